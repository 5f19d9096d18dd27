"""Whole-model A/B of where the compiled kernel takes dense convs (the rule
``cpu_kernels._dense_direct_wins``), against alternatives, in one process.

Each rule is patched in, the folded model compiled under it, and all compiled programs are
timed interleaved (one call each per round, medians). The first rule is the baseline of the
printed speed ratios. Rules: ``none`` (no dense conv in the kernel: Winograd, XLA's conv and
matmuls), ``default`` (the library's rule), ``no_gemm`` (the default but 1x1 convs as XLA
matmuls), ``no_epilogue`` (the default, but bias, residual and ReLU after each 1x1 conv in XLA
instead of the GEMM's epilogue), ``stride2`` (stride-2 3x3 convs only), ``all`` (every
dense conv), ``maps`` (stride 2, plus stride 1 up to 128 channels with pixels x channels
<= 56x56x64 or <= 196 pixels: the per-conv winners at batch 1; no 1x1 convs).

Example (the figures in docs/performance.md):
    python benchmarks/dense_rule_ab.py --models resnet18,resnet34 --batch-sizes 1,8 \
        --rules none,default,maps,stride2
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import resnext_flax
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.nn import cpu_kernels


def _pixels(x_shape, kernel_shape, stride: int, padding: int) -> int:
    return int(np.prod(cpu_kernels._output_size(x_shape, kernel_shape, stride, padding)))


_LIBRARY_RULE = cpu_kernels._dense_direct_wins  # before any rule is patched in
_LIBRARY_EPILOGUE = cpu_kernels.pointwise_supports


def _three(kernel_shape) -> bool:
    return tuple(kernel_shape[:2]) == (3, 3)


RULES = {  # (x_shape, kernel_shape, stride, padding) -> whether the kernel takes the conv
    "none": lambda x, k, s, p: False,
    "default": _LIBRARY_RULE,
    "no_gemm": lambda x, k, s, p: _three(k) and _LIBRARY_RULE(x, k, s, p),
    "no_epilogue": _LIBRARY_RULE,
    "stride2": lambda x, k, s, p: _three(k) and s != 1,
    "all": lambda x, k, s, p: True,
    "maps": lambda x, k, s, p: _three(k) and (s != 1 or _pixels(x, k, s, p) <= 196 or (
        k[2] <= 128 and _pixels(x, k, s, p) * k[2] <= 56 * 56 * 64)),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rules", default="none,default")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    if not cpu_kernels.available("direct"):
        raise SystemExit(f"the compiled kernel is not loaded: {cpu_kernels.unavailable_reasons()}")
    rules = args.rules.split(",")
    for name in args.models.split(","):
        model = resnext_flax.create_model(name)
        model.eval()
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            x = np.random.default_rng(0).standard_normal(
                (batch, args.size, args.size, 3)).astype(np.float32)
            programs = {}
            try:
                for rule in rules:
                    cpu_kernels._dense_direct_wins = RULES[rule]
                    cpu_kernels.pointwise_supports = (
                        (lambda *a: False) if rule == "no_epilogue" else _LIBRARY_EPILOGUE)
                    jax.clear_caches()  # the rule acts at trace time
                    folded = optimize_for_inference(model)
                    compiled = jax.jit(lambda f, a: f(a)).lower(folded, x).compile()
                    programs[rule] = (compiled, folded)
            finally:
                cpu_kernels._dense_direct_wins = _LIBRARY_RULE
                cpu_kernels.pointwise_supports = _LIBRARY_EPILOGUE
                jax.clear_caches()
            times = {rule: [] for rule in rules}
            for rounds, record in ((2, False), (args.repeats, True)):
                for _ in range(rounds):
                    for rule, (compiled, folded) in programs.items():
                        start = time.perf_counter()
                        compiled(folded, x).block_until_ready()
                        if record:
                            times[rule].append(time.perf_counter() - start)
            medians = {rule: statistics.median(t) for rule, t in times.items()}
            base = medians[rules[0]]
            print(f"{name} batch {batch}: " + "  ".join(
                f"{rule} {1e3 * ms:.1f} ms ({base / ms:.2f}x)" for rule, ms in medians.items()),
                flush=True)


if __name__ == "__main__":
    main()
