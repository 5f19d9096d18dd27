"""Per-layer timing of one convolution (3x3, or 1x1 with ``--shapes pointwise``, the 7x7 stem
with ``--shapes stem``) or of the stem's max-pool (``--shapes pool``): the library's pure-XLA
lowering (the automatic policy without the compiled kernel; XLA's reduce_window), the compiled
CPU kernel (resnext_flax.nn.lowering.kernel: the direct AVX2 kernel, whose 1x1 form is a GEMM;
nn.lowering.stem for the stem's conv and pool) and torch channels_last.

All sides run in one process, interleaved one call each per round (so load from other
processes hits them alike), fp32, medians over rounds after warm-up; outputs are checked
against XLA's conv. Kernels are prepared once as for inference (``prepare_kernel``:
Winograd's tiles, the direct kernel's blocked layout), as ``optimize_for_inference`` runs them.

Example (the ResNeXt grouped-conv shapes at batch 8 and 1):
    python benchmarks/conv_kernels.py --batch-sizes 8,1
    python benchmarks/conv_kernels.py --shapes dense --batch-sizes 8
    python benchmarks/conv_kernels.py --shapes pointwise --batch-sizes 8,1
    python benchmarks/conv_kernels.py --shapes stem,pool --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from resnext_flax.nn.lowering import conv as conv_ops
from resnext_flax.nn.lowering import kernel, stem
from resnext_flax.nn.ops import conv_xla, max_pool
from resnext_flax.nn.policy import ConvPolicy

# (name, h=w, channels, groups, stride) of ResNeXt / ResNet 3x3 convs (input size, NHWC).
GROUPED = [
    ("RNX50 layer1", 56, 128, 32, 1),
    ("RNX50 layer2.0", 56, 256, 32, 2),
    ("RNX50 layer2", 28, 256, 32, 1),
    ("RNX50 layer3.0", 28, 512, 32, 2),
    ("RNX50 layer3", 14, 512, 32, 1),
    ("RNX50 layer4.0", 14, 1024, 32, 2),
    ("RNX50 layer4", 7, 1024, 32, 1),
    ("32x8d layer1", 56, 256, 32, 1),
    ("32x8d layer2.0", 56, 512, 32, 2),
    ("32x8d layer2", 28, 512, 32, 1),
    ("32x8d layer3", 14, 1024, 32, 1),
    ("32x8d layer4", 7, 2048, 32, 1),
    ("64x4d layer1", 56, 256, 64, 1),
    ("64x4d layer2", 28, 512, 64, 1),
    ("64x4d layer3", 14, 1024, 64, 1),
    ("64x4d layer4", 7, 2048, 64, 1),
]
DENSE = [
    ("RN50 layer1", 56, 64, 1, 1),
    ("RN50 layer2.0", 56, 128, 1, 2),
    ("RN50 layer2", 28, 128, 1, 1),
    ("RN50 layer3.0", 28, 256, 1, 2),
    ("RN50 layer3", 14, 256, 1, 1),
    ("RN50 layer4.0", 14, 512, 1, 2),
    ("RN50 layer4", 7, 512, 1, 1),
    ("WRN50 layer1", 56, 128, 1, 1),
    ("WRN50 layer2", 28, 256, 1, 1),
    ("WRN50 layer3", 14, 512, 1, 1),
    ("WRN50 layer4.0", 14, 1024, 1, 2),
    ("WRN50 layer4", 7, 1024, 1, 1),
]
# 1x1 convs: (name, h=w, in channels, out channels, stride); "d" prints the in channels.
POINTWISE = [
    ("RN50 layer1 expand", 56, 64, 256, 1),
    ("RN50 layer1 reduce", 56, 256, 64, 1),
    ("RNX50 layer1 reduce", 56, 256, 128, 1),
    ("RN50 layer2 expand", 28, 128, 512, 1),
    ("RN50 layer2 reduce", 28, 512, 128, 1),
    ("RN50 layer3 expand", 14, 256, 1024, 1),
    ("RN50 layer3 reduce", 14, 1024, 256, 1),
    ("RN50 layer4 expand", 7, 512, 2048, 1),
    ("RN50 layer4 reduce", 7, 2048, 512, 1),
    ("RN50 layer2.0 downsample", 56, 256, 512, 2),
    ("RN50 layer3.0 downsample", 28, 512, 1024, 2),
    ("RN50 layer4.0 downsample", 14, 1024, 2048, 2),
    ("32x8d layer2", 28, 512, 512, 1),
    ("32x8d layer3", 14, 1024, 1024, 1),
]
# The 7x7 stride-2 stem (3 -> 64 channels, padding 3): (name, h, cin, cout, kernel, pad).
STEM = [("stem 7x7", 224, 3, 64, 7, 3)]
# The stem's max-pool: (name, h=w, channels, window, stride, padding).
POOL = [("stem max-pool 3x3/2", 112, 64, 3, 2, 1)]


def timed(calls: dict, args) -> dict:
    """Median milliseconds of each call, interleaved one call each per round after warm-up."""
    for f in calls.values():
        for _ in range(args.warmup):
            f()
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def measure(batch: int, h: int, cin: int, cout: int, size: int, groups: int, stride: int,
            padding: int, args) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((size, size, cin // groups, cout)) * 0.05, jnp.float32)
    policy = ConvPolicy(exclude={"ffi"})
    lowering = policy.choose(x.shape, k.shape, stride=stride, padding=padding, groups=groups)
    prepared = conv_ops.prepare_kernel(k, stride=stride, groups=groups, policy=policy)
    lowered = jax.jit(lambda x, k, p: conv_ops.conv2d(
        x, k, stride=stride, padding=padding, groups=groups, policy=policy, prepared=p))
    compiled = lowered.lower(x, k, prepared).compile()
    fns = {"lowering": lambda x, k, f=compiled: f(x, k, prepared)}
    if stem.supports(x.shape, k.shape, stride, padding, groups, jnp.float32):
        blocked = kernel.block_kernel(k, groups)
        compiled = jax.jit(lambda x, k, b: stem.conv(
            x, k, stride=stride, padding=padding, blocked=b)).lower(x, k, blocked).compile()
        assert kernel.STEM_TARGET in compiled.as_text()
        fns["direct"] = lambda x, k, f=compiled, b=blocked: f(x, k, b)
    elif kernel.supports(x.shape, k.shape, stride, padding, groups, jnp.float32):
        blocked = kernel.block_kernel(k, groups)
        compiled = jax.jit(lambda x, k, b: kernel.conv2d(
            x, k, stride=stride, padding=padding, groups=groups,
            blocked=b)).lower(x, k, blocked).compile()
        assert "resnext_flax_direct_conv" in compiled.as_text()
        fns["direct"] = lambda x, k, f=compiled, b=blocked: f(x, k, b)
    calls = {name: (lambda f=f: f(x, k).block_until_ready()) for name, f in fns.items()}
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last)
    tw = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())

    def torch_call():
        with torch.inference_mode():
            return torch.nn.functional.conv2d(tx, tw, stride=stride, padding=padding,
                                              groups=groups)

    calls["torch_cl"] = torch_call
    reference = np.asarray(conv_xla(x, k, stride, padding, groups))
    scale = np.abs(reference).max()
    errors = {name: float(np.abs(np.asarray(f(x, k)) - reference).max() / scale)
              for name, f in fns.items()}
    return {"lowering": lowering, "ms": timed(calls, args), "errors": errors}


def measure_pool(batch: int, h: int, c: int, window: int, stride: int, padding: int,
                 args) -> dict:
    """XLA's reduce_window, the kernel's max-pool and torch's; the kernel's must be XLA's
    bits."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, h, h, c)), jnp.float32)
    config = {"window": window, "stride": stride, "padding": padding}
    xla = jax.jit(lambda x: max_pool(x, **config)).lower(x).compile()
    fast = jax.jit(lambda x: stem.max_pool(x, **config)).lower(x).compile()
    assert kernel.POOL_TARGET in fast.as_text()
    np.testing.assert_array_equal(np.asarray(fast(x)), np.asarray(xla(x)))
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last)

    def torch_call():
        with torch.inference_mode():
            return torch.nn.functional.max_pool2d(tx, window, stride, padding)

    calls = {"lowering": lambda: xla(x).block_until_ready(),
             "direct": lambda: fast(x).block_until_ready(), "torch_cl": torch_call}
    return {"lowering": "reduce_window", "ms": timed(calls, args), "errors": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="grouped",
                   help="comma-separated: grouped, dense, pointwise, stem, pool")
    p.add_argument("--batch-sizes", default="8,1")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of layer names")
    args = p.parse_args()
    shapes = []  # (name, h, cin, cout, kernel size, groups, stride, padding)
    for kind in args.shapes.split(","):
        if kind == "pool":  # groups 0 marks a pool: (name, h, c, c, window, 0, stride, padding)
            shapes += [(n, h, c, c, k, 0, s, p) for n, h, c, k, s, p in POOL]
        elif kind == "stem":
            shapes += [(n, h, ci, co, k, 1, 2, p) for n, h, ci, co, k, p in STEM]
        elif kind == "pointwise":
            shapes += [(n, h, ci, co, 1, 1, s, 0) for n, h, ci, co, s in POINTWISE]
        else:
            table = {"grouped": GROUPED, "dense": DENSE}[kind]
            shapes += [(n, h, c, c, 3, g, s, 1) for n, h, c, g, s in table]
    if args.only:
        shapes = [s for s in shapes if any(o in s[0] for o in args.only.split(","))]
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"compiled kernel: {kernel.available() or kernel.unavailable_reasons()}")
    cols = ["lowering", "direct", "torch_cl"]
    print(f"| layer | input (NHWC) | d | stride | {' | '.join(cols)} | lowering / direct | "
          "torch / direct |")
    print("|" + "---|" * (len(cols) + 6))
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for name, h, cin, cout, size, groups, stride, padding in shapes:
            if groups == 0:
                r = measure_pool(batch, h, cin, size, stride, padding, args)
                groups = 1
            else:
                r = measure(batch, h, cin, cout, size, groups, stride, padding, args)
            for side, err in r["errors"].items():
                assert err < 1e-5, (name, side, err)
            ms = r["ms"]
            cells = [f"{ms[col]:.2f}" if col in ms else "" for col in cols]
            cells[0] += f" ({r['lowering']})"
            ratios = [f"{ms[a] / ms['direct']:.2f}" if "direct" in ms else ""
                      for a in ("lowering", "torch_cl")]
            print(f"| {name} | {batch}x{h}x{h}x{cin} | {cin // groups} | {stride} | "
                  f"{' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
