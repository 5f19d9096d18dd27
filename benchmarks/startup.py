"""Start-up latency, whole processes: this library beside torchvision doing the same job.

Every measurement is a fresh interpreter (``subprocess``, wall clock from spawn to exit); the
sides of a job alternate (library, torchvision, library, ...) so load from other processes
hits both alike; medians over ``--repeats``. Where a child times its own stages (import,
build, first call) it prints them as JSON and their medians are reported too.

Jobs (``--jobs`` takes names or groups: import, list, predict, forward, train):

- ``import``: ``import resnext_flax`` and its first name (``resnext_flax.create_model``, which
  the package resolves lazily) vs ``import torch, torchvision``; baseline
  ``import jax, flax.nnx``.
- ``list``, ``help``: ``resnext-flax list`` (vs a torchvision script printing the same table
  from its weight enums) and ``resnext-flax --help``.
- ``predict-pth``, ``predict-safetensors``: ``resnext-flax predict`` on two photos
  (scikit-learn's sample images) with a random-weight ResNet-50 (random BatchNorm statistics)
  saved as a ``.pth`` and converted to ``.safetensors``; torchvision: a plain script that
  builds the model, loads the ``.pth``, preprocesses like its weights' transforms and prints
  the top-5. Both sides use IMAGENET1K_V1's preprocessing (resize 256, crop 224) and class
  names (``--weights IMAGENET1K_V1``: a bare state dict records none). Reading the ``.pth``
  imports torch in the library's process too.
- ``forward-resnet50``, ``forward-resnext101_32x8d``: build + first eval-mode ``model(x)``,
  batch 2, 224x224, random weights.
- ``train-resnet50``: build + first SGD training step, batch 2, 224x224.

Caches: every library process gets ``RESNEXT_FLAX_CACHE`` and ``JAX_COMPILATION_CACHE_DIR``
pointing at a per-run directory. The cached jobs run ``cold`` (a fresh, empty directory) and
then ``warm`` (a second process on the directory the cold one filled); whether anything is
written there is the library's (and JAX's) business, so the harness measures what a user
gets. torchvision has no cache: its cold and warm rows are two runs of the same script. The
operating system's file cache is warm for both after the first run.

Threads: each child is pinned to the same ``--cpus`` CPUs (``sched_setaffinity``); torch
scripts call ``torch.set_num_threads(cpus)``; XLA keeps its default (one intra-op thread per
schedulable CPU).

    python benchmarks/startup.py --json benchmarks/results/x.json
    python benchmarks/startup.py --jobs import,list --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The child scripts live beside this file (each job's library and torchvision code together).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import startup_children as child  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Command:
    """A child's arguments after the interpreter; ``@name`` items are fixture paths."""

    argv: tuple[str, ...]

    def resolve(self, fixtures: dict[str, str], threads: int) -> list[str]:
        argv = [fixtures.get(a[1:], a) if a.startswith("@") else a for a in self.argv]
        if argv[0] == "-c":  # a script: its parameters and the fixtures as JSON
            params = json.loads(argv[2])
            argv[2] = json.dumps({**params, "threads": threads})
            argv.append(json.dumps(fixtures))
        return argv


def script(*parts: str, **params: Any) -> Command:
    """A child script: the shared prelude, `parts` (which call ``mark``), the stages printed;
    `params` are its ``P``."""
    return Command(("-c", child.PRELUDE + "".join(parts) + child.EPILOGUE, json.dumps(params)))


def torch_script(*parts: str, **params: Any) -> Command:
    """A torchvision child: torch imported, its threads pinned, then `parts`."""
    return script(child.TORCH_HEAD, *parts, **params)


def jax_script(*parts: str, **params: Any) -> Command:
    """A library child: JAX, Flax and the package imported, then `parts`."""
    return script(child.JAX_HEAD, *parts, **params)


def cli(*args: str) -> Command:
    """The ``resnext-flax`` console script's work (``python -m resnext_flax.cli``)."""
    return Command(("-m", "resnext_flax.cli", *args))


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    group: str
    library: Command
    torchvision: Command | None = None
    baseline: Command | None = None  # a reference the library is held to, e.g. jax's import
    baseline_label: str = ""
    cached: bool = False  # cold and warm rows (a fresh cache directory, then the same one)
    needs: tuple[str, ...] = ()  # fixtures


PHOTOS = ("@china", "@flower")
PREDICT = ("predict", "--model", "resnet50", "--weights", "IMAGENET1K_V1", "--checkpoint")
TORCH_PREDICT_JOB = torch_script(child.TORCH_PREDICT, model="resnet50", weights="IMAGENET1K_V1")

