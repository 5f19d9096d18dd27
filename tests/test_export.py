"""Export (``resnext_flax.export``, ``resnext-flax export``): the artifact holds no custom call
of the library's kernel, loads in a process where only JAX can be imported, carries its record,
and is verified before it is written; bad requests fail before anything is written. Every
variant against the model and torchvision: tests/test_export_variants.py.

Weights are random torchvision weights with randomized BatchNorm statistics, written as a
``.pth`` file and loaded through the library as a user's file would be; images are 33x33, the
smallest size at which the last stage's maps are 2x2 (every tap of its 3x3 convs meets a real
pixel).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from limits import CHILD_TIMEOUT
from torch_reference import random_images, torch_model

import resnext_flax
from resnext_flax import cli
from resnext_flax.errors import ExportError, OutputPathError
from resnext_flax.export import export, metadata_props, relative_error
from resnext_flax.export.stablehlo import (
    custom_call_targets,
    export_stablehlo,
    read_stablehlo,
    run_stablehlo,
)
from resnext_flax.nn.lowering import kernel

SIZE = (33, 33)
# The parity tests' bound against torchvision (tests/test_parity.py): 1e-5, or 10x torch
# float32's own error against torch float64 on the same input where that floor is larger.
RTOL = 1e-5
FLOOR_MULTIPLE = 10.0
# The library's forward pass against the artifact: the same model, other conv lowerings.
MODEL_TOLERANCE = 1e-5

HAS_ONNX = importlib.util.find_spec("resnext_flax.export.onnx_graph") is not None


def _torch_file(name: str, folder, *, num_classes: int = 10) -> tuple[torch.nn.Module, str]:
    reference = torch_model(name, seed=len(name), num_classes=num_classes)
    path = os.path.join(folder, f"{name}.pth")
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A 10-class ResNet-18 as a torchvision file, and the library's model of it."""
    folder = tmp_path_factory.mktemp("r18")
    reference, pth = _torch_file("resnet18", folder)
    return reference, pth, resnext_flax.load_model(pth)


def test_export_verifies_and_writes_the_record_inside_the_artifact(resnet18, tmp_path):
    _, pth, _ = resnet18
    output = tmp_path / "r18.stablehlo"
    report = export(pth, output, probe_batch=2, probe_size=SIZE[0])
    assert sorted(report.relative_errors) == [1, 2, 3]
    assert all(0 <= e <= MODEL_TOLERANCE for e in report.relative_errors.values())
    assert report.size == output.stat().st_size and os.listdir(tmp_path) == ["r18.stablehlo"]
    _, weights, record = read_stablehlo(output)
    assert record == report.record
    assert weights["weights/fc.kernel"].shape == (512, 10)
    convs_and_fc = [k for k in torch.load(pth) if k.endswith("weight") and ".bn" not in k
                    and "downsample.1" not in k and not k.startswith("bn1")]
    assert sorted(k for k in weights if k.endswith(".kernel")) == sorted(
        "weights/" + k.removesuffix(".weight")
        + ".kernel" for k in convs_and_fc)  # one folded kernel per conv, no BatchNorm left
    assert record["format_version"] == "resnext-flax-export/1"
    assert record["format"] == "stablehlo"
    assert record["model"] == "resnet18" and record["num_classes"] == 10
    assert record["source"] == "resnet18.pth" and record["platforms"] == ["cpu", "cuda"]
    assert record["input"]["shape"] == ["batch", "height", "width", 3]
    assert record["input"]["layout"] == "NHWC" and record["output"]["shape"] == ["batch", 10]
    assert record["jax"]["version"] == jax.__version__
    assert "relative error batch 1:" in str(report)


