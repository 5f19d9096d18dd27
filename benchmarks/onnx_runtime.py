"""This library's jit path vs PyTorch eager and ONNX Runtime (on ``torch.onnx.export`` and on
this library's own ONNX export) of the same torchvision model, in one process.

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
``optimize_for_inference(model)`` called on NHWC images (``jax_folded``); ``torch_eager`` is
the torchvision model itself, NCHW and channels_last (``benchmark.py``'s setup, under
``torch.inference_mode``, ``--threads`` intra-op threads), the faster layout being the eager
reference. ``--sides`` picks the sides (by default all). All sides are timed *interleaved*,
one call each per round, so load from other processes hits all of them alike; medians over
rounds (each round in a rotated order; ORT's threads do not spin between runs, which would
take the cores from the side timed next). Every side's logits are compared with torch eager's
(relative error).

Each case's ``summary`` has the library's images/s over the faster torch eager layout's and over
ONNX Runtime's on torch's export (its fastest level), and every side's GFLOP/s: 2 FLOPs per
multiply-add of each conv and of the classifier (``profile_compare.layer_table``), as a fraction
of ``--peak-gflops`` (the machine's FMA peak, ``fma_peak.py``) when given.
``scripts/readme_table.py`` turns the JSON into the README's table.

``--optimized-graphs DIR`` also writes every export as ONNX Runtime's optimizer leaves it at
each level (``SessionOptions.optimized_model_filepath``) and records each graph's node counts
by operator, to see what the optimizer did differently.

Examples (docs/deploy.md's table; the README's table, both ratios):
    python benchmarks/onnx_runtime.py --json benchmarks/results/cpu_2core_onnx_runtime.json
    python benchmarks/onnx_runtime.py --models all --batch-sizes 1,8 --repeats 5 \
        --sides jax_folded,torch_eager,torch --opt-levels all --peak-gflops 228.7 --json r.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
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
import torchvision
from benchmark import machine, torch_callables  # sibling script (same folder)

import resnext_flax
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
#: ONNX Runtime sides: torch's export, ours (NCHW input), ours with the NHWC input, ours with a
#: fixed height and width, ours in a session that fixes them.
ORT_SIDES = ("torch", "ours", "ours_nhwc", "ours_fixed", "ours_pinned")
SIDES = ("jax_folded", "torch_eager", *ORT_SIDES)
EAGER_LAYOUTS = ("torch_nchw", "torch_channels_last")  # benchmark.torch_callables' names
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


def onnx_exports(model: Any, tmodel: torch.nn.Module, sides: list[str],
                 size: int) -> tuple[dict[str, bytes], dict[str, float]]:
    """The ONNX file of each ONNX Runtime side in ``sides`` (``ours_pinned`` runs ``ours``'s)
    and each export's seconds."""
    build = {"ours": lambda: to_onnx(model, layout="NCHW"), "ours_nhwc": lambda: to_onnx(model),
             "ours_fixed": lambda: to_onnx(model, layout="NCHW", size=(size, size)),
             "torch": lambda: torch_onnx(tmodel, size)}
    exports: dict[str, bytes] = {}
    export_s: dict[str, float] = {}
    for side in (s for s in sides if s in ORT_SIDES):
        source = "ours" if side == "ours_pinned" else side
        if source not in export_s:
            t0 = time.perf_counter()
            exports[source] = build[source]()
            export_s[source] = time.perf_counter() - t0
        exports[side] = exports[source]
    return exports, export_s


def torch_eager(name: str, tmodel: torch.nn.Module,
                nhwc: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """PyTorch eager in both layouts, each call under ``torch.inference_mode``."""
    def call(fn: Callable[[], torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            return fn().numpy()

    fns = torch_callables(name, tmodel, nhwc, torch.float32, compile_=False, device="cpu")
    return {key: lambda f=fns[key][0]: call(f) for key in EAGER_LAYOUTS}


def model_flops(tmodel: torch.nn.Module, batch: int, size: int) -> int:
    """FLOPs of one call: 2 per multiply-add of each conv and of the classifier."""
    # Imported here: profile_compare imports this script.
    from profile_compare import layer_table

    return sum(layer["flops"] for layer in layer_table(tmodel, batch, size).values())


def summary(results: dict[str, Any], flops: int, peak: float | None) -> dict[str, Any]:
    """Every side's GFLOP/s (and fraction of ``peak``); the library's speed over the faster
    torch eager layout's and over ONNX Runtime's on torch's export (its fastest level)."""
    out: dict[str, Any] = {"flops": flops, "gflops": {}, "peak_fraction": {}}
    for key, r in results.items():
        out["gflops"][key] = flops / r["median_s"] / 1e9
        if peak:
            out["peak_fraction"][key] = out["gflops"][key] / peak
    candidates = {
        "torch_eager": [k for k in EAGER_LAYOUTS if k in results],
        "ort": [k for k in results if k.startswith("ort_torch:")],
    }
    library = results.get("jax_folded", {}).get("images_per_s")
    for label, keys in candidates.items():
        if not keys:
            continue
        best = max(keys, key=lambda k: results[k]["images_per_s"])
        out[f"{label}_best"] = best
        out[f"{label}_images_per_s"] = results[best]["images_per_s"]
        if library is not None:
            out[f"library_vs_{label}"] = library / results[best]["images_per_s"]
    if library is not None:
        out["library_images_per_s"] = library
    return out


def run_case(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    tmodel = torch_model(name, seed=0)
    model = flax_model_from_torch(name, tmodel)
    nhwc = random_images(batch, args.size, args.size, seed=0)
    nchw = to_nchw(nhwc)
    exports, export_s = onnx_exports(model, tmodel, args.sides, args.size)
    inputs = {side: nhwc if side == "ours_nhwc" else nchw.numpy() for side in exports}

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
    if "jax_folded" in args.sides:
        folded = optimize_for_inference(model)
        images = jax.device_put(nhwc)
        calls["jax_folded"] = lambda: np.asarray(folded(images).block_until_ready())
    if "torch_eager" in args.sides:
        calls |= torch_eager(name, tmodel, nhwc)

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
        if f"ort_torch:{level}" not in results:
            break
        torch_speed = results[f"ort_torch:{level}"]["images_per_s"]
        for side in (s for s in exports if s != "torch"):
            entry = results[f"ort_{side}:{level}"]
            entry["speed_vs_ort_torch"] = entry["images_per_s"] / torch_speed
    return {"model": name, "batch": batch, "size": args.size, "export_s": export_s,
            "onnx_bytes": {k: len(v) for k, v in exports.items()},
            "optimized_op_counts": graphs, "loadavg_1min_after": os.getloadavg()[0],
            "summary": summary(results, model_flops(tmodel, batch, args.size),
                               args.peak_gflops),
            "results": results}


def print_case(case: dict[str, Any]) -> None:
    print(f"\n{case['model']} batch {case['batch']} {case['size']}x{case['size']} "
          f"(1-min load average {case['loadavg_1min_after']:.1f})")
    total = case["summary"]
    for key, r in case["results"].items():
        ratio = r.get("speed_vs_ort_torch")
        peak = total["peak_fraction"].get(key)
        print(f"  {key:26s} {r['images_per_s']:8.2f} img/s  median {r['median_s'] * 1e3:8.2f} ms"
              f"  {total['gflops'][key]:6.1f} GFLOP/s"
              + ("" if peak is None else f" ({peak:.0%} of peak)")
              + f"  rel err {r['rel_err_vs_torch']:.1e}"
              + ("" if ratio is None else f"  {ratio:.3f}x of ORT on torch's export"))
    for label, what in (("torch_eager", "PyTorch eager"), ("ort", "ONNX Runtime")):
        if f"library_vs_{label}" in total:
            print(f"  library / {what} ({total[f'{label}_best']}): "
                  f"{total[f'library_vs_{label}']:.3f}")
    for level, graphs in case["optimized_op_counts"].items():
        ops = sorted(set().union(*graphs.values()))
        differ = {op: {side: g.get(op, 0) for side, g in graphs.items()} for op in ops
                  if len({g.get(op, 0) for g in graphs.values()}) > 1}
        print(f"  optimized graphs ({level}): {differ if differ else 'identical op counts'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated variants, or 'all' (those torchvision builds)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of ONNX Runtime "
                   "and PyTorch eager (the library's XLA pool has one per CPU)")
    p.add_argument("--sides", default=",".join(SIDES),
                   help=f"comma-separated sides to time, from {', '.join(SIDES)}")
    p.add_argument("--peak-gflops", type=float,
                   help="the machine's FMA peak (fma_peak.py): GFLOP/s as a fraction of it")
    p.add_argument("--opt-levels", default="all,extended",
                   help=f"ORT graph optimization levels, from {sorted(OPT_LEVELS)}")
    p.add_argument("--optimized-graphs", metavar="DIR",
                   help="write the ORT-optimized graphs here and compare their operators")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    known = resnext_flax.list_models()
    # "all": the variants torchvision builds (the ORT side exports torchvision's model); the
    # weakly supervised 32x16d-32x48d are asked for by name (0.8-3.3 GB of weights each, and
    # a single ONNX protobuf stops at 2 GB).
    published = [m for m in known if hasattr(torchvision.models, m)]
    args.models = published if args.models == "all" else [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(known):
        p.error(f"--models: unknown {sorted(set(args.models) - set(known))}; choose from "
                f"{', '.join(known)} or 'all'")
    args.sides = [side for side in args.sides.split(",") if side]
    if not args.sides or set(args.sides) - set(SIDES):
        p.error(f"--sides: unknown {sorted(set(args.sides) - set(SIDES))}; choose from "
                f"{', '.join(SIDES)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.opt_levels = [lvl for lvl in args.opt_levels.split(",") if lvl]
    unknown = [lvl for lvl in args.opt_levels if lvl not in OPT_LEVELS]
    if unknown or not args.opt_levels:
        p.error(f"--opt-levels: unknown {unknown}; choose from {sorted(OPT_LEVELS)}")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be at least 1")
    if args.peak_gflops is not None and args.peak_gflops <= 0:
        p.error("--peak-gflops must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # torch eager's intra-op threads, as ORT's
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
            {"command": [sys.executable, *sys.argv], "date": datetime.date.today().isoformat(),
             "machine": info, "args": vars(args), "cases": cases}, indent=1) + "\n")
    return cases


if __name__ == "__main__":
    main()
