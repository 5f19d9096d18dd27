"""Side-by-side inference benchmark: this library (jit) vs PyTorch eager on the same weights.

For each model and batch size: random torchvision weights (random BatchNorm statistics too) are
ported with ``resnext_flax.load_torch_state_dict``; the JAX side is jitted once (compile time
measured), then JAX and every torch variant (NCHW, channels_last, optionally torch.compile) are
timed *interleaved*, one call each per round, so load from other processes hits all of them
alike; medians over rounds. Outputs are checked against each other (relative error).

Memory: "peak RSS" is the largest resident-set increase of this process, sampled every 2 ms
from /proc/self/statm while that side runs a few calls, above the RSS just before them
(weights and compiled code already resident), during the warm-up calls (the first calls,
which allocate); memory freed by one side and kept by the allocator may be reused by the next,
so treat it as indicative. For JAX also XLA's own buffer plan
(``compiled.memory_analysis()``: temporaries + output).

Example (the README table):
    python benchmarks/benchmark.py --models all --batch-sizes 8 --json results.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import resnext_flax
from resnext_flax.models import functional
from resnext_flax.models.folding import optimize_for_inference
from resnext_flax.nn.layers import with_conv_policy
from resnext_flax.nn.policy import LOWERINGS, ConvPolicy

# The test suite's reference models (random weights and BN statistics), shared, not copied.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torch_reference import (
    flax_model_from_torch,
    random_images,
    relative_error,
    to_nchw,
    torch_model,
)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the (monotonic) peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_delta(fn: Callable[[], Any], calls: int = 2) -> int:
    """Largest RSS increase (bytes) over the RSS before, while `fn` runs `calls` times."""
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        for _ in range(calls):
            fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - base


def policy_from_spec(spec: str) -> ConvPolicy:
    """``"auto"``, a lowering name, or ``"auto-winograd-ffi"`` (auto without those) as a
    policy; a ``+nofuse`` suffix turns the inference fusion off."""
    spec, fuse = (spec[:-len("+nofuse")], False) if spec.endswith("+nofuse") else (spec, True)
    forced, *excluded = spec.split("-")
    return ConvPolicy(lowering=forced, exclude=excluded, fuse=fuse)


def jax_callables(
    name: str,
    tmodel: torch.nn.Module,
    x: jax.Array,
    dtype: Any,
    paths: list[str],
    lowerings: list[str],
) -> dict[str, tuple[Callable[[], jax.Array], float, int]]:
    """Compiled JAX inference functions: name -> (call, compile seconds, XLA buffer bytes).

    One entry per (path, conv lowering); "auto" entries are named ``jax_<path>``, the others
    ``jax_<path>:<lowering>``. Each is traced from a fresh closure, so no trace is shared.
    """
    model = flax_model_from_torch(name, tmodel, dtype=dtype)
    out = {}
    for path in paths:
        for lowering in lowerings:
            t0 = time.perf_counter()
            policy = policy_from_spec(lowering)
            if path == "folded":
                def forward(folded, images):
                    return folded(images)

                args = (optimize_for_inference(model, policy=policy), x)
            elif path == "model":
                graphdef, state = nnx.split(with_conv_policy(model, policy))
                forward = functools.partial(functional.apply, graphdef)  # eval mode
                args = (state, x)
            else:
                raise ValueError(f"unknown JAX path {path!r}")
            compiled = jax.jit(forward).lower(*args).compile()
            seconds = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            xla_bytes = 0
            if mem is not None:
                xla_bytes = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
            key = f"jax_{path}" + ("" if lowering == "auto" else f":{lowering}")
            out[key] = (lambda c=compiled, a=args: c(*a).block_until_ready(), seconds,
                        xla_bytes)
    return out


def torch_callables(
    name: str,
    tmodel: torch.nn.Module,
    x: np.ndarray,
    dtype: torch.dtype,
    compile_: bool,
    device: str,
    extra_threads: tuple[int, ...] = (),
) -> dict[str, tuple[Callable[[], torch.Tensor], float]]:
    """torch eager NCHW / channels_last (and torch.compile): name -> (call, setup seconds).

    Each call returns only when the device is done (``torch.cuda.synchronize`` on GPU).
    `extra_threads` adds eager entries run with that many intra-op threads (``@<n>t``): on a
    CPU shared with other jobs, torch's OpenMP ops can run faster on fewer threads.
    """
    nchw = to_nchw(x).to(device=device, dtype=dtype)
    cl_model = copy.deepcopy(tmodel).to(device=device, dtype=dtype)
    cl_model = cl_model.to(memory_format=torch.channels_last)
    m = tmodel.to(device=device, dtype=dtype)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(model: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor,
              threads: int | None = None):
        def call() -> torch.Tensor:
            if threads:
                torch.set_num_threads(threads)
            out = model(inp)
            sync()
            if threads:
                torch.set_num_threads(default_threads)
            return out

        return call

    default_threads = torch.get_num_threads()
    out = {
        "torch_nchw": (timed(m, nchw), 0.0),
        "torch_channels_last": (timed(cl_model, cl), 0.0),
    }
    for threads in extra_threads:
        out[f"torch_nchw@{threads}t"] = (timed(m, nchw, threads), 0.0)
        out[f"torch_channels_last@{threads}t"] = (timed(cl_model, cl, threads), 0.0)
    if compile_:
        compiled = torch.compile(cl_model)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(cl)
            sync()
        out["torch_compile"] = (timed(compiled, cl), time.perf_counter() - t0)
    return out


def run_case(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tmodel = torch_model(name, seed=0)
    x_np = random_images(batch, args.size, args.size, seed=0)
    x = jnp.asarray(x_np, dtype=jdtype)
    jax_fns = jax_callables(name, tmodel, x, jdtype if args.dtype != "float32" else None,
                            args.jax_paths, args.conv_lowerings)
    torch_fns = torch_callables(name, tmodel, x_np, tdtype, args.torch_compile, args.device,
                                args.torch_threads)

    with torch.inference_mode():
        reference = torch_fns["torch_nchw"][0]().float().cpu().numpy()
        results: dict[str, Any] = {}
        for key, (fn, compile_s, xla_bytes) in jax_fns.items():
            logits = np.asarray(fn(), np.float64)
            err = relative_error(logits, reference)
            top1 = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
            results[key] = {"compile_s": compile_s, "xla_buffer_bytes": xla_bytes,
                            "rel_err_vs_torch": float(err), "top1_agreement": top1}
        for key, (_, setup_s) in torch_fns.items():
            results[key] = {"compile_s": setup_s}
        calls = {k: v[0] for k, v in jax_fns.items()} | {k: v[0] for k, v in torch_fns.items()}
        for key, fn in calls.items():  # warm-up: the first calls allocate, so measure memory
            results[key]["peak_rss_delta_bytes"] = peak_rss_delta(fn, max(args.warmup, 1))
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.repeats):
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    for key, ts in times.items():
        med = statistics.median(ts)
        results[key] |= {"median_s": med, "images_per_s": batch / med, "times_s": ts}
    torch_keys = [k for k in results if k.startswith("torch") and k != "torch_compile"]
    best_torch = max(torch_keys, key=lambda k: results[k]["images_per_s"])
    for key in jax_fns:
        results[key]["ratio_vs_best_torch_eager"] = (
            results[key]["images_per_s"] / results[best_torch]["images_per_s"]
        )
    return {"model": name, "batch": batch, "size": args.size, "dtype": args.dtype,
            "loadavg_1min_after": os.getloadavg()[0],
            "best_torch_eager": best_torch, "results": results}


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def print_case(case: dict[str, Any]) -> None:
    r = case["results"]
    best = case["best_torch_eager"]
    print(f"\n{case['model']}  batch {case['batch']}  {case['size']}x{case['size']}  "
          f"{case['dtype']}   (ratio = JAX img/s / {best} img/s; "
          f"1-min load average {case['loadavg_1min_after']:.1f} on {os.cpu_count()} CPUs)")
    print(f"  {'side':<22}{'img/s':>8}{'ratio':>7}{'compile s':>11}{'rel err':>10}"
          f"{'peak RSS MiB':>14}{'XLA buf MiB':>13}")
    for key, v in r.items():
        ratio = f"{v['ratio_vs_best_torch_eager']:.2f}" if "ratio_vs_best_torch_eager" in v else ""
        err = f"{v['rel_err_vs_torch']:.1e}" if "rel_err_vs_torch" in v else ""
        xla = _mib(v["xla_buffer_bytes"]) if "xla_buffer_bytes" in v else ""
        print(f"  {key:<22}{v['images_per_s']:>8.2f}{ratio:>7}{v['compile_s']:>11.2f}"
              f"{err:>10}{_mib(v['peak_rss_delta_bytes']):>14}{xla:>13}")
    sys.stdout.flush()


def markdown_table(cases: list[dict[str, Any]]) -> str:
    """One row per (model, batch, JAX side): images/s of both sides, the ratio, compile time."""
    rows = ["| model | batch | JAX side | JAX img/s | torch NCHW img/s | torch channels_last "
            "img/s | fastest torch eager | torch.compile img/s | JAX/PyTorch | JAX compile s "
            "| rel. error |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        r = c["results"]
        tc = r.get("torch_compile", {}).get("images_per_s")
        for key, v in r.items():
            if not key.startswith("jax"):
                continue
            rows.append(
                f"| {c['model']} | {c['batch']} | {key} | {v['images_per_s']:.2f} | "
                f"{r['torch_nchw']['images_per_s']:.2f} | "
                f"{r['torch_channels_last']['images_per_s']:.2f} | "
                f"{c['best_torch_eager']} ({r[c['best_torch_eager']]['images_per_s']:.2f}) | "
                f"{'' if tc is None else f'{tc:.2f}'} | "
                f"**{v['ratio_vs_best_torch_eager']:.2f}** | {v['compile_s']:.1f} | "
                f"{v['rel_err_vs_torch']:.1e} |"
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnext50_32x4d",
                   help="comma-separated names, or 'all'")
    p.add_argument("--batch-sizes", default="8", help="comma-separated, e.g. 1,8,32")
    p.add_argument("--size", type=int, default=224, help="image height and width")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--jax-paths", default="folded",
                   help="'folded' (optimize_for_inference) and/or 'model' (the NNX model)")
    p.add_argument("--conv-lowerings", default="auto",
                   help="comma-separated conv policies to time side by side (a lowering, "
                   f"one of {', '.join(LOWERINGS)}; default: auto, the library's choice; "
                   "'auto-winograd' is the automatic choice without winograd, 'auto-ffi' without "
                   "the compiled CPU kernel; a '+nofuse' suffix: no inference fusion)")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--torch-threads", default="",
                   help="also time torch eager with these thread counts, e.g. '1'; the ratio "
                   "is then over the fastest torch eager entry")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (JAX uses its "
                   "default backend)")
    p.add_argument("--precision", choices=("default", "highest"), default="default",
                   help="'highest': JAX matmul precision 'highest' and torch TF32 off (GPU)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--markdown", default=None, help="append the summary table to this file")
    args = p.parse_args(argv)
    args.models = (resnext_flax.list_models() if args.models == "all"
                   else args.models.split(","))
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.jax_paths = args.jax_paths.split(",")
    args.conv_lowerings = args.conv_lowerings.split(",")
    for spec in args.conv_lowerings:  # bad names fail here, before any model is built
        try:
            policy_from_spec(spec)
        except (TypeError, ValueError) as err:
            p.error(f"--conv-lowerings {spec!r}: {err}")
    args.torch_threads = tuple(int(t) for t in args.torch_threads.split(",") if t)
    return args


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_1min_start": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    info = machine()
    print(json.dumps(info))
    cases = []
    for name in args.models:
        for batch in args.batch_sizes:
            case = run_case(name, batch, args)
            print_case(case)
            cases.append(case)
    table = markdown_table(cases)
    print("\nsummary (JAX/PyTorch = images/s over the faster torch eager layout)\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n`{' '.join(sys.argv)}` on {info['platform']}, {info['cpu_count']} "
                    f"CPUs, JAX backend {info['jax_backend']} ({info['jax_devices'][0]}), "
                    f"torch device {args.device}, {args.dtype}, precision {args.precision}, "
                    f"1-min load average at start {info['loadavg_1min_start']:.1f}\n\n"
                    + table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "cases": cases}, f, indent=1)
    return cases


if __name__ == "__main__":
    main()
