"""The maintained JAX->ONNX converter ``jax2onnx`` vs this library's own ONNX emitter
(``resnext_flax.export.onnx_graph.to_onnx``) on the same BatchNorm-folded models.

For each model: a torchvision model with random weights and random BatchNorm statistics,
ported as the tests port it (``tests/torch_reference.py``). Three ONNX files of it:

- ``ours``: ``to_onnx(model)``, emitted node by node from the folded module tree (NHWC input,
  symbolic batch, height and width);
- ``jax2onnx_dynamic``: ``jax2onnx.to_onnx`` of the folded inference function
  (``optimize_for_inference(model, policy=XLA_POLICY)``: XLA's own convolutions, no custom
  call) traced with a symbolic batch, height and width;
- ``jax2onnx_fixed``: the same with a symbolic batch and a fixed ``--size`` (224) image;
- both again at ``--retry-opset`` (``_opset18``), and at that opset with the stem's max-pool
  traced as ``nnx.max_pool`` on an input padded with -inf (``_opset18_pool2d``, the same
  function), which jax2onnx writes as a 2-D ONNX MaxPool.

Recorded for each: whether conversion works (else the exact error), conversion time, file
size, node counts by operator in the file and after ONNX Runtime's ``ORT_ENABLE_ALL``
optimizer (``SessionOptions.optimized_model_filepath``); the largest error relative to the
largest logit (``max|a - b| / max|b|``) against the JAX model, both the unfolded model and the
folded function that was converted, on random ``--check-size`` images at batch 1 and 3 (the
fixed-size file is checked at its own size, batch 1, from the timing run); and ONNX Runtime
latency at batch 1, ``--size`` images, ``--threads`` intra-op threads, the files timed
interleaved (one call each per round, the order rotated each round), medians of
``--repeats`` rounds.

``jax2onnx`` pins an older ``orbax-checkpoint`` than the library's, so it runs from its own
virtual environment layered on the system packages:

    python -m venv --system-site-packages /tmp/j2o-venv
    /tmp/j2o-venv/bin/pip install jax2onnx
    /tmp/j2o-venv/bin/python benchmarks/jax2onnx_compare.py \\
        --json benchmarks/results/cpu_2core_jax2onnx_compare.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from benchmark import machine  # the sibling script's machine record (same folder)
from flax import nnx

import resnext_flax
from resnext_flax.export.onnx_graph import to_onnx
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.nn import ops
from resnext_flax.nn.policy import XLA_POLICY

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torch_reference import flax_model_from_torch, random_images, torch_model

MODELS = ("resnet18", "resnext50_32x4d")
#: jax2onnx's files: height and width symbolic or fixed.
SHAPES = ("dynamic", "fixed")
VERSIONED = ("jax2onnx", "onnx-ir", "orbax-checkpoint", "flax", "jax", "onnx", "onnxruntime")


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """Nodes by ``domain:op_type`` (an optimized graph holds ONNX Runtime's own ops)."""
    counts = collections.Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.node)
    return dict(sorted(counts.items()))


def session(model_bytes: bytes, threads: int, optimized_path: pathlib.Path
            ) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Interleaved, one session's spinning idle threads would take the cores from the next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def sides(args: argparse.Namespace) -> dict[str, tuple[str, str, int, bool]]:
    """The files to make, as (emitter, height/width, opset, pool_patch): ours; jax2onnx's
    at ``--opset``; and again at ``--retry-opset``, plain and with :func:`patched_max_pool`.
    """
    made = {"ours": ("ours", "dynamic", args.opset, False)}
    for opset, patch, suffix in ((args.opset, False, ""),
                                 (args.retry_opset, False, f"_opset{args.retry_opset}"),
                                 (args.retry_opset, True, f"_opset{args.retry_opset}_pool2d")):
        for shape in SHAPES:
            made[f"jax2onnx_{shape}{suffix}"] = ("jax2onnx", shape, opset, patch)
    return made


@contextlib.contextmanager
def patched_max_pool() -> Iterator[None]:
    """The stem's max-pool as ``nnx.max_pool`` (VALID) on the input padded with -inf, the
    same function: jax2onnx writes ``nnx.max_pool`` as a 2-D ONNX MaxPool, while the
    library's ``lax.reduce_window`` over all four NHWC dimensions becomes a MaxPool with a
    4-D kernel on a 6-D tensor."""
    original = ops.max_pool

    def max_pool(x: jax.Array, *, window: int, stride: int, padding: int) -> jax.Array:
        pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
        return nnx.max_pool(jnp.pad(x, pads, constant_values=-jnp.inf),
                            window_shape=(window, window), strides=(stride, stride),
                            padding="VALID")

    ops.max_pool = max_pool
    try:
        yield
    finally:
        ops.max_pool = original


def convert(emitter: str, shape: str, opset: int, pool_patch: bool, model: Any, folded: Any,
            args: argparse.Namespace) -> bytes:
    """One ONNX file, serialized."""
    if emitter == "ours":
        return to_onnx(model, opset=opset)
    import jax2onnx  # only in the converter's own environment

    height, width = ("H", "W") if shape == "dynamic" else (args.size, args.size)
    with patched_max_pool() if pool_patch else contextlib.nullcontext():
        proto = jax2onnx.to_onnx(lambda images: folded(images),
                                 inputs=[("B", height, width, 3)], model_name="resnet",
                                 opset=opset, input_names=["images"], output_names=["logits"])
    return proto.SerializeToString()


def warm_up_jax2onnx() -> float | str:
    """Seconds of jax2onnx's first conversion in the process (plugin registry and the like,
    which would otherwise land on whichever model converts first), or the error."""
    t0 = time.perf_counter()
    try:
        import jax2onnx

        jax2onnx.to_onnx(lambda x: jax.numpy.maximum(x + 1.0, 0.0), inputs=[("B", 3)])
    except Exception as error:
        return error_text(error)
    return time.perf_counter() - t0


