"""A/B of glibc's malloc settings under a compiled inference program, in one process.

XLA:CPU allocates an execution's buffers anew on every call. glibc serves large blocks with
fresh ``mmap`` pages and unmaps them on free, so every call pays a page fault (and the
kernel's zeroing) per 4 KiB of activations. This script runs the same compiled
``optimize_for_inference`` program with glibc's defaults and with large blocks kept in the heap
(``mallopt``: no mmap, no trimming), switching settings between calls, interleaved, medians after
warm-up, and counts the minor page faults per call of each. ``--torch`` times torchvision's
eager model (channels_last, ``inference_mode``) the same way: the settings are process-wide,
so a program that shares the process with the library gets them too.

    python benchmarks/malloc_ab.py --models resnet50,resnext50_32x4d --batch-sizes 1,8
    python benchmarks/malloc_ab.py --models resnet101 --batch-sizes 8 --torch
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnext_flax import create_model
from resnext_flax.models.folding import optimize_for_inference

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: glibc's defaults (mallopt(3)): 65536 mmapped blocks at most, trim above 128 KiB.
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}
KEEP_IN_HEAP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 62}


def apply(libc: ctypes.CDLL, settings: dict[int, int]) -> None:
    for option, value in settings.items():
        if libc.mallopt(option, ctypes.c_int(min(value, 2**31 - 1))) != 1:
            raise RuntimeError(f"mallopt({option}, {value}) failed")


def library_call(name: str, batch: int, size: int):
    folded = optimize_for_inference(create_model(name, rngs=nnx.Rngs(0)))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)),
                         jnp.float32)
    compiled = jax.jit(lambda x: folded(x)).lower(images).compile()
    return lambda: compiled(images).block_until_ready()


def torch_call(name: str, batch: int, size: int, threads: int):
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = getattr(torchvision.models, name)().eval().to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def call():
        with torch.inference_mode():
            return model(images)

    return call


def run(name: str, batch: int, args, libc: ctypes.CDLL) -> dict:
    call = (torch_call(name, batch, args.size, args.threads) if args.torch
            else library_call(name, batch, args.size))
    sides = {"glibc_defaults": GLIBC_DEFAULTS, "keep_in_heap": KEEP_IN_HEAP}
    times = {side: [] for side in sides}
    faults = {side: [] for side in sides}
    order = list(sides)
    for round_ in range(args.warmup + args.repeats):
        for side in order[round_ % 2:] + order[:round_ % 2]:
            apply(libc, sides[side])
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
            if round_ >= args.warmup:
                times[side].append(elapsed)
                faults[side].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    apply(libc, GLIBC_DEFAULTS)
    ms = {side: statistics.median(t) * 1e3 for side, t in times.items()}
    row = {"model": name, "batch": batch, "side": "torch eager" if args.torch else "library",
           "ms": ms,
           "minor_faults_per_call": {s: statistics.median(f) for s, f in faults.items()},
           "speedup_keep_in_heap": ms["glibc_defaults"] / ms["keep_in_heap"]}
    print(f"{row['side']} {name} b{batch}: defaults {ms['glibc_defaults']:.1f} ms "
          f"({row['minor_faults_per_call']['glibc_defaults']:.0f} faults), keep in heap "
          f"{ms['keep_in_heap']:.1f} ms ({row['minor_faults_per_call']['keep_in_heap']:.0f}"
          f" faults): x{row['speedup_keep_in_heap']:.3f}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnext50_32x4d")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch", action="store_true",
                   help="time torchvision's eager model instead of the library's")
    p.add_argument("--threads", type=int, default=2, help="torch's intra-op threads")
    p.add_argument("--json", default="")
    args = p.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    rows = [run(name, int(b), args, libc) for name in args.models.split(",")
            for b in args.batch_sizes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
