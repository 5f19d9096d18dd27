"""Every variant exported both ways computes what the model and torchvision compute: the
StableHLO program (through its serialization, for cpu and cuda, with no custom call of the
library's kernel) and the ONNX graph in ONNX Runtime (NHWC and NCHW), at batch sizes 1 and 3
from one artifact.

One case per variant builds the torchvision model once (random weights, randomized BatchNorm
statistics), ports it, exports and runs both formats, and keeps only the results: the largest
variants' models and artifacts never outlive their case. Images are 33x41: odd at the stem, the
pool and two stages, where a padding or rounding difference would show, and large enough that
every tap of every conv meets real pixels.
"""

from __future__ import annotations

import copy
import importlib.util

import jax
import numpy as np
import pytest
import torch
from test_parity import FLOOR_MULTIPLE, RTOL
from torch_reference import (
    WSL_WIDTHS,
    flax_model_from_torch,
    random_images,
    relative_error,
    shrunk,
    to_nchw,
    torch_model,
)

import resnext_flax
from resnext_flax.export.stablehlo import custom_call_targets, export_stablehlo, run_stablehlo
from resnext_flax.models.folding import fold_batchnorm
from resnext_flax.nn.lowering import kernel

HAS_ONNX = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX,
                                reason="needs the onnx extra: pip install 'resnext-flax[onnx]'")

SIZE = (33, 41)
BATCHES = (1, 3)
LAYOUTS = ("NHWC", "NCHW")
# Against the model it was exported from (max|a - b| / max|b|, float32): the bound.
MAX_RELATIVE = 1e-5


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _torch_logits(reference: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, float]:
    """torchvision's logits on `images`, and test_parity's bound for a comparison with them
    (1e-5, or 10x torch float32's own error against float64 where that is larger)."""
    x = to_nchw(images)
    with torch.no_grad():
        expected = reference(x).numpy()
        exact = copy.deepcopy(reference).double()(x.double()).numpy()
    return expected, max(RTOL, FLOOR_MULTIPLE * relative_error(expected, exact))


class Case:
    """One variant's results: torchvision's logits and bound, the model's logits, and what the
    StableHLO program and each ONNX layout computed, per batch size."""

    def __init__(self, name: str):
        self.name = name
        self.images = random_images(max(BATCHES), *SIZE, seed=3)
        reference = torch_model(name, seed=len(name))
        self.torch_logits, self.torch_bound = _torch_logits(reference, self.images)
        model = flax_model_from_torch(name, reference)
        del reference
        self.num_classes = model.num_classes
        # One call: a row of the model's output does not depend on the batch beside it, and
        # every compile of the largest variants costs seconds.
        logits = np.asarray(model(self.images))
        self.logits = {n: logits[:n] for n in BATCHES}
        model = fold_batchnorm(model)  # once for both formats (each also takes it folded)
        self.stablehlo, self.custom_calls = self._run_stablehlo(model)
        self.onnx = self._run_onnx(model) if HAS_ONNX else {}

    def _run_stablehlo(self, model) -> tuple[dict[int, np.ndarray], set[str]]:
        exported, weights = export_stablehlo(model, platforms=("cpu", "cuda"))
        loaded = jax.export.deserialize(exported.serialize())
        weights = jax.device_put(weights, jax.devices("cpu")[0])
        outputs = {n: run_stablehlo(loaded, weights, self.images[:n]) for n in BATCHES}
        return outputs, custom_call_targets(loaded)

    def _run_onnx(self, model) -> dict[tuple[str, int], np.ndarray]:
        from resnext_flax.export.onnx_graph import onnx_session, run_onnx, to_onnx

        outputs = {}
        for layout in LAYOUTS:
            graph = onnx_session(to_onnx(model, layout=layout), threads=1)
            for n in BATCHES:
                images = self.images[:n]
                if layout == "NCHW":
                    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
                outputs[layout, n] = run_onnx(graph, images, threads=1)
        return outputs


# The WSL ResNeXts export through the same code as resnext101_32x8d: the smallest of them,
# shrunk, stands for the three.
@pytest.fixture(scope="module", params=[
    *(n for n in resnext_flax.list_models() if n not in WSL_WIDTHS), shrunk("resnext101_32x16d")])
def case(request) -> Case:
    return Case(request.param)


def test_stablehlo_matches_the_model_and_torchvision(case: Case):
    assert not case.custom_calls & set(kernel.TARGETS)
    for batch, actual in case.stablehlo.items():
        assert actual.shape == (batch, case.num_classes)
        err = max_relative_error(actual, case.logits[batch])
        assert err <= MAX_RELATIVE, f"batch {batch}: relative error {err:.2e} vs the model"
        err = relative_error(actual, case.torch_logits[:batch])
        assert err <= case.torch_bound, f"batch {batch}: {err:.2e} > {case.torch_bound:.1e}"
        np.testing.assert_array_equal(actual.argmax(-1), case.torch_logits[:batch].argmax(-1))


@needs_onnx
@pytest.mark.parametrize("layout", LAYOUTS)
def test_onnx_matches_the_model_at_batch_1_and_3(case: Case, layout: str):
    for batch in BATCHES:
        actual, expected = case.onnx[layout, batch], case.logits[batch]
        assert actual.shape == expected.shape == (batch, case.num_classes)
        err = max_relative_error(actual, expected)
        assert err <= MAX_RELATIVE, f"{layout} batch {batch}: relative error {err:.2e}"


@needs_onnx
def test_onnx_matches_torchvision(case: Case):
    """The NCHW graph against torchvision's own model, under test_parity's bound."""
    actual = case.onnx["NCHW", max(BATCHES)]
    err = relative_error(actual, case.torch_logits)
    assert err <= case.torch_bound, f"relative error {err:.2e} > {case.torch_bound:.1e}"
    np.testing.assert_array_equal(actual.argmax(-1), case.torch_logits.argmax(-1))