@pytest.fixture
def resnet18_with_cfg():
    """A 3-class ResNet-18 that knows its class names and its 32-pixel crop."""
    from resnext_flax.metadata import Preprocessing, PretrainedCfg

    model = resnext_flax.resnet18(num_classes=3)
    model.eval()
    model.pretrained_cfg = PretrainedCfg("resnet18", model.spec, 3, class_names=("a", "b", "c"),
                                         preprocessing=Preprocessing(resize_size=40,
                                                                     crop_size=32))
    return model


def test_the_record_carries_the_weights_class_names_and_preprocessing(resnet18_with_cfg,
                                                                       tmp_path):
    """A model that knows its classes and transform hands them to the artifact's record; a
    fixed size is the weights' crop size."""
    model = resnet18_with_cfg
    report = export(model, tmp_path / "m.stablehlo", fixed_size="crop", probe_batch=1)
    exported, weights, record = read_stablehlo(tmp_path / "m.stablehlo")
    assert record["class_names"] == ["a", "b", "c"]
    assert record["preprocessing"]["crop_size"] == 32
    assert record["input"]["shape"] == ["batch", 32, 32, 3] == list(report.input_signature[
        "shape"])
    with pytest.raises(Exception, match="shape"):
        run_stablehlo(exported, weights, random_images(1, 40, 40))


