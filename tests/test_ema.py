"""The EMA against torchvision's reference: ``ExponentialMovingAverage`` (an
``AveragedModel`` over parameters and buffers, written out in classification_reference.py),
driven by the reference training loop's rule (an update every ``model_ema_steps`` batches of an
epoch, the count reset during the warm-up epochs) on a tiny torch model that really trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from classification_reference import ExponentialMovingAverage

import resnext_flax
from resnext_flax import ema, training


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _split(model: torch.nn.Module) -> tuple[dict, dict]:
    """Parameters and the BatchNorm statistics (num_batches_tracked has no counterpart)."""
    params = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    stats = {k: v.detach().numpy().copy() for k, v in model.named_buffers()
             if "num_batches" not in k}
    return params, stats


@pytest.mark.parametrize("steps, warmup_epochs", [(1, 0), (2, 1), (3, 2)])
def test_ema_follows_the_reference_loop(steps: int, warmup_epochs: int):
    """4 epochs of 5 batches: the average of parameters and running statistics equals the
    reference's after every batch (float32: the same arithmetic, so to rounding)."""
    decay = 0.9
    model = _tiny().train()
    reference = ExponentialMovingAverage(model, decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    config = ema.EmaConfig(decay=decay, steps=steps, warmup_epochs=warmup_epochs)
    state = ema.init_ema(*_split(model))
    update = jax.jit(ema.ema_step, static_argnums=0)
    rng = np.random.default_rng(0)
    updates = 0
    for epoch in range(4):
        for i in range(5):
            x = torch.from_numpy(rng.standard_normal((4, 3, 6, 6)).astype(np.float32) + 1)
            y = torch.from_numpy(rng.integers(0, 3, 4))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            # The reference's train_one_epoch:
            if i % steps == 0:
                reference.update_parameters(model)
                updates += 1
                if epoch < warmup_epochs:
                    reference.n_averaged.fill_(0)
            state = update(config, state, *_split(model), step_in_epoch=i, epoch=epoch)
            assert int(state.n_averaged) == int(reference.n_averaged)
            expected_params, expected_stats = _split(reference.module)
            for ours, theirs in [(state.params, expected_params),
                                 (state.batch_stats, expected_stats)]:
                assert ours.keys() == theirs.keys()
                for name in theirs:
                    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7,
                                               err_msg=f"{name}, epoch {epoch}, batch {i}")
    assert updates == 4 * len(range(0, 5, steps))
    # The average lags the model (after the warm-up): it is not a copy.
    final = _split(model)[1]["1.running_mean"]
    assert not np.allclose(state.batch_stats["1.running_mean"], final, rtol=1e-3)


def test_the_first_update_copies_and_later_ones_average():
    params = {"w": jnp.array([1.0, 2.0])}
    stats = {"mean": jnp.array([0.5])}
    state = ema.init_ema(params, stats)
    state = ema.update_ema(state, {"w": jnp.array([3.0, 4.0])}, {"mean": jnp.array([1.5])}, 0.75)
    np.testing.assert_array_equal(state.params["w"], [3.0, 4.0])
    state = ema.update_ema(state, {"w": jnp.array([7.0, 8.0])}, {"mean": jnp.array([5.5])}, 0.75)
    np.testing.assert_allclose(state.params["w"], [4.0, 5.0])
    np.testing.assert_allclose(state.batch_stats["mean"], [2.5])
    assert int(state.n_averaged) == 2


@pytest.mark.parametrize("decay, world, batch, steps, epochs", [
    (0.99998, 8, 128, 32, 600),   # torchvision's ResNet-50 V2 recipe
    (0.99998, 1, 64, 32, 10),
    (0.9, 8, 128, 32, 1),         # alpha capped at 1: the average is the model
    (0.99, 2, 3, 5, 7),
])
def test_adjusted_decay_is_the_references(decay, world, batch, steps, epochs):
    adjust = world * batch * steps / epochs  # the reference's train.py, literally
    alpha = 1.0 - decay
    alpha = min(1.0, alpha * adjust)
    assert ema.adjusted_decay(decay, world_size=world, batch_size=batch, steps=steps,
                              epochs=epochs) == 1.0 - alpha


def test_the_ema_state_evaluates_as_a_train_state():
    model = resnext_flax.create_model("resnet18", num_classes=3)
    state = training.create_train_state(model, training.sgd(0.1))
    @jax.jit
    def average_of_shifted_and_current(params, stats):
        average = ema.init_ema(params, stats)
        shifted = jax.tree.map(lambda v: v + 1, (params, stats))
        return ema.update_ema(ema.update_ema(average, *shifted, 0.5), params, stats, 0.5)

    average = average_of_shifted_and_current(state.params, state.batch_stats)
    swapped = ema.ema_train_state(state, average)
    np.testing.assert_allclose(swapped.batch_stats["bn1"]["mean"],
                               state.batch_stats["bn1"]["mean"] + 0.5)
    np.testing.assert_allclose(swapped.params["fc"]["bias"], state.params["fc"]["bias"] + 0.5)
    assert swapped.model().fc.bias.get_value().shape == (3,)


@pytest.mark.parametrize("call, message", [
    (lambda: ema.EmaConfig(decay=1.5), "decay must be a finite number in"),
    (lambda: ema.EmaConfig(decay=float("nan")), "decay must be"),
    (lambda: ema.EmaConfig(decay=0.9, steps=0), "steps must be an integer >= 1"),
    (lambda: ema.EmaConfig(decay=0.9, warmup_epochs=-1), "warmup_epochs must be an integer"),
    (lambda: ema.adjusted_decay(0.9, world_size=0, batch_size=1, steps=1, epochs=1),
     "world_size must be an integer >= 1"),
])
def test_bad_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
