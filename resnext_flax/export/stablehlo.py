"""StableHLO export: the BatchNorm-folded inference function serialized by ``jax.export``,
packed with its weights and record in one file.

The program is the folded model under ``XLA_POLICY`` (XLA's own convolutions, no custom call
of the library's compiled CPU kernel), so it runs wherever JAX runs, without this library.
The file is an uncompressed zip that ``numpy.load`` reads:

    import jax, numpy as np
    with np.load("model.stablehlo") as artifact:
        exported = jax.export.deserialize(artifact["program.stablehlo"])
        weights = {k: artifact[k] for k in artifact.files if k.startswith("weights/")}
    logits = exported.call(weights, images)  # float32 NHWC, normalized

The weights are the program's first argument, not constants inside it: a program holding
hundreds of megabytes of constants takes XLA many times longer to compile for each new input
shape, needs several copies of them in memory, and cannot be serialized at all past
``jax.export``'s 2 GiB flatbuffer limit. The batch dimension is symbolic, and so are height
and width unless a fixed size is asked for. Convolutions and matmuls are traced at 'highest'
precision: an accelerator then computes float32 (no TF32), as the CPU does.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax.errors import ExportError
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.models.functional import CompiledModel, apply
from resnext_flax.models.resnet import ResNet
from resnext_flax.nn.layers import with_conv_policy
from resnext_flax.nn.policy import XLA_POLICY

#: The platforms ``jax.export`` lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
#: The symbolic input dimensions (the same names as the ONNX graph's).
SYMBOLIC_DIMS = ("batch", "height", "width")
#: The members of the artifact's zip: the serialized program, the record, and one ``.npy``
#: per weight under ``weights/`` (the program's first argument is the dict of those names).
PROGRAM_MEMBER = "program.stablehlo"
RECORD_MEMBER = "record.json"
WEIGHTS_PREFIX = "weights/"


def portable_module(model: ResNet | CompiledModel) -> nnx.Module:
    """`model` with its BatchNorms folded and every conv on XLA's own lowering: a module whose
    program holds no custom call (`model` is not changed)."""
    if isinstance(model, CompiledModel):
        return with_conv_policy(model.module(), XLA_POLICY)
    return optimize_for_inference(model, policy=XLA_POLICY).module()


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """`platforms` as a tuple of distinct known names; ExportError otherwise."""
    if isinstance(platforms, str):
        platforms = (platforms,)
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if not platforms or unknown or len(set(platforms)) != len(platforms):
        raise ExportError(f"platforms must be distinct names among {', '.join(PLATFORMS)}, "
                          f"got {list(platforms)}")
    return platforms


def input_shape(size: tuple[int, int] | None) -> tuple[int | str, ...]:
    """The input shape: symbolic batch, and height and width symbolic (`size` None) or
    fixed."""
    batch, height, width = SYMBOLIC_DIMS
    return (batch, height, width, 3) if size is None else (batch, *size, 3)


def _weight_name(path: tuple[Any, ...]) -> str:
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return WEIGHTS_PREFIX + name.removesuffix(".value")


def export_stablehlo(model: ResNet | CompiledModel, *, platforms: Sequence[str] = ("cpu",
                                                                                    "cuda"),
                     size: tuple[int, int] | None = None
                     ) -> tuple[jax.export.Exported, dict[str, np.ndarray]]:
    """The folded forward pass of `model` (logits, or features for a headless model) as a
    ``jax.export.Exported`` for `platforms`, called as ``exported.call(weights, images)``
    with images float32 NHWC of :func:`input_shape`, and its `weights` (name -> array, the
    names the artifact's zip gives them)."""
    module = portable_module(model)
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [_weight_name(path) for path, _ in leaves]
    weights = {name: np.asarray(leaf) for name, (_, leaf) in zip(names, leaves, strict=True)}
    del state, leaves

    def forward(weights: dict[str, jax.Array], images: jax.Array) -> jax.Array:
        state = jax.tree_util.tree_unflatten(treedef, [weights[n] for n in names])
        return apply(graphdef, state, images)

    spec = ", ".join(str(d) for d in input_shape(size))
    images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), jnp.float32)
    weight_specs = {n: jax.ShapeDtypeStruct(w.shape, w.dtype) for n, w in weights.items()}
    with jax.default_matmul_precision("highest"):
        exported = jax.export.export(jax.jit(forward), platforms=check_platforms(platforms))(
            weight_specs, images)
    return exported, weights


