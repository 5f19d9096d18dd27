"""Fine-tune on an image folder: a new head sized to its classes, optax, every local device
(and every process once ``jax.distributed`` is initialized), validation each epoch, Orbax
checkpoints that resume bit for bit, and the best model exported as a converted checkpoint
that records the class names.

Resuming is exact because everything a step depends on is either in the checkpoint (params,
BatchNorm statistics, optimizer state, step, the data loader's position, the running epoch
totals) or a pure function of the settings (batch ``k`` of the Grain pipeline depends only on
the seed and ``k``; the learning-rate schedule only on the step), and XLA's CPU programs are
deterministic. A checkpoint directory written with other settings or other data is refused
(more epochs only when asked: ``extend``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from resnext_flax import finetune_progress as bookkeeping
from resnext_flax import optim, parallel, training
from resnext_flax.augment import Augmentation
from resnext_flax.builders import create_model
from resnext_flax.compilation import report_compilation
from resnext_flax.datasets import DatasetError, ImageDataset, load_dataset, split_dataset
from resnext_flax.ema import (
    EmaConfig,
    adjusted_decay,
    ema_step,
    ema_train_state,
    init_ema,
)
from resnext_flax.errors import WeightFileNotFoundError
from resnext_flax.evaluation import evaluate
from resnext_flax.metadata import Preprocessing, PretrainedCfg, pretrained_cfg
from resnext_flax.mixing import MixConfig
from resnext_flax.models.resnet import ResNet
from resnext_flax.models.variants import get_spec
from resnext_flax.outputs import check_finetune_output
from resnext_flax.pipeline import LoaderOptions, SkipReport, train_loader
from resnext_flax.run_log import plot_metrics, require_plotting, write_metrics
from resnext_flax.schedules import Schedule, StepUnit, WarmupMethod
from resnext_flax.training import TrainState
from resnext_flax.weights.checkpoint import save_checkpoint
from resnext_flax.weights.files import atomic_write
from resnext_flax.weights.loading import load_model
from resnext_flax.weights.pretrained import from_pretrained

#: ``weights`` values that mean "random initialization".
RANDOM_INIT = (None, "none", "random")


#: The largest seed: the input pipeline (Grain) takes 32-bit seeds.
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a run (all of them are checked again when a run resumes).

    - `model`: architecture name; `weights`: a weight-set tag (``"DEFAULT"``), a local
      ``.pth`` / ``.safetensors`` / converted file, or None for random initialization.
    - `new_head`: give the model a new, randomly initialized head for the data's classes;
      None: only when the weights' head has another number of classes.
    - `epochs`, `batch_size` (global, a multiple of the device count), `seed`.
    - `optimizer`: ``"sgd"`` (torch's SGD with momentum) or ``"adamw"``; `lr` is the peak of
      a warm-up over `warmup_epochs` (`warmup_method`, from ``lr * warmup_decay``) followed by
      a cosine decay to `lr_min`, changed every step or, as torchvision's reference does,
      every epoch (`schedule_unit`). `weight_decay` applies to conv and linear kernels;
      BatchNorm parameters get `norm_weight_decay` and biases `bias_weight_decay` (None:
      `weight_decay`, as torch does when no parameter groups are given).
    - `label_smoothing`; `freeze_backbone` (train the head only); `bf16` (bfloat16 compute,
      float32 parameters and statistics).
    - `resize_size`, `crop_size`: override the weights' preprocessing for evaluation;
      `train_crop_size`: the training crop when it differs from `crop_size` (torchvision's
      ``--train-crop-size``); `augmentation`: crop scale, ratio, flip and the image policies.
    - `mixup_alpha`, `cutmix_alpha`: MixUp / CutMix of each batch (0: off), one of the two
      per batch as torchvision's reference does (:mod:`resnext_flax.mixing`).
    - `ema_steps`: keep an exponential moving average of the weights and BatchNorm
      statistics, updated every `ema_steps` optimizer steps of an epoch with `ema_decay`
      adjusted to the run as the reference does (:mod:`resnext_flax.ema`); 0: none. With an
      average, it is validated each epoch beside the model and is what ``best.safetensors``
      holds.
    - `ra_reps`: repeated augmentation, the reference's ``RASampler`` (1: off).
    - `grad_accum_steps`: one optimizer step per this many batches, on their mean gradient
      (``batch_size`` is each batch's; the optimizer sees ``batch_size * grad_accum_steps``).
    - `clip_grad_norm`: clip the gradients' global norm as torch's ``clip_grad_norm_``.
    - `val_split`: hold out this fraction of each class when there is no validation folder.
    - `save_every`: also checkpoint every N steps (0: at the end of each epoch only).
    """

    model: str
    weights: str | None = None
    new_head: bool | None = None
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = 0.0
    bias_weight_decay: float | None = None
    warmup_epochs: float = 1.0
    warmup_method: WarmupMethod = "linear"
    warmup_decay: float = 0.01
    lr_min: float = 0.0
    schedule_unit: StepUnit = "epoch"
    label_smoothing: float = 0.1
    freeze_backbone: bool = False
    bf16: bool = False
    seed: int = 0
    resize_size: int | None = None
    crop_size: int | None = None
    train_crop_size: int | None = None
    augmentation: Augmentation = dataclasses.field(default_factory=Augmentation)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_steps: int = 0
    ema_decay: float = 0.99998
    ra_reps: int = 1
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    val_split: float | None = None
    save_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "keep_checkpoints", "save_every", "seed",
                     "ema_steps", "ra_reps", "grad_accum_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("epochs", "batch_size", "keep_checkpoints", "ra_reps",
                     "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        decays = {name: getattr(self, name) for name in ("norm_weight_decay",
                                                         "bias_weight_decay")
                  if getattr(self, name) is not None}
        training.check_hyperparameters(
            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing, **decays)
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be from 0 to {MAX_SEED} (the input pipeline's seed is "
                             f"32-bit), got {self.seed}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) must not exceed epochs "
                             f"({self.epochs}): the warm-up is part of the schedule")
        self.schedule()  # checks the schedule's own settings
        if self.ema_steps < 0:
            raise ValueError(f"ema_steps must be >= 0 (0: no average), got {self.ema_steps}")
        if self.ema_steps:
            EmaConfig(self.ema_decay, self.ema_steps)  # checks the decay
        if self.mixup_alpha or self.cutmix_alpha:
            self.mixing(2)  # checks the alphas
        elif self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0, got "
                             f"{self.mixup_alpha} and {self.cutmix_alpha}")
        if self.clip_grad_norm is not None:
            optim.clip_grad_norm(self.clip_grad_norm)  # checks the norm
        for name in ("resize_size", "crop_size", "train_crop_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    def mixing(self, num_classes: int) -> MixConfig | None:
        """MixUp / CutMix for `num_classes`, or None when both alphas are 0."""
        if not self.mixup_alpha and not self.cutmix_alpha:
            return None
        return MixConfig(num_classes, float(self.mixup_alpha), float(self.cutmix_alpha))

    def schedule(self) -> Schedule:
        """The learning-rate schedule these settings describe."""
        return Schedule(self.lr, self.epochs, self.warmup_epochs, self.warmup_method,
                        self.warmup_decay, self.lr_min, self.schedule_unit)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the trajectory (a resumed run must match them)."""
        out = dataclasses.asdict(self)
        for key in ("save_every", "keep_checkpoints"):
            out.pop(key)
        return json.loads(json.dumps(out))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """:class:`TrainConfig` with fine-tuning's defaults: start from the default weights, give
    the model a new head for the data's classes, no decay on biases, and a warm-up from 0
    with the rate changed every step."""

    weights: str | None = "DEFAULT"
    new_head: bool | None = True
    bias_weight_decay: float | None = 0.0
    warmup_decay: float = 0.0
    schedule_unit: StepUnit = "step"


@dataclasses.dataclass
class FinetuneResult:
    """The final train state, one history entry per epoch, and the exported best model."""

    state: TrainState
    history: list[dict[str, Any]]
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    best_path: str
    best_epoch: int
    #: The state with the weights' average in place of the model's (None: no average).
    average: TrainState | None = None


def initial_model(config: TrainConfig, num_classes: int, *,
                  cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> tuple[ResNet, Preprocessing]:
    """The model to start from, with a new head of `num_classes`, and the preprocessing its
    weights go with (what the loaded model's ``pretrained_cfg`` records, else ImageNet's)."""
    dtype = jnp.bfloat16 if config.bf16 else None
    weights = config.weights
    if weights in RANDOM_INIT:
        model = create_model(config.model, num_classes=num_classes, dtype=dtype,
                             rngs=nnx.Rngs(config.seed))
    elif os.path.isfile(weights):
        model = load_model(weights, config.model, dtype=dtype)
    elif weights.endswith((".pth", ".pt", ".safetensors")):
        raise WeightFileNotFoundError(f"no weights file at {weights!r}")
    else:
        model = from_pretrained(config.model, weights, dtype=dtype, cache_dir=cache_dir,
                                progress=progress)
    cfg = pretrained_cfg(model)
    base = cfg.preprocessing if cfg is not None and cfg.preprocessing else Preprocessing()
    if weights not in RANDOM_INIT:
        _fit_head(model, num_classes, config)
    sizes = {k: v for k, v in (("resize_size", config.resize_size),
                               ("crop_size", config.crop_size)) if v is not None}
    return model, dataclasses.replace(base, **sizes)


def _fit_head(model: ResNet, num_classes: int, config: TrainConfig) -> None:
    """A new head for the data's classes when `config.new_head` asks for one (None: when the
    weights' head has another size); keeping a head of the wrong size is an error."""
    same = model.num_classes == num_classes
    if config.new_head or (config.new_head is None and not same):
        model.reset_classifier(num_classes, rngs=nnx.Rngs(config.seed))  # the record follows
    elif not same:
        raise ValueError(f"new_head=False keeps the weights' head of {model.num_classes} "
                         f"classes, but the data has {num_classes}: give new_head=None or "
                         "True")


def optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer `train` builds for `config` over epochs of `steps_per_epoch` batches:
    SGD is torch's (coupled L2 before momentum); AdamW's decay is decoupled, after Adam's
    scaling, as in optax.adamw. Gradients are clipped first, as torch's loop clips them before
    ``optimizer.step()``; accumulation wraps it all."""
    return _cached_optimizer(config.optimizer, config.schedule(),
                             steps_per_epoch / config.grad_accum_steps, config.momentum,
                             (config.weight_decay, config.norm_weight_decay,
                              config.bias_weight_decay), config.clip_grad_norm,
                             config.grad_accum_steps)


@functools.cache
def _cached_optimizer(kind: str, schedule: Schedule, steps_per_epoch: float, momentum: float,
                      decays: tuple[float, float | None, float | None],
                      clip: float | None, accumulate: int) -> optax.GradientTransformation:
    """Cached on what the update depends on: the optimizer is static in the jitted step, so
    an equal but new object would compile the step again (runs in one process share it)."""
    weight_decay, norm, bias = decays
    decay = optim.add_weight_decay(functools.partial(
        training.weight_decay_tree, weight_decay=weight_decay, norm_weight_decay=norm,
        bias_weight_decay=bias))
    rate = schedule.optax(steps_per_epoch)
    if kind == "sgd":
        update = optax.chain(decay, optax.sgd(rate, momentum=momentum or None))
    else:
        update = optax.chain(optax.scale_by_adam(), decay, optax.scale_by_learning_rate(rate))
    if clip is not None:
        update = optax.chain(optim.clip_grad_norm(clip), update)
    return optim.accumulate_gradients(update, accumulate)


@functools.cache
def _train_step(mesh: Mesh, label_smoothing: float, mix: MixConfig | None = None,
                mix_seed: int = 0) -> Callable:
    return parallel.make_parallel_train_step(mesh, label_smoothing=label_smoothing, mix=mix,
                                             mix_seed=mix_seed)


def _datasets(train: str | os.PathLike | ImageDataset, val: str | os.PathLike | ImageDataset
              | None, config: TrainConfig) -> tuple[ImageDataset, ImageDataset | None]:
    train_ds = train if isinstance(train, ImageDataset) else load_dataset(train)
    if train_ds.num_classes < 2:
        raise DatasetError(f"{train_ds.root}: fine-tuning needs at least 2 classes, found "
                           f"{train_ds.num_classes}")
    if val is not None and config.val_split is not None:
        raise ValueError("give a validation folder or a validation split, not both")
    if val is not None:
        val_ds = val if isinstance(val, ImageDataset) else load_dataset(val)
        return train_ds, val_ds.relabel(train_ds.classes)
    if config.val_split is not None:
        return split_dataset(train_ds, config.val_split, seed=config.seed)
    return train_ds, None


def _checkpoint_manager(directory: str, keep: int) -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("fine-tuning checkpoints need Orbax: pip install "
                          "'resnext-flax[train]'") from err
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "run"))


def train(
    train: str | os.PathLike | ImageDataset,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    val: str | os.PathLike | ImageDataset | None = None,
    loader: LoaderOptions | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    on_step: Callable[[int, dict[str, jax.Array]], None] | None = None,
    log: Callable[[str], None] | None = None,
    extend: bool = False,
) -> FinetuneResult:
    """Train `config.model` on a folder or list file; resume if `output_dir` holds a run.

    ``finetune`` is the same function; :class:`FinetuneConfig` holds fine-tuning's defaults
    and :mod:`resnext_flax.recipes` published recipes (``recipe_config``).

    `output_dir` receives ``checkpoints/`` (Orbax: the train state, the loader position and the
    run's history), ``metrics.jsonl`` and ``metrics.png`` (one line and one point per epoch:
    losses, accuracies, learning rate), ``best.safetensors`` (the best epoch by validation
    acc@1, or the last epoch without validation; a converted checkpoint with the class names
    and preprocessing in its header) and ``history.json``. `val` is a validation folder or list
    file (classes matched by name); else ``config.val_split`` holds out part of `train`.
    `on_step(step, metrics)` is called after every step (an exception there stops the run
    without saving, like a crash). Ctrl-C saves a checkpoint and re-raises.
    """
    say = log or (lambda message: print(message, flush=True))
    check_finetune_output(output_dir, [train, val], config.weights)
    require_plotting()  # before any work: every epoch ends with the plot
    train_ds, val_ds = _datasets(train, val, config)
    mesh = mesh if mesh is not None else parallel.data_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"the batch size ({config.batch_size}) must be a multiple of the "
                         f"{mesh.size} devices it is sharded over")
    if len(train_ds) < config.batch_size:
        raise DatasetError(f"{train_ds.root}: {len(train_ds)} training images are fewer than "
                           f"one batch of {config.batch_size}")
    model, preprocessing = initial_model(config, train_ds.num_classes, cache_dir=cache_dir,
                                         progress=progress)
    train_preprocessing = preprocessing if config.train_crop_size is None else (
        dataclasses.replace(preprocessing, crop_size=config.train_crop_size))
    batches = train_loader(
        train_ds, train_preprocessing, config.batch_size, epochs=config.epochs,
        seed=config.seed, augmentation=config.augmentation, options=loader,
        repetitions=config.ra_reps, replicas=mesh.size)
    per_epoch = batches.steps_per_epoch
    if per_epoch % config.grad_accum_steps:
        raise ValueError(f"grad_accum_steps={config.grad_accum_steps} must divide the "
                         f"{per_epoch} batches of an epoch (an optimizer step would straddle "
                         "two epochs and their learning rates)")
    schedule = config.schedule()
    tx = optimizer(config, per_epoch)
    state = training.create_train_state(model, tx, freeze_backbone=config.freeze_backbone)
    state = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
    step_fn = _train_step(mesh, config.label_smoothing, config.mixing(train_ds.num_classes),
                          config.seed)
    average = _Average.create(config, state, per_epoch)

    output_dir = os.fspath(output_dir)
    best_path = os.path.join(output_dir, "best.safetensors")
    manager = _checkpoint_manager(os.path.join(output_dir, "checkpoints"),
                                  config.keep_checkpoints)
    data = {"train": bookkeeping.data_fingerprint(train_ds),
            "val": None if val_ds is None else bookkeeping.data_fingerprint(val_ds)}
    run = {"config": config.fingerprint(), "classes": list(train_ds.classes),
           "train_images": len(train_ds), "data": data, "history": [],
           "epoch": bookkeeping.EpochTotals().to_json(), "best": None}
    state, run, extra = bookkeeping.resume(manager, state, batches, run, say, extend=extend,
                                           extra=average.arrays())
    average.restore(extra, int(state.step))
    totals = bookkeeping.EpochTotals.from_json(run["epoch"])
    watch = bookkeeping.LossWatch(per_epoch)
    primary = jax.process_index() == 0

    def save(replace: bool = False) -> int:
        """Checkpoint the steps completed; returns that step (0: nothing to save). With
        `replace`, a checkpoint of the same step (one holding less of the run's record) is
        rewritten; the one before it stays until then."""
        import orbax.checkpoint as ocp

        watch.flush()
        done = int(state.step)
        average.catch_up(state, done)  # an interrupt may come between a step and its update
        run["epoch"] = totals.to_json()
        run["epoch_skipped"] = {"count": skipped.count, "paths": skipped.paths}
        if done and replace and manager.latest_step() == done:
            manager.wait_until_finished()
            manager.delete(done)
        if done and manager.latest_step() != done:
            bookkeeping.check_finite({**bookkeeping.arrays(state), **average.arrays()},
                                     f"checkpoint {done}")
            # The loader may have drawn the batch of a step that never finished: the data
            # consumed is one batch per completed step.
            manager.save(done, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave({**bookkeeping.arrays(state), **average.arrays()}),
                data=ocp.args.JsonSave({"position": done}), run=ocp.args.JsonSave(run)))
        return done

    so_far = run.get("epoch_skipped", {})  # the resumed epoch's unreadable files
    skipped = SkipReport(train_ds, count=int(so_far.get("count", 0)),
                         paths=list(so_far.get("paths", [])))
    timer = bookkeeping.Throughput()
    bar = tqdm(total=len(batches), initial=batches.position, desc="finetune", unit="step",
               disable=not progress or not primary)
    # The first step and the first validation compile (or load from the compilation cache).
    first_step = report_compilation(f"{config.model}'s training step for batches of "
                                    f"{config.batch_size}", enabled=progress and primary)
    first_validation = report_compilation(f"{config.model}'s validation step",
                                          enabled=progress and primary)
    def end_epoch(step: int) -> None:
        """Validate, export an improvement, record the epoch and checkpoint. The epoch enters
        the history last: a run interrupted before that redoes all of it when resumed."""
        nonlocal totals, skipped, first_validation
        watch.flush()  # no validation, export or checkpoint of a diverged state
        entry = totals.entry(step // per_epoch, step, config.batch_size)
        entry.update(images_per_second=timer.rate(), skipped=skipped.count,
                     lr=schedule.rate((step - 1) / per_epoch))
        if val_ds is not None:
            with first_validation:
                entry.update(_validate(state, val_ds, preprocessing, config, loader, mesh))
                if average.ema is not None:
                    scores = _validate(average.train_state(state), val_ds, preprocessing,
                                       config, loader, mesh)
                    entry.update({f"{k}_ema": v for k, v in scores.items()})
            first_validation = contextlib.nullcontext()
        say(bookkeeping.epoch_message(entry, config.epochs))
        if skipped.count:
            say(f"epoch {entry['epoch']}: "
                f"{skipped.message('replaced by the next readable image')}")
        if bookkeeping.is_better(entry, run["best"], ema=average.ema is not None):
            if primary:
                _export(average.train_state(state), best_path, train_ds.classes,
                        preprocessing, config, entry)
            acc1 = entry.get("val_acc1_ema" if average.ema is not None else "val_acc1")
            run["best"] = {"epoch": entry["epoch"], "acc1": acc1}
        run["history"].append(entry)
        if primary:
            write_metrics(output_dir, run["history"])
            plot_metrics(output_dir, run["history"])
        totals, skipped = bookkeeping.EpochTotals(), SkipReport(train_ds)
        timer.restart()
        save(replace=True)

    try:
        done = int(state.step)
        if done and done % per_epoch == 0 and len(run["history"]) < done // per_epoch:
            end_epoch(done)  # interrupted between its last step and its checkpoint
        with batches:
            for batch in batches:
                images, labels = parallel.shard_batch(mesh, batch["image"], batch["label"])
                with first_step:
                    state, metrics = step_fn(state, images, labels)
                first_step = contextlib.nullcontext()
                step = batches.position
                average.after_step(state, step)
                watch.add(step, metrics["loss"])
                totals.add(metrics)
                skipped.add(batch)
                timer.step(state, config.batch_size)
                bar.update(1)
                if on_step is not None:
                    on_step(step, metrics)
                if progress and primary and (step % 10 == 0 or step % per_epoch == 0):
                    accuracy = 100 * int(metrics["correct"]) / config.batch_size
                    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                    acc1=f"{accuracy:.1f}", img_s=f"{timer.rate():.0f}")
                if step % per_epoch == 0:
                    end_epoch(step)
                elif config.save_every and step % config.save_every == 0:
                    save()
    except KeyboardInterrupt:
        done = save()
        manager.wait_until_finished()
        say(f"interrupted: saved step {done} in {output_dir}; rerun to resume" if done else
            "interrupted before the first step finished: nothing to save")
        raise
    finally:
        bar.close()
    watch.flush()
    manager.wait_until_finished()
    if primary:
        atomic_write(os.path.join(output_dir, "history.json"),
                     lambda tmp: _write_json(tmp, run["history"]))
    best = run["best"] or {"epoch": config.epochs}
    return FinetuneResult(state, run["history"], train_ds.classes, preprocessing, best_path,
                          int(best["epoch"]),
                          None if average.ema is None else average.train_state(state))


class _Average:
    """The run's exponential moving average of the weights (none when ``ema_steps`` is 0):
    updated after each optimizer step by the reference loop's rule, checkpointed with the
    state, validated and exported in the model's place."""

    def __init__(self, config: EmaConfig | None, state: TrainState, per_epoch: int,
                 accumulate: int):
        self.config, self.per_epoch, self.accumulate = config, per_epoch, accumulate
        self.ema = None if config is None else init_ema(state.params, state.batch_stats)
        self.seen = 0  # the last step whose update was considered

    @classmethod
    def create(cls, config: TrainConfig, state: TrainState, per_epoch: int) -> _Average:
        if not config.ema_steps:
            return cls(None, state, per_epoch, config.grad_accum_steps)
        # The reference adjusts the decay by the images of one optimizer step over all
        # processes (``world_size * batch_size``): here the global batch times accumulation.
        decay = adjusted_decay(config.ema_decay, world_size=1,
                               batch_size=config.batch_size * config.grad_accum_steps,
                               steps=config.ema_steps, epochs=config.epochs)
        settings = EmaConfig(decay, config.ema_steps, math.ceil(config.warmup_epochs))
        return cls(settings, state, per_epoch, config.grad_accum_steps)

    def arrays(self) -> dict[str, Any]:
        return {} if self.ema is None else {"ema": self.ema}

    def restore(self, arrays: dict[str, Any], step: int) -> None:
        self.seen = step
        if self.ema is not None:
            self.ema = arrays["ema"]

    def after_step(self, state: TrainState, step: int) -> None:
        """After micro-step `step` (from 1): the reference's rule on optimizer steps."""
        self.seen = step
        if self.ema is None or step % self.accumulate:
            return
        epoch, within = divmod(step - 1, self.per_epoch)
        self.ema = _ema_step(self.config, self.ema, state.params, state.batch_stats,
                             step_in_epoch=within // self.accumulate, epoch=epoch)

    def catch_up(self, state: TrainState, step: int) -> None:
        """The update of step `step` if it has not been made (a checkpoint of that step must
        hold the average after it)."""
        if step and self.seen != step:
            self.after_step(state, step)

    def train_state(self, state: TrainState) -> TrainState:
        """`state` with the average's weights (the state itself when there is none)."""
        return state if self.ema is None else ema_train_state(state, self.ema)


_ema_step = jax.jit(ema_step, static_argnums=0)


#: Fine-tuning is training with :class:`FinetuneConfig`'s defaults.
finetune = train


def _validate(state: TrainState, val_ds: ImageDataset, preprocessing: Preprocessing,
              config: TrainConfig, loader: LoaderOptions | None, mesh: Mesh
              ) -> dict[str, Any]:
    result = evaluate(state.model(), val_ds, preprocessing=preprocessing,
                      batch_size=config.batch_size, loader=loader, mesh=mesh, progress=False)
    return {"val_acc1": 100 * result.top1, "val_acc5": 100 * result.top5,
            "val_loss": result.loss, "val_skipped": result.num_skipped}


def _export(state: TrainState, path: str, classes: tuple[str, ...],
            preprocessing: Preprocessing, config: TrainConfig, entry: dict[str, Any]
            ) -> None:
    bookkeeping.check_finite({"params": state.params, "batch_stats": state.batch_stats}, path)
    model = state.model()
    model.pretrained_cfg = finetuned_cfg(config, classes, preprocessing, path)
    metadata = {"finetuned_from": str(config.weights), "epoch": str(entry["epoch"])}
    if "val_acc1" in entry:
        metadata["val_acc1"] = f"{entry['val_acc1']:.4f}"
    save_checkpoint(model, path, metadata=metadata)


def finetuned_cfg(config: TrainConfig, classes: tuple[str, ...],
                  preprocessing: Preprocessing, path: str) -> PretrainedCfg:
    """The record a fine-tuned model carries: its classes and preprocessing, and where it was
    written."""
    return PretrainedCfg(architecture=config.model, spec=get_spec(config.model),
                         num_classes=len(classes), source=path, class_names=tuple(classes),
                         preprocessing=preprocessing)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def finetune_summary(result: FinetuneResult) -> str:
    """A short report: the best epoch and where the model was written."""
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
    score = ""
    if best and "val_acc1_ema" in best:  # the average is what was exported
        score = f" (weights' average: val acc@1 {best['val_acc1_ema']:.2f}%)"
    elif best and "val_acc1" in best:
        score = f" (val acc@1 {best['val_acc1']:.2f}%)"
    return (f"best epoch {result.best_epoch}{score}; {len(result.classes)} classes; wrote "
            f"{result.best_path}")


