"""ONNX export (``resnext_flax.export.onnx_graph``): the graph's nodes, shapes and metadata, how
ONNX Runtime optimizes it, bad options and missing packages, and the benchmark script.
Every variant's graph against the model and torchvision: tests/test_export_variants.py.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from limits import CHILD_TIMEOUT
from test_export_variants import MAX_RELATIVE, max_relative_error
from torch_reference import (
    flax_model_from_torch,
    random_images,
    torch_model,
)

import resnext_flax
from resnext_flax.export.onnx_graph import run_onnx, to_onnx
from resnext_flax.models.folding import is_folded

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="needs the onnx extra: pip install 'resnext-flax[onnx]'")


@pytest.fixture(scope="module")
def resnext50() -> resnext_flax.ResNet:
    return flax_model_from_torch("resnext50_32x4d", torch_model("resnext50_32x4d", seed=5))


def test_an_optimized_model_exports_the_same_graph(resnext50):
    """``optimize_for_inference``'s result (fused blocks, prepared kernels) exports the same
    weights as the model it came from; the model itself stays unfolded."""
    optimized = resnext_flax.optimize_for_inference(resnext50)
    assert to_onnx(optimized) == to_onnx(resnext50)
    assert not is_folded(resnext50)


def _node_signatures(model_bytes: bytes) -> collections.Counter:
    import onnx

    return collections.Counter(
        (n.op_type, tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a)))
                                 for a in n.attribute)))
        for n in onnx.load_from_string(model_bytes).graph.node)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter
def test_the_nchw_graph_has_the_nodes_of_torchs_export(resnext50):
    """Node for node (operator and attributes, in any order) what ``torch.onnx.export`` writes
    for torchvision's model, which folds BatchNorm too: ONNX Runtime optimizes both alike."""
    buffer = io.BytesIO()
    torch.onnx.export(torch_model("resnext50_32x4d", seed=5), (torch.zeros(1, 3, 32, 32),),
                      buffer, dynamo=False, opset_version=17)
    assert _node_signatures(to_onnx(resnext50, layout="NCHW")) == _node_signatures(
        buffer.getvalue())


