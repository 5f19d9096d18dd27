"""Where the time goes inside one jitted inference call: XLA thunk times by output shape.

Runs this library's folded inference (random weights; torch is not needed) a few times under
``jax.profiler``, reads the trace's per-thunk events back, and prints the time per call grouped
by the thunk's kind and output shape (a 1x1 conv is a ``ynn`` dot of shape [N*H*W, O]; a
Winograd product a ``ynn`` dot of [groups, tiles, O]; shifted taps and transforms are ``loop``
fusions; the compiled CPU kernels are ``ffi`` custom calls). Thunks that run concurrently
(e.g. a block's downsample beside its first conv) both count in full, so the sum can exceed
the wall time, which is printed too.

Example (the ResNeXt-50 breakdown in docs/performance.md):
    python benchmarks/profile_ops.py --model resnext50_32x4d --batch 8 --top 25
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

import resnext_flax
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.nn.policy import LOWERINGS, ConvPolicy

_DEFINITION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\S+) ")


def thunk_shapes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> output shape (layout stripped), from compiled HLO text."""
    shapes = {}
    for line in hlo_text.splitlines():
        match = _DEFINITION.match(line)
        if match:
            shapes[match.group(1)] = match.group(2).split("{")[0]
    return shapes


def thunk_times(trace_dir: str, calls: int) -> dict[str, float]:
    """Thunk name -> milliseconds per call, from the profiler's Chrome trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event["dur"] / 1e3 / calls
    return totals


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnext50_32x4d", choices=resnext_flax.list_models())
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calls", type=int, default=3, help="profiled calls (times are per call)")
    p.add_argument("--top", type=int, default=25, help="groups to print")
    p.add_argument("--exclude", default="", help="lowerings to take out of the automatic "
                   f"choice, comma-separated ({', '.join(LOWERINGS[1:])})")
    args = p.parse_args(argv)

    model = resnext_flax.create_model(args.model)
    model.eval()
    policy = ConvPolicy(exclude=[e for e in args.exclude.split(",") if e])
    folded = optimize_for_inference(model, policy=policy)
    images = np.random.default_rng(0).standard_normal(
        (args.batch, args.size, args.size, 3)).astype(np.float32)
    compiled = jax.jit(lambda f, x: f(x)).lower(folded, images).compile()
    for _ in range(2):
        compiled(folded, images).block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(args.calls):
            compiled(folded, images).block_until_ready()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.calls
        jax.profiler.stop_trace()
        times = thunk_times(trace_dir, args.calls)

    shapes = thunk_shapes(compiled.as_text())
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in times.items():
        if name in shapes:
            kind = ("ynn " if name.startswith("ynn")
                    else "ffi " if name.startswith("ffi_call") else "loop")
            groups[f"{kind} {shapes[name]}"][0] += ms
            groups[f"{kind} {shapes[name]}"][1] += 1
    total = sum(ms for ms, _ in groups.values())
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}: {wall_ms:.1f} ms per "
          f"call under the profiler, {total:.1f} ms of thunk time")
    kinds: dict[str, float] = collections.defaultdict(float)
    for key, (ms, _) in groups.items():
        kinds[key.split()[0]] += ms
    print("by kind: " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in sorted(kinds.items())))
    print(f"{'ms/call':>8}  {'thunks':>6}  kind and output shape")
    for key, (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{ms:8.1f}  {count:6d}  {key}")


if __name__ == "__main__":
    main()
