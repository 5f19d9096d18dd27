"""Per-layer profiles of this library and of ONNX Runtime on the same model, side by side.

For one torchvision model (random weights and BatchNorm statistics) at one batch size:

* the library: ``optimize_for_inference`` of the ported model, jitted, run under
  ``jax.profiler``; each XLA thunk is charged to a layer through the compiled HLO
  (``hlo_layers.py``: by the weights it reads, so a conv and its epilogue count together);
* ONNX Runtime: ``torch.onnx.export`` of the torch model (see ``onnx_runtime.py``), all graph
  optimizations, its profiler on; each node's kernel time is mapped by the torch module path in
  its name (a conv fused with the ReLU after it is named after that ReLU: ``relu`` follows
  ``conv1``, ``relu_1`` ``conv2``, ``relu_2`` the block's last conv); NCHWc reorders
  (``ReorderInput``/``ReorderOutput``) count as their stage's ``relayout`` and any other
  unnamed node belongs to the layer before it.

Times are milliseconds per call, the mean over ``--calls`` profiled calls after ``--warmup``
calls (the first profiled call of each side is dropped too). Thunks that run concurrently (a
block's downsample beside its first conv) share the time they overlap, so the library's sum is
the time any thunk ran (each thunk's whole span is in the JSON too). The wall times (medians
of ``--repeats`` calls without a profiler, the two sides interleaved) are printed beside the
sums. FLOPs count 2 per multiply-add of each conv and of the classifier; with
``--peak-gflops`` (``fma_peak.py``) the JSON has each row's GFLOP/s as a fraction of it.

Example (the docs/performance.md tables):
    python benchmarks/profile_compare.py --model resnext50_32x4d --batch 1 \\
        --json benchmarks/results/cpu_2core_profile_compare_resnext50_b1.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import onnxruntime as ort
import torch
from fma_peak import cpu_info
from hlo_layers import shared_time, thunk_layers
from interleaved import interleaved_seconds
from onnx_runtime import session, torch_onnx  # sibling scripts (same folder)

from resnext_flax.models.folding import optimize_for_inference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torch_reference import (
    flax_model_from_torch,
    random_images,
    relative_error,
    to_nchw,
    torch_model,
)

RELAYOUT = "relayout"


# ---------------------------------------------------------------- the layers and their FLOPs


def layer_table(model: torch.nn.Module, batch: int, size: int) -> dict[str, dict[str, Any]]:
    """Every conv, pool and the classifier in execution order: stage, kind, FLOPs, output."""
    layers: dict[str, dict[str, Any]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear | torch.nn.MaxPool2d
                      | torch.nn.AdaptiveAvgPool2d):
            def hook(mod, inputs, output, name=name):
                macs = 0
                if isinstance(mod, torch.nn.Conv2d):
                    macs = (output.numel() * mod.in_channels // mod.groups
                            * mod.kernel_size[0] * mod.kernel_size[1])
                elif isinstance(mod, torch.nn.Linear):
                    macs = output.numel() * mod.in_features
                layers[name] = {"stage": stage_of(name), "kind": kind_of(name, mod),
                                "flops": 2 * macs, "output": list(output.shape)}
            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.zeros(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return layers


def stage_of(name: str) -> str:
    if name.startswith("layer"):
        return name.split(".")[0]
    return "stem" if name in ("conv1", "maxpool") else "head"


def kind_of(name: str, module: torch.nn.Module) -> str:
    """The row a layer is summed into within its stage (bottleneck: 1x1 reduce, 3x3, 1x1
    expand; basic block: two 3x3)."""
    leaf = name.split(".")[2] if name.startswith("layer") else name
    if not isinstance(module, torch.nn.Conv2d):
        return leaf
    k = f"{module.kernel_size[0]}x{module.kernel_size[1]}"
    grouped = " grouped" if module.groups > 1 else ""
    return {"conv1": "stem conv 7x7" if leaf == name else f"conv1 {k}{grouped}",
            "downsample": "downsample 1x1"}.get(leaf, f"{leaf} {k}{grouped}")


# ---------------------------------------------------------------- the library under jax.profiler


def library_profile(folded: Any, images: jax.Array, calls: int, warmup: int) -> dict[str, Any]:
    """Milliseconds per call by layer (and by thunk) under ``jax.profiler``."""
    compiled = jax.jit(lambda f, x: f(x)).lower(folded, images).compile()
    layers = thunk_layers(compiled.as_text())
    for _ in range(warmup):
        compiled(folded, images).block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        walls = []
        for _ in range(calls + 1):
            t0 = time.perf_counter()
            compiled(folded, images).block_until_ready()
            walls.append((time.perf_counter() - t0) * 1e3)
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    thunks = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    runs = sorted({e["args"]["run_id"] for e in thunks}, key=int)[1:]  # the first is warm-up
    by_thunk: dict[str, float] = collections.defaultdict(float)
    raw: dict[str, float] = collections.defaultdict(float)
    for run in runs:
        spans = [(e["ts"], e["ts"] + e["dur"], e["args"]["hlo_op"]) for e in thunks
                 if e["args"]["run_id"] == run]
        for thunk, us in shared_time(spans).items():
            by_thunk[thunk] += us / 1e3 / len(runs)
        for start, end, thunk in spans:
            raw[thunk] += (end - start) / 1e3 / len(runs)
    by_layer: dict[str, float] = collections.defaultdict(float)
    raw_layer: dict[str, float] = collections.defaultdict(float)
    for thunk, ms in by_thunk.items():
        by_layer[layers.get(thunk, "unmapped")] += ms
        raw_layer[layers.get(thunk, "unmapped")] += raw[thunk]
    return {"ms": dict(by_layer), "ms_overlapping": dict(raw_layer),
            "thunks": {t: {"ms": ms, "ms_overlapping": raw[t], "layer": layers.get(t, "unmapped")}
                       for t, ms in by_thunk.items()},
            "calls": len(runs), "wall_ms_profiled": statistics.mean(walls[1:]),
            "fn": lambda: compiled(folded, images).block_until_ready()}


# ---------------------------------------------------------------- ONNX Runtime's profiler


def ort_layer(name: str, known: set[str]) -> str | None:
    """The torch module an ORT node's name points at, or None (decided by position)."""
    if name.startswith(("ReorderInput", "ReorderOutput")):
        return RELAYOUT
    parts = [p for p in name.split("/") if p]
    if not parts:
        return None
    if parts[0].startswith("layer") and len(parts) >= 3:
        block, leaf = parts[1], parts[2]
        if leaf == "downsample":
            return f"{block}.downsample.0"
        relu = re.fullmatch(r"relu(?:_(\d+))?", leaf)
        if relu:  # the conv before the k-th ReLU of the block
            leaf = f"conv{int(relu.group(1) or 0) + 1}"
            if f"{block}.{leaf}" not in known:  # the ReLU after the residual add
                leaf = max(n.split(".")[-1] for n in known if n.startswith(block + ".conv"))
        return f"{block}.{leaf}" if f"{block}.{leaf}" in known else None
    head = {"relu": "conv1", "conv1": "conv1", "maxpool": "maxpool", "avgpool": "avgpool",
            "fc": "fc", "Flatten": "avgpool"}
    return head.get(parts[0].split("_output")[0])


