"""benchmarks/bench_train.py --quick runs on the genuine files and prints its table and RATIO line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"
# Where the script reads the files (benchmarks/_common.data_dir), which may differ from conftest's REAL_DATA.
DATA = Path(os.environ.get("MEDKD_DATA", "/work/shared/data/medmnist"))


@pytest.mark.realdata
@pytest.mark.slow
def test_bench_train_quick() -> None:
    if not (DATA / "breastmnist.npz").is_file():
        pytest.skip(f"breastmnist.npz not found in {DATA}")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rates = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in ("official", "medkd"):
            rates[fields[0]] = float(fields[1])
    assert set(rates) == {"official", "medkd"}, proc.stdout
    assert all(rate > 0 for rate in rates.values()), rates
    assert re.search(r"^RATIO medkd / official training img/s = \d+\.\d+ .*(PASS|MISS)$", proc.stdout, re.M)