def run_model(name: str, args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, Any]:
    model = flax_model_from_torch(name, torch_model(name, seed=0))
    folded = optimize_for_inference(model, policy=XLA_POLICY)
    results: dict[str, dict[str, Any]] = {}
    sessions: dict[str, ort.InferenceSession] = {}
    for side, (emitter, shape, opset, pool_patch) in sides(args).items():
        entry: dict[str, Any] = {"emitter": emitter, "height_width": shape,
                                 "opset_asked": opset, "pool2d_patch": pool_patch}
        results[side] = entry
        t0 = time.perf_counter()
        try:
            model_bytes = convert(emitter, shape, opset, pool_patch, model, folded, args)
        except Exception as error:  # recorded verbatim: whether it converts is the question
            entry["convert_error"] = error_text(error)
            continue
        entry["convert_s"] = time.perf_counter() - t0
        entry["onnx_bytes"] = len(model_bytes)
        proto = onnx.load_from_string(model_bytes)
        try:
            onnx.checker.check_model(proto)
            entry["onnx_checker"] = "passed"
        except Exception as error:
            entry["onnx_checker"] = error_text(error)
        entry["opset"] = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
        entry["inputs"] = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                           for i in proto.graph.input]
        entry["op_counts"] = op_counts(proto.graph)
        entry["nodes"] = len(proto.graph.node)
        optimized = workdir / f"{name}_{side}_all.onnx"
        try:
            sessions[side] = session(model_bytes, args.threads, optimized)
        except Exception as error:
            entry["session_error"] = error_text(error)
            continue
        graph = onnx.load(str(optimized), load_external_data=False).graph
        entry["optimized_op_counts"] = op_counts(graph)
        entry["optimized_nodes"] = len(graph.node)

    for batch in (1, 3):  # accuracy on small images, one file for both batch sizes
        images = random_images(batch, args.check_size, args.check_size, seed=batch)
        references = {"jax_model": np.asarray(model(images)),
                      "jax_folded": np.asarray(folded(images))}
        for side, sess in sessions.items():
            if results[side]["height_width"] == "fixed":
                continue
            key = f"max_rel_err_b{batch}_{args.check_size}"
            try:
                logits = sess.run(None, {"images": images})[0]
            except Exception as error:
                results[side][key] = error_text(error)
                continue
            results[side][key] = {ref: max_relative_error(logits, expected)
                                for ref, expected in references.items()}

    images = random_images(1, args.size, args.size, seed=0)
    references = {"jax_model": np.asarray(model(images)),
                  "jax_folded": np.asarray(folded(images))}
    calls: dict[str, Callable[[], np.ndarray]] = {}
    for side, sess in sessions.items():
        def call(s: ort.InferenceSession = sess) -> np.ndarray:
            return s.run(None, {"images": images})[0]

        try:
            logits = call()  # warm-up, and the full-size accuracy check
        except Exception as error:
            results[side][f"max_rel_err_b1_{args.size}"] = error_text(error)
            continue
        results[side][f"max_rel_err_b1_{args.size}"] = {
            ref: max_relative_error(logits, expected) for ref, expected in references.items()}
        calls[side] = call
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for round_ in range(args.repeats):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            t0 = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t0)
    for key, ts in times.items():
        results[key]["ort_b1_median_s"] = statistics.median(ts)
        results[key]["ort_b1_times_s"] = ts
    return {"model": name, "loadavg_1min_after": os.getloadavg()[0], "sides": results}


def print_model(case: dict[str, Any]) -> None:
    print(f"\n{case['model']} (1-min load average {case['loadavg_1min_after']:.1f})")
    for side, entry in case["sides"].items():
        if "convert_error" in entry:
            print(f"  {side:24s} conversion failed: {entry['convert_error']}")
            continue
        errors = {k: v for k, v in entry.items() if k.startswith("max_rel_err")}
        median = entry.get("ort_b1_median_s")
        print(f"  {side:24s} convert {entry['convert_s']:6.2f} s  {entry['onnx_bytes'] / 1e6:7.2f}"
              f" MB  nodes {entry['nodes']} -> {entry.get('optimized_nodes')} optimized  "
              + (f"ORT b1 {median * 1e3:.1f} ms" if median is not None else ""))
        print(f"    {entry['op_counts']}")
        print(f"    optimized: {entry.get('optimized_op_counts')}")
        print(f"    onnx.checker: {entry['onnx_checker']}")
        if "session_error" in entry:
            print(f"    ONNX Runtime session failed: {entry['session_error']}")
        print(f"    errors: {errors}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated variants")
    p.add_argument("--size", type=int, default=224, help="timed (and fixed-shape) image size")
    p.add_argument("--check-size", type=int, default=64, help="accuracy-check image size")
    p.add_argument("--opset", type=int, default=17, help="every file's opset")
    p.add_argument("--retry-opset", type=int, default=18,
                   help="the opset to convert with jax2onnx again at")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    info = machine() | {"versions": versions(), "ort_threads": args.threads,
                        "resnext_flax": os.path.dirname(resnext_flax.__file__),
                        "jax_backend": jax.default_backend(),
                        "jax2onnx_first_conversion_s": warm_up_jax2onnx()}
    print(f"{info['platform']}, {info['cpu_count']} CPUs, {info['versions']}, "
          f"1-min load average at start {info['loadavg_1min_start']:.1f}")
    cases = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            cases.append(run_model(name, args, pathlib.Path(workdir)))
            print_model(cases[-1])
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"machine": info, "args": vars(args), "models": cases}, indent=1) + "\n")
    return cases


if __name__ == "__main__":
    main()
