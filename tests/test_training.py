"""Training-mode semantics against PyTorch: BatchNorm running statistics, torch's SGD
(coupled weight decay before momentum), label smoothing, a frozen backbone, and a few SGD
steps of whole models against torchvision in train mode."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch_reference import (
    flax_model_from_torch,
    randomize_batchnorm,
    relative_error,
    to_nchw,
    torch_model,
)

import resnext_flax
from resnext_flax import training
from resnext_flax.layers import BatchNorm


def test_batchnorm_running_statistics_match_torch_after_k_steps():
    """torch momentum 0.1 and the unbiased batch variance, k train-mode steps in a row."""
    rng = np.random.default_rng(0)
    channels = 5
    torch_bn = torch.nn.BatchNorm2d(channels).train()
    randomize_batchnorm(torch.nn.Sequential(torch_bn), seed=1)
    bn = BatchNorm(channels)
    for name, torch_name in [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                             ("var", "running_var")]:
        getattr(bn, name).set_value(jnp.asarray(getattr(torch_bn, torch_name).detach().numpy()))
    for _ in range(4):
        # Offset and scaled so mean and variance both matter; 2*3*3 = 18 samples per channel
        # make the unbiased factor 18/17 visible.
        x = (rng.standard_normal((2, 3, 3, channels)) * 2.0 + 0.5).astype(np.float32)
        out = np.asarray(bn(jnp.asarray(x)))
        expected = torch_bn(to_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
        assert relative_error(out, expected) < 1e-6
    assert relative_error(bn.mean.get_value(), torch_bn.running_mean.numpy()) < 1e-6
    assert relative_error(bn.var.get_value(), torch_bn.running_var.numpy()) < 1e-6


def test_sgd_matches_torch_sgd_coupled_weight_decay_before_momentum():
    """optax chain == torch.optim.SGD(momentum, weight_decay): wd * param joins the gradient
    before the momentum buffer (a decoupled or post-momentum decay fails this)."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(7).astype(np.float32)
    grads = [rng.standard_normal(7).astype(np.float32) for _ in range(5)]
    torch_p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD([torch_p], lr=0.1, momentum=0.9, weight_decay=0.05)
    tx = training.sgd(0.1, momentum=0.9, weight_decay=0.05, decay_bn_and_bias=True)
    params = {"kernel": jnp.asarray(p0)}
    opt_state = tx.init(params)
    for g in grads:
        torch_p.grad = torch.from_numpy(g.copy())
        opt.step()
        updates, opt_state = tx.update({"kernel": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["kernel"], torch_p.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_decay_mask_excludes_batchnorm_and_biases():
    model = resnext_flax.create_model("resnet18", num_classes=10)
    state = training.create_train_state(model, training.sgd(0.1, weight_decay=1e-4))
    mask = training.decay_mask(state.params)
    assert mask["conv1"]["kernel"] and mask["fc"]["kernel"]
    assert mask["layer1"][0]["conv2"]["kernel"]
    assert not mask["bn1"]["scale"] and not mask["bn1"]["bias"] and not mask["fc"]["bias"]
    assert not mask["layer4"][0]["downsample"][1]["scale"]


def test_label_smoothing_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=0.1
    ).item()
    got = float(training.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                       label_smoothing=0.1))
    assert abs(got - expected) < 1e-6


def test_frozen_backbone_trains_only_the_head():
    model = resnext_flax.create_model("resnet18", num_classes=10)
    tx = training.sgd(0.1, weight_decay=1e-4)
    state = training.create_train_state(model, tx, freeze_backbone=True)
    assert set(state.trainable()) == {"fc"}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    new, metrics = training.train_step(state, x, y)
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           new.params, state.params)
    assert changed["fc"]["kernel"] and changed["fc"]["bias"]
    del changed["fc"]
    assert not any(jax.tree.leaves(changed)), "a backbone parameter moved"
    # The backbone runs with its running statistics: they stay fixed.
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                            new.batch_stats, state.batch_stats)))
    assert int(new.step) == 1


# ---------------------------------------------------------------------------------------------
# Whole models: 3 SGD steps (momentum 0.9, weight decay 1e-4 on everything, as torch does),
# torch in model.train(), same batches, cross-entropy, float32.
#
# A randomly initialized ResNet trained in train mode on 4 images of 64x64 is a chaotic system:
# its gradients are huge (conv1's gradient norm is ~40 for resnet18 and ~1400 for
# resnext50_32x4d), so float32 rounding grows fast from step to step. Measured (torch float32
# vs torch float64, i.e. the float32 floor itself) it reaches 12% of the parameters after 3
# steps for resnext50_32x4d at lr 1e-4. The learning rates below are chosen so that the
# float32 floor stays well below the bound; see docs/training.md for the measurements.
PARITY = {  # resnext50_32x4d: see test_resnext_sgd_steps_within_the_float32_floor
    # name: (learning rate, bound on losses, parameters and running statistics)
    "resnet18": (1e-3, 1e-4),
}