def write_stablehlo(path: str | os.PathLike, program: bytes | bytearray,
                    weights: Mapping[str, np.ndarray], record: Mapping[str, Any]) -> None:
    """The artifact's zip at `path` (the caller makes it atomic): stored, since float weights
    barely compress and a reader then copies them without inflating; ZIP64, so models past
    4 GiB fit."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr(PROGRAM_MEMBER, bytes(program))
        archive.writestr(RECORD_MEMBER, json.dumps(record, indent=1) + "\n")
        for name, array in weights.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array),
                                          allow_pickle=False)


def read_stablehlo(path: str | os.PathLike
                   ) -> tuple[jax.export.Exported, dict[str, np.ndarray], dict[str, Any]]:
    """The program, weights and record of an artifact written by :func:`write_stablehlo`, as
    a deployment reads them (``numpy.load``, no pickles); ExportError naming the file where it
    is not one, or its weights are not the program's."""
    from resnext_flax.export.metadata import FORMAT_VERSION

    where = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{where!r} is not a resnext-flax StableHLO artifact (a zip)")
    try:
        with np.load(path, allow_pickle=False) as artifact:
            missing = {PROGRAM_MEMBER, RECORD_MEMBER} - set(artifact.files)
            if missing:
                raise ExportError(f"{where!r} is not a resnext-flax StableHLO artifact: it "
                                  f"has no {', '.join(sorted(missing))}")
            record = json.loads(artifact[RECORD_MEMBER])
            if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
                found = record.get("format_version") if isinstance(record, dict) else None
                raise ExportError(f"{where!r}: record format {found!r}, expected "
                                  f"{FORMAT_VERSION!r}")
            exported = jax.export.deserialize(bytearray(artifact[PROGRAM_MEMBER]))
            weights = {k: artifact[k] for k in artifact.files if k.startswith(WEIGHTS_PREFIX)}
    except ExportError:
        raise
    except Exception as err:  # a damaged member fails in numpy, json or the flatbuffer reader
        raise ExportError(f"cannot read the StableHLO artifact {where!r}: "
                          f"{type(err).__name__}: {err}") from err
    expected = _argument_names(exported)
    if expected is not None and set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ExportError(f"{where!r}: the weights are not the program's (missing "
                          f"{missing[:3]}, unexpected {extra[:3]})")
    return exported, weights, record


def _argument_names(exported: jax.export.Exported) -> set[str] | None:
    """The weight names the program's first argument takes (None where it takes no dict)."""
    (args, _kwargs) = jax.tree_util.tree_unflatten(exported.in_tree, [0] * exported.in_tree
                                                   .num_leaves)
    return set(args[0]) if args and isinstance(args[0], dict) else None


def custom_call_targets(exported: jax.export.Exported) -> set[str]:
    """The custom-call targets the exported program names (JAX's own shape checks
    included)."""
    return set(re.findall(r"custom_call @([\w.]+)", exported.mlir_module()))


def run_stablehlo(exported: jax.export.Exported, weights: Mapping[str, Any], images: Any,
                  device: Any = None) -> np.ndarray:
    """The program run on `images` on `device` (default: the first CPU), as a deployment runs
    it (place `weights` on the device once with ``jax.device_put`` for several calls)."""
    device = device or jax.devices("cpu")[0]
    weights = jax.device_put(dict(weights), device)
    images = jax.device_put(np.asarray(images, np.float32), device)
    return np.asarray(exported.call(weights, images))
