"""`medkd demo`: the whole pipeline on synthetic data, end to end.

Its speed (about a minute on 2 idle CPU cores) is measured, not asserted: timed tests fail on busy machines.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from medkd.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo", "--out", "demo", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "demo"
    assert "SYNTHETIC" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("demo finished in ") and last.endswith("report.png in demo/")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text().splitlines()
    assert len(markdown) == 2 + 6  # teacher, baseline, 2 × 2 sweep (the KD run is one of its trials)
    runs = sorted(p.parent.relative_to(out / "runs").as_posix() for p in out.glob("runs/**/result.json"))
    assert runs == ["baseline", *(f"sweep/a{a}_t{t}_s0" for a in ("0.2", "0.5") for t in ("2", "4"))]
    assert result.output.count("skipped (finished)") == 1  # the sweep reuses the KD run
    assert json.loads((out / "runs" / "baseline" / "result.json").read_text())["baseline"]
    assert (out / "cache" / "octmnist_28_run-teacher.h5").is_file() and (
        out / "data" / "octmnist.npz"
    ).is_file()
    # The teacher is a run trained first (outside runs/, so not a row of the students' report).
    teacher = json.loads((out / "teacher" / "result.json").read_text())
    assert teacher["config"]["epochs"] > teacher_epochs_of_students(out)
    # The closing sentence says what the table shows: the best KD run on val against the baseline, on test.
    results = [json.loads(p.read_text()) for p in (out / "runs" / "sweep").glob("*/result.json")]
    best = max(results, key=lambda r: (r["val"]["auc"], r["val"]["acc"]))["test"]
    base = json.loads((out / "runs" / "baseline" / "result.json").read_text())["test"]
    sentence = next(line for line in result.output.splitlines() if line.startswith("Distillation "))
    assert f"test ACC {best['acc']:.3f}" in sentence and f"against {base['acc']:.3f}" in sentence
    assert ("helped" in sentence) == (best["acc"] > base["acc"] and best["auc"] >= base["auc"])


def teacher_epochs_of_students(out) -> int:
    return json.loads((out / "runs" / "baseline" / "result.json").read_text())["config"]["epochs"]