def ort_profile(model_bytes: bytes, images: np.ndarray, threads: int, calls: int,
                warmup: int, known: set[str]) -> dict[str, Any]:
    """Milliseconds per call by layer (and per node) from ORT's profile JSON."""
    with tempfile.TemporaryDirectory() as workdir:
        sess = session(model_bytes, "all", threads, profile_prefix=os.path.join(workdir, "ort"))
        feed = {sess.get_inputs()[0].name: images}
        for _ in range(warmup + 1 + calls):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = runs[warmup + 1:]
    nodes = sorted((e for e in events if e.get("cat") == "Node"
                    and e["name"].endswith("_kernel_time")), key=lambda e: e["ts"])
    by_node: dict[str, dict[str, Any]] = {}
    for run in runs:
        inside = [e for e in nodes if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
        for e in inside:
            node = e["name"][:-len("_kernel_time")]
            entry = by_node.setdefault(node, {"ms": 0.0, "op": e["args"].get("op_name"),
                                              "output": e["args"].get("output_type_shape")})
            entry["ms"] += e["dur"] / 1e3 / len(runs)
    order = list(by_node)  # execution order of the first kept run
    previous = "conv1"
    by_layer: dict[str, float] = collections.defaultdict(float)
    for i, node in enumerate(order):
        layer = ort_layer(node, known)
        if layer == RELAYOUT:  # charged to the stage of the next named layer
            following = (ort_layer(n, known) for n in order[i + 1:])
            nxt = next((lyr for lyr in following if lyr not in (None, RELAYOUT)), previous)
            layer = f"{stage_of(nxt)}/{RELAYOUT}"
        elif layer is None:
            layer = previous
        else:
            previous = layer
        by_node[node]["layer"] = layer
        by_layer[layer] += by_node[node]["ms"]
    return {"ms": dict(by_layer), "nodes": by_node, "calls": len(runs),
            "wall_ms_profiled": statistics.mean(r["dur"] / 1e3 for r in runs)}


# ---------------------------------------------------------------- joining and printing


def join(layers: dict[str, dict[str, Any]], lib: dict[str, float], onnx: dict[str, float],
         peak: float | None) -> dict[str, Any]:
    """Per layer, per (stage, kind) and per stage: both sides' ms, ratio, GFLOP/s."""
    rows = []
    for name, info in layers.items():
        rows.append(info | {"layer": name, "library_ms": lib.get(name, 0.0),
                            "ort_ms": onnx.get(name, 0.0)})
    for side, times in (("library_ms", lib), ("ort_ms", onnx)):
        for name, ms in times.items():
            if name not in layers:  # relayouts, 'other', 'unmapped'
                stage = name.split("/")[0] if "/" in name else "other"
                rows.append({"layer": name, "stage": stage, "kind": RELAYOUT if "/" in name
                             else name, "flops": 0, "output": None, "library_ms": 0.0,
                             "ort_ms": 0.0} | {side: ms})

    order = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    rows.sort(key=lambda r: order.index(r["stage"]) if r["stage"] in order else len(order))

    def summed(key_fn) -> list[dict[str, Any]]:
        groups: dict[Any, dict[str, Any]] = {}
        for r in rows:
            g = groups.setdefault(key_fn(r), {"layers": 0, "flops": 0, "library_ms": 0.0,
                                               "ort_ms": 0.0})
            g["layers"] += 1
            for k in ("flops", "library_ms", "ort_ms"):
                g[k] += r[k]
        out = []
        for key, g in groups.items():
            out.append(dict(zip(("stage", "kind"), key if isinstance(key, tuple) else (key,),
                                strict=False)) | g | rates(g, peak))
        return out

    for r in rows:
        r |= rates(r, peak)
    total = {"flops": sum(r["flops"] for r in rows),
             "library_ms": sum(r["library_ms"] for r in rows),
             "ort_ms": sum(r["ort_ms"] for r in rows)}
    return {"layers": rows, "kinds": summed(lambda r: (r["stage"], r["kind"])),
            "stages": summed(lambda r: r["stage"]), "total": total | rates(total, peak)}


def rates(row: dict[str, Any], peak: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"library_over_ort": (row["library_ms"] / row["ort_ms"]
                                                if row["ort_ms"] else None)}
    for side in ("library", "ort"):
        ms = row[f"{side}_ms"]
        gflops = row["flops"] / ms / 1e6 if ms and row["flops"] else None
        out[f"{side}_gflops"] = gflops
        if peak and gflops:
            out[f"{side}_peak_fraction"] = gflops / peak
    return out


def markdown(joined: dict[str, Any], key: str) -> str:
    """A markdown table of ``joined[key]`` ('stages', 'kinds' or 'layers')."""
    label = {"stages": ["stage"], "kinds": ["stage", "kind"], "layers": ["layer", "kind"]}[key]
    head = [*label, "GFLOP", "library ms", "ORT ms", "library / ORT", "library GFLOP/s",
            "ORT GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x: Any, spec: str) -> str:
        return "" if x is None else format(x, spec)

    for r in joined[key] + ([{"stage": "**total**", "layer": "**total**", "kind": ""}
                             | joined["total"]] if key != "layers" else []):
        lines.append("| " + " | ".join([str(r[k]) for k in label] + [
            fmt(r["flops"] / 1e9, ".3f"), fmt(r["library_ms"], ".2f"), fmt(r["ort_ms"], ".2f"),
            fmt(r["library_over_ort"], ".2f"), fmt(r["library_gflops"], ".0f"),
            fmt(r["ort_gflops"], ".0f")]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnext50_32x4d")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads "
                   "(the library's XLA pool has one per CPU)")
    p.add_argument("--calls", type=int, default=5, help="profiled calls per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="unprofiled timed calls per side")
    p.add_argument("--peak-gflops", type=float, help="the machine's FMA peak (fma_peak.py)")
    p.add_argument("--per-layer", action="store_true", help="print the per-layer table too")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    if min(args.calls, args.repeats, args.batch, args.threads) < 1 or args.warmup < 0:
        p.error("--calls, --repeats, --batch and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = cpu_info() | {"onnxruntime": ort.__version__, "jax": jax.__version__}
    tmodel = torch_model(args.model, seed=0)
    model = flax_model_from_torch(args.model, tmodel)
    layers = layer_table(tmodel, args.batch, args.size)
    nhwc = random_images(args.batch, args.size, args.size, seed=0)
    nchw = to_nchw(nhwc).numpy()

    folded = optimize_for_inference(model)
    lib = library_profile(folded, jax.device_put(nhwc), args.calls, args.warmup)
    exported = torch_onnx(tmodel, args.size)
    onnx = ort_profile(exported, nchw, args.threads, args.calls, args.warmup, set(layers))
    plain = session(exported, "all", args.threads)
    sides = {"library": lib["fn"], "ort": lambda: plain.run(None, {"images": nchw})[0]}
    with torch.inference_mode():
        reference = tmodel(torch.from_numpy(nchw)).numpy()
    rel_err = {"library": relative_error(np.asarray(folded(nhwc)), reference),
               "ort": relative_error(sides["ort"](), reference)}
    wall = {k: [t * 1e3 for t in ts]
            for k, ts in interleaved_seconds(sides, args.repeats, args.warmup).items()}

    joined = join(layers, lib["ms"], onnx["ms"], args.peak_gflops)
    walls = {k: statistics.median(v) for k, v in wall.items()}
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, ORT {args.threads} "
          f"threads; wall ms (medians of {args.repeats}): library {walls['library']:.2f}, "
          f"ORT {walls['ort']:.2f} (library / ORT {walls['library'] / walls['ort']:.2f}); "
          f"profiled calls, wall (sum of op times): library {lib['wall_ms_profiled']:.2f} "
          f"({joined['total']['library_ms']:.2f}), ORT {onnx['wall_ms_profiled']:.2f} "
          f"({joined['total']['ort_ms']:.2f}); load {os.getloadavg()[0]:.1f}\n")
    print(markdown(joined, "stages") + "\n\n" + markdown(joined, "kinds"))
    if args.per_layer:
        print("\n" + markdown(joined, "layers"))
    record = {"command": [sys.executable, *sys.argv], "date": datetime.date.today().isoformat(),
              "machine": info | {"loadavg_1min_end": os.getloadavg()[0]}, "args": vars(args),
              "rel_err_vs_torch": rel_err, "wall_ms": {k: {"median": walls[k], "runs": v}
                                                       for k, v in wall.items()},
              "wall_ms_profiled": {"library": lib["wall_ms_profiled"],
                                   "ort": onnx["wall_ms_profiled"]},
              "profiled_calls": {"library": lib["calls"], "ort": onnx["calls"]},
              **joined, "library_ms_overlapping_by_layer": lib["ms_overlapping"],
              "library_thunks": lib["thunks"], "ort_nodes": onnx["nodes"]}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