def test_the_artifact_runs_where_only_jax_can_be_imported(resnet18, tmp_path):
    """docs/deploy.md's loading lines, in a child that cannot import the library, Flax, optax
    or torch."""
    _, pth, model = resnet18
    output = tmp_path / "r18.stablehlo"
    export(pth, output, verify=False)
    images = random_images(2, 45, 37, seed=3)
    np.save(tmp_path / "images.npy", images)
    code = textwrap.dedent("""
        import sys

        BLOCKED = {"resnext_flax", "flax", "optax", "torch", "torchvision"}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked")

        sys.meta_path.insert(0, Blocker())
        import json

        import jax
        import numpy as np

        images = np.load(sys.argv[2])
        with np.load(sys.argv[1]) as artifact:
            program = jax.export.deserialize(artifact["program.stablehlo"])
            weights = {k: artifact[k] for k in artifact.files if k.startswith("weights/")}
            record = json.loads(artifact["record.json"])
        assert record["model"] == "resnet18", record
        weights = jax.device_put(weights)
        logits = program.call(weights, images)
        np.save(sys.argv[3], np.asarray(logits))
        print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code, str(output), str(tmp_path / "images.npy"),
         str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=CHILD_TIMEOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    expected = np.asarray(model(images))
    assert relative_error(np.load(tmp_path / "logits.npy"), expected) <= MODEL_TOLERANCE


def test_the_kernel_check_can_fail():
    """The same model under the automatic policy lowers to the kernel's custom calls (where
    the kernel loaded): what the portable program must not contain is really looked for."""
    if not kernel.available():
        pytest.skip("the compiled CPU kernel is not loaded here")
    model = resnext_flax.resnet18(num_classes=3)
    model.eval()
    graphdef, state = nnx.split(resnext_flax.optimize_for_inference(model).module())
    text = jax.jit(lambda x: nnx.merge(graphdef, state)(x)).lower(
        jax.ShapeDtypeStruct((1, 56, 56, 3), np.float32)).as_text()
    assert any(target in text for target in kernel.TARGETS)
    portable, _ = export_stablehlo(model, platforms=("cpu",))
    assert not custom_call_targets(portable) & set(kernel.TARGETS)


def test_a_failed_verification_writes_nothing(resnet18, tmp_path, monkeypatch):
    from resnext_flax.export import verify

    _, pth, _ = resnet18
    real = verify.reference
    monkeypatch.setattr(verify, "reference", lambda m, x: real(m, x) * 1.01)
    output = tmp_path / "r18.stablehlo"
    with pytest.raises(ExportError, match=r"relative error .* tolerance 1e-05; nothing written"):
        export(pth, output, probe_batch=1, probe_size=SIZE[0])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"dtype": "float16"}, ExportError, "float32 programs only, not float16"),
    ({"format": "tflite"}, ExportError, "unknown export format 'tflite'"),
    ({"format": "onnx"}, ExportError, "names the stablehlo format, not onnx"),
    ({"platforms": ("cpu", "metal")}, ExportError, "platforms must be distinct names"),
    ({"onnx_layout": "NCHW"}, ExportError, "StableHLO artifact takes NHWC"),
    ({"probe_batch": 0}, ValueError, "probe_batch must be a positive int"),
    ({"probe_size": 32}, ValueError, r"probe_size must be an int from 33 \(where every conv"),
    ({"probe_size": 64, "fixed_size": 64}, ValueError, "probed at its own size"),
    ({"fixed_size": (0, 224)}, ValueError, "fixed_size must be None, 'crop', or a size"),
    ({"num_classes": 7}, ExportError, "another head would be untrained"),
    ({"tolerance": float("nan")}, ValueError, "tolerance must be a positive finite"),
])
def test_bad_requests_fail_before_any_work(kwargs, error, match, tmp_path):
    with pytest.raises(error, match=match):
        export("no-such-model", tmp_path / "m.stablehlo", **kwargs)
    assert os.listdir(tmp_path) == []


def test_a_model_in_bfloat16_is_refused(tmp_path):
    model = resnext_flax.resnet18(num_classes=3, dtype=jax.numpy.bfloat16)
    with pytest.raises(ExportError, match="float32 programs only; this model computes or stores "
                                          "bfloat16"):
        export(model, tmp_path / "m.stablehlo")
    assert os.listdir(tmp_path) == []


def test_an_output_suffix_that_names_no_format_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"cannot tell the format from .*m\.bin.* "
                                          r"format=stablehlo\|onnx"):
        export("resnet18", tmp_path / "m.bin")


def test_the_output_may_not_be_an_input(resnet18, tmp_path):
    _, pth, _ = resnet18
    with pytest.raises(OutputPathError, match="is the input file"):
        export(pth, pth, format="stablehlo")
    linked = tmp_path / "w.onnx"
    os.link(pth, linked)
    with pytest.raises(OutputPathError, match="is the input file"):
        export(pth, linked)
    assert os.listdir(tmp_path) == ["w.onnx"]


def test_a_missing_onnx_package_names_the_extra(resnet18, tmp_path, monkeypatch):
    _, pth, _ = resnet18
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"onnxruntime, not installed: pip install "
                                          r"'resnext-flax\[onnx\]'"):
        export(pth, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not HAS_ONNX, reason="resnext_flax.export.onnx_graph is not in this tree")
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_onnx_export_is_verified_and_carries_the_record(resnet18, tmp_path, layout):
    import onnx

    _, pth, _ = resnet18
    output = tmp_path / "r18.onnx"
    report = export(pth, output, onnx_layout=layout, probe_batch=2, probe_size=SIZE[0])
    assert sorted(report.relative_errors) == [1, 2, 3] and report.platforms == ()
    assert all(e <= MODEL_TOLERANCE for e in report.relative_errors.values())
    props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert props["format"] == "onnx" and props["model"] == "resnet18"
    assert json.loads(props["input"])["layout"] == layout
    assert json.loads(props["input"])["shape"][0] == "batch"
    assert json.loads(props["class_names"]) is None and props == metadata_props(report.record)


@pytest.mark.skipif(not HAS_ONNX, reason="resnext_flax.export.onnx_graph is not in this tree")
def test_a_fixed_size_onnx_export_takes_the_crop_size(resnet18_with_cfg, tmp_path):
    import onnx

    report = export(resnet18_with_cfg, tmp_path / "m.onnx", fixed_size="crop",
                    onnx_layout="NCHW", probe_batch=1)
    (images,) = onnx.load(str(tmp_path / "m.onnx")).graph.input
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == [
        "batch", 3, 32, 32] == report.input_signature["shape"]
    assert sorted(report.relative_errors) == [1, 3]


def test_the_command_writes_a_verified_artifact(resnet18, tmp_path, capsys):
    _, pth, _ = resnet18
    output = tmp_path / "r18.stablehlo"
    status = cli.main(["export", pth, "--output", str(output), "--probe-size", "33",
                       "--platforms", "cpu", "--no-progress"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert f"wrote {output} (stablehlo," in out.out and "platforms: cpu\n" in out.out
    assert "relative error batch 1:" in out.out
    assert read_stablehlo(output)[2]["platforms"] == ["cpu"]


def test_the_command_checks_its_outputs_before_importing_jax(resnet18, tmp_path):
    _, pth, _ = resnet18
    code = ("import sys\nfrom resnext_flax import cli\nstatus = cli.main(sys.argv[1:])\n"
            "assert 'jax' not in sys.modules, 'imported JAX'\nsys.exit(status)")
    for output, message in [([pth, "--format", "stablehlo"], "is the input file"),
                            ([str(tmp_path / "m.bin")], "--format stablehlo|onnx"),
                            ([str(tmp_path / "missing" / "m.onnx")], "folder")]:
        result = subprocess.run([sys.executable, "-c", code, "export", pth, "--output", *output],
                                capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        assert result.returncode == 1, result.stderr
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_the_command_help_says_every_default():
    parser = cli.parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    export_parser = sub.choices["export"]
    text = " ".join(export_parser.format_help().split())
    for action in export_parser._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert f"(default: {action.default})" in text, action.option_strings


@pytest.mark.parametrize(("source", "error", "match"), [
    ("resnet19", "UnknownModelError", "neither a file nor a model name"),
    ("weights/r18.pth", "WeightFileNotFoundError", "no file or folder 'weights/r18.pth'"),
])
def test_a_source_that_is_neither_a_file_nor_a_model_is_named(source, error, match, tmp_path):
    from resnext_flax import errors

    with pytest.raises(getattr(errors, error), match=match):
        export(source, tmp_path / "m.stablehlo")


def test_an_optimized_model_exports_without_its_kernel_calls(resnet18, tmp_path):
    """``optimize_for_inference``'s result (whose convs may run the compiled kernel) exports
    on XLA's own convs, and matches the model it was made from."""
    _, _, model = resnet18
    output = tmp_path / "opt.stablehlo"
    report = export(resnext_flax.optimize_for_inference(model), output, platforms=("cpu",),
                    probe_batch=1, probe_size=SIZE[0])
    assert all(e <= MODEL_TOLERANCE for e in report.relative_errors.values())
    exported, weights, _ = read_stablehlo(output)
    assert not custom_call_targets(exported) & set(kernel.TARGETS)
    images = random_images(2, *SIZE, seed=4)
    assert relative_error(run_stablehlo(exported, weights, images), model(images)
                          ) <= MODEL_TOLERANCE


