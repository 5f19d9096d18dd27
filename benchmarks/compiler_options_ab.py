"""XLA compiler options A/B: compile time and run time of the same lowered program compiled
with XLA's defaults and with other options, in one process, runs interleaved.

For the folded inference forward (``optimize_for_inference``) and the training step: each
program is lowered once, compiled under every option set (timed), then the compiled
executables run in turn, ``--repeats`` rounds, and the median of each is reported with its
ratio to the first option set.

    python benchmarks/compiler_options_ab.py --models resnet50,resnext50_32x4d \\
        --options '{}' '{"xla_backend_optimization_level": 1}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import resnext_flax
from resnext_flax import training
from resnext_flax.models.programs import forward_program


def lowered_programs(name: str, batch: int, size: int, programs: list[str]):
    """(label, lowered, args) for each program of `name`."""
    model = resnext_flax.create_model(name, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    out = []
    if "inference" in programs:
        folded = resnext_flax.optimize_for_inference(model)
        lowered = forward_program.trace(folded.graphdef, folded.state, x, "__call__",
                                        None).lower()
        out.append((f"{name} inference b{batch}", lowered, (folded.state, x)))
    if "train" in programs:
        state = training.create_train_state(model, training.sgd(0.01))
        labels = jnp.zeros((batch,), jnp.int32)
        lowered = training.train_step.trace(state, x, labels).lower()
        out.append((f"{name} train b{batch}", lowered, (state, x, labels)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnext50_32x4d")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--programs", default="inference,train")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--options", nargs="+",
                        default=["{}", '{"xla_backend_optimization_level": 1}'],
                        help="JSON dicts of XLA compiler options; the first is the baseline")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    option_sets = [json.loads(o) for o in args.options]
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for label, lowered, call_args in lowered_programs(name, batch, args.size,
                                                               args.programs.split(",")):
                compiled, compile_s = [], []
                for options in option_sets:
                    start = time.perf_counter()
                    compiled.append(lowered.compile(compiler_options=options))
                    compile_s.append(time.perf_counter() - start)
                for program in compiled:  # warm-up
                    jax.block_until_ready(program(*call_args))
                runs = [[] for _ in compiled]
                for _ in range(args.repeats):
                    for i, program in enumerate(compiled):
                        start = time.perf_counter()
                        jax.block_until_ready(program(*call_args))
                        runs[i].append(time.perf_counter() - start)
                medians = [statistics.median(r) for r in runs]
                for options, c, m in zip(option_sets, compile_s, medians, strict=True):
                    rows.append({"program": label, "options": options, "compile_s": c,
                                 "run_s": m, "run_ratio": m / medians[0],
                                 "compile_ratio": c / compile_s[0]})
                    print(f"{label:32s} {json.dumps(options):45s} compile {c:6.2f}s "
                          f"({c / compile_s[0]:.2f}x)  run {1e3 * m:8.1f} ms "
                          f"({m / medians[0]:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
