"""Eval-mode parity with torchvision, variant by variant and stage by stage.

Reference models have random weights and randomized BatchNorm statistics and affine parameters.
Every forward pass here is one jit of a pure function over the split model state, run on the
CPU and, where JAX sees one, on a GPU/TPU (matmul precision 'highest', torch TF32 off).
"""

from __future__ import annotations

import copy
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from torch_reference import (
    flax_model_from_torch,
    random_images,
    real_weight_cases,
    relative_error,
    to_nchw,
    torch_stages,
)
from torch_reference import torch_model as make_torch_model

import resnext_flax
from resnext_flax.models.resnet import FEATURE_NAMES

ODD_SIZE = (97, 131)
FULL_SIZE = (224, 224)
FULL_SIZE_MODELS = ("resnet18", "resnet50", "resnext50_32x4d")
# float32 parity of a whole ResNet in eval mode is ~1e-6 relative: one forward pass, no
# feedback, so it stays near the float32 floor (torch float32 vs torch float64, measured in
# every test below: 4e-7 to 8e-7 for the logits at the odd size, on AVX2 and AVX-512 CPUs
# alike; ours vs torch float64 0.9-1.4x that). The bound is 1e-5, or 10x the floor where a
# machine's floor is larger; a real bug gives ~1e-1 (a swapped statistic).
RTOL = 1e-5
FLOOR_MULTIPLE = 10.0


def _accelerator() -> jax.Device | None:
    return next((d for d in jax.devices() if d.platform != "cpu"), None)


BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("accelerator", id="accelerator", marks=[
        pytest.mark.accelerator,
        pytest.mark.skipif(_accelerator() is None, reason="JAX sees no GPU/TPU"),
    ]),
]


class Pair:
    """A torchvision model and the ported Flax model, with cached outputs per input."""

    def __init__(self, name: str):
        self.name = name
        self.torch = make_torch_model(name, seed=len(name))
        self.flax = flax_model_from_torch(name, self.torch)
        graphdef, state = nnx.split(self.flax)
        self._state = state

        def forward(state, images):
            model = nnx.merge(graphdef, state)
            features = model.forward_features(images)
            return {**features, "logits": model.forward_head(features["pre_logits"])}

        self._forward = jax.jit(forward)

    @functools.cache  # noqa: B019 - one Pair per module-scoped fixture
    def flax_outputs(self, backend: str, batch: int, size: tuple[int, int]) -> dict:
        device = jax.devices("cpu")[0] if backend == "cpu" else _accelerator()
        images = jax.device_put(random_images(batch, *size, seed=batch), device)
        state = jax.device_put(self._state, device)
        outputs = self._forward(state, images)
        assert all(o.devices() == {device} for o in outputs.values())
        return {k: np.asarray(v) for k, v in outputs.items()}

    @functools.cache  # noqa: B019
    def torch_outputs(self, batch: int, size: tuple[int, int]) -> dict:
        return torch_stages(self.torch, to_nchw(random_images(batch, *size, seed=batch)))

    @functools.cache  # noqa: B019
    def bounds(self, batch: int, size: tuple[int, int]) -> dict[str, float]:
        """Per output, the bound: RTOL or FLOOR_MULTIPLE x torch float32's own error against
        torch float64 on the same input, whichever is larger."""
        exact = torch_stages(copy.deepcopy(self.torch).double(),
                             to_nchw(random_images(batch, *size, seed=batch)).double())
        return {k: max(RTOL, FLOOR_MULTIPLE * relative_error(v, exact[k]))
                for k, v in self.torch_outputs(batch, size).items()}


@pytest.fixture(scope="module", params=real_weight_cases())
def pair(request) -> Pair:
    return Pair(request.param)


def _assert_logits_match(actual: np.ndarray, expected: np.ndarray, bound: float) -> None:
    assert actual.shape == expected.shape
    err = relative_error(actual, expected)
    assert err <= bound, f"logits relative error {err:.2e} > {bound:.1e}"
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_logits_match_torchvision_at_odd_size(pair: Pair, backend: str, batch: int):
    actual = pair.flax_outputs(backend, batch, ODD_SIZE)["logits"]
    _assert_logits_match(actual, pair.torch_outputs(batch, ODD_SIZE)["logits"],
                         pair.bounds(batch, ODD_SIZE)["logits"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_stage_matches_torchvision(pair: Pair, backend: str):
    actual = pair.flax_outputs(backend, 2, ODD_SIZE)
    expected = pair.torch_outputs(2, ODD_SIZE)
    bounds = pair.bounds(2, ODD_SIZE)
    for name in FEATURE_NAMES:
        assert actual[name].shape == expected[name].shape, name
        err = relative_error(actual[name], expected[name])
        assert err <= bounds[name], f"{name}: relative error {err:.2e} > {bounds[name]:.1e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FULL_SIZE_MODELS)
def test_logits_match_torchvision_at_224(name: str, backend: str):
    pair = Pair(name)
    actual = pair.flax_outputs(backend, 2, FULL_SIZE)["logits"]
    _assert_logits_match(actual, pair.torch_outputs(2, FULL_SIZE)["logits"],
                         pair.bounds(2, FULL_SIZE)["logits"])


def test_parity_check_can_fail():
    """The comparison above must notice a single swapped BN statistic."""
    pair = Pair("resnet18")
    sd = pair.torch.state_dict()
    broken = dict(sd)
    broken["layer2.0.bn1.running_mean"] = sd["layer2.0.bn1.running_var"]
    model = flax_model_from_torch("resnet18", pair.torch)
    resnext_flax.load_torch_state_dict(model, broken)
    images = random_images(2, *ODD_SIZE, seed=2)
    actual = np.asarray(jax.jit(lambda x: model(x))(images))
    with pytest.raises(AssertionError):
        _assert_logits_match(actual, pair.torch_outputs(2, ODD_SIZE)["logits"],
                             pair.bounds(2, ODD_SIZE)["logits"])
