"""The largest models: peak host memory of loading a weight file, and inference speed.

Memory (``--memory``): a child process writes a random-weight ``.safetensors`` file of the
model with torchvision's keys (float32, as timm's Hub files are; written tensor by tensor, and
its memory is not measured). Then, each in a fresh child process:

- ``load``: ``resnext_flax.load_model(file)`` (read, resolve the layout, convert every tensor
  into the model's parameters), the way a Hugging Face Hub file is loaded;
- ``convert``: ``convert_checkpoint(file, out, verify=False)`` (the load, then the converted
  file written);
- ``load_converted``: ``resnext_flax.load_checkpoint(out)``;
- ``optimize``: ``load_model(file)``, then ``optimize_for_inference`` (the original model
  kept, as a caller holding it would).

Each child reports its RSS after its imports and JAX's backend start (before the work), its
peak RSS (``VmHWM``, which includes that start), its RSS at the end, and the file's bytes;
the ratios are the peak over the file's bytes and the growth (peak minus the start) over
them.

Speed (``--speed``): ``benchmarks/benchmark.py``'s case (the library after
``optimize_for_inference`` against PyTorch eager, NCHW and channels_last, same process,
interleaved rounds, medians) at the batch sizes asked for. The torch reference is built with
torch's random init and random BatchNorm statistics; both sides hold the weights.

Example (docs/models.md):
    python benchmarks/large_models.py --model resnext101_32x16d --memory --speed \\
        --json benchmarks/results/large_models_resnext101_32x16d.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the tests' torch reference models

MODES = ("load", "convert", "load_converted", "optimize")


class RandomTensor:
    """A tensor of random values made when it is written (one at a time): BatchNorm variances
    positive, step counters zero, everything else small normal values."""

    def __init__(self, key: str, shape: tuple[int, ...], seed: int):
        self.key, self.shape, self.seed = key, shape, seed
        self.dtype = np.dtype(np.int64 if key.endswith("num_batches_tracked") else np.float32)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.dtype == np.int64:
            return np.zeros(self.shape, np.int64)
        if self.key.endswith("running_var"):
            return rng.uniform(0.5, 1.5, self.shape).astype(np.float32)
        values = rng.standard_normal(self.shape, dtype=np.float32)
        values *= 0.02
        return values


def write_random_file(name: str, path: str) -> None:
    """A random-weight safetensors file of `name` with torchvision's keys (run in a child)."""
    import torch
    from torch_reference import torch_architecture

    from resnext_flax.weights.stored import write_tensors

    with torch.device("meta"):  # shapes only
        keys = {k: tuple(v.shape) for k, v in torch_architecture(name).state_dict().items()}
    tensors = {k: RandomTensor(k, shape, seed) for seed, (k, shape) in enumerate(keys.items())}
    with open(path, "wb") as f:
        write_tensors(f, tensors)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(mode: str, path: str, out: str) -> dict[str, Any]:
    """One mode's memory, in this (fresh) process."""
    import jax

    import resnext_flax
    from resnext_flax.weights.conversion import convert_checkpoint

    jax.devices()  # the backend's own memory belongs to the start, not to the load
    start = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "load":
        model = resnext_flax.load_model(path)
    elif mode == "convert":
        convert_checkpoint(path, out, verify=False)
        model = None
    elif mode == "load_converted":
        model = resnext_flax.load_checkpoint(out)
    else:
        loaded = resnext_flax.load_model(path)
        model = resnext_flax.optimize_for_inference(loaded)
    if model is not None:
        from flax import nnx

        jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    peak, end = _status("VmHWM"), _status("VmRSS")
    size = os.path.getsize(path)
    return {"mode": mode, "file_bytes": size, "rss_start_bytes": start, "peak_rss_bytes": peak,
            "rss_end_bytes": end,
            "peak_over_file": peak / size, "growth_over_file": (peak - start) / size,
            "seconds": seconds}


def _child(*args: str) -> str:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True,
                          capture_output=True, text=True)
    return done.stdout


def memory(name: str, folder: str) -> list[dict[str, Any]]:
    path = os.path.join(folder, f"{name}.safetensors")
    out = os.path.join(folder, f"{name}.converted.safetensors")
    _child("--write", name, path)
    rows = []
    for mode in MODES:
        row = json.loads(_child("--measure", mode, path, out).splitlines()[-1])
        print(f"{name} {mode}: file {row['file_bytes'] / 2**30:.2f} GiB, start "
              f"{row['rss_start_bytes'] / 2**30:.2f} GiB, peak {row['peak_rss_bytes'] / 2**30:.2f}"
              f" GiB: {row['peak_over_file']:.2f}x the file ({row['growth_over_file']:.2f}x "
              f"above the start), {row['seconds']:.1f} s", flush=True)
        rows.append(row)
    return rows


def speed(name: str, batches: str, repeats: int) -> list[dict[str, Any]]:
    sys.path.insert(0, HERE)
    import benchmark

    args = benchmark.parse_args(["--models", name, "--batch-sizes", batches,
                                 "--repeats", str(repeats), "--warmup", "1"])
    cases = []
    for batch in args.batch_sizes:
        case = benchmark.run_case(name, batch, args)
        benchmark.print_case(case)
        cases.append(case)
    return cases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnext101_32x16d")
    p.add_argument("--memory", action="store_true", help="measure the loads' peak memory")
    p.add_argument("--speed", action="store_true", help="time inference against PyTorch")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the weight files go (default: a "
                   "temporary folder, removed after)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--note", default="", help="recorded as is (e.g. 'busy machine')")
    p.add_argument("--write", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--measure", nargs=3, metavar=("MODE", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write:
        write_random_file(*args.write)
        return
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    import resnext_flax

    if args.model not in resnext_flax.list_models():
        p.error(f"--model: one of {', '.join(resnext_flax.list_models())}")
    result: dict[str, Any] = {"model": args.model, "note": args.note,
                              "date": datetime.datetime.now(datetime.UTC).isoformat(
                                  timespec="seconds"),
                              "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    if args.memory:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            result["memory"] = memory(args.model, folder)
    if args.speed:
        result["speed"] = speed(args.model, args.batch_sizes, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