JOBS = (
    Job("import", "import", script(child.LIBRARY_IMPORT), torch_script(),
        script('import jax, flax.nnx\nmark("import")\n'), "import jax, flax.nnx"),
    Job("list", "list", cli("list"), torch_script(child.TORCH_LIST)),
    Job("help", "list", cli("--help")),
    Job("predict-pth", "predict", cli(*PREDICT, "@pth", *PHOTOS), TORCH_PREDICT_JOB,
        cached=True, needs=("pth",)),
    Job("predict-safetensors", "predict", cli(*PREDICT, "@safetensors", *PHOTOS),
        TORCH_PREDICT_JOB, cached=True, needs=("pth", "safetensors")),
    *(Job(f"forward-{name}", "forward", jax_script(child.JAX_MODEL, child.JAX_FORWARD, model=name),
          torch_script(child.TORCH_MODEL, child.TORCH_FORWARD, model=name), cached=True)
      for name in ("resnet50", "resnext101_32x8d")),
    Job("train-resnet50", "train", jax_script(child.JAX_MODEL, child.JAX_TRAIN, model="resnet50"),
        torch_script(child.TORCH_MODEL, child.TORCH_TRAIN, model="resnet50"), cached=True),
)
SIDES = ("library", "torchvision", "baseline")


def select_jobs(spec: str) -> list[Job]:
    """The jobs named in `spec` (comma-separated names or groups, or 'all'), in table order."""
    wanted = set(spec.split(","))
    if "all" in wanted:
        return list(JOBS)
    unknown = wanted - {j.name for j in JOBS} - {j.group for j in JOBS}
    if unknown:
        known = sorted({j.name for j in JOBS} | {j.group for j in JOBS})
        raise SystemExit(f"unknown jobs {sorted(unknown)}; known: {', '.join(known)}")
    return [j for j in JOBS if j.name in wanted or j.group in wanted]


class Runner:
    """Runs children on the pinned CPUs with this checkout first on the path."""

    def __init__(self, workdir: pathlib.Path, cpus: list[int], timeout: float) -> None:
        self.workdir, self.cpus, self.timeout = workdir, cpus, timeout
        self.fixtures: dict[str, str] = {}
        self._dirs = 0

    def cache_dir(self) -> str:
        self._dirs += 1
        path = self.workdir / f"cache-{self._dirs}"
        path.mkdir()
        return str(path)

    def run(self, command: Command, cache_dir: str | None = None) -> dict[str, Any]:
        """One child: its wall time, the marks it printed and the tail of its output. Without
        `cache_dir` it gets a fresh one, removed afterwards."""
        if cache_dir is None:
            cache_dir = self.cache_dir()
            try:
                return self.run(command, cache_dir)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "RESNEXT_FLAX_CACHE": cache_dir,
               "JAX_COMPILATION_CACHE_DIR": cache_dir}
        argv = [sys.executable, *command.resolve(self.fixtures, len(self.cpus))]
        start = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=self.workdir,
                             timeout=self.timeout,
                             preexec_fn=lambda: os.sched_setaffinity(0, self.cpus))
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])}... exited {out.returncode}:\n"
                               f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        lines = out.stdout.splitlines()
        marks = {}
        if lines and lines[-1].startswith(child.MARKER):
            marks = json.loads(lines.pop()[len(child.MARKER):])
        return {"wall_s": wall, "marks": marks, "output": "\n".join(lines)[-1500:]}

    def make_fixtures(self, needs: set[str]) -> None:
        """The photos, and the checkpoints the selected jobs need (made once, untimed)."""
        if not needs:
            return
        sklearn = importlib.util.find_spec("sklearn")
        if sklearn is None:
            raise SystemExit("the predict jobs classify scikit-learn's sample photos: "
                             "pip install scikit-learn")
        images = pathlib.Path(sklearn.origin).parent / "datasets" / "images"
        self.fixtures.update(china=str(images / "china.jpg"), flower=str(images / "flower.jpg"))
        if "pth" in needs:
            self.fixtures["pth"] = str(self.workdir / "resnet50-random.pth")
            print("fixtures: a random-weight resnet50 .pth", flush=True)
            self.run(torch_script(child.MAKE_PTH))
        if "safetensors" in needs:
            self.fixtures["safetensors"] = str(self.workdir / "resnet50-random.safetensors")
            print("fixtures: resnext-flax convert (verified against torchvision)", flush=True)
            self.run(cli("convert", "@pth", "--output", "@safetensors", "--model", "resnet50"))


