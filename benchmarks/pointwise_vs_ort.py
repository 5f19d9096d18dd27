"""The compiled kernel's 1x1 GEMM against ONNX Runtime's (MLAS) on the same chains of 1x1 convs.

A whole-model comparison mixes every op, and both sides' profilers slow their own ops (the
library's most at batch 1, where ops are short), so per-op profiles cannot settle a gap of a
few percent. Here each side runs one chain of 1x1 conv + bias + ReLU layers with the same
random weights, in one process, interleaved, without a profiler:

* the library: the kernel's pointwise handler (the op an inference model's 1x1 convs run),
  one ``ffi_call`` per layer in one jitted program, NHWC;
* ONNX Runtime: a graph of ``Conv`` + ``Relu`` nodes (opset 17, all graph optimizations: it
  fuses the ReLU and runs NCHWc convs, reordering only at the chain's two ends), CPU execution
  provider, ``--threads`` intra-op threads that do not spin between runs.

``--threads 1`` also runs the library on its calling thread only
(``resnext_direct_conv_set_helpers(0)``), so the two kernels' single-core speeds compare
without either side's work split. The layers repeat each shape's pattern (``1024-256,256-1024``:
a block's reduce and expand) ``--repeats-of-pattern`` times, with distinct weights, so a chain
of large layers reads its weights from memory as a deep model does. Each row records both
sides' GFLOP/s (2 per multiply-add) and the library's time over ORT's; the outputs are compared
(relative error).

Example (docs/performance.md):
    python benchmarks/pointwise_vs_ort.py --repeats 21 \\
        --json benchmarks/results/cpu_2core_pointwise_vs_ort.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
from fma_peak import cpu_info  # sibling script (same folder)
from onnx import TensorProto, helper, numpy_helper

from resnext_flax.nn.lowering import kernel

#: (batch, map size, pattern of (in, out) channels, times the pattern repeats): the 1x1 convs
#: of ResNeXt-101 32x8d's and ResNet-50's stages 3 and 4 at batch 1 and 8, and of their
#: stages 1 and 2 at batch 1.
CHAINS = [
    (1, 14, "1024-1024", 8),
    (1, 14, "1024-256,256-1024", 6),
    (1, 7, "2048-2048", 3),
    (1, 7, "1024-1024", 12),
    (1, 7, "2048-512,512-2048", 4),
    (1, 28, "512-128,128-512", 4),
    (1, 56, "256-64,64-256", 4),
    (8, 14, "1024-1024", 4),
    (8, 7, "2048-2048", 3),
]


def layers_of(pattern: str, times: int) -> list[tuple[int, int]]:
    pairs = [tuple(int(c) for c in p.split("-")) for p in pattern.split(",")]
    for (_, cout), (cin, _) in zip(pairs, pairs[1:] + pairs[:1], strict=True):
        if cout != cin:
            raise ValueError(f"pattern {pattern!r}: each layer's outputs feed the next's inputs")
    return pairs * times


def onnx_chain(weights: list[np.ndarray], biases: list[np.ndarray], batch: int,
               size: int) -> bytes:
    """Conv + Relu nodes, NCHW, weights as initializers."""
    nodes, initializers, current = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"conv{i}"]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"])]
        current = f"relu{i}"
    shape_in = [batch, weights[0].shape[1], size, size]
    shape_out = [batch, weights[-1].shape[0], size, size]
    graph = helper.make_graph(
        nodes, "pointwise_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape_out)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def ort_session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads would take the cores from the library's side, timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def library_chain(weights: list[np.ndarray], biases: list[np.ndarray], x_nhwc: np.ndarray):
    """The chain as one jitted program of the kernel's pointwise handler."""
    blocked = [kernel.block_kernel(jnp.asarray(w.transpose(2, 3, 1, 0)), 1) for w in weights]
    bias = [jnp.asarray(b) for b in biases]

    def chain(x, blocked, bias):
        for w, b in zip(blocked, bias, strict=True):
            units, _, _, _, unit = w.shape
            out = jax.ShapeDtypeStruct((*x.shape[:3], units * unit), jnp.float32)
            x = jax.ffi.ffi_call(kernel._POINTWISE_TARGET, out)(x, w, b, stride=np.int64(1),
                                                                relu=True)
        return x

    x = jax.device_put(x_nhwc)
    compiled = jax.jit(chain).lower(x, blocked, bias).compile()
    return lambda: compiled(x, blocked, bias).block_until_ready()


