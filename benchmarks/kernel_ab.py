"""A/B of builds of the compiled CPU kernel, in one process: its 1x1 GEMM layer by layer, or
whole ``optimize_for_inference`` models (``--models``).

Each build's handlers are registered under custom-call targets of its own, and the 1x1 convs
of ResNet-50 and ResNeXt-101 32x8d (with the bias + ReLU epilogue of an inference model) run
on each, interleaved one call each per round, medians after warm-up; outputs are checked
against XLA's conv. GFLOP/s count 2 x MACs. With ``--models``, each build's program is
traced with the library's target names pointed at that build's handlers and compiled ahead
of time, so every program keeps its own build; outputs are compared with the first build's.

Build the variant to compare into another file first, e.g.:
    git stash && python setup.py build_ext --inplace
    cp resnext_flax/nn/lowering/_cpu_direct.so /tmp/old.so
    git stash pop && python setup.py build_ext --inplace
    python benchmarks/kernel_ab.py --builds /tmp/old.so,resnext_flax/nn/lowering/_cpu_direct.so
    python benchmarks/kernel_ab.py --builds /tmp/old.so,resnext_flax/nn/lowering/_cpu_direct.so \
        --models resnet50,resnext50_32x4d --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from conv_kernels import POINTWISE
from flax import nnx

from resnext_flax import create_model
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.nn.lowering import kernel
from resnext_flax.nn.ops import conv_xla, epilogue
from resnext_flax.nn.policy import ConvPolicy

#: kernel.py's target-name constants and the handler symbol each one names.
TARGET_SYMBOLS = {"_DIRECT_TARGET": "ResnextDirectConv",
                  "_POINTWISE_TARGET": "ResnextPointwiseConv",
                  "_BOUNDARY_TARGET": "ResnextFusionBoundary",
                  "_DIRECT_ACT_TARGET": "ResnextDirectConvBiasAct",
                  "STEM_TARGET": "ResnextStemConv", "POOL_TARGET": "ResnextMaxPool"}


def register(index: int, path: str, helpers: int, gemm_avx2: bool = False) -> dict[str, str]:
    """Registers one build's handlers under targets of their own: constant -> target."""
    lib = ctypes.CDLL(str(Path(path).resolve()))
    lib.resnext_direct_conv_set_helpers(helpers)
    if gemm_avx2:
        lib.resnext_gemm_set_avx512(0)
    targets = {}
    for constant, symbol in TARGET_SYMBOLS.items():
        if not hasattr(lib, symbol):  # an older build: its programs do without
            continue
        targets[constant] = f"resnext_flax_kernel_ab_{index}{constant.lower()}"
        jax.ffi.register_ffi_target(targets[constant], jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return targets


def _unfused_direct(x, kernel_, bias, *, relu, stride, padding, groups, differentiate_with,
                    blocked):
    """The direct conv with its bias and ReLU in XLA (as before the direct epilogue)."""
    y = kernel.conv2d(x, kernel_, stride=stride, padding=padding, groups=groups,
                      differentiate_with=differentiate_with, blocked=blocked)
    return epilogue(y, bias, None, relu)


def model_program(targets: dict[str, str], name: str, batch: int, size: int):
    """The folded model's forward pass compiled against one build's handlers (a build without
    the direct convs' epilogue gets their bias and ReLU in XLA; one without the stem form, XLA's
    stem)."""
    assert kernel.available(), kernel.unavailable_reasons()
    jax.clear_caches()  # no program traced for another build may be reused
    for constant, target in targets.items():
        setattr(kernel, constant, target)
    model = create_model(name, rngs=nnx.Rngs(0))
    # A build without the stem form runs the stem in XLA.
    folded = optimize_for_inference(model, policy=ConvPolicy(stem="STEM_TARGET" in targets))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)),
                         jnp.float32)
    fused_direct = kernel.conv2d_bias_act
    if "_DIRECT_ACT_TARGET" not in targets:
        kernel.conv2d_bias_act = _unfused_direct
    try:
        compiled = jax.jit(lambda x: folded(x)).lower(images).compile()
    finally:
        kernel.conv2d_bias_act = fused_direct
    text = compiled.as_text()
    assert targets["_POINTWISE_TARGET"] in text, "the program does not call this build"
    return lambda: compiled(images).block_until_ready()


