"""Fine-tuning's bookkeeping: per-epoch totals kept on the device, the training throughput,
the epoch line printed, which epoch is exported, the checks that keep NaN out of what a run
writes, and what identifies a run (its settings and data) for resuming."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from resnext_flax.datasets import ImageDataset
from resnext_flax.errors import Fix, Message, TrainingError
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
    if "val_acc1_ema" in entry:
        message += f" (EMA acc@1 {entry['val_acc1_ema']:.2f}% acc@5 {entry['val_acc5_ema']:.2f}%)"
    if entry["images_per_second"]:
        message += f", {entry['images_per_second']:.0f} images/s"
    return message


def is_better(entry: dict[str, Any], best: dict[str, Any] | None, *, ema: bool = False
              ) -> bool:
    """Whether `entry`'s epoch beats the best so far, by validation acc@1 (of the weights'
    average when `ema`, the model it exports)."""
    key = "val_acc1_ema" if ema else "val_acc1"
    if key not in entry:
        return True  # no validation: the last epoch is the one exported
    return best is None or best.get("acc1") is None or entry[key] > best["acc1"]


class LossWatch:
    """Stops a run whose training loss became NaN or infinite (a learning rate too high, bad
    data), naming the step. Step ``k``'s loss is read once step ``k + 1`` is dispatched, so
    the check never makes the host wait for the step it just started; :meth:`flush` reads the
    last one before anything is saved or exported."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.pending: tuple[int, jax.Array] | None = None

    def add(self, step: int, loss: jax.Array) -> None:
        """Record step `step`'s loss (steps count from 1) and check the previous one."""
        previous, self.pending = self.pending, (step, loss)
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            self._check(*pending)

    def _check(self, step: int, loss: jax.Array) -> None:
        value = float(loss)
        if not math.isfinite(value):
            epoch, within = divmod(step - 1, self.steps_per_epoch)
            raise TrainingError(
                f"the training loss became {value} at step {step} (epoch {epoch + 1}, step "
                f"{within + 1} of {self.steps_per_epoch}): the run stopped without saving or "
                "exporting that state; lower the learning rate or check the data")


@jax.jit
def _finite(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def check_finite(tree: Any, what: str) -> None:
    """Raise a :class:`TrainingError` naming the arrays of `tree` that hold NaN or Inf."""
    flags = jax.device_get(_finite(tree))
    bad = [jax.tree_util.keystr(path, simple=True, separator=".")
           for path, ok in jax.tree_util.tree_leaves_with_path(flags) if not ok]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingError(f"refusing to write {what}: NaN or Inf in {shown}")


def data_fingerprint(dataset: ImageDataset) -> str:
    """A SHA-256 of the dataset's file list: each file's path relative to the dataset's
    folder (so a moved folder still matches), its size and its label, in dataset order (batch
    ``k`` depends on that order). Only ``stat`` is called: no file is read."""
    base = dataset.root if os.path.isdir(dataset.root) else os.path.dirname(dataset.root)
    digest = hashlib.sha256()
    for path, label in zip(dataset.paths, dataset.labels.tolist(), strict=True):
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1  # unreadable now; the loader reports it
        digest.update(f"{os.path.relpath(path, base or '.')}\0{size}\0{label}\n".encode())
    return digest.hexdigest()


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _shown(value: Any) -> str:
    text = "(not recorded)" if value is None else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings (dotted, e.g. ``augmentation.hflip``) whose values differ, as
    ``{name: (saved, now)}``."""
    old, new = _flat(saved), _flat(now)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """``"epochs: 10 -> 20, lr: 0.01 -> 0.02"``; data fingerprints are named, not shown."""
    return ", ".join(
        f"{k}: other images (paths, sizes or labels)"
        if k.startswith("data.") and a is not None and b is not None
        else f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())


def identity(run: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the saved one: the settings that change the
    trajectory, the classes, and the data."""
    return {**run["config"], "classes": run["classes"], "train_images": run["train_images"],
            "data": run.get("data")}


def _check_same_run(directory: str, saved: dict[str, Any], run: dict[str, Any], step: int,
                    extend: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """The saved run record, carried on to `run`'s epochs when `extend` allows it; else a
    :class:`TrainingError` naming what differs and how to go on."""
    if saved.get("data") is None and run.get("data") is not None:
        say(f"{directory}: this run's data was not recorded (it was written by an older "
            "version): resuming without checking that the images are the same")
        saved["data"] = run["data"]
    changes = differences(identity(saved), identity(run))
    if not changes:
        return saved
    before, after = changes.get("epochs", (0, 0))
    more_epochs = set(changes) == {"epochs"} and after > before
    if more_epochs and extend:
        say(f"extending the run in {directory} from {before} to {after} epochs at step {step}")
        saved["config"] = run["config"]
        saved.setdefault("extensions", []).append(
            {"step": step, "from_epochs": before, "to_epochs": after})
        return saved
    if more_epochs:
        advice: tuple[str | Fix, ...] = (f"to train it on to {after} epochs pass ",
                                         Fix.of(extend=True), ", or use another output "
                                         "directory")
    else:
        advice = ("rerun with its settings to resume it, or use another output directory",)
    raise TrainingError(Message(f"{directory} holds a run with other settings "
                                f"({describe(changes)}): ", *advice))


def resume(manager: Any, state: TrainState, batches: Any, run: dict[str, Any],
           say: Callable[[str], None], *, extend: bool = False,
           extra: dict[str, Any] | None = None
           ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """Restore the latest checkpoint of `manager`, if any, after checking it was written by
    this run (:func:`identity`); `batches` then continues at the batch after the last one
    whose update the checkpoint holds. `extra` holds other arrays checkpointed beside the
    state (the weights' average), returned restored (as given when nothing is saved)."""
    import orbax.checkpoint as ocp

    extra = dict(extra or {})
    step = manager.latest_step()
    if step is None:
        return state, run, extra
    saved = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    saved = _check_same_run(str(manager.directory), saved, run, step, extend, say)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**arrays(state), **extra})
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    position = int(restored["data"]["position"])
    # One batch per step: the state holds the updates of batches 0 .. step-1. Checkpoints of
    # runs interrupted inside a step recorded the batch drawn for it as well.
    if position not in (step, step + 1):
        raise TrainingError(f"{manager.directory}: checkpoint {step} holds loader position "
                            f"{position}, not {step}; use another output directory")
    batches.set_state({"position": step})
    say(f"resumed from step {step}")
    arrays_restored = dict(restored["state"])
    extra = {name: arrays_restored.pop(name) for name in extra}
    return state.replace(**arrays_restored), saved, extra


def arrays(state: TrainState) -> dict[str, Any]:
    """The parts of a train state a checkpoint holds."""
    return {"params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "step": state.step}
