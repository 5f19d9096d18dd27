"""How long ``create_model(name)`` takes with random init: the batched draw against drawing
each parameter eagerly (the earlier behaviour), each in a fresh process, alternating.

A fresh process is the honest setting: the eager path compiles one small program per
parameter shape, and a second call in the same process would reuse them. JAX's backend is
started before the clock runs; the first call of a process includes compiling the batched
draw's one program.

    python benchmarks/construction.py --models resnet50,resnext50_32x4d --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import contextlib, json, sys, time
import jax
jax.devices()
from flax import nnx
import resnext_flax
from resnext_flax.models import resnet
if sys.argv[2] == "eager":
    resnet.batched_init = contextlib.nullcontext
times = []
for seed in (0, 1):
    start = time.perf_counter()
    model = resnext_flax.create_model(sys.argv[1], rngs=nnx.Rngs(seed))
    jax.block_until_ready(nnx.state(model))
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def measure(name: str, path: str) -> list[float]:
    """Seconds of the first and second ``create_model`` call in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, name, path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("| model | path | first call s (median) | second call s (median) |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        runs = {"batched": [], "eager": []}
        for _ in range(args.repeats):
            for path in runs:  # alternating, so load hits both alike
                runs[path].append(measure(name, path))
        for path, times in runs.items():
            first = statistics.median(t[0] for t in times)
            second = statistics.median(t[1] for t in times)
            print(f"| {name} | {path} | {first:.2f} | {second:.2f} |", flush=True)


if __name__ == "__main__":
    main()
