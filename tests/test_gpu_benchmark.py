"""benchmarks/gpu.sh --quick runs on the CPU and writes gpu.json and gpu.md; without CUDA, --device cuda
stops with one line that points at --device cpu."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
MEASURED = [
    "resnet50_train_eager",
    "resnet18_train_eager",
    "resnet18_macs",
    "vitb14_forward",
    "kd_over_ce",
    "data_batches",
]
# --quick compiles nothing unless --compile is passed: these are listed, as skipped.
COMPILED = ["resnet50_train_compiled", "resnet18_train_compiled"]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    # One thread: the 2-core machine is shared, and a second torch thread only waits for a core.
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_quick_cpu_run_writes_json_and_markdown(tmp_path: Path) -> None:
    proc = run_script("--quick", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["device"] == "cpu" and doc["machine"]["device"] == "cpu"
    assert doc["machine"]["torch"] == torch.__version__
    results = {r["name"]: r for r in doc["results"]}
    assert set(results) == set(MEASURED + COMPILED)
    for name in MEASURED:
        value = results[name]["value"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
        assert results[name]["setting"] and results[name]["goal"], name
        assert results[name]["verdict"] in ("PASS", "MISS", "info"), name
    for name in COMPILED:
        assert results[name]["value"] is None and results[name]["verdict"] == "SKIP", name

    table = (tmp_path / "gpu.md").read_text().splitlines()
    assert "| benchmark | setting | measured | anchor / goal | verdict |" in table
    for name in MEASURED + COMPILED:
        rows = [line for line in table if line.startswith("|") and f"`{name}`" in line]
        assert len(rows) == 1 and rows[0].count("|") == 6, (name, rows)

    ratios = [line for line in proc.stdout.splitlines() if line.startswith("RATIO ")]
    assert len(ratios) == 5 and all(line.endswith(("PASS", "MISS")) for line in ratios), ratios
    assert "total wall time" in proc.stdout


def test_only_runs_the_subset(tmp_path: Path) -> None:
    proc = run_script("--quick", "--device", "cpu", "--out", str(tmp_path), "--only", "kd,data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["name"] for r in doc["results"]] == ["kd_over_ce", "data_batches"]


def test_cuda_without_a_gpu_fails_in_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    proc = run_script("--device", "cuda", "--out", str(tmp_path))
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--device cpu" in lines[0], proc.stderr
    assert not (tmp_path / "gpu.json").exists()