def _torch_steps(model: torch.nn.Module, batches, lr: float) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(to_nchw(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(PARITY))
def test_sgd_steps_match_torch_train_mode(name: str):
    lr, bound = PARITY[name]
    reference = torch_model(name, num_classes=10, seed=0)
    # No copy of the state dict needed: load_torch_state_dict copies, so torch's in-place
    # optimizer steps below cannot reach the JAX arrays.
    model = flax_model_from_torch(name, reference)
    reference.train()
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((4, 64, 64, 3)).astype(np.float32),
                rng.integers(0, 10, 4)) for _ in range(3)]
    expected_losses = _torch_steps(reference, batches, lr)

    tx = training.sgd(lr, momentum=0.9, weight_decay=1e-4, decay_bn_and_bias=True)
    state = training.create_train_state(model, tx)
    losses = []
    for x, y in batches:
        state, metrics = training.train_step(state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(losses, expected_losses, rtol=bound)
    got = resnext_flax.to_torch_state_dict(state.model())
    expected = reference.state_dict()
    errors = {key: relative_error(value, expected[key].numpy()) for key, value in got.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < bound, f"{worst}: relative error {errors[worst]:.2e}"
    # The running statistics really moved (train mode), by far more than the bound.
    before = torch_model(name, num_classes=10, seed=0).state_dict()
    assert relative_error(before["bn1.running_mean"].numpy(),
                          expected["bn1.running_mean"].numpy()) > 100 * bound


def test_bfloat16_logits_close_to_float32():
    """Mixed precision: bfloat16 compute, float32 parameters and BatchNorm statistics.

    Measured (random torchvision weights and BN statistics, random inputs, eval mode): logits
    relative error 4.8e-3 (resnet18, 16x64x64), 4.2e-3 (resnet18, 8x128x128), 3.6e-3
    (resnext50_32x4d), 6.9e-3 (resnet50), top-1 agreement 100% in all 40 images. bfloat16's
    unit roundoff is 2**-8 = 3.9e-3, so ~1-2 roundoffs at the output; the bound 2e-2 is
    ~4x the worst measurement. The lower bound proves bfloat16 was really used.
    """
    reference = torch_model("resnet18", seed=0)
    logits = {}
    for dtype in (None, jnp.bfloat16):
        model = flax_model_from_torch("resnet18", reference, dtype=dtype)
        state = training.create_train_state(model, training.sgd(0.1))
        images = np.random.default_rng(0).standard_normal((16, 64, 64, 3)).astype(np.float32)
        out = training.predict(state, jnp.asarray(images))
        logits[dtype] = np.asarray(out.astype(jnp.float32))
        assert out.dtype == (dtype or jnp.float32)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    error = relative_error(logits[jnp.bfloat16], logits[None])
    assert 1e-4 < error < 2e-2
    agree = np.mean(logits[jnp.bfloat16].argmax(-1) == logits[None].argmax(-1))
    assert agree >= 15 / 16


def test_bfloat16_train_step_keeps_float32_state():
    model = resnext_flax.create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
    state = training.create_train_state(model, training.sgd(0.05, weight_decay=1e-4))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3])
    new, metrics = training.train_step(state, x, y)
    assert np.isfinite(float(metrics["loss"]))
    for tree in (new.params, new.batch_stats, new.opt_state):
        assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
def test_resnext_sgd_steps_within_the_float32_floor():
    """resnext50_32x4d, 3 steps at lr 1e-5: compared with torch in float64 (the exact
    trajectory), this library in float32 must stay as close as torch in float32 does.

    At random init this model's gradients are ~1400 (conv1), so float32 rounding grows ~70x
    per step: torch float32 itself is 1e-4 (parameters) / 1e-5 (statistics) off the float64
    trajectory after one step and 6.5e-3 / 3.2e-2 after three; measured for this library:
    9.5e-5 / 1.1e-5 and 6.6e-3 / 3.2e-2 (docs/training.md). A fixed 1e-4 bound would test
    the chaos, not the code; the float32 floor is the honest yardstick, and the tight step-1
    bounds still catch a wrong momentum, weight decay or variance estimator.
    """
    name, lr = "resnext50_32x4d", 1e-5
    reference = torch_model(name, num_classes=10, seed=0)
    model = flax_model_from_torch(name, reference)
    reference.train()
    reference64 = copy.deepcopy(reference).double()
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((4, 64, 64, 3)).astype(np.float32),
                rng.integers(0, 10, 4)) for _ in range(3)]
    state = training.create_train_state(
        model, training.sgd(lr, momentum=0.9, weight_decay=1e-4, decay_bn_and_bias=True))
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
                  for m in (reference, reference64)]

    def errors(got: dict, expected: dict) -> tuple[float, float]:
        e = {k: relative_error(v, expected[k].double().numpy()) for k, v in got.items()}
        return (max(v for k, v in e.items() if "running" not in k),
                max(v for k, v in e.items() if "running" in k))

    for step, (x, y) in enumerate(batches, 1):
        losses = []
        for m, opt in zip((reference, reference64), optimizers, strict=True):
            opt.zero_grad()
            inputs = to_nchw(x).to(next(m.parameters()).dtype)
            loss = torch.nn.functional.cross_entropy(m(inputs), torch.from_numpy(y))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state, metrics = training.train_step(state, jnp.asarray(x), jnp.asarray(y))
        exact = reference64.state_dict()
        ours = errors(resnext_flax.to_torch_state_dict(state.model()), exact)
        floor = errors({k: v.numpy() for k, v in reference.state_dict().items()
                        if "num_batches" not in k}, exact)
        loss_error = abs(float(metrics["loss"]) - losses[1]) / losses[1]
        loss_floor = abs(losses[0] - losses[1]) / losses[1]
        assert loss_error <= 2 * loss_floor + 1e-6, (step, loss_error, loss_floor)
        for kind, ours_e, floor_e in zip(("parameters", "statistics"), ours, floor,
                                         strict=True):
            assert ours_e <= 2 * floor_e + 1e-6, (step, kind, ours_e, floor_e)
        if step == 1:
            assert ours[0] < 3e-4 and ours[1] < 5e-5, ours
