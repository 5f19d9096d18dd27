"""Learning-rate schedules: a warm-up then a cosine decay, stepped per optimizer step or, as
torchvision's classification reference steps them, once per epoch.

torchvision's reference chains ``LinearLR(start_factor=lr_warmup_decay,
total_iters=lr_warmup_epochs)`` (or ``ConstantLR(factor=lr_warmup_decay, ...)``) and
``CosineAnnealingLR(T_max=epochs - lr_warmup_epochs, eta_min=lr_min)`` in a ``SequentialLR``,
and calls ``step()`` after each epoch: every step of epoch ``e`` sees the rate of epoch ``e``.
The closed forms here equal those schedulers' rates (tested against torch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import optax

WarmupMethod = Literal["linear", "constant"]
StepUnit = Literal["step", "epoch"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A warm-up then a cosine decay from `lr` to `lr_min`.

    - `warmup_epochs`: length of the warm-up (fractions allowed when `unit` is ``"step"``).
    - `warmup_method`: ``"linear"`` rises from ``lr * warmup_decay`` towards `lr`;
      ``"constant"`` holds ``lr * warmup_decay`` (torchvision's ``--lr-warmup-method``).
    - `warmup_decay`: torchvision's ``--lr-warmup-decay`` (its default is 0.01).
    - `unit`: ``"epoch"`` changes the rate once per epoch, as torchvision's reference does;
      ``"step"`` changes it every optimizer step.
    """

    lr: float
    epochs: int
    warmup_epochs: float = 0.0
    warmup_method: WarmupMethod = "linear"
    warmup_decay: float = 0.0
    lr_min: float = 0.0
    unit: StepUnit = "step"

    def __post_init__(self) -> None:
        if self.warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method must be 'linear' or 'constant', got "
                             f"{self.warmup_method!r}")
        if self.unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {self.unit!r}")
        if not 0 <= self.warmup_decay <= 1:
            raise ValueError(f"warmup_decay must be from 0 to 1, got {self.warmup_decay}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be from 0 to epochs ({self.epochs}), got "
                             f"{self.warmup_epochs}")
        if self.unit == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise ValueError("a schedule stepped per epoch needs a whole number of warm-up "
                             f"epochs, got {self.warmup_epochs}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be from 0 to lr ({self.lr}), got {self.lr_min}")

    def rate(self, epoch: float) -> float:
        """The rate at `epoch` (a float: whole numbers when stepped per epoch), in Python
        floats; the reference for :meth:`optax`."""
        if self.unit == "epoch":
            epoch = math.floor(epoch)
        warmup = self.warmup_epochs
        if epoch < warmup:
            if self.warmup_method == "constant":
                return self.lr * self.warmup_decay
            return self.lr * (self.warmup_decay + (1 - self.warmup_decay) * epoch / warmup)
        span = self.epochs - warmup
        progress = min((epoch - warmup) / span, 1.0) if span > 0 else 1.0
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * progress)) / 2

    def optax(self, steps_per_epoch: int) -> optax.Schedule:
        """The same rates as a function of the optimizer step (jittable)."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        warmup, span = self.warmup_epochs, self.epochs - self.warmup_epochs

        def schedule(step: jnp.ndarray) -> jnp.ndarray:
            epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
            if self.unit == "epoch":
                epoch = jnp.floor(epoch)
            if self.warmup_method == "constant":
                rising = jnp.float32(self.lr * self.warmup_decay)
            else:
                fraction = epoch / warmup if warmup > 0 else jnp.float32(1)
                rising = self.lr * (self.warmup_decay + (1 - self.warmup_decay) * fraction)
            progress = jnp.clip((epoch - warmup) / span, 0, 1) if span > 0 else jnp.float32(1)
            cosine = self.lr_min + (self.lr - self.lr_min) * (1 + jnp.cos(jnp.pi * progress)) / 2
            return jnp.where(epoch < warmup, rising, cosine)

        return schedule