@pytest.mark.skipif(not HAS_ONNX, reason="resnext_flax.export.onnx_graph is not in this tree")
def test_a_checkpoint_with_classes_exports_them_from_the_command(tmp_path, capsys):
    """A saved checkpoint (as ``finetune`` writes one) carries its class names and
    preprocessing into both formats' records."""
    import onnx

    from resnext_flax.metadata import Preprocessing

    model = resnext_flax.resnet18(num_classes=3)
    model.eval()
    checkpoint = tmp_path / "best.safetensors"
    resnext_flax.save_checkpoint(model, checkpoint, classes=["cat", "dog", "owl"],
                                 preprocessing=Preprocessing(resize_size=40, crop_size=32))
    for output in (tmp_path / "m.onnx", tmp_path / "m.stablehlo"):
        status = cli.main(["export", str(checkpoint), "--output", str(output), "--probe-size",
                           "33", "--probe-batch", "1", "--no-progress"])
        assert status == 0, capsys.readouterr().err
        if output.suffix == ".onnx":
            props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
            record = {k: json.loads(v) if k in ("class_names", "preprocessing") else v
                      for k, v in props.items()}
        else:
            record = read_stablehlo(output)[2]
        assert record["class_names"] == ["cat", "dog", "owl"], output
        assert record["preprocessing"]["crop_size"] == 32 and record["source"] == checkpoint.name