def measure(batch: int, size: int, pattern: str, times: int, threads: int,
            args: argparse.Namespace) -> dict[str, Any]:
    layers = layers_of(pattern, times)
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
               for cin, cout in layers]
    biases = [(0.1 * rng.standard_normal(cout)).astype(np.float32) for _, cout in layers]
    x = rng.standard_normal((batch, layers[0][0], size, size)).astype(np.float32)
    session = ort_session(onnx_chain(weights, biases, batch, size), threads)
    sides = {"library": library_chain(weights, biases, x.transpose(0, 2, 3, 1)),
             "ort": lambda: session.run(None, {"x": x})[0]}
    reference = sides["ort"]()
    got = np.asarray(sides["library"]()).transpose(0, 3, 1, 2)
    rel_err = float(np.abs(got - reference).max() / np.abs(reference).max())
    for fn in sides.values():
        for _ in range(args.warmup):
            fn()
    times_s: dict[str, list[float]] = {k: [] for k in sides}
    for round_ in range(args.repeats):  # interleaved, alternating which side goes first
        for key in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            sides[key]()
            times_s[key].append(time.perf_counter() - t0)
    flops = sum(2 * batch * size * size * cin * cout for cin, cout in layers)
    median = {k: statistics.median(v) for k, v in times_s.items()}
    return {"batch": batch, "size": size, "pattern": pattern, "times": times,
            "threads": threads, "flops": flops, "rel_err": rel_err,
            "ms": {k: m * 1e3 for k, m in median.items()},
            "gflops": {k: flops / m / 1e9 for k, m in median.items()},
            "library_over_ort_time": median["library"] / median["ort"],
            "times_s": times_s}


def parse_chain(text: str) -> tuple[int, int, str, int]:
    batch, size, pattern, times = text.split(":")
    layers_of(pattern, 1)  # checks that the layers chain
    return int(batch), int(size), pattern, int(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated patterns to run (default all)")
    p.add_argument("--chain", action="append", default=[],
                   help="BATCH:SIZE:PATTERN:TIMES, e.g. 1:14:1024-256,256-1024:6, instead of the "
                        "built-in chains (repeatable)")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if not kernel.available():
        sys.exit(f"the compiled kernel is not available: {kernel.unavailable_reasons()}")
    helpers = ctypes.CDLL(str(kernel._LIBRARY))  # the handle the kernel module loaded
    chains = [c for c in CHAINS if not args.only or c[2] in args.only.split(",")]
    if args.chain:
        chains = [parse_chain(text) for text in args.chain]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        helpers.resnext_direct_conv_set_helpers(0 if threads == 1 else -1)
        for batch, size, pattern, times in chains:
            row = measure(batch, size, pattern, times, threads, args)
            rows.append(row)
            print(f"{threads} thread(s), batch {batch}, {size}x{size}, {pattern} x{times}: "
                  f"library {row['ms']['library']:.2f} ms ({row['gflops']['library']:.0f} "
                  f"GFLOP/s), ORT {row['ms']['ort']:.2f} ms ({row['gflops']['ort']:.0f}); "
                  f"library / ORT time {row['library_over_ort_time']:.3f}, "
                  f"rel err {row['rel_err']:.1e}", flush=True)
    helpers.resnext_direct_conv_set_helpers(-1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "date": datetime.date.today().isoformat(),
                       "machine": cpu_info() | {"onnxruntime": ort.__version__,
                                                "jax": jax.__version__},
                       "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
