"""The machine's measured fp32 FMA peak: GFLOP/s of independent FMA chains, 256- and 512-bit.

A small C source (below) is compiled at run time with the system C compiler (``cc -O2``); its
per-function target attributes put an AVX2+FMA loop and an AVX-512F loop in one shared
library, and the AVX-512 loop runs only where the CPU (and the OS) supports it, checked at run
time by the library itself. Each loop updates ``ACCUMULATORS`` independent vector registers
with ``a = a * b + c``: enough chains to cover the FMA latency on the two FMA pipes of current
x86 cores, so the loop is bound by FMA throughput alone. A FLOP count is 2 per lane per FMA.

The multi-threaded rows call the same C function from Python threads at once (ctypes releases
the GIL around the call); their time is from the first thread's start to the last thread's end.
Each row is the best of ``--repeats`` runs, the peak being what the hardware can do.

Whether the 512-bit row doubles the 256-bit one tells how a CPU executes 512-bit FMAs: AMD
Zen 4 splits them into two 256-bit halves (no gain), Zen 5 and Intel server cores with two
512-bit FMA units do not.

Example (benchmarks/results/cpu_2core_fma_peak.json):
    python benchmarks/fma_peak.py --json benchmarks/results/cpu_2core_fma_peak.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from startup import lscpu  # the sibling script's lscpu reading (same folder)

ACCUMULATORS = 12

_LOOP = """
__attribute__((target("{target}")))
float fma{bits}(long iters, float b, float c) {{
    {vec} {decls};
    const {vec} vb = {set1}(b), vc = {set1}(c);
    for (long i = 0; i < iters; ++i) {{
{body}
    }}
    {vec} s = {add}(a0, a1);
{reduce}
    float out[{lanes}];
    {store}(out, s);
    return out[0];
}}
"""

_HEADER = """
#include <immintrin.h>

int has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

int has_avx512f(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}
"""

WIDTHS = {256: {"target": "avx2,fma", "vec": "__m256", "prefix": "_mm256", "lanes": 8},
          512: {"target": "avx512f", "vec": "__m512", "prefix": "_mm512", "lanes": 16}}


def c_source() -> str:
    """The C file: feature checks and one FMA loop per vector width."""
    loops = []
    for bits, w in WIDTHS.items():
        p = w["prefix"]
        names = [f"a{i}" for i in range(ACCUMULATORS)]
        loops.append(_LOOP.format(
            target=w["target"], bits=bits, vec=w["vec"], lanes=w["lanes"],
            set1=f"{p}_set1_ps", add=f"{p}_add_ps", store=f"{p}_storeu_ps",
            # distinct starting values: no two chains are the same computation
            decls=", ".join(f"{n} = {p}_set1_ps(1.0f + {i}e-3f)" for i, n in enumerate(names)),
            body="\n".join(f"        {n} = {p}_fmadd_ps({n}, vb, vc);" for n in names),
            reduce="\n".join(f"    s = {p}_add_ps(s, {n});" for n in names[2:]),
        ))
    return _HEADER + "".join(loops)


def build(workdir: pathlib.Path, compiler: str = "cc") -> ctypes.CDLL:
    """Compile the C source into a shared library in ``workdir`` and load it."""
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH; the FMA loops are built at "
                           "run time (set --cc)")
    src, lib = workdir / "fma_peak.c", workdir / "fma_peak.so"
    src.write_text(c_source())
    result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} failed to build the FMA loops:\n{result.stderr}")
    dll = ctypes.CDLL(str(lib))
    for bits in WIDTHS:
        fn = getattr(dll, f"fma{bits}")
        fn.argtypes = [ctypes.c_long, ctypes.c_float, ctypes.c_float]
        fn.restype = ctypes.c_float
    return dll


def run_threads(fn: Any, iters: int, threads: int) -> float:
    """Seconds from the first thread's start to the last one's end, all calling ``fn``."""
    barrier = threading.Barrier(threads)
    spans: list[tuple[float, float]] = []

    def work() -> None:
        barrier.wait()
        t0 = time.perf_counter()
        fn(iters, 0.9999999, 1e-7)  # converges to 1.0: no overflow, no denormals
        spans.append((t0, time.perf_counter()))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return max(end for _, end in spans) - min(start for start, _ in spans)


def calibrate(fn: Any, seconds: float) -> int:
    """Loop iterations that make one single-threaded call last about ``seconds``."""
    iters = 1 << 12
    while True:
        elapsed = run_threads(fn, iters, 1)
        if elapsed >= seconds / 4 or iters >= 1 << 40:
            return max(1, int(iters * seconds / max(elapsed, 1e-9)))
        iters *= 4


def cpu_info() -> dict[str, Any]:
    """lscpu's model name and flags (all of them, and the vector ones as booleans)."""
    model, flags = lscpu()
    mhz = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "cpu_mhz_reported": mhz,
            "avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
            "flags": flags, "platform": platform.platform(),
            "loadavg_1min_start": os.getloadavg()[0]}