def measure(job: Job, runner: Runner, repeats: int) -> list[dict[str, Any]]:
    """The job's rows (one, or cold and warm), its sides alternating run by run."""
    phases = ("cold", "warm") if job.cached else ("",)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(repeats):
        # A cold library run fills it, the warm one reuses it; other runs get their own.
        cache_dir = runner.cache_dir() if job.cached else None
        for phase in phases:
            for side in SIDES:
                command = getattr(job, side)
                if command is not None:
                    shared = cache_dir if side == "library" else None
                    runs.setdefault((phase, side), []).append(runner.run(command, shared))
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    rows = []
    for phase in phases:
        row: dict[str, Any] = {"job": job.name, "phase": phase or None,
                               "baseline_label": job.baseline_label or None}
        for side in SIDES:
            side_runs = runs.get((phase, side))
            row[side] = None if side_runs is None else summarize(side_runs)
        lib, tv = row["library"], row["torchvision"]
        row["ratio"] = lib["median_s"] / tv["median_s"] if tv else None
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    marks = {k: statistics.median(r["marks"][k] for r in runs) for k in runs[0]["marks"]}
    return {"median_s": statistics.median(r["wall_s"] for r in runs),
            "runs_s": [r["wall_s"] for r in runs], "marks_median_s": marks,
            "output_first_run": runs[0]["output"]}


def _seconds(side: dict[str, Any] | None) -> str:
    return "-" if side is None else f"{side['median_s']:.2f}"


def _marks(side: dict[str, Any] | None) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in (side or {}).get("marks_median_s", {}).items())


def format_row(row: dict[str, Any]) -> str:
    label = f"{row['job']} {row['phase'] or ''}".strip()
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
    line = f"{label:32s} {_seconds(row['library']):>9s} {_seconds(row['torchvision']):>12s} " \
           f"{ratio:>6s}"
    if row["baseline"]:
        line += f"   baseline {_seconds(row['baseline'])} ({row['baseline_label']})"
    stages = [f"{side}: {_marks(row[side])}" for side in SIDES if _marks(row[side])]
    return line + ("\n    " + " | ".join(stages) if stages else "")


HEADER = f"{'job':32s} {'library s':>9s} {'torchvision s':>12s} {'ratio':>6s}"


def lscpu() -> tuple[str, list[str]]:
    """lscpu's model name and CPU flags (the platform's processor name and none where lscpu
    is missing)."""
    model, flags = platform.processor(), []
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = value.split()
    except OSError:
        pass
    return model, flags


def machine(cpus: list[int]) -> dict[str, Any]:
    """The CPU (lscpu's model name, AVX2 / AVX-512), thread settings and package versions."""
    model, flags = lscpu()
    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "torchvision", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("XLA_", "JAX_", "RESNEXT_FLAX_", "OMP_", "MKL_"))}
    return {"cpu_model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_1min_start": os.getloadavg()[0],
            "threads": {"cpus_pinned": cpus, "torch": f"torch.set_num_threads({len(cpus)})",
                        "xla": "default: one intra-op thread per schedulable CPU"},
            "versions": versions, "environment": env}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", default="all",
                   help="comma-separated job names or groups (import, list, predict, forward, "
                        f"train), or 'all'; jobs: {', '.join(j.name for j in JOBS)}")
    p.add_argument("--repeats", type=int, default=5, help="runs per side and phase (median)")
    available = sorted(os.sched_getaffinity(0))
    p.add_argument("--cpus", type=int, default=len(available),
                   help=f"CPUs every child is pinned to (default all: {len(available)})")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    p.add_argument("--json", help="write the table and the machine here")
    args = p.parse_args(argv)
    if args.repeats < 1 or not 1 <= args.cpus <= len(available):
        p.error(f"--repeats must be >= 1 and --cpus in 1..{len(available)}")
    args.cpu_list = available[:args.cpus]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    jobs = select_jobs(args.jobs)
    info = machine(args.cpu_list)
    print(f"{info['cpu_model']} (avx2 {info['avx2']}, avx512f {info['avx512f']}), "
          f"{len(args.cpu_list)} CPUs pinned, load {info['loadavg_1min_start']:.1f}", flush=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="startup-"))
    try:
        runner = Runner(workdir, args.cpu_list, args.timeout)
        runner.make_fixtures({need for job in jobs for need in job.needs})
        print(HEADER, flush=True)
        rows = [row for job in jobs for row in measure(job, runner, args.repeats)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + HEADER + "\n" + "\n".join(format_row(r).split("\n")[0] for r in rows))
    if args.json:
        record = {"command": [sys.executable, *sys.argv],
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "machine": info, "args": {k: v for k, v in vars(args).items()},
                  "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
