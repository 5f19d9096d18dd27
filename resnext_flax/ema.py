"""An exponential moving average of the weights, as torchvision's reference trains with.

The reference's ``ExponentialMovingAverage`` is ``torch.optim.swa_utils.AveragedModel`` with
``avg = decay * avg + (1 - decay) * param`` over the parameters *and* the BatchNorm running
statistics (``use_buffers=True``); its first update copies the model (``n_averaged == 0``).
The training loop updates it after the optimizer step of every batch whose index within the
epoch is a multiple of ``--model-ema-steps``, and during the ``--lr-warmup-epochs`` resets
``n_averaged`` to 0 after each update, so the average keeps copying the model until the
warm-up is over. The decay is adjusted to the run's length (:func:`adjusted_decay`).

Everything here is a pure function of pytrees, for use inside a jitted train step; the EMA
is evaluated by swapping its weights into a train state (:func:`ema_train_state`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from resnext_flax.training import Params, TrainState


def adjusted_decay(decay: float, *, world_size: int, batch_size: int, steps: int,
                   epochs: int) -> float:
    """The reference's decay for ``--model-ema-decay`` on a run of `epochs` with
    `batch_size` images per process on `world_size` processes, an update every `steps`:
    ``alpha = min(1, (1 - decay) * world_size * batch_size * steps / epochs)``, decay
    ``1 - alpha`` (keeps the average's horizon independent of those settings)."""
    for name, value in (("world_size", world_size), ("batch_size", batch_size),
                        ("steps", steps), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    _check_decay(decay)
    adjust = world_size * batch_size * steps / epochs
    alpha = 1.0 - decay
    alpha = min(1.0, alpha * adjust)
    return 1.0 - alpha


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """`decay` (already adjusted, see :func:`adjusted_decay`); an update every `steps`
    batches of an epoch; the average follows the model during `warmup_epochs`."""

    decay: float
    steps: int = 32
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        _check_decay(self.decay)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) \
                or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got "
                             f"{self.warmup_epochs!r}")


@struct.dataclass
class EmaState:
    """The averaged parameters and BatchNorm statistics, and how many updates they hold."""

    params: Params
    batch_stats: Params
    n_averaged: jax.Array


def init_ema(params: Params, batch_stats: Params) -> EmaState:
    """A fresh average (``AveragedModel(model)``): a copy that the first update overwrites."""
    copy = jax.tree.map(jnp.array, (params, batch_stats))
    return EmaState(params=copy[0], batch_stats=copy[1], n_averaged=jnp.zeros((), jnp.int32))


def update_ema(ema: EmaState, params: Params, batch_stats: Params, decay: float) -> EmaState:
    """``AveragedModel.update_parameters``: copy on the first update, then
    ``decay * avg + (1 - decay) * value`` for parameters and statistics alike."""
    first = ema.n_averaged == 0

    def average(avg: jax.Array, value: jax.Array) -> jax.Array:
        return jnp.where(first, value, decay * avg + (1 - decay) * value).astype(avg.dtype)

    return EmaState(params=jax.tree.map(average, ema.params, params),
                    batch_stats=jax.tree.map(average, ema.batch_stats, batch_stats),
                    n_averaged=ema.n_averaged + 1)


def ema_step(config: EmaConfig, ema: EmaState, params: Params, batch_stats: Params, *,
             step_in_epoch: int | jax.Array, epoch: int | jax.Array) -> EmaState:
    """The reference loop's rule, after the optimizer step of batch `step_in_epoch` (0 for
    an epoch's first batch) of `epoch` (from 0): update when the batch index is a multiple
    of ``config.steps``, and during the warm-up epochs restart the count (follow the model).
    Both may be traced integers."""
    updated = update_ema(ema, params, batch_stats, config.decay)
    in_warmup = jnp.asarray(epoch) < config.warmup_epochs
    updated = updated.replace(n_averaged=jnp.where(in_warmup, 0, updated.n_averaged))
    due = jnp.asarray(step_in_epoch) % config.steps == 0
    return jax.tree.map(lambda new, old: jnp.where(due, new, old), updated, ema)


def ema_train_state(state: TrainState, ema: EmaState) -> TrainState:
    """`state` with the average's weights, to evaluate or export the EMA model."""
    return state.replace(params=ema.params, batch_stats=ema.batch_stats)


def _check_decay(decay: float) -> None:
    if isinstance(decay, bool) or not isinstance(decay, int | float) or \
            not math.isfinite(decay) or not 0 <= decay <= 1:
        raise ValueError(f"decay must be a finite number in [0, 1], got {decay!r}")
