"""Fine-tuning's bookkeeping: per-epoch totals kept on the device, the training throughput,
the epoch line printed, and which epoch is exported."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from resnext_flax.training import TrainState


class EpochTotals:
    """Training loss and correct count of the current epoch, summed on the device (no host
    sync per step); saved with checkpoints so a resumed epoch reports the same numbers."""

    def __init__(self, loss: float = 0.0, correct: int = 0, steps: int = 0):
        self.loss, self.correct, self.steps = jnp.float32(loss), jnp.int32(correct), steps

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.loss, self.correct = self.loss + metrics["loss"], self.correct + metrics["correct"]
        self.steps += 1

    def to_json(self) -> list:
        return [float(self.loss), int(self.correct), self.steps]

    @classmethod
    def from_json(cls, value: list) -> EpochTotals:
        return cls(*value)

    def entry(self, epoch: int, step: int, batch_size: int) -> dict[str, Any]:
        steps = max(self.steps, 1)
        return {"epoch": epoch, "step": step, "train_loss": float(self.loss) / steps,
                "train_acc1": 100 * int(self.correct) / (steps * batch_size)}


class Throughput:
    """Training images per second in the current epoch, from the end of its first step
    (which includes compilation in the first epoch) to now; validation is not counted."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.images = 0

    def restart(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def step(self, state: TrainState, batch_size: int) -> None:
        if self.start is None:
            jax.block_until_ready(state.step)
            self.start = time.perf_counter()
        else:
            self.images += batch_size

    def rate(self) -> float:
        if self.start is None or not self.images:
            return 0.0
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def epoch_message(entry: dict[str, Any], epochs: int) -> str:
    message = (f"epoch {entry['epoch']}/{epochs}: train loss {entry['train_loss']:.4f} "
               f"acc@1 {entry['train_acc1']:.2f}%")
    if "val_acc1" in entry:
        message += (f", val acc@1 {entry['val_acc1']:.2f}% acc@5 {entry['val_acc5']:.2f}% "
                    f"loss {entry['val_loss']:.4f}")
    if entry["images_per_second"]:
        message += f", {entry['images_per_second']:.0f} images/s"
    return message


def is_better(entry: dict[str, Any], best: dict[str, Any] | None) -> bool:
    if "val_acc1" not in entry:
        return True  # no validation: the last epoch is the one exported
    return best is None or best.get("acc1") is None or entry["val_acc1"] > best["acc1"]
