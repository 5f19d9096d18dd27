"""The scripts cannot rot: the accelerator script's CPU dry run goes through every step,
the start-up benchmark runs its smallest jobs, the FMA peak its shortest runs, the
library-vs-ONNX Runtime profile its smallest model, the sanitizer build its check (the build and
its tests under the sanitizers take minutes: run by hand, docs/performance.md), the README
table's generator its errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest
from limits import CHILD_TIMEOUT

ROOT = pathlib.Path(__file__).parents[1]


def test_gpu_benchmark_dry_run_writes_its_reports(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_benchmark.sh"), str(tmp_path),
                             "--dry-run"], capture_output=True, text=True, env=env,
                            timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_benchmark.md").read_text()
    assert "Parity (precision 'highest'): passed" in report
    assert "## float32" in report and "## bfloat16" in report and "resnet18" in report
    for dtype in ("float32", "bfloat16"):
        data = json.loads((tmp_path / f"gpu_benchmark_{dtype}.json").read_text())
        assert {c["batch"] for c in data["cases"]} == {1, 2}
    assert "passed" in (tmp_path / "parity.log").read_text()
    pipeline = report.split("## Input pipeline", 1)[1]
    assert "pipeline, evaluation, 0 workers" in pipeline and "evaluate end to end" in pipeline
    assert json.loads((tmp_path / "gpu_pipeline.json").read_text())["images"] == 16


def test_startup_benchmark_smallest_run_writes_its_table(tmp_path):
    out = tmp_path / "startup.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--jobs",
                             "import,help", "--repeats", "1", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [row["job"] for row in data["rows"]] == ["import", "help"]
    imports, help_row = data["rows"]
    for side in ("library", "torchvision", "baseline"):
        assert imports[side]["median_s"] > 0 and len(imports[side]["runs_s"]) == 1
    assert set(imports["library"]["marks_median_s"]) == {"import", "create_model"}
    assert imports["ratio"] > 0 and imports["baseline_label"] == "import jax, flax.nnx"
    assert help_row["torchvision"] is None and help_row["ratio"] is None
    assert "usage: resnext-flax" in help_row["library"]["output_first_run"]
    assert {"cpu_model", "avx2", "avx512f", "threads"} <= set(data["machine"])
    assert "--repeats" in data["command"] and data["date"]


def test_startup_benchmark_rejects_an_unknown_job():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--jobs",
                             "import,imprt"], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown jobs ['imprt']" in result.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the FMA loops")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the FMA loops are x86 AVX2 / AVX-512 code")
def test_fma_peak_shortest_run_writes_positive_rates(tmp_path):
    out = tmp_path / "fma.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fma_peak.py"),
                             "--threads", "1,2", "--seconds", "0.01", "--repeats", "1",
                             "--json", str(out)], capture_output=True, text=True,
                            timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    widths = data["widths_measured"]
    assert widths[0] == 256 and set(widths) <= {256, 512}
    assert (512 in widths) == data["machine"]["avx512f"]
    assert [(r["bits"], r["threads"]) for r in data["rows"]] == [
        (bits, n) for bits in widths for n in (1, 2)]
    for row in data["rows"]:
        assert row["gflops"] > 0 and len(row["runs_gflops"]) == 1 and row["iters_per_thread"] > 0
    assert data["peak_gflops"] == max(r["gflops"] for r in data["rows"])
    assert set(data["ratio_512_over_256"]) == ({"1", "2"} if 512 in widths else set())
    assert data["machine"]["cpu_model"] and "--seconds" in data["command"]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("onnx") is None,
                    reason="needs the onnx extra: pip install 'resnext-flax[onnx]'")
def test_profile_compare_smallest_run_charges_every_layer_on_both_sides(tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_compare.py"),
                             "--model", "resnet18", "--batch", "1", "--size", "64", "--calls",
                             "1", "--repeats", "1", "--warmup", "1", "--peak-gflops", "100",
                             "--json", str(out)], capture_output=True, text=True,
                            timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| stage | kind |" in result.stdout
    data = json.loads(out.read_text())
    assert data["rel_err_vs_torch"]["library"] <= 1e-5
    assert data["rel_err_vs_torch"]["ort"] <= 1e-5
    layers = {row["layer"]: row for row in data["layers"]}
    convs = [name for name in layers if name == "conv1" or ".conv" in name
             or "downsample" in name]
    assert len(convs) == 20  # resnet18: the stem, 16 block convs, 3 downsamples
    for name in [*convs, "maxpool", "fc"]:
        row = layers[name]
        assert row["library_ms"] > 0 and row["ort_ms"] > 0, name
        assert (row["flops"] > 0) == (name != "maxpool"), name
    assert "unmapped" not in layers and "other" not in layers  # every thunk has a layer
    assert [s["stage"] for s in data["stages"]] == ["stem", "layer1", "layer2", "layer3",
                                                    "layer4", "head"]
    total = data["total"]
    for side in ("library_ms", "ort_ms"):
        assert abs(sum(s[side] for s in data["stages"]) - total[side]) < 1e-9
    assert total["flops"] == sum(layers[n]["flops"] for n in convs) + layers["fc"]["flops"]
    assert total["library_peak_fraction"] > 0 and total["ort_peak_fraction"] > 0
    for side in ("library", "ort"):
        assert data["wall_ms"][side]["median"] > 0
    # concurrent thunks share the time they overlap: the sum is at most the call's wall time
    assert total["library_ms"] <= data["wall_ms_profiled"]["library"]


def _sanitizer_runtime() -> bool:
    if shutil.which("g++") is None:
        return False
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                         text=True).stdout.strip()
    return os.path.isabs(lib) and os.path.exists(lib)


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64"),
                    reason="setup.py declares the compiled kernel on Linux x86-64")
@pytest.mark.skipif(not _sanitizer_runtime(), reason="no g++ with AddressSanitizer's runtime")
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="the script copies the repository's files with git")
def test_sanitizer_script_check_builds_every_source_file():
    """``--check`` reads the extension from setup.py as the full run does: every csrc/*.cc
    must be one of its sources (or the sanitized build would leave that code unchecked), built
    where the kernel's loader looks for it."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize_kernel.sh"), "--check"],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sources,) = [line for line in result.stdout.splitlines() if line.startswith("sources: ")]
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cc")}
    assert set(sources.split()[1:]) == expected
    from resnext_flax.nn.lowering import kernel  # setup.py builds where the loader looks

    assert f"output:  {kernel._LIBRARY.relative_to(ROOT).as_posix()}" in result.stdout
    assert "check passed" in result.stdout


def test_sanitizer_script_rejects_an_unknown_option():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize_kernel.sh"), "--chek"],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 2 and "usage:" in result.stderr


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table",
                                                  ROOT / "scripts" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_needs_both_ratios_and_shows_the_peak_only_when_measured():
    """The full run's table is checked with the benchmark (tests/test_onnx_export.py); here a
    run without ONNX Runtime fails by name, and one without ``--peak-gflops`` has no peak
    column."""
    readme_table = _readme_table()
    summary = {"library_images_per_s": 12.345, "library_vs_torch_eager": 1.234,
               "library_vs_ort": 0.876, "peak_fraction": {}}
    record = {"date": "2026-12-07", "args": {"opt_levels": ["all"], "threads": 2, "repeats": 5},
              "machine": {"torch": "2.14.1", "onnxruntime": "1.32.0", "cpu_count": 2},
              "cases": [{"model": "resnet50", "batch": 8, "size": 224, "summary": summary}]}
    text = readme_table.table([record])
    assert text.splitlines()[2:] == [
        "| model | batch | library img/s | vs PyTorch eager | vs ONNX Runtime |",
        "|---|---|---|---|---|", "| resnet50 | 8 | 12.3 | 1.23 | 0.88 |"]
    assert "medians of 5" in text and "2 threads" in text
    del summary["library_vs_ort"]
    with pytest.raises(ValueError, match=r"run.json: resnet50 batch 8 has no library_vs_ort: "
                       r"run benchmarks/onnx_runtime.py with --sides jax_folded,torch_eager,"):
        readme_table.table([record], ["run.json"])


def test_readme_table_compact_has_a_column_per_model_and_two_rows_per_batch():
    readme_table = _readme_table()

    def case(model, batch, torch_ratio, ort_ratio):
        return {"model": model, "batch": batch, "size": 224,
                "summary": {"library_images_per_s": 1.0, "library_vs_torch_eager": torch_ratio,
                            "library_vs_ort": ort_ratio}}

    record = {"date": "2026-12-07", "args": {"opt_levels": ["all"], "threads": 2, "repeats": 5},
              "machine": {"torch": "2.14.1", "onnxruntime": "1.32.0", "cpu_count": 2},
              "cases": [case("resnet18", 1, 1.314, 1.186), case("resnet18", 8, 1.276, 1.25),
                        case("wide_resnet50_2", 1, 1.47, 1.055)]}
    assert readme_table.compact_table([record]).splitlines()[2:] == [
        "| batch | over | r18 | wrn50 |", "|---|---|---|---|",
        "| 1 | PyTorch eager | 1.31 | 1.47 |", "| 1 | ONNX Runtime | 1.19 | 1.05 |",
        "| 8 | PyTorch eager | 1.28 | - |", "| 8 | ONNX Runtime | 1.25 | - |"]


def test_train_step_benchmark_smallest_run_times_both_sides(tmp_path):
    out = tmp_path / "train_step.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"),
                             "--models", "resnet18", "--batch-size", "2", "--image-size", "32",
                             "--dtypes", "bf16", "--repeats", "2", "--warmup", "1",
                             "--num-classes", "10", "--json", str(out)],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert (case["model"], case["dtype"], case["batch"], case["size"]) == ("resnet18", "bf16",
                                                                           2, 32)
    assert case["recipe_covers_model"] is False  # the recipe's common settings
    for side in ("library", "torch_eager"):
        r = case["results"][side]
        assert len(r["times_s"]) == 2 and r["images_per_s"] > 0
        assert all(math.isfinite(loss) for loss in r["losses"]), r["losses"]
    assert case["library_vs_torch"] == pytest.approx(
        case["results"]["library"]["images_per_s"] / case["results"]["torch_eager"]["images_per_s"])
    assert data["machine"]["torch_threads"] == data["args"]["threads"] >= 1
    assert data["machine"]["peak_rss_mib"] > 0 and "loadavg_1min_end" in data["machine"]
    assert "| resnet18 | bf16 | 2 |" in result.stdout


def test_train_step_benchmark_one_side_has_no_ratio(tmp_path):
    out = tmp_path / "train_step.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"),
                             "--models", "resnet18", "--batch-size", "2", "--image-size", "32",
                             "--dtypes", "fp32", "--sides", "library", "--repeats", "1",
                             "--warmup", "1", "--num-classes", "10", "--json", str(out)],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    assert set(case["results"]) == {"library"} and case["library_vs_torch"] is None
    assert "| resnet18 | fp32 | 2 |" in result.stdout and "| - | - |" in result.stdout


def test_train_pipeline_benchmark_smallest_run_compares_loaders_and_the_step(tmp_path):
    out = tmp_path / "train_pipeline.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_pipeline.py"),
                             "--images", "12", "--batch-size", "4", "--workers", "0",
                             "--model", "resnet18", "--crop-size", "32", "--step-batch", "2",
                             "--step-steps", "1", "--num-classes", "10", "--rounds", "1",
                             "--json", str(out)],
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["crop_size"] == 32 and data["images"] == 12 and data["step_measured"]
    assert data["augmentation"]["auto_augment"] == "ta_wide"
    assert data["augmentation"]["random_erase"] == 0.1
    for key in ("library_w0", "torch_w0", "step_alone", "end_to_end_w0"):
        assert data["median"][key] > 0 and len(data["samples"][key]) == 1
    assert data["step_images_per_second"] == data["median"]["step_alone"]
    verdict = data["keep_up"]["library_w0"]
    assert verdict["cpu_share"] == pytest.approx(
        data["median"]["step_alone"] / data["median"]["library_w0"])
    assert verdict["keeps_up"] == (verdict["cpu_share"] < 1)
    assert "| 0 |" in result.stdout and "training step (resnet18, batch 2, measured)" in (
        result.stdout)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("onnx") is None,
                    reason="needs the onnx extra: pip install 'resnext-flax[onnx]'")
def test_pointwise_vs_ort_times_both_sides_on_the_same_chain(tmp_path):
    from resnext_flax.nn.lowering import kernel

    if not kernel.available():
        # Only where the optional extension was not built (no C++ compiler); CI builds it.
        pytest.skip(f"the compiled kernel is not built: {kernel.unavailable_reasons()}")
    out = tmp_path / "pointwise.json"
    script = str(ROOT / "benchmarks" / "pointwise_vs_ort.py")
    result = subprocess.run([sys.executable, script, "--chain", "1:6:32-16,16-32:2",
                             "--threads", "2,1", "--repeats", "2", "--warmup", "1",
                             "--json", str(out)], capture_output=True, text=True,
                            timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(row["threads"], row["library_helpers"]) for row in data["rows"]] == [(2, 1), (1, 0)]
    for row in data["rows"]:
        assert row["rel_err"] <= 1e-5  # the same weights on both sides
        assert row["flops"] == 2 * 2 * 6 * 6 * (32 * 16 + 16 * 32)
        assert len(row["times_s"]["library"]) == len(row["times_s"]["ort"]) == 2
        assert row["gflops"]["library"] > 0 and row["gflops"]["ort"] > 0
    assert data["build"]["kernel_bytes"] > 0
    for bad, message in [("1:6:32-16,32-32:1", "each layer's outputs feed the next's inputs"),
                         ("1:6:32-16", "expected BATCH:SIZE:PATTERN:TIMES"),
                         ("1:6:32-16-8:1", "expected IN-OUT pairs"),
                         ("1:6:32-32:0", "repeated at least once"),
                         ("1:6:24-24:1", "multiples of 16")]:
        failed = subprocess.run([sys.executable, script, "--chain", bad, "--repeats", "1"],
                                capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        assert failed.returncode != 0 and message in failed.stderr, (bad, failed.stderr[-2000:])


def test_pointwise_vs_ort_selects_chains_by_whole_pattern():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pointwise_vs_ort as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    picked = bench.parse_args(["--only", "1024-256,256-1024", "--only", "2048-2048"]).chains
    assert {c.pattern for c in picked} == {"1024-256,256-1024", "2048-2048"}
    assert len(picked) == 1 + 2  # 2048-2048 at batch 1 and 8
    assert bench.parse_args([]).chains == bench.CHAINS
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "1024-256"])  # a part of a pattern selects nothing
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "2048-2048", "--chain", "1:7:32-32:1"])