def test_options_of_the_other_format_are_refused(tmp_path):
    with pytest.raises(ExportError, match="platforms apply to StableHLO"):
        export("resnet18", tmp_path / "m.onnx", platforms=("cpu",))
    status = subprocess.run(
        [sys.executable, "-m", "resnext_flax", "export", "resnet18", "--output",
         str(tmp_path / "m.onnx"), "--platforms", "tpu"], capture_output=True, text=True,
        timeout=CHILD_TIMEOUT)
    assert status.returncode == 1 and "platforms apply to StableHLO" in status.stderr
    assert os.listdir(tmp_path) == []


def test_a_crop_size_the_weights_do_not_record_is_asked_for(tmp_path):
    model = resnext_flax.resnet18(num_classes=3)
    with pytest.raises(ExportError, match=r"record no crop size; name the size: "
                                          r"fixed_size=224"):
        export(model, tmp_path / "m.stablehlo", fixed_size="crop")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["empty", "text", "foreign program", "weight missing",
                                    "other record"])
def test_reading_a_damaged_artifact_names_the_file(resnet18_with_cfg, tmp_path, damage):
    import zipfile

    from resnext_flax.export.stablehlo import write_stablehlo

    good = tmp_path / "good.stablehlo"
    export(resnet18_with_cfg, good, platforms=("cpu",), verify=False)
    bad = tmp_path / "bad.stablehlo"
    if damage in ("empty", "text"):
        bad.write_text("" if damage == "empty" else "not a zip")
    else:
        exported, weights, record = read_stablehlo(good)
        program = exported.serialize()
        if damage == "foreign program":
            program = b"\x07" * 64
        elif damage == "weight missing":
            del weights["weights/fc.bias"]
        else:
            record["format_version"] = "someone-else/3"
        write_stablehlo(bad, program, weights, record)
        assert zipfile.is_zipfile(bad)
    expected = {"empty": "is not a resnext-flax StableHLO artifact",
                "text": "is not a resnext-flax StableHLO artifact",
                "foreign program": "cannot read the StableHLO artifact",
                "weight missing": r"the weights are not the program's \(missing "
                                  r"\['weights/fc.bias'\]",
                "other record": "record format 'someone-else/3', expected"}[damage]
    with pytest.raises(ExportError, match=expected) as info:
        read_stablehlo(bad)
    assert "bad.stablehlo" in str(info.value)


def test_a_model_name_is_the_model_beside_a_folder_of_that_name(resnet18, tmp_path,
                                                                   monkeypatch):
    """A run folder named after its model does not hide the model name; the record names
    the weight file the model was loaded with."""
    _, pth, _ = resnet18
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    report = export("resnet18", "m.stablehlo", weights=pth, platforms=("cpu",),
                    probe_batch=1, probe_size=SIZE[0])
    assert report.record["model"] == "resnet18"
    assert report.record["source"] == os.path.basename(pth)


def test_the_cached_weight_set_a_name_loads_is_an_input(tmp_path):
    from resnext_flax.weights.cache import cached_checkpoint_path
    from resnext_flax.weights.catalog import get_weight_set

    cached = cached_checkpoint_path(get_weight_set("resnet18", "DEFAULT"), tmp_path)
    cached.write_bytes(b"stands for the converted weights")
    with pytest.raises(OutputPathError, match="is the input file"):
        export("resnet18", cached, format="onnx", cache_dir=tmp_path)
    assert cached.read_bytes() == b"stands for the converted weights"
