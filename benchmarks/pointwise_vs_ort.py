"""The compiled kernel's 1x1 GEMM against ONNX Runtime's on the same chains of 1x1 convs.

A whole-model comparison mixes every op, and both sides' profilers slow their own ops (the
library's most at batch 1, where ops are short), so per-op profiles cannot settle a gap of a
few percent. Here each side runs one chain of 1x1 conv + bias + ReLU layers with the same
random weights, in one process, interleaved, without a profiler:

* the library: ``kernel.pointwise_conv`` with prepared weights (the op an inference model's
  1x1 convs run, on the kernel's GEMM), one per layer, in one jitted program, NHWC in and out;
* ONNX Runtime: a graph of ``Conv`` + ``Relu`` nodes (opset 17, all graph optimizations, which
  fuse the ReLU and run the convs in its NCHWc layout), CPU execution provider, ``--threads``
  intra-op threads that do not spin between runs. Its timed call includes the two reorders
  between NCHW and NCHWc at the chain's ends, which the library's NHWC chain does not need: on
  short chains that favours the library slightly.

With ``--threads N`` the library's work loop uses the calling thread and N - 1 of XLA's pool
(``resnext_direct_conv_set_helpers``), so ``--threads 1`` compares the two kernels' one-core
speeds without either side's work split. A chain repeats its pattern of (in, out) channels
(``1024-256,256-1024``: a bottleneck block's reduce and expand) with distinct weights, so a
chain of large layers reads its weights from memory as a deep model does. Each row records both
sides' GFLOP/s (2 per multiply-add), the library's time over ORT's and the outputs' relative
difference; the JSON records the kernel build (path, size, commit of the checkout).

Example (docs/performance.md):
    python benchmarks/pointwise_vs_ort.py --repeats 21 \\
        --json benchmarks/results/cpu_2core_pointwise_vs_ort.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
from fma_peak import cpu_info  # sibling scripts (same folder)
from interleaved import interleaved_seconds
from onnx import TensorProto, helper, numpy_helper

from resnext_flax.nn.lowering import kernel


class Chain(NamedTuple):
    batch: int
    size: int
    pattern: str  # (in, out) channels of each layer, e.g. "1024-256,256-1024"
    times: int  # how often the pattern repeats


#: The 1x1 convs of ResNeXt-101 32x8d's stages 3 and 4 (1024-1024 at 14x14, 2048-2048 at
#: 7x7) and of ResNet-50's stages 1-4, at batch 1; the two ResNeXt ones at batch 8 too; and a
#: 7x7 chain of ResNeXt-101's stage-3 width, to separate the map size from the width.
CHAINS = [
    Chain(1, 14, "1024-1024", 8),
    Chain(1, 14, "1024-256,256-1024", 6),
    Chain(1, 7, "2048-2048", 3),
    Chain(1, 7, "1024-1024", 12),
    Chain(1, 7, "2048-512,512-2048", 4),
    Chain(1, 28, "512-128,128-512", 4),
    Chain(1, 56, "256-64,64-256", 4),
    Chain(8, 14, "1024-1024", 4),
    Chain(8, 7, "2048-2048", 3),
]


def layers_of(pattern: str, times: int) -> list[tuple[int, int]]:
    """The chain's (in, out) channels per layer; each layer must feed the next."""
    try:
        pairs = [tuple(int(c) for c in p.split("-")) for p in pattern.split(",")]
    except ValueError:
        raise ValueError(f"pattern {pattern!r}: expected IN-OUT pairs of integers, "
                         "comma-separated") from None
    if any(len(p) != 2 or min(p) < 1 for p in pairs) or times < 1:
        raise ValueError(f"pattern {pattern!r} x{times}: expected IN-OUT pairs of positive "
                         "channel counts, repeated at least once")
    for (_, cout), (cin, _) in zip(pairs, pairs[1:] + pairs[:1], strict=True):
        if cout != cin:
            raise ValueError(f"pattern {pattern!r}: each layer's outputs feed the next's inputs")
    return pairs * times


def parse_chain(text: str) -> Chain:
    """``BATCH:SIZE:PATTERN:TIMES`` (an argparse type: errors become usage errors)."""
    parts = text.split(":")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCH:SIZE:PATTERN:TIMES")
    try:
        chain = Chain(int(parts[0]), int(parts[1]), parts[2], int(parts[3]))
        layers_of(chain.pattern, chain.times)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    if chain.batch < 1 or chain.size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and size must be positive")
    return chain


def select_chains(chains: list[Chain], only: list[str]) -> list[Chain]:
    """The chains whose pattern is one of ``only`` (all of them when it is empty)."""
    return [c for c in chains if not only or c.pattern in only]


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
    """A CPU session with ``threads`` intra-op threads that sleep between runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads would take the cores from the library's side, timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def library_chain(weights: list[np.ndarray], biases: list[np.ndarray],
                  x_nhwc: np.ndarray) -> Callable[[], jax.Array]:
    """The chain as one jitted program of the kernel's pointwise conv, weights prepared."""
    kernels = [jnp.asarray(w.transpose(2, 3, 1, 0)) for w in weights]  # OIHW -> HWIO
    shape = x_nhwc.shape
    for k in kernels:
        if not kernel.pointwise_supports(shape, k.shape, 1, jnp.float32):
            raise ValueError(f"a {k.shape[2]}->{k.shape[3]} 1x1 conv does not run in the "
                             "kernel's GEMM (it needs float32 on the CPU and output channels "
                             "in multiples of 16)")
        shape = (*shape[:3], k.shape[3])
    prepared = [kernel.block_kernel(k, 1) for k in kernels]
    bias = [jnp.asarray(b) for b in biases]

    def chain(x, kernels, prepared, bias):
        for k, p, b in zip(kernels, prepared, bias, strict=True):
            x = kernel.pointwise_conv(x, k, b, relu=True, blocked=p)
        return x

    x = jax.device_put(x_nhwc)
    compiled = jax.jit(chain).lower(x, kernels, prepared, bias).compile()
    if compiled.as_text().count(kernel._POINTWISE_TARGET) < len(kernels):
        raise RuntimeError("the compiled chain does not call the kernel's GEMM for every layer")
    return lambda: compiled(x, kernels, prepared, bias).block_until_ready()