def measure(dll: ctypes.CDLL, widths: list[int], threads: list[int], seconds: float,
            repeats: int) -> list[dict[str, Any]]:
    """One row per (width, thread count): best and all GFLOP/s over ``repeats`` runs."""
    rows = []
    for bits in widths:
        fn = getattr(dll, f"fma{bits}")
        iters = calibrate(fn, seconds)
        flops_per_call = 2 * WIDTHS[bits]["lanes"] * ACCUMULATORS * iters
        for n in threads:
            runs = [n * flops_per_call / run_threads(fn, iters, n) / 1e9 for _ in range(repeats)]
            rows.append({"bits": bits, "threads": n, "gflops": max(runs), "runs_gflops": runs,
                         "iters_per_thread": iters, "accumulators": ACCUMULATORS})
            print(f"{bits:4d}-bit  {n:3d} thread(s)  {max(runs):8.1f} GFLOP/s  "
                  f"({max(runs) / n:.1f} per thread)", flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=f"1,{os.cpu_count()}",
                   help="comma-separated thread counts (default: 1 and os.cpu_count())")
    p.add_argument("--seconds", type=float, default=0.5, help="length of one run")
    p.add_argument("--repeats", type=int, default=5, help="runs per row (the best counts)")
    p.add_argument("--cc", default="cc", help="C compiler")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",") if t})
    except ValueError:
        p.error(f"--threads: integers expected, got {args.threads!r}")
    if not args.threads or min(args.threads) < 1:
        p.error("--threads: at least one count, each >= 1")
    if args.repeats < 1 or args.seconds <= 0:
        p.error("--repeats must be >= 1 and --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = cpu_info()
    with tempfile.TemporaryDirectory(prefix="fma-peak-") as workdir:
        dll = build(pathlib.Path(workdir), args.cc)
        if not dll.has_avx2_fma():
            raise SystemExit("this CPU lacks AVX2+FMA: nothing to measure")
        widths = [256, 512] if dll.has_avx512f() else [256]
        print(f"{info['cpu_model']}, {info['cpu_count']} CPUs, reported {info['cpu_mhz_reported']}"
              f" MHz; measuring {widths}-bit FMAs, {ACCUMULATORS} accumulators; "
              f"load {info['loadavg_1min_start']:.1f}", flush=True)
        vector_flags = [f for f in info["flags"] if f.startswith(("avx", "fma"))]
        print("vector flags: " + " ".join(vector_flags))
        rows = measure(dll, widths, args.threads, args.seconds, args.repeats)
    best = {(r["bits"], r["threads"]): r["gflops"] for r in rows}
    ratios = {str(n): best[512, n] / best[256, n] for n in args.threads if (512, n) in best}
    for n, ratio in ratios.items():
        print(f"512-bit / 256-bit on {n} thread(s): {ratio:.2f}x")
    record = {"command": [sys.executable, *sys.argv], "date": datetime.date.today().isoformat(),
              "machine": info | {"loadavg_1min_end": os.getloadavg()[0]},
              "args": vars(args), "widths_measured": widths, "rows": rows,
              "peak_gflops": max(best.values()), "ratio_512_over_256": ratios}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
