"""Images/s of one training step: the library's jitted step as ``resnext-flax train`` runs it
vs PyTorch eager's step as torchvision's classification reference runs it, in one process.

Both sides train with the ``torchvision-v2`` recipe's step (:mod:`resnext_flax.recipes`): SGD
with momentum 0.9, weight decay 2e-5 and none on the normalization layers (the reference's
``set_weight_decay`` parameter groups), label smoothing 0.1, and MixUp (alpha 0.2) or CutMix
(alpha 1.0) drawn for each batch. Models the recipe does not cover use its common settings.
The EMA of the weights (every 32 steps, outside the step on both sides) is not timed.

- **library**: the step ``resnext_flax.finetuning.train`` compiles:
  ``parallel.make_parallel_train_step`` over ``parallel.data_mesh()`` (mixing inside the
  step), the optimizer of ``finetuning.optimizer(config, steps_per_epoch)``, the model of
  ``finetuning.initial_model`` (random weights; ``bf16`` builds it with bfloat16 compute as
  ``TrainConfig(bf16=True)`` does). A step is ``shard_batch`` of the NHWC float32 batch, the
  step, and waiting for its results.
- **torch**: the torchvision model in ``channels_last`` (the same NHWC batch, viewed as NCHW
  without a copy), ``torchvision.transforms.v2``'s ``RandomChoice([MixUp, CutMix])`` on the
  batch, forward and ``CrossEntropyLoss(label_smoothing=0.1)`` (under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` for bf16), ``zero_grad``, backward,
  ``SGD.step``, and the loss and correct count read back, as the reference's loop does.

The sides are timed interleaved, one step each per round in a rotated order, so load from
other processes hits both alike; medians over ``--repeats`` rounds after ``--warmup`` steps of
each (the first compiles the library's step). PyTorch gets ``--threads`` intra-op threads,
by default the CPUs this process may run on, as XLA's CPU pool has. The 1-minute load average
is recorded before and after each case, and the process's peak resident memory: both sides'
models, activations and gradients live in this one process; where they do not fit,
``--sides library`` (or ``torch_eager``) times one side alone (no ratio).

    python benchmarks/train_step.py --json benchmarks/results/cpu_2core_train_step.json
    python benchmarks/train_step.py --models resnet50 --batch-size 16 --dtypes fp32 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

import resnext_flax
from resnext_flax import finetuning, parallel, recipes, training
from resnext_flax.finetuning import TrainConfig

RECIPE = "torchvision-v2"
MODELS = ("resnet50", "resnext50_32x4d", "resnext101_32x8d")
DTYPES = ("fp32", "bf16")
SIDES = ("library", "torch_eager")
#: The optimizer's schedule depends on the epoch length; the step's cost does not.
STEPS_PER_EPOCH = 1000


def recipe_config(name: str, batch: int, dtype: str) -> TrainConfig:
    """The recipe's settings for `name` (its common ones for a model it does not cover) with
    this benchmark's batch and compute dtype."""
    covered = name in recipes.recipe_models(RECIPE)
    config = recipes.recipe_config(RECIPE, name if covered else MODELS[0], batch_size=batch,
                                   bf16=dtype == "bf16")
    return config if covered else dataclasses.replace(config, model=name)


def library_step(config: TrainConfig,
                 num_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """A function that runs one training step of the library on a host batch (NHWC float32
    images, int labels) and returns its loss, the state carried from call to call."""
    mesh = parallel.data_mesh()
    model, _ = finetuning.initial_model(config, num_classes, progress=False)
    tx = finetuning.optimizer(config, STEPS_PER_EPOCH)
    state = training.create_train_state(model, tx)
    state = parallel.replicate(mesh, parallel.with_batchnorm_axis(state))
    step = parallel.make_parallel_train_step(mesh, label_smoothing=config.label_smoothing,
                                             mix=config.mixing(num_classes),
                                             mix_seed=config.seed)

    def call(images: np.ndarray, labels: np.ndarray) -> float:
        nonlocal state
        x, y = parallel.shard_batch(mesh, images, labels)
        state, metrics = step(state, x, y)
        jax.block_until_ready(state)
        return float(metrics["loss"])

    return call


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     norm_weight_decay: float | None) -> list[dict[str, Any]]:
    """torchvision reference's ``set_weight_decay``: normalization layers' parameters get
    `norm_weight_decay` (None: `weight_decay`), every other parameter `weight_decay`."""
    norm_classes = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm,
                    torch.nn.GroupNorm, torch.nn.modules.instancenorm._InstanceNorm,
                    torch.nn.LocalResponseNorm)
    norm, other = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(module, norm_classes) else other).extend(params)
    norm_decay = weight_decay if norm_weight_decay is None else norm_weight_decay
    return [{"params": other, "weight_decay": weight_decay},
            {"params": norm, "weight_decay": norm_decay}]


