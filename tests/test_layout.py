"""The package layout: no module imports a higher layer (lazy imports inside functions
count too), and the public API is explicit."""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
import textwrap

import pytest

import resnext_flax

PACKAGE = pathlib.Path(resnext_flax.__file__).parent

# Lowest first; a module may import modules of its own layer or lower ones.
LAYERS = {
    "resnext_flax.errors": 0,
    "resnext_flax.nn": 0,
    "resnext_flax.models": 1,
    "resnext_flax.metadata": 1,
    "resnext_flax.weights": 2,
    "resnext_flax.compilation": 2,
    "resnext_flax.outputs": 2,
    "resnext_flax.preprocess": 3,
    "resnext_flax.augment": 3,
    "resnext_flax.autoaugment": 3,
    "resnext_flax.run_log": 3,
    "resnext_flax.schedules": 3,
    "resnext_flax.datasets": 3,
    "resnext_flax.sampling": 3,
    "resnext_flax.inference": 4,
    "resnext_flax.training": 4,
    "resnext_flax.pipeline": 4,
    "resnext_flax.optim": 4,
    "resnext_flax.mixing": 4,
    "resnext_flax.ema": 4,
    "resnext_flax.parallel": 5,
    "resnext_flax.distributed": 5,
    "resnext_flax.builders": 6,
    "resnext_flax.evaluation": 7,
    "resnext_flax.finetuning": 7,
    "resnext_flax.finetune_progress": 7,
    "resnext_flax.recipes": 7,
    "resnext_flax.export": 7,
    "resnext_flax.cli": 8,
    "resnext_flax": 9,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import module` imports the module only
                full = f"{node.module}.{alias.name}"
                found.add(full if _is_module(full) else node.module)
    return {name for name in found if name.split(".")[0] == "resnext_flax"}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_module_imports_a_higher_layer(path: pathlib.Path):
    module = _module_name(path)
    own = _layer(module)
    upward = sorted(name for name in _imports(path) if _is_module(name) and _layer(name) > own)
    assert not upward, f"{module} (layer {own}) imports higher layers: {upward}"


def _is_module(name: str) -> bool:
    """Whether an imported dotted name is a module of the package (not a name in one)."""
    relative = pathlib.Path(*name.split(".")[1:])
    return name == "resnext_flax" or (PACKAGE / relative).is_dir() or (
        PACKAGE / relative).with_suffix(".py").is_file()


DATA_MODULES = ("preprocess", "augment", "autoaugment", "datasets", "pipeline")


@pytest.mark.parametrize("name", DATA_MODULES)
def test_the_data_side_does_not_import_weights(name: str):
    """Preprocessing and label tables live in ``metadata``: the data side needs no weights."""
    found = _imports(PACKAGE / f"{name}.py")
    assert not [m for m in found if m.startswith("resnext_flax.weights")], found


def test_every_module_is_in_a_layer():
    for path in MODULES:
        _layer(_module_name(path))


def test_public_api_is_explicit():
    """Everything in __all__ is really defined (no generated globals), with a docstring."""
    for name in resnext_flax.__all__:
        value = getattr(resnext_flax, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert value.__doc__, f"{name} has no docstring"
    source = (PACKAGE / "__init__.py").read_text()
    assert "globals()" not in source


# What a user types in the README; the rest lives in the subpackages.
NARROW_SURFACE = {
    "create_model", "list_models", "resnet18", "resnet34", "resnet50", "resnet101",
    "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "resnext101_32x16d",
    "resnext101_32x32d", "resnext101_32x48d", "wide_resnet50_2", "wide_resnet101_2", "ResNet",
    "from_pretrained", "list_weight_sets", "load_model",
    "inspect_checkpoint", "read_state_dict", "load_torch_state_dict", "to_torch_state_dict",
    "load_checkpoint", "save_checkpoint", "optimize_for_inference", "ConvPolicy", "Predictor",
    "FeatureExtractor", "ResnextFlaxError", "enable_compilation_cache",
}


def test_public_surface_is_narrow():
    assert set(resnext_flax.__all__) == NARROW_SURFACE
    assert set(resnext_flax.__all__) <= set(dir(resnext_flax))
    with pytest.raises(AttributeError, match="no attribute 'compare_state_dict'"):
        _ = resnext_flax.compare_state_dict


def test_importing_the_package_imports_no_optional_dependency():
    """``import resnext_flax`` (and building a model) loads neither the training, data and
    evaluation modules nor what they need (Grain, Orbax, tqdm) nor torch. optax counts only
    where the library itself brings it in: ``flax.nnx`` imports it on its own."""
    code = textwrap.dedent("""
        import sys
        import jax
        from flax import nnx
        before = set(sys.modules)
        import resnext_flax
        resnext_flax.create_model("resnet18", num_classes=3)
        heavy = ("optax", "grain", "orbax", "torch", "torchvision", "tqdm",
                 "resnext_flax.training", "resnext_flax.evaluation", "resnext_flax.finetuning",
                 "resnext_flax.parallel", "resnext_flax.pipeline", "resnext_flax.datasets",
                 "resnext_flax.cli")
        added = set(sys.modules) - before
        print(sorted(m for m in added if m in heavy or m.split(".")[0] in heavy
                     or any(m.startswith(h + ".") for h in heavy)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


def test_importing_the_package_imports_no_jax():
    """The top level and the compilation-cache switch are lazy: nothing of JAX is loaded
    until a name that computes is used."""
    code = ("import sys, resnext_flax; resnext_flax.compilation; "
            "print(sorted(m for m in ('jax', 'flax', 'numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


# Runs one command in a fresh interpreter; prints its status, which heavy packages it imported
# and whether JAX started a backend (which costs the device discovery, threads and memory).
_COMMAND = textwrap.dedent("""
    import contextlib, io, json, sys
    from resnext_flax import cli
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(json.loads(sys.argv[1]))
        except SystemExit as exit:
            status = exit.code
    heavy = ("numpy", "jax", "flax", "torch", "optax", "orbax", "grain", "tqdm")
    bridge = sys.modules.get("jax._src.xla_bridge")
    print(json.dumps([status, sorted(h for h in heavy if h in sys.modules),
                      bool(bridge and bridge._backends)]))
""")


def _command(argv: list[str]) -> list:
    import json
    import os

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _COMMAND, json.dumps(argv)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "--model", "resnet50"],
                                  ["predict", "--help"], ["inspect", "--help"]])
def test_help_and_list_import_neither_numpy_nor_jax_nor_torch(argv):
    assert _command(argv) == [0, [], False]


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """A torchvision-named resnet18 state dict as .safetensors and (with torch) .pth."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("files")
    state = {k: np.ascontiguousarray(v) for k, v in
             resnext_flax.to_torch_state_dict(resnext_flax.resnet18()).items()}
    save_file(state, folder / "r18.safetensors")
    try:
        import torch
    except ImportError:
        return folder, False
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / "r18.pth")
    return folder, True


def test_inspecting_a_safetensors_file_imports_no_torch_and_starts_no_backend(resnet18_files):
    """The expected shapes come from the model's abstract evaluation (``nnx.eval_shape``: JAX
    and Flax are imported), but reading and resolving the file runs nothing on a device."""
    status, imported, backend = _command(["inspect", str(resnet18_files[0] / "r18.safetensors")])
    assert status == 0 and not backend
    assert not {"torch", "tqdm", "orbax", "grain"} & set(imported), imported


def test_inspecting_a_pth_file_imports_torch_and_starts_no_backend(resnet18_files):
    folder, have_torch = resnet18_files
    if not have_torch:
        # A .pth needs torch to be read at all; the [test] extra installs it, so CI runs this.
        pytest.skip("torch is not installed")
    status, imported, backend = _command(["inspect", str(folder / "r18.pth")])
    assert status == 0 and not backend and "torch" in imported
    assert not {"orbax", "grain"} & set(imported), imported
