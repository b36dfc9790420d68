"""`medkd report`: grouping over seeds, the three formats, the ablation plot, and runs that did not finish."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medkd.cli import main
from medkd.report import collect_runs, summarise

PAIRS = ((2.0, 0.2), (4.0, 0.2), (2.0, 0.5), (2.0, 1.0))  # (T, alpha); alpha=1 is the baseline
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


TEACHER = {
    "cache": "c.h5", "teacher": "tiny", "backbone": "tiny", "medkd_format": 1, "teacher_input_size": 28,
    "weights_sha256": "", "data_sha256": {"train": "a", "val": "b", "test": "c"}, "fingerprint": "f" * 64,
    "test_auc": 0.61, "test_acc": 0.55,
}  # fmt: skip


def write_run(folder: Path, alpha: float, temperature: float, seed: int, rng: np.random.Generator) -> None:
    """A finished run folder as `medkd distill` writes it, by hand: result.json and the two run files.

    Half the runs are written in result format 1 (grid keys copied to the top level), as medkd 0.1 did.
    """
    config = {
        "cache": "c.h5", "dataset": None, "size": 28, "alpha": alpha, "temperature": temperature,
        "student": "resnet18", "student_size": 16, "student_weights": None, "interpolation": "bicubic",
        "epochs": 1, "batch_size": 64, "lr": 1e-3, "milestones": None, "patience": None, "out": str(folder),
        "data_dir": None, "download": False, "device": "auto", "seed": seed, "force": False, "quiet": True,
        "resume": False,
    }  # fmt: skip
    result = {
        "medkd_result": 2, "run_dir": str(folder), "config": config, "config_hash": "0" * 16,
        "dataset": "breastmnist", "size": 28, "task": "binary-class", "n_outputs": 2, "student_size": 16,
        "baseline": alpha == 1.0, "teacher": TEACHER, "data_sha256": TEACHER["data_sha256"],
        "history": [], "epochs_run": 1, "best_epoch": 1,
        "val": {"auc": float(rng.uniform(0.5, 1)), "acc": float(rng.uniform(0.5, 1))},
        "test": {"auc": float(rng.uniform(0.5, 1)), "acc": float(rng.uniform(0.5, 1))},
        "wall_seconds": float(rng.uniform(1, 9)), "train_images_per_second": 100.0, "device": "cpu",
        "versions": {},
    }  # fmt: skip
    if seed == 1:
        result.update(
            medkd_result=1, student="resnet18", alpha=alpha, temperature=temperature, lr=1e-3, seed=1
        )
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    for name in ("best.pt", "predictions.npz"):
        (folder / name).write_bytes(b"")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished sweep with two seeds per config: three KD configs and the baseline."""
    out, rng = tmp_path_factory.mktemp("runs") / "sweep", np.random.default_rng(0)
    for temperature, alpha in PAIRS:
        for seed in (0, 1):
            write_run(out / f"a{alpha:g}_t{temperature:g}_s{seed}", alpha, temperature, seed, rng)
    return out


def saved_results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("result.json"))]


def report(*args: str):
    result = CliRunner().invoke(main, ["report", *args])
    assert result.exit_code == 0, result.output
    return result


def test_collect_and_summarise_group_over_seeds(runs):
    results, problems = collect_runs(runs)
    assert len(results) == 8 and problems == []
    rows = summarise(results)
    assert [r["kind"] for r in rows] == ["teacher", "baseline", "kd", "kd", "kd"]
    kd = [(r["alpha"], r["temperature"]) for r in rows if r["kind"] == "kd"]
    assert kd == [(0.2, 2.0), (0.2, 4.0), (0.5, 2.0)]
    baseline = rows[1]
    assert baseline["alpha"] == 1.0 and baseline["temperature"] is None and baseline["teacher"] is None
    teacher = rows[0]
    assert teacher["teacher"] == "tiny" and teacher["n_seeds"] == 1  # one cache behind all the runs
    assert teacher["test_auc_mean"] == results[0].teacher["test_auc"] and teacher["test_auc_std"] is None
    for row in rows[1:]:
        assert row["n_seeds"] == 2 and row["seeds"] == [0, 1] and row["student"] == "resnet18"