def measure_models(builds: list[dict[str, str]], args) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            calls = [model_program(t, name, batch, args.size) for t in builds]
            first = np.asarray(calls[0]())
            errors = [float(np.abs(np.asarray(c()) - first).max() / np.abs(first).max())
                      for c in calls]
            times = interleaved(calls, args)
            ms = [statistics.median(t) * 1e3 for t in times]
            rows.append({"model": name, "batch": batch, "ms": ms, "errors": errors})
            print(f"{name} b{batch}: " + "  ".join(f"{m:8.2f} ms" for m in ms)
                  + f"  first/last {ms[0] / ms[-1]:5.3f}  err {max(errors):.1e}", flush=True)
    return rows


def interleaved(calls: list, args) -> list[list[float]]:
    """Times per call, one call each per round, each round starting one call later."""
    for f in calls:
        for _ in range(args.warmup):
            f()
    times = [[] for _ in calls]
    for round_ in range(args.repeats):
        for i in [(round_ + j) % len(calls) for j in range(len(calls))]:
            t0 = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t0)
    return times


def gemm_call(targets: dict[str, str], stride: int):
    target = targets["_POINTWISE_TARGET"]

    def call(x, blocked, bias):
        units, _, _, _, unit = blocked.shape
        n, h, w, _ = x.shape
        out = jax.ShapeDtypeStruct((n, (h - 1) // stride + 1, (w - 1) // stride + 1,
                                    units * unit), jnp.float32)
        return jax.ffi.ffi_call(target, out)(x, blocked, bias, stride=np.int64(stride),
                                             relu=True)
    return jax.jit(call)


def measure(targets: list[dict[str, str]], batch: int, h: int, cin: int, cout: int, stride: int,
            args) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, cin, cout)) / np.sqrt(cin), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(cout), jnp.float32)
    blocked = kernel.block_kernel(k, 1)
    reference = np.asarray(jax.nn.relu(conv_xla(x, k, stride, 0, 1) + bias))
    calls, errors = [], []
    for build in targets:
        f = gemm_call(build, stride)
        errors.append(float(np.abs(np.asarray(f(x, blocked, bias)) - reference).max()
                            / np.abs(reference).max()))
        calls.append(lambda f=f: f(x, blocked, bias).block_until_ready())
    ms = [statistics.median(t) * 1e3 for t in interleaved(calls, args)]
    ho = (h - 1) // stride + 1
    flops = 2 * batch * ho * ho * cin * cout
    return {"ms": ms, "gflops": [flops / m / 1e6 for m in ms], "errors": errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", required=True, help="comma-separated paths of built .so files")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated substrings of layer names")
    p.add_argument("--helpers", default="-1",
                   help="helper threads from XLA's pool per build, comma-separated (one value: "
                        "all builds; -1: as many as the pool has; 0: the calling thread only)")
    p.add_argument("--gemm-avx2", default="",
                   help="comma-separated indices of builds whose GEMM and stem run AVX2 forms")
    p.add_argument("--models", default="",
                   help="comma-separated model names: whole optimize_for_inference models")
    p.add_argument("--size", type=int, default=224, help="image size of --models")
    p.add_argument("--json", default="")
    args = p.parse_args()
    builds = args.builds.split(",")
    helpers = args.helpers.split(",")
    helpers = helpers * len(builds) if len(helpers) == 1 else helpers
    avx2 = {int(i) for i in args.gemm_avx2.split(",") if i}
    targets = [register(i, path, int(h), i in avx2) for i, (path, h) in enumerate(
        zip(builds, helpers, strict=True))]
    if args.models:
        rows = measure_models(targets, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"builds": builds, "rows": rows}, indent=1))
        return
    only = [s for s in args.only.split(",") if s]
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        totals = np.zeros(len(targets))
        for name, h, cin, cout, stride in POINTWISE:
            if only and not any(s in name for s in only):
                continue
            r = measure(targets, batch, h, cin, cout, stride, args)
            totals += r["ms"]
            rows.append({"batch": batch, "layer": name, **r})
            cells = "  ".join(f"{m:7.3f} ms {g:6.1f} GF/s"
                              for m, g in zip(r["ms"], r["gflops"], strict=True))
            ratio = r["ms"][0] / r["ms"][-1]
            print(f"b{batch} {name:26s} {cells}  first/last {ratio:5.2f}  "
                  f"err {max(r['errors']):.1e}", flush=True)
        print(f"b{batch} total " + "  ".join(f"{t:8.2f} ms" for t in totals)
              + f"  first/last {totals[0] / totals[-1]:5.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"builds": builds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
