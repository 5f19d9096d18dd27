"""The accelerator script cannot rot: its CPU dry run goes through every step."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_gpu_benchmark_dry_run_writes_its_reports(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_benchmark.sh"), str(tmp_path),
                             "--dry-run"], capture_output=True, text=True, env=env, timeout=900)
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