def test_csv_has_one_row_per_config_with_mean_and_std_of_the_seeds(runs):
    rows = list(csv.DictReader(io.StringIO(report(str(runs), "--format", "csv").stdout)))
    assert len(rows) == 5
    saved = saved_results(runs)
    for row in rows:
        if row["kind"] == "teacher":
            assert (
                float(row["test_auc_mean"]) == saved[0]["teacher"]["test_auc"] and row["val_auc_mean"] == ""
            )
            continue
        alpha, temperature = float(row["alpha"]), row["temperature"]
        group = [
            r
            for r in saved
            if r["config"]["alpha"] == alpha
            and (alpha == 1 or r["config"]["temperature"] == float(temperature))
        ]
        assert len(group) == 2 and row["n_seeds"] == "2" and row["seeds"] == "0;1"
        for split in ("val", "test"):
            for metric in ("auc", "acc"):
                values = [r[split][metric] for r in group]
                assert float(row[f"{split}_{metric}_mean"]) == pytest.approx(np.mean(values))
                assert float(row[f"{split}_{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
        assert float(row["wall_seconds_mean"]) == pytest.approx(np.mean([r["wall_seconds"] for r in group]))
        assert float(row["best_epoch_mean"]) == 1.0 and row["epochs"] == "1"


def test_table_and_markdown(runs):
    table = report(str(runs)).stdout
    for text in ("test AUC", "val ACC", "tiny (teacher)", "baseline", "resnet18@16", " ± ", "8 run(s)"):
        assert text in table
    markdown = report(str(runs), "--format", "markdown").stdout.strip().splitlines()
    assert len(markdown) == 2 + 5 and all(line.startswith("| ") and line.endswith(" |") for line in markdown)
    assert markdown[0].startswith("| dataset | size | teacher | student | α | T |")
    assert markdown[2].split(" | ")[2] == "tiny (teacher)" and "baseline" in markdown[3]


def test_plot_is_a_png(runs, tmp_path):
    out = report(str(runs), "--plot", str(tmp_path / "fig" / "ablation.png")).output
    png = tmp_path / "fig" / "ablation.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == PNG_SIGNATURE
    assert f"ablation plot: {png}" in out
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert width > height > 300


def test_broken_and_incomplete_runs_are_listed_not_dropped(runs, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    (copy / "a0.5_t2_s1" / "result.json").write_text('{"medkd_result": 1, "config": ')  # cut off mid-write
    (copy / "a0.2_t4_s0" / "result.json").unlink()  # killed: best.pt and predictions.npz remain
    (copy / "a0.2_t2_s0" / "result.json").write_text('{"something": "else"}')
    results, problems = collect_runs(copy)
    assert len(results) == 5
    by_dir = {Path(p["run_dir"]).name: p for p in problems}
    assert by_dir["a0.5_t2_s1"]["status"] == "broken" and "not valid JSON" in by_dir["a0.5_t2_s1"]["reason"]
    assert (
        by_dir["a0.2_t2_s0"]["status"] == "broken" and "not a medkd result" in by_dir["a0.2_t2_s0"]["reason"]
    )
    assert by_dir["a0.2_t4_s0"]["status"] == "incomplete"
    assert (
        by_dir["a0.2_t4_s0"]["reason"]
        == "best.pt, predictions.npz but no result.json: killed, or still running"
    )
    result = report(str(copy), "--format", "csv")
    assert "incomplete: " in result.stderr and result.stderr.count("broken: ") == 2
    assert "a0.2_t4_s0" in result.stderr and "a0.5_t2_s1" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))  # stdout is still clean CSV
    assert sorted(int(r["n_seeds"]) for r in rows if r["kind"] == "kd") == [1, 1, 1]


def test_no_runs_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "no finished runs below" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "does not exist" in result.output