def _optimized_ops(model_bytes: bytes, folder: pathlib.Path, name: str) -> collections.Counter:
    """The graph as ONNX Runtime's optimizer leaves it (all levels), counted by operator."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / f"{name}.onnx")
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(f"{n.domain}:{n.op_type}" for n in graph.node)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter
def test_the_graph_optimizes_as_torchs_export(resnext50, tmp_path):
    """ONNX Runtime's optimizer turns our graph, with symbolic or fixed height and width, into
    the operators it makes of torch's file (every residual Add and ReLU fused into a conv):
    the shapes recorded for every tensor let it match both inputs of each Add."""
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(torch_model("resnext50_32x4d", seed=5), (torch.zeros(1, 3, 64, 64),),
                      buffer, dynamo=False, opset_version=17)
    torchs = _optimized_ops(buffer.getvalue(), tmp_path, "torch")
    assert torchs[":Add"] == torchs[":Relu"] == 0
    for size in (None, (64, 64)):
        assert _optimized_ops(to_onnx(resnext50, layout="NCHW", size=size), tmp_path,
                              f"ours{size}") == torchs, size
    unannotated = onnx.load_from_string(to_onnx(resnext50, layout="NCHW"))
    del unannotated.graph.value_info[:]
    assert _optimized_ops(unannotated.SerializeToString(), tmp_path, "bare")[":Add"] > 0


def test_the_graph_holds_standard_ops_symbolic_dims_and_metadata(resnext50):
    import onnx

    proto = onnx.load_from_string(to_onnx(resnext50, metadata={"classes": "a,b", "x": "1"}))
    assert {n.op_type for n in proto.graph.node} == {
        "Transpose", "Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (images,), (logits,) = proto.graph.input, proto.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == [
        "batch", "height", "width", 3]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == [
        "batch", 1000]
    grouped = {a.i for n in proto.graph.node for a in n.attribute if a.name == "group"}
    assert grouped == {1, 32}
    assert {p.key: p.value for p in proto.metadata_props} == {"classes": "a,b", "x": "1"}


def test_a_headless_model_exports_its_features():
    model = flax_model_from_torch("resnet18", torch_model("resnet18", seed=7))
    model.reset_classifier(0)
    images = random_images(2, 40, 48, seed=4)
    exported = to_onnx(model)
    actual = run_onnx(exported, images)
    expected = np.asarray(model(images))
    assert actual.shape == expected.shape == (2, 512)
    assert max_relative_error(actual, expected) <= MAX_RELATIVE
    import onnx

    assert onnx.load_from_string(exported).graph.output[0].name == "features"


@pytest.mark.parametrize("package, call", [
    ("onnx", lambda: to_onnx(None)),
    ("onnxruntime", lambda: run_onnx(b"", np.zeros((1, 8, 8, 3), np.float32))),
])
def test_a_missing_dependency_names_the_extra(monkeypatch, package, call):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ImportError, match=r"pip install 'resnext-flax\[onnx\]'"):
        call()


@pytest.fixture(scope="module")
def abstract_resnet18() -> resnext_flax.ResNet:
    return nnx.eval_shape(lambda: resnext_flax.create_model("resnet18", num_classes=3))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layout": "NCWH"}, ValueError, "layout must be one of"),
    ({"opset": 13}, ValueError, "opset must be an int from 17"),
    ({"opset": 10_000}, ValueError, "opset must be an int from 17"),
    ({"metadata": {"epochs": 3}}, TypeError, "str keys to str values"),
    ({"size": (224,)}, ValueError, "two positive ints"),
    ({"size": (0, 224)}, ValueError, "two positive ints"),
])
def test_bad_export_options_are_refused(abstract_resnet18, kwargs, error, match):
    with pytest.raises(error, match=match):
        to_onnx(abstract_resnet18, **kwargs)


def test_weights_past_one_files_limit_are_refused_before_any_graph(monkeypatch):
    from resnext_flax.export import onnx_graph

    model = resnext_flax.resnet18(num_classes=3)
    to_onnx(model)  # fits under the real limit
    monkeypatch.setattr(onnx_graph, "MAX_ONNX_WEIGHT_BYTES", 2**20)
    with pytest.raises(ValueError, match=r"folded weights are 0\.04 GiB; one ONNX file holds at "
                                         r"most 0\.00 GiB .* export it to StableHLO instead"):
        to_onnx(model)


def test_only_float32_models_and_resnets_export():
    bf16 = nnx.eval_shape(lambda: resnext_flax.create_model("resnet18", dtype=jnp.bfloat16))
    with pytest.raises(ValueError, match=r"float32 graphs.*bfloat16.*dtype=None"):
        to_onnx(bf16)
    with pytest.raises(TypeError, match="takes a resnext_flax ResNet"):
        to_onnx({"conv1": np.zeros(3)})


def test_run_onnx_refuses_images_that_do_not_fit(resnext50):
    exported = to_onnx(resnext50)
    for images, match in [(np.zeros((1, 32, 32, 3), np.int32), "floating-point"),
                          (np.zeros((32, 32, 3), np.float32), "4-D"),
                          (np.zeros((1, 3, 32, 32), np.float32), "check the layout")]:
        with pytest.raises(ValueError, match=match):
            run_onnx(exported, images)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        run_onnx(exported, np.zeros((1, 32, 32, 3), np.float32), threads=0)


def test_the_benchmark_smallest_run_writes_its_json(tmp_path):
    """``benchmarks/onnx_runtime.py`` at its smallest: every side runs, agrees with torch and
    is timed; the optimized graphs of our export and torch's have the same operators; the
    summary has both ratios and every side's GFLOP/s, and the README's table is made from it."""
    out = tmp_path / "onnx.json"
    root = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "onnx_runtime.py"), "--models", "resnet18",
         "--batch-sizes", "2", "--size", "33", "--repeats", "1", "--warmup", "1", "--opt-levels",
         "all", "--threads", "1", "--peak-gflops", "100",
         "--optimized-graphs", str(tmp_path / "graphs"), "--json", str(out)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert set(case["results"]) == {"ort_ours:all", "ort_ours_nhwc:all", "ort_ours_fixed:all",
                                    "ort_ours_pinned:all", "ort_torch:all", "jax_folded",
                                    "torch_nchw", "torch_channels_last"}
    for side in case["results"].values():
        assert side["rel_err_vs_torch"] <= 1e-5 and side["median_s"] > 0
    graphs = case["optimized_op_counts"]["all"]
    assert graphs["ours"] == graphs["torch"]

    summary, results = case["summary"], case["results"]
    assert summary["torch_eager_best"] in ("torch_nchw", "torch_channels_last")
    assert summary["ort_best"] == "ort_torch:all"
    library = results["jax_folded"]["images_per_s"]
    for label in ("torch_eager", "ort"):
        best = results[summary[f"{label}_best"]]["images_per_s"]
        assert best == max(results[k]["images_per_s"] for k in results
                           if k.startswith("torch_" if label == "torch_eager" else "ort_torch"))
        assert summary[f"library_vs_{label}"] == pytest.approx(library / best)
    # resnet18 at 33x33: 2 FLOPs per multiply-add of its 20 convs and the classifier
    assert summary["flops"] == 2 * 2 * (3 * 49 * 64 * 17**2 + 9 * 64 * 64 * 4 * 9**2
                                        + 9 * 64 * 128 * 5**2 + 9 * 128 * 128 * 3 * 5**2
                                        + 64 * 128 * 5**2 + 9 * 128 * 256 * 3**2
                                        + 9 * 256 * 256 * 3 * 3**2 + 128 * 256 * 3**2
                                        + 9 * 256 * 512 * 2**2 + 9 * 512 * 512 * 3 * 2**2
                                        + 256 * 512 * 2**2 + 512 * 1000)
    for key, r in results.items():
        assert summary["gflops"][key] == pytest.approx(summary["flops"] / r["median_s"] / 1e9)
        assert summary["peak_fraction"][key] == pytest.approx(summary["gflops"][key] / 100)

    table = subprocess.run([sys.executable, str(root / "scripts" / "readme_table.py"), str(out)],
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert table.returncode == 0, table.stderr
    assert "| model | batch | library img/s | vs PyTorch eager | vs ONNX Runtime | of FMA " \
        "peak |" in table.stdout
    assert (f"| resnet18 | 2 | {library:.1f} | {summary['library_vs_torch_eager']:.2f} | "
            f"{summary['library_vs_ort']:.2f} | {summary['peak_fraction']['jax_folded']:.0%} |"
            in table.stdout)


def test_the_benchmark_rejects_unknown_sides_and_models():
    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "onnx_runtime.py"
    for flag, value, message in [("--sides", "jax_folded,torch_eagr", "--sides: unknown"),
                                 ("--models", "resnet18,resnt50", "--models: unknown")]:
        result = subprocess.run([sys.executable, str(script), flag, value],
                                capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        assert result.returncode == 2 and message in result.stderr
        assert value.split(",")[1] in result.stderr