def measure(chain: Chain, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides on one chain, interleaved: medians, GFLOP/s, their ratio, the outputs' error."""
    layers = layers_of(chain.pattern, chain.times)
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((cout, cin, 1, 1)) / np.sqrt(cin)).astype(np.float32)
               for cin, cout in layers]
    biases = [(0.1 * rng.standard_normal(cout)).astype(np.float32) for _, cout in layers]
    x = rng.standard_normal((chain.batch, layers[0][0], chain.size, chain.size))
    x = x.astype(np.float32)
    session = ort_session(onnx_chain(weights, biases, chain.batch, chain.size), threads)
    sides = {"library": library_chain(weights, biases, x.transpose(0, 2, 3, 1)),
             "ort": lambda: session.run(None, {"x": x})[0]}
    reference = sides["ort"]()
    got = np.asarray(sides["library"]()).transpose(0, 3, 1, 2)
    rel_err = float(np.abs(got - reference).max() / np.abs(reference).max())
    times_s = interleaved_seconds(sides, args.repeats, args.warmup)
    flops = sum(2 * chain.batch * chain.size * chain.size * cin * cout for cin, cout in layers)
    median = {k: statistics.median(v) for k, v in times_s.items()}
    # The work loop never uses more helpers than XLA's pool has threads but one (one per core).
    helpers = min(threads, os.cpu_count() or 1) - 1
    return {**chain._asdict(), "threads": threads, "library_helpers": helpers,
            "flops": flops, "rel_err": rel_err,
            "ms": {k: m * 1e3 for k, m in median.items()},
            "gflops": {k: flops / m / 1e9 for k, m in median.items()},
            "library_over_ort_time": median["library"] / median["ort"],
            "times_s": times_s}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def thread_counts(text: str) -> list[int]:
    return [positive_int(t) for t in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=thread_counts, default=[2, 1],
                   help="comma-separated thread counts, each run for every chain")
    p.add_argument("--repeats", type=positive_int, default=15)
    p.add_argument("--warmup", type=positive_int, default=3)
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run the built-in chains of this pattern (repeatable)")
    p.add_argument("--chain", action="append", default=[], type=parse_chain,
                   metavar="BATCH:SIZE:PATTERN:TIMES",
                   help="run this chain instead of the built-in ones (repeatable), e.g. "
                        "1:14:1024-256,256-1024:6")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.chain and args.only:
        p.error("--only selects among the built-in chains; with --chain, give only the chains")
    args.chains = args.chain or select_chains(CHAINS, args.only)
    if not args.chains:
        p.error(f"--only {' '.join(args.only)}: no built-in chain has that pattern "
                f"({', '.join(sorted({c.pattern for c in CHAINS}))})")
    return args


def build_info() -> dict[str, Any]:
    """Which kernel build ran: its path and size, and the checkout's commit."""
    root = pathlib.Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or None
    return {"kernel_library": str(kernel._LIBRARY), "kernel_bytes": kernel._LIBRARY.stat().st_size,
            "commit": commit}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if not kernel.available():
        sys.exit(f"the compiled kernel is not available: {kernel.unavailable_reasons()}")
    loaded = kernel._load().direct  # the handle the library registered its handlers from
    rows = []
    try:
        for threads in args.threads:
            loaded.resnext_direct_conv_set_helpers(threads - 1)
            for chain in args.chains:
                row = measure(chain, threads, args)
                rows.append(row)
                print(f"{threads} thread(s), batch {chain.batch}, {chain.size}x{chain.size}, "
                      f"{chain.pattern} x{chain.times}: library {row['ms']['library']:.2f} ms "
                      f"({row['gflops']['library']:.0f} GFLOP/s), ORT {row['ms']['ort']:.2f} ms "
                      f"({row['gflops']['ort']:.0f}); library / ORT time "
                      f"{row['library_over_ort_time']:.3f}, rel err {row['rel_err']:.1e}",
                      flush=True)
    except ValueError as err:  # a chain the kernel's GEMM does not run
        sys.exit(f"error: {err}")
    finally:
        loaded.resnext_direct_conv_set_helpers(-1)  # the default: every pool thread
    if args.json:
        record = vars(args) | {"chains": [c._asdict() for c in args.chains],
                               "chain": [c._asdict() for c in args.chain]}
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "date": datetime.date.today().isoformat(),
                       "machine": cpu_info() | {"onnxruntime": ort.__version__,
                                                "jax": jax.__version__},
                       "build": build_info(), "args": record, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
