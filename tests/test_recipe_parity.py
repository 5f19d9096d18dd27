"""The recipe's training step against torchvision's reference loop: the same few steps on the
same batches agree within the float32 floor.

The oracle is ``references/classification/train.py`` (not an installed package: its
``train_one_epoch`` and the setup in its ``main`` are written out below, reading the same flags):
SGD with momentum over ``set_weight_decay``'s groups (``--norm-weight-decay 0``),
``CrossEntropyLoss(label_smoothing=0.1)`` on the soft targets of ``RandomChoice([MixUp(0.2),
CutMix(1.0)])``, ``clip_grad_norm_``, ``LinearLR`` warm-up then ``CosineAnnealingLR`` in a
``SequentialLR`` stepped per epoch, and ``ExponentialMovingAverage`` with ``model_ema_steps``,
the warm-up reset and the decay adjustment. The library runs ``training.train_step_fn`` (jitted,
one device) with the optimizer and the average ``finetuning.train`` builds from a
``TrainConfig`` of the same settings. The library draws each batch's MixUp/CutMix inside its
step from a key of (seed, step); the test draws the same decisions from the same keys and
replays them through torchvision's own random draws.

Two epochs of two steps of resnet18 (random weights and BatchNorm statistics) on 8 images of
32x32: after every step the loss, the parameters, the BatchNorm statistics and the averages
(updated every step and every second step) are compared with torch float64, within the bound
of the float32 floor measured here (float32_floor.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
from classification_reference import (
    ExponentialMovingAverage,
    get_mixup_cutmix,
    replaying,
    set_weight_decay,
)
from flax import nnx
from float32_floor import Snapshot, bound, drift, floors
from torch.utils.data import default_collate
from torch_reference import relative_error, to_nchw, torch_model

import resnext_flax
from resnext_flax import finetuning, mixing, training

NUM_CLASSES, BATCH, SIZE = 10, 8, 32
STEPS_PER_EPOCH = 2
#: The averages compared: one updated after every step, one after every second step.
EMA_STEPS = (1, 2)
#: The library's settings, the recipe's where they fit a 4-step run (a warm-up of one epoch
#: from a tenth of the rate, gradients clipped, a decay the groups make visible).
CONFIG = finetuning.TrainConfig(
    model="resnet18", epochs=2, batch_size=BATCH, optimizer="sgd", lr=0.1, momentum=0.9,
    weight_decay=0.01, norm_weight_decay=0.0, bias_weight_decay=None, warmup_epochs=1,
    warmup_method="linear", warmup_decay=0.1, lr_min=0.0, schedule_unit="epoch",
    label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, ema_steps=EMA_STEPS[0],
    ema_decay=0.95, clip_grad_norm=1.0, seed=3)


def _reference_args(config: finetuning.TrainConfig) -> argparse.Namespace:
    """The reference's command-line flags for `config` (besides ``--lr-scheduler
    cosineannealinglr``, ``--lr-warmup-method linear`` and ``--model-ema``, which
    :func:`_reference_run` follows)."""
    return argparse.Namespace(
        epochs=config.epochs, batch_size=config.batch_size, world_size=1, opt=config.optimizer,
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        norm_weight_decay=config.norm_weight_decay, bias_weight_decay=config.bias_weight_decay,
        label_smoothing=config.label_smoothing, mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha, clip_grad_norm=config.clip_grad_norm,
        lr_warmup_epochs=int(config.warmup_epochs), lr_warmup_decay=config.warmup_decay,
        lr_min=config.lr_min, model_ema_decay=config.ema_decay)


@functools.cache
def _batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32),
             rng.integers(0, NUM_CLASSES, BATCH))
            for _ in range(CONFIG.epochs * STEPS_PER_EPOCH)]


@functools.cache
def _decisions() -> list[mixing.MixDecision]:
    """Each step's MixUp/CutMix draw, from the key ``training.train_step_fn`` derives for it
    on one device: ``fold_in(key(mix_seed), step)``."""
    config = CONFIG.mixing(NUM_CLASSES)
    draw = jax.jit(lambda step: mixing.draw_decision(
        config, jax.random.fold_in(jax.random.key(CONFIG.seed), step), SIZE, SIZE))
    return [jax.tree.map(np.asarray, draw(step))
            for step in range(CONFIG.epochs * STEPS_PER_EPOCH)]


@dataclasses.dataclass
class Step:
    """What a run holds after a step: the loss and the state dict (torch names) of the model
    and of each average (``series``, by name), each average's update count, and (the
    reference only) the gradient norm before clipping and the learning rate."""

    series: dict[str, Snapshot]
    counts: dict[int, int]
    norm: float | None = None
    rate: float | None = None


def _average_name(model_ema_steps: int) -> str:
    return f"average every {model_ema_steps}"


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The live tensors (no copy): read before the run takes its next step."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items()
            if "num_batches" not in k}


def train_one_epoch(model, criterion, optimizer, data_loader, epoch, args,
                    model_emas) -> Iterator[Step]:
    """The reference's ``train_one_epoch`` (no AMP, one process) with one average per
    ``model_ema_steps``, yielding after each step."""
    model.train()
    for i, (image, target) in enumerate(data_loader):
        output = model(image)
        loss = criterion(output, target)

        optimizer.zero_grad()
        loss.backward()
        norm = None
        if args.clip_grad_norm is not None:
            norm = float(nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm))
        rate = optimizer.param_groups[0]["lr"]
        optimizer.step()

        for model_ema_steps, model_ema in model_emas.items():
            if i % model_ema_steps == 0:
                model_ema.update_parameters(model)
                if epoch < args.lr_warmup_epochs:
                    # Reset ema buffer to keep copying weights during warmup period
                    model_ema.n_averaged.fill_(0)
        series = {"model": (loss.item(), _state_dict(model))}
        series.update({_average_name(s): (loss.item(), _state_dict(m.module))
                       for s, m in model_emas.items()})
        yield Step(series, {s: int(m.n_averaged) for s, m in model_emas.items()}, norm, rate)


def _reference_run(reference: nn.Module, dtype: torch.dtype,
                   channels_last: bool = False) -> Iterator[Step]:
    """The reference's ``main`` for these flags, on the test's batches in `dtype`."""
    args = _reference_args(CONFIG)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(reference).to(dtype).to(memory_format=memory_format)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    custom_keys_weight_decay = []
    if args.bias_weight_decay is not None:
        custom_keys_weight_decay.append(("bias", args.bias_weight_decay))
    parameters = set_weight_decay(
        model, args.weight_decay, norm_weight_decay=args.norm_weight_decay,
        custom_keys_weight_decay=custom_keys_weight_decay or None)
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov="nesterov" in args.opt)
    main_lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs - args.lr_warmup_epochs, eta_min=args.lr_min)
    warmup_lr_scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs)
    lr_scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer, schedulers=[warmup_lr_scheduler, main_lr_scheduler],
        milestones=[args.lr_warmup_epochs])
    model_emas = {}
    for model_ema_steps in EMA_STEPS:
        adjust = args.world_size * args.batch_size * model_ema_steps / args.epochs
        alpha = 1.0 - args.model_ema_decay
        alpha = min(1.0, alpha * adjust)
        model_emas[model_ema_steps] = ExponentialMovingAverage(model, decay=1.0 - alpha)
    mixup_cutmix = get_mixup_cutmix(mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
                                    num_classes=NUM_CLASSES)

    def data_loader(epoch: int):
        """The epoch's batches through the reference's collate_fn, its draws replayed."""
        for i in range(STEPS_PER_EPOCH):
            step = epoch * STEPS_PER_EPOCH + i
            images, labels = _batches()[step]
            samples = list(zip(to_nchw(images).to(dtype), torch.from_numpy(labels),
                               strict=True))
            with replaying(mixup_cutmix, _decisions()[step], SIZE, SIZE):
                image, target = mixup_cutmix(*default_collate(samples))
            # The targets are float32 whatever the images' dtype: the float64 run's criterion
            # takes them in its own.
            yield image.contiguous(memory_format=memory_format), target.to(dtype)

    for epoch in range(args.epochs):
        yield from train_one_epoch(model, criterion, optimizer, data_loader(epoch), epoch, args,
                                   model_emas)
        lr_scheduler.step()


def _library_run(reference: nn.Module) -> Iterator[Step]:
    """``train_step_fn`` with the optimizer and averages ``finetuning.train`` builds."""
    abstract = nnx.eval_shape(lambda: resnext_flax.create_model(CONFIG.model,
                                                                num_classes=NUM_CLASSES))
    model = resnext_flax.load_torch_state_dict(abstract, reference.state_dict())
    state = training.create_train_state(model, finetuning.optimizer(CONFIG, STEPS_PER_EPOCH))
    step_fn = jax.jit(training.train_step_fn(label_smoothing=CONFIG.label_smoothing,
                                             mix=CONFIG.mixing(NUM_CLASSES),
                                             mix_seed=CONFIG.seed))
    averages = {s: finetuning._Average.create(dataclasses.replace(CONFIG, ema_steps=s), state,
                                              STEPS_PER_EPOCH) for s in EMA_STEPS}
    for step, (images, labels) in enumerate(_batches(), 1):
        state, metrics = step_fn(state, jnp.asarray(images), jnp.asarray(labels))
        loss = float(metrics["loss"])
        series = {"model": (loss, resnext_flax.to_torch_state_dict(state.model()))}
        for steps, average in averages.items():
            average.after_step(state, step)
            series[_average_name(steps)] = (
                loss, resnext_flax.to_torch_state_dict(average.train_state(state).model()))
        yield Step(series, {s: int(a.ema.n_averaged) for s, a in averages.items()})


@dataclasses.dataclass
class Comparison:
    """Per step: the library's drift from the reference in float64 and the float32 floor (per
    series and kind), the two runs' average update counts, and the reference's own record
    (gradient norm, rate, how far each kind moved in the step, how far each average lags the
    model)."""

    drift: list[dict[str, dict[str, float]]] = dataclasses.field(default_factory=list)
    floor: list[dict[str, dict[str, float]]] = dataclasses.field(default_factory=list)
    counts: list[tuple[dict[int, int], dict[int, int]]] = dataclasses.field(
        default_factory=list)
    norms: list[float] = dataclasses.field(default_factory=list)
    rates: list[float] = dataclasses.field(default_factory=list)
    moved: list[dict[str, float]] = dataclasses.field(default_factory=list)
    lag: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _largest_change(after: dict, before: dict, statistics: bool) -> float:
    return max(relative_error(after[k], before[k]) for k in after
               if ("running" in k) == statistics)


@functools.cache
def _compare() -> Comparison:
    """The four runs in lockstep (only one step of state dicts is held at a time)."""
    reference = torch_model(CONFIG.model, num_classes=NUM_CLASSES, seed=0)
    runs = [_reference_run(reference, torch.float64), _library_run(reference),
            _reference_run(reference, torch.float32),
            _reference_run(reference, torch.float32, channels_last=True)]
    out = Comparison()
    before = {k: v.double().numpy() for k, v in reference.state_dict().items()
              if "num_batches" not in k}
    for exact, ours, *torch32 in zip(*runs, strict=True):
        names = exact.series.keys()
        out.drift.append({n: drift([ours.series[n]], [exact.series[n]])[0] for n in names})
        out.floor.append({n: floors([[run.series[n]] for run in torch32],
                                    [exact.series[n]])[0] for n in names})
        out.counts.append((ours.counts, exact.counts))
        out.norms.append(exact.norm)
        out.rates.append(exact.rate)
        after = exact.series["model"][1]
        out.moved.append({kind: _largest_change(after, before, kind == "statistics")
                          for kind in ("parameters", "statistics")})
        out.lag.append({n: _largest_change(exact.series[n][1], after, False) for n in names
                        if n != "model"})
        before = {k: v.copy() for k, v in after.items()}
    return out


def test_the_recipe_steps_agree_with_the_reference_loop_within_the_float32_floor():
    result = _compare()
    for step, (drifts, floors_) in enumerate(zip(result.drift, result.floor, strict=True), 1):
        for name, errors in drifts.items():
            for kind, error in errors.items():
                floor = floors_[name][kind]
                assert error <= bound(floor), (
                    f"{name}, step {step}, {kind}: relative drift from the reference loop in "
                    f"float64 {error:.2e} > the bound {bound(floor):.2e} of the float32 floor "
                    f"{floor:.2e}")
    for ours, theirs in result.counts:
        assert ours == theirs


def test_the_comparison_sees_every_piece_of_the_recipe():
    """The run exercises what it compares, each by far more than the bound the comparison
    allows: both transforms are drawn, the clipping acts, the rate changes at the epoch,
    every step moves the parameters and statistics, and the averages lag the model once the
    warm-up is over."""
    result = _compare()
    assert {bool(d.cutmix) for d in _decisions()} == {True, False}
    assert min(result.norms) > CONFIG.clip_grad_norm
    warm = CONFIG.lr * CONFIG.warmup_decay
    np.testing.assert_allclose(result.rates, [warm, warm, CONFIG.lr, CONFIG.lr], rtol=1e-12)
    for moved, floor in zip(result.moved, result.floor, strict=True):
        for kind, change in moved.items():
            assert change > 100 * bound(floor["model"][kind]), (kind, change)
    # The averages copy the model at their updates in the warm-up epoch and at their first
    # one after it (the count was reset); in between and after that they lag it.
    copies = {_average_name(1): [True, True, True, False],
              _average_name(2): [True, False, True, False]}
    assert {name: [lag[name] == 0 for lag in result.lag] for name in copies} == copies
    for lag, floor in zip(result.lag, result.floor, strict=True):
        for name, behind in lag.items():
            assert behind == 0 or behind > 100 * bound(floor[name]["parameters"]), (name, behind)
