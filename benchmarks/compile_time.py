"""How long each variant's programs take to trace, lower and compile, cold, in a fresh process.

Three programs per variant: the folded inference forward (``optimize_for_inference``, the
library's default policy), the un-folded eval-mode forward (an eager ``model(x)`` after
``model.eval()``) and the training step (``training.train_step``, SGD, train-mode
BatchNorm). Each is timed in stages with JAX's ahead-of-time API
(``jit(...).trace(...).lower().compile()``), so tracing (Python), lowering (StableHLO) and
XLA's compile show apart. The persistent compilation cache is off in the child.

    python benchmarks/compile_time.py --models all --json benchmarks/results/x.json

``--trees A,B`` runs the children on these checkouts (``PYTHONPATH``), alternating process by
process, for before/after tables (the default: the installed library).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_compilation_cache", False)
jax.devices()
import jax.numpy as jnp
from flax import nnx
import resnext_flax
from resnext_flax import training
try:
    from resnext_flax.models.programs import forward_program
except ImportError:  # an older tree (A/B across commits): its jitted eval-mode apply
    from resnext_flax.models.functional import apply_jit

    class forward_program:
        trace = staticmethod(lambda g, s, x, method, outputs: apply_jit.trace(g, s, x, method))

name, program, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = resnext_flax.create_model(name, rngs=nnx.Rngs(0))
x = jnp.zeros((batch, size, size, 3), jnp.float32)
start = time.perf_counter()
if program == "inference":
    folded = resnext_flax.optimize_for_inference(model)
    prepared = time.perf_counter()
    traced = forward_program.trace(folded.graphdef, folded.state, x, "__call__", None)
elif program == "eval":
    model.eval()
    graphdef, state = nnx.split(model)
    prepared = time.perf_counter()
    traced = forward_program.trace(graphdef, state, x, "__call__", None)
else:
    state = training.create_train_state(model, training.sgd(0.1))
    prepared = time.perf_counter()
    traced = training.train_step.trace(state, x, jnp.zeros((batch,), jnp.int32))
t_trace = time.perf_counter()
lowered = traced.lower()
t_lower = time.perf_counter()
lowered.compile()
t_compile = time.perf_counter()
print(json.dumps({"prepare_s": prepared - start, "trace_s": t_trace - prepared,
                  "lower_s": t_lower - t_trace, "compile_s": t_compile - t_lower,
                  "total_s": t_compile - start}))
"""

ALL = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
       "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")


def measure(name: str, program: str, batch: int, size: int,
            tree: str | None = None) -> dict[str, float]:
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    if tree:
        env["PYTHONPATH"] = os.path.abspath(tree)
    # The child's working directory leads its sys.path: run it in the tree it measures.
    out = subprocess.run([sys.executable, "-c", CHILD, name, program, str(batch), str(size)],
                         check=True, capture_output=True, text=True, env=env, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnext101_32x8d",
                        help="comma-separated names, or 'all'")
    parser.add_argument("--programs", default="inference,eval,train")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--inference-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--trees", help="comma-separated checkouts to alternate (PYTHONPATH)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    names = ALL if args.models == "all" else tuple(args.models.split(","))
    trees = args.trees.split(",") if args.trees else [None]
    results = []
    for name in names:
        for program in args.programs.split(","):
            batch = args.train_batch if program == "train" else args.inference_batch
            runs: dict = {tree: [] for tree in trees}
            for _ in range(args.repeats):
                for tree in trees:
                    runs[tree].append(measure(name, program, batch, args.size, tree))
            for tree in trees:
                row = {"model": name, "program": program, "batch": batch, "size": args.size,
                       "tree": tree}
                row.update({k: statistics.median(r[k] for r in runs[tree])
                            for k in runs[tree][0]})
                results.append(row)
                print(f"{name:18s} {program:9s} {tree or '':14s} trace {row['trace_s']:6.2f}s  "
                      f"lower {row['lower_s']:5.2f}s  compile {row['compile_s']:6.2f}s  "
                      f"prepare {row['prepare_s']:5.2f}s  total {row['total_s']:6.2f}s",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
