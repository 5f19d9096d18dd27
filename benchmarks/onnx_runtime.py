"""ONNX Runtime on this library's ONNX export vs ONNX Runtime on ``torch.onnx.export`` of the
same torchvision model, and vs this library's own jit path, in one process.

For each model and batch size: a torchvision model with random weights and random BatchNorm
statistics, ported with ``resnext_flax.load_torch_state_dict``; exported by
``resnext_flax.export.onnx_graph.to_onnx`` (NCHW input like torch's; ``ours_nhwc`` is the
library's default NHWC input, one Transpose more; ``ours_fixed`` has a fixed height and width,
as torch's file has: every export but that one and torch's leaves them symbolic;
``ours_pinned`` is ``ours`` in a session that fixes them,
``add_free_dimension_override_by_name``) and by
``torch.onnx.export`` (TorchScript
exporter, ``dynamo=False``: deprecated but still in torch 2.14, and unlike the dynamo
exporter it needs no ``onnxscript``; opset 17, dynamic batch; it folds BatchNorm too);
every ONNX file runs in an ``InferenceSession`` (CPU execution provider, ``--threads``
intra-op threads, one per graph optimization level in ``--opt-levels``); the jit side is
``optimize_for_inference(model)`` called on NHWC images. All sides are timed *interleaved*,
one call each per round, so load from other processes hits all of them alike; medians over
rounds (each round in a rotated order; ORT's threads do not spin between runs, which would
take the cores from the side timed next). Every side's logits are compared with torch eager's
(relative error).

``--optimized-graphs DIR`` also writes every export as ONNX Runtime's optimizer leaves it at
each level (``SessionOptions.optimized_model_filepath``) and records each graph's node counts
by operator, to see what the optimizer did differently.

Example (docs/deploy.md's table):
    python benchmarks/onnx_runtime.py --json benchmarks/results/cpu_2core_onnx_runtime.json
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import onnx
import onnxruntime as ort
import torch
from benchmark import machine  # the sibling script's machine record (same folder)

from resnext_flax.export.onnx_graph import to_onnx
from resnext_flax.models.folding import optimize_for_inference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torch_reference import (
    flax_model_from_torch,
    random_images,
    relative_error,
    to_nchw,
    torch_model,
)

MODELS = ("resnet50", "resnext50_32x4d", "resnext101_32x8d")
OPT_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def torch_onnx(model: torch.nn.Module, size: int) -> bytes:
    """torchvision's model through ``torch.onnx.export`` (TorchScript exporter), batch
    dynamic."""
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), buffer, dynamo=False,
                      opset_version=17, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def session(model_bytes: bytes, level: str, threads: int,
            optimized_path: pathlib.Path | None = None,
            pinned: dict[str, int] | None = None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session; ``profile_prefix`` turns on ORT's profiler (``end_profiling()`` writes
    its JSON, named from the prefix)."""
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    for dim, value in (pinned or {}).items():  # a symbolic dimension fixed for the session
        options.add_free_dimension_override_by_name(dim, value)
    options.graph_optimization_level = OPT_LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin after a run by default; interleaved, one session's spinning
    # threads would take the cores from whichever side runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def op_counts(path: pathlib.Path) -> dict[str, int]:
    """Nodes by ``domain:op_type`` in an ONNX file (an optimized one holds ORT's own ops)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = collections.Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.node)
    return dict(sorted(counts.items()))


def run_case(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    tmodel = torch_model(name, seed=0)
    model = flax_model_from_torch(name, tmodel)
    nhwc = random_images(batch, args.size, args.size, seed=0)
    nchw = to_nchw(nhwc)
    t0 = time.perf_counter()
    exports = {"ours": to_onnx(model, layout="NCHW")}
    export_s = {"ours": time.perf_counter() - t0}
    exports |= {"ours_nhwc": to_onnx(model),
                "ours_fixed": to_onnx(model, layout="NCHW", size=(args.size, args.size))}
    t0 = time.perf_counter()
    exports["torch"] = torch_onnx(tmodel, args.size)
    export_s["torch"] = time.perf_counter() - t0
    exports["ours_pinned"] = exports["ours"]
    inputs = {"ours": nchw.numpy(), "ours_nhwc": nhwc, "ours_fixed": nchw.numpy(),
              "ours_pinned": nchw.numpy(), "torch": nchw.numpy()}

    calls: dict[str, Callable[[], np.ndarray]] = {}
    graphs: dict[str, dict[str, int]] = {}
    for level in args.opt_levels:
        for side, model_bytes in exports.items():
            path = None
            if args.optimized_graphs:
                path = pathlib.Path(args.optimized_graphs) / f"{name}_b{batch}_{side}_{level}.onnx"
                path.parent.mkdir(parents=True, exist_ok=True)
            pinned = {"height": args.size, "width": args.size} if side == "ours_pinned" else None
            sess = session(model_bytes, level, args.threads, path, pinned)
            if path is not None:
                graphs.setdefault(level, {})[side] = op_counts(path)
            feed = {sess.get_inputs()[0].name: inputs[side]}
            calls[f"ort_{side}:{level}"] = lambda s=sess, f=feed: s.run(None, f)[0]
    folded = optimize_for_inference(model)
    images = jax.device_put(nhwc)
    calls["jax_folded"] = lambda: np.asarray(folded(images).block_until_ready())

    with torch.inference_mode():
        reference = tmodel(nchw).numpy()
    results: dict[str, Any] = {}
    for key, fn in calls.items():  # warm-up (compiles the jit side), then check the outputs
        for _ in range(max(args.warmup, 1)):
            logits = fn()
        results[key] = {"rel_err_vs_torch": relative_error(logits, reference)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for round_ in range(args.repeats):  # each round starts one side later: no fixed order
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            t0 = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t0)
    for key, ts in times.items():
        median = statistics.median(ts)
        results[key] |= {"median_s": median, "images_per_s": batch / median, "times_s": ts}
    for level in args.opt_levels:
        torch_speed = results[f"ort_torch:{level}"]["images_per_s"]
        for side in ("ours", "ours_nhwc", "ours_fixed", "ours_pinned"):
            entry = results[f"ort_{side}:{level}"]
            entry["speed_vs_ort_torch"] = entry["images_per_s"] / torch_speed
    return {"model": name, "batch": batch, "size": args.size, "export_s": export_s,
            "onnx_bytes": {k: len(v) for k, v in exports.items()},
            "optimized_op_counts": graphs, "loadavg_1min_after": os.getloadavg()[0],
            "results": results}


def print_case(case: dict[str, Any]) -> None:
    print(f"\n{case['model']} batch {case['batch']} {case['size']}x{case['size']} "
          f"(1-min load average {case['loadavg_1min_after']:.1f})")
    for key, r in case["results"].items():
        ratio = r.get("speed_vs_ort_torch")
        print(f"  {key:26s} {r['images_per_s']:8.2f} img/s  median {r['median_s'] * 1e3:8.2f} ms"
              f"  rel err {r['rel_err_vs_torch']:.1e}"
              + ("" if ratio is None else f"  {ratio:.3f}x of ORT on torch's export"))
    for level, graphs in case["optimized_op_counts"].items():
        ops = sorted(set().union(*graphs.values()))
        differ = {op: {side: g.get(op, 0) for side, g in graphs.items()} for op in ops
                  if len({g.get(op, 0) for g in graphs.values()}) > 1}
        print(f"  optimized graphs ({level}): {differ if differ else 'identical op counts'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated variants")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--opt-levels", default="all,extended",
                   help=f"ORT graph optimization levels, from {sorted(OPT_LEVELS)}")
    p.add_argument("--optimized-graphs", metavar="DIR",
                   help="write the ORT-optimized graphs here and compare their operators")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.opt_levels = [lvl for lvl in args.opt_levels.split(",") if lvl]
    unknown = [lvl for lvl in args.opt_levels if lvl not in OPT_LEVELS]
    if unknown or not args.opt_levels:
        p.error(f"--opt-levels: unknown {unknown}; choose from {sorted(OPT_LEVELS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    info = machine() | {"onnx": onnx.__version__, "onnxruntime": ort.__version__,
                        "ort_threads": args.threads}
    print(f"{info['platform']}, {info['cpu_count']} CPUs, onnxruntime {ort.__version__}, "
          f"1-min load average at start {info['loadavg_1min_start']:.1f}")
    cases = []
    for name in args.models:
        for batch in args.batch_sizes:
            cases.append(run_case(name, batch, args))
            print_case(cases[-1])
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"machine": info, "args": {k: v for k, v in vars(args).items()},
             "cases": cases}, indent=1) + "\n")
    return cases


if __name__ == "__main__":
    main()