def torch_step(config: TrainConfig,
               num_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """A function that runs one training step of torchvision's reference loop
    (channels_last) on a host batch (NHWC float32 images, int labels) and returns its
    loss."""
    if config.bias_weight_decay is not None and config.bias_weight_decay != config.weight_decay:
        raise ValueError("the torch side has the reference's groups only: biases decay like "
                         "weights (bias_weight_decay None)")
    torch.manual_seed(config.seed)
    model = torchvision.models.get_model(config.model, weights=None, num_classes=num_classes)
    model = model.to(memory_format=torch.channels_last).train()
    # The schedule's first rate, the library's at these steps: the recipe's peak rate on
    # random data can diverge, and a diverged step need not cost what a real one does.
    optimizer = torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.norm_weight_decay),
        lr=config.schedule().rate(0.0), momentum=config.momentum,
        weight_decay=config.weight_decay)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    mix = v2.RandomChoice([v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes),
                           v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes)])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)

    def call(images: np.ndarray, labels: np.ndarray) -> float:
        # NHWC memory seen as NCHW: already channels_last, no copy.
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        image, target = mix(x, torch.from_numpy(labels.astype(np.int64)))
        image = image.contiguous(memory_format=torch.channels_last)  # no copy when it is
        with autocast:
            output = model(image)
            loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        int((output.argmax(1) == target.argmax(1)).sum())  # the reference's accuracy count
        return loss.item()

    return call


def run_case(name: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    config = recipe_config(name, args.batch_size, dtype)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3),
                                 dtype=np.float32)
    labels = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
    load_start = os.getloadavg()[0]
    build = {"library": library_step, "torch_eager": torch_step}
    steps = {side: build[side](config, args.num_classes) for side in args.sides}
    calls = {key: lambda f=fn: f(images, labels) for key, fn in steps.items()}
    first: dict[str, dict[str, float]] = {}
    for key, fn in calls.items():  # warm-up: the first library call compiles
        t0 = time.perf_counter()
        loss = fn()
        first[key] = {"first_step_s": time.perf_counter() - t0, "first_loss": loss}
        for _ in range(args.warmup - 1):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    losses: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for round_ in range(args.repeats):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            t0 = time.perf_counter()
            losses[key].append(calls[key]())
            times[key].append(time.perf_counter() - t0)
    results = {}
    for key, ts in times.items():
        median = statistics.median(ts)
        results[key] = first[key] | {"median_s": median, "images_per_s": args.batch_size / median,
                                     "times_s": ts, "losses": losses[key]}
    ratio = (results["library"]["images_per_s"] / results["torch_eager"]["images_per_s"]
             if len(results) == len(SIDES) else None)
    return {"model": name, "dtype": dtype, "batch": args.batch_size, "size": args.image_size,
            "recipe": RECIPE, "recipe_covers_model": name in recipes.recipe_models(RECIPE),
            "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0],
            "library_vs_torch": ratio, "results": results}


def table(cases: list[dict[str, Any]]) -> str:
    lines = ["| model | dtype | batch | library img/s | torch eager img/s | library/torch | load |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        cells = [f"{c['results'][side]['images_per_s']:.2f}" if side in c["results"] else "-"
                 for side in SIDES]
        ratio = "-" if c["library_vs_torch"] is None else f"{c['library_vs_torch']:.2f}"
        lines.append(f"| {c['model']} | {c['dtype']} | {c['batch']} | {' | '.join(cells)} | "
                     f"{ratio} | {c['loadavg_1min_start']:.1f}-{c['loadavg_1min_end']:.1f} |")
    return "\n".join(lines)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated variants, or 'all'")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtypes", default=",".join(DTYPES), help="fp32, bf16 or both")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    p.add_argument("--threads", type=int, default=_cpus(),
                   help="PyTorch's intra-op threads (default: this process's CPUs, as XLA)")
    p.add_argument("--sides", default=",".join(SIDES),
                   help="both (default), or one where both do not fit in memory (no ratio)")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    if not args.sides or set(args.sides) - set(SIDES):
        p.error(f"--sides: choose from {', '.join(SIDES)}, got {args.sides}")
    known = resnext_flax.list_models()
    args.models = known if args.models == "all" else [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(known):
        p.error(f"--models: unknown {sorted(set(args.models) - set(known))}; choose from "
                f"{', '.join(known)} or 'all'")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}, got {args.dtypes}")
    devices = jax.device_count()
    if args.batch_size < 1 or args.batch_size % devices:
        p.error(f"--batch-size must be a positive multiple of the {devices} JAX devices")
    if args.repeats < 1 or args.warmup < 1 or args.threads < 1 or args.num_classes < 2:
        p.error("--repeats, --warmup and --threads must be at least 1, --num-classes 2")
    return args


def machine() -> dict[str, Any]:
    return {"platform": sys.platform, "cpu_count": os.cpu_count(), "cpus_usable": _cpus(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_1min_start": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info['cpus_usable']} CPUs, JAX {info['jax_backend']} x{len(info['jax_devices'])}, "
          f"{args.threads} torch threads, 1-min load average at start "
          f"{info['loadavg_1min_start']:.1f}")
    cases = []

    def write() -> None:
        """After every case: a run cut short (out of memory, interrupted) keeps its cases."""
        info["loadavg_1min_end"] = os.getloadavg()[0]
        # ru_maxrss is KiB on Linux.
        info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(
                {"machine": info, "args": vars(args), "date": datetime.date.today().isoformat(),
                 "command": "python benchmarks/train_step.py " + " ".join(argv or sys.argv[1:]),
                 "cases": cases}, indent=1))

    for name in args.models:
        for dtype in args.dtypes:
            cases.append(run_case(name, dtype, args))
            print(table(cases[-1:]).splitlines()[-1], flush=True)
            gc.collect()  # the case's models, states and programs go before the next's
            jax.clear_caches()
            write()
    print(table(cases))
    return cases


if __name__ == "__main__":
    main(sys.argv[1:])
