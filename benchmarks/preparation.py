"""How long preparing a model takes before its first real compile, each step in a fresh process:
``create_model`` (random init), ``load_model`` of a converted ``.safetensors`` and of a
torchvision ``.pth`` (``load_pth``; torch's import included), and
``optimize_for_inference`` (fold + kernel preparation), with the XLA programs each compiles.

A fresh process is the honest setting: a program compiled by an earlier step would be reused.
JAX's backend is started (and the persistent compilation cache switched off) before the clock
runs. ``--trees`` runs the same steps against other source trees (``PYTHONPATH``), interleaved
run by run, for A/B comparisons on a busy machine:

    python benchmarks/preparation.py --models resnet50,resnext101_32x8d --repeats 3 \\
        --trees /path/to/before,/path/to/after
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_compilation_cache", False)
jax.devices()
from flax import nnx
import resnext_flax

name, step, path = sys.argv[1], sys.argv[2], sys.argv[3]
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(secs)
    if event == "/jax/core/compile/backend_compile_duration" else None)
model = resnext_flax.create_model(name) if step == "optimize" else None
if model is not None:
    jax.block_until_ready(nnx.state(model))
compiles.clear()
run = {"create": lambda: resnext_flax.create_model(name),
       "load": lambda: resnext_flax.load_model(path + ".safetensors"),
       "load_pth": lambda: resnext_flax.load_model(path + ".pth"),
       "optimize": lambda: resnext_flax.optimize_for_inference(model).module()}[step]
wall, cpu = time.perf_counter(), time.process_time()
jax.block_until_ready(nnx.state(run()))
print(json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "compiles": len(compiles), "compile_s": sum(compiles)}))
"""

STEPS = ("create", "load", "load_pth", "optimize")


def measure(tree: str, name: str, step: str, path: str) -> dict[str, float]:
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    if tree:
        env["PYTHONPATH"] = tree
    # Run from the tree: ``python -c`` puts the working directory before PYTHONPATH.
    out = subprocess.run([sys.executable, "-c", CHILD, name, step, path], check=True,
                         capture_output=True, text=True, env=env, cwd=tree or None)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_checkpoints(name: str, folder: str) -> str:
    """`name`'s random weights as ``<path>.safetensors`` (converted) and ``<path>.pth``."""
    import torch

    import resnext_flax
    from resnext_flax.weights.torch_port import to_torch_state_dict

    path = os.path.join(folder, name)
    model = resnext_flax.create_model(name)
    resnext_flax.save_checkpoint(model, path + ".safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in to_torch_state_dict(model).items()},
               path + ".pth")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnext101_32x8d")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trees", default="", help="comma-separated PYTHONPATHs to compare "
                        "(default: this interpreter's own)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    trees = args.trees.split(",")
    rows = []
    print("| model | step | tree | wall s (median) | CPU s (median) | programs compiled |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            path = _write_checkpoints(name, folder) if "load" in args.steps else ""
            for step in args.steps.split(","):
                runs = {tree: [] for tree in trees}
                for _ in range(args.repeats):
                    for tree in trees:  # interleaved, so load on the machine hits both alike
                        runs[tree].append(measure(tree, name, step, path))
                for tree, results in runs.items():
                    row = {"model": name, "step": step, "tree": tree or "(installed)",
                           "runs": results}
                    row.update({k: statistics.median(r[k] for r in results)
                                for k in results[0]})
                    rows.append(row)
                    print(f"| {name} | {step} | {row['tree']} | {row['wall_s']:.2f} | "
                          f"{row['cpu_s']:.2f} | {row['compiles']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
