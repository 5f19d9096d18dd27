"""Whole-model A/B of where the compiled kernel takes dense convs (the rule knobs of
``ConvPolicy``), against alternatives, in one process.

Each rule is a policy; the folded model is compiled under each, and all compiled programs are
timed interleaved (one call each per round, medians). The first rule is the baseline of the
printed speed ratios. Rules: ``none`` (no dense conv in the kernel: Winograd, XLA's conv and
matmuls), ``default`` (the library's rule), ``no_gemm`` (the default but 1x1 convs as XLA
matmuls), ``no_fuse`` (the default, but bias, residual and ReLU after each conv in XLA instead
of the GEMM's epilogue, and no residual fusion boundary), ``stride2`` (stride-2 3x3 convs
only), ``all`` (every dense conv).

Example (the figures in docs/performance.md):
    python benchmarks/dense_rule_ab.py --models resnet18,resnet34 --batch-sizes 1,8 \
        --rules none,default,stride2
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import resnext_flax
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.nn.lowering import kernel
from resnext_flax.nn.policy import ConvPolicy

RULES = {
    "none": ConvPolicy(gemm_1x1=False, direct_strided=False, direct_max_pixels=0),
    "default": ConvPolicy(),
    "no_gemm": ConvPolicy(gemm_1x1=False),
    "no_fuse": ConvPolicy(fuse=False),
    "stride2": ConvPolicy(gemm_1x1=False, direct_max_pixels=0),
    "all": ConvPolicy(direct_max_pixels=None),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rules", default="none,default")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    if not kernel.available():
        raise SystemExit(f"the compiled kernel is not loaded: {kernel.unavailable_reasons()}")
    rules = args.rules.split(",")
    unknown = [rule for rule in rules if rule not in RULES]
    if unknown:
        p.error(f"unknown rules {unknown}; choose from {', '.join(RULES)}")
    for name in args.models.split(","):
        model = resnext_flax.create_model(name)
        model.eval()
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            x = np.random.default_rng(0).standard_normal(
                (batch, args.size, args.size, 3)).astype(np.float32)
            programs = {}
            for rule in rules:
                folded = optimize_for_inference(model, policy=RULES[rule])
                compiled = jax.jit(lambda f, a: f(a)).lower(folded, x).compile()
                programs[rule] = (compiled, folded)
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
