"""`medkd report` layouts: table2 (methods × datasets), table4 ((T, α) blocks), params (Table 3), the best
setting by val AUC with its paired-bootstrap Δ vs the baseline, and the reliability-diagram PNG."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

import medkd.report
from medkd.cache import write_cache
from medkd.data import SPLITS, data_sha256
from medkd.errors import MedkdError
from medkd.metrics import evaluate, expected_calibration_error
from medkd.report import collect_runs, report, summarise
from medkd.runs import PROFILE, RunResult, write_predictions, write_result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
N_TEST = 60
RESAMPLES = 300
DATASETS = {"breastmnist": ("binary-class", 2), "pathmnist": ("multi-class", 9)}
# (kind, T, α): a baseline and two KD settings. Per seed: (val AUC, val ACC, test AUC, test ACC). KD A wins
# on val and KD B on test, so a report that picked by test would name B.
METHODS = {"baseline": (None, 1.0), "kd_a": (2.0, 0.2), "kd_b": (4.0, 0.5)}
NUMBERS = {
    ("breastmnist", "baseline"): [
        (0.80, 0.70, 0.78, 0.71),
        (0.82, 0.72, 0.80, 0.70),
        (0.81, 0.71, 0.79, 0.74),
    ],
    ("breastmnist", "kd_a"): [(0.91, 0.80, 0.83, 0.75), (0.93, 0.82, 0.84, 0.77), (0.92, 0.81, 0.82, 0.76)],
    ("breastmnist", "kd_b"): [(0.88, 0.79, 0.90, 0.85), (0.87, 0.78, 0.91, 0.86), (0.89, 0.80, 0.89, 0.84)],
    ("pathmnist", "baseline"): [(0.70, 0.60, 0.69, 0.61), (0.72, 0.62, 0.71, 0.60), (0.71, 0.61, 0.70, 0.64)],
    ("pathmnist", "kd_a"): [(0.86, 0.75, 0.80, 0.70), (0.85, 0.74, 0.81, 0.71), (0.87, 0.76, 0.79, 0.72)],
    ("pathmnist", "kd_b"): [(0.80, 0.72, 0.88, 0.80), (0.81, 0.73, 0.87, 0.81), (0.79, 0.71, 0.86, 0.79)],
}
TEACHER_METRICS = {"breastmnist": (0.88, 0.83), "pathmnist": (0.95, 0.90)}
NOISE = {"baseline": 1.6, "kd_a": 0.9, "kd_b": 1.1}  # score noise: the students beat the baseline


def labels(dataset: str) -> np.ndarray:
    _, n_classes = DATASETS[dataset]
    return np.random.default_rng(7).integers(0, n_classes, (N_TEST, 1)).astype(np.int64)


def scores(dataset: str, method: str, seed: int) -> np.ndarray:
    """Softmax probabilities that rank the true class higher the less noise the method has."""
    _, n_classes = DATASETS[dataset]
    y = labels(dataset).reshape(-1)
    rng = np.random.default_rng([seed, len(method), n_classes])
    logits = rng.normal(0, NOISE[method], (N_TEST, n_classes))
    logits[np.arange(N_TEST), y] += 1.5
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def write_teacher_cache(path: Path, dataset: str) -> str:
    """A small format-2 cache whose test labels are the runs' (the calibration plot reads them)."""
    task, n_classes = DATASETS[dataset]
    rng = np.random.default_rng(3)
    sizes = {"train": 12, "val": 6, "test": N_TEST}
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in sizes.items()}
    ys = {"train": rng.integers(0, n_classes, (12, 1)), "val": rng.integers(0, n_classes, (6, 1))}
    ys["test"] = labels(dataset)
    weight, bias = rng.normal(size=(n_classes, 8)).astype(np.float32), np.zeros(n_classes, np.float32)
    splits = {}
    for s in SPLITS:
        features = rng.normal(size=(sizes[s], 8)).astype(np.float16)
        splits[s] = {"logits": features.astype(np.float32) @ weight.T, "labels": ys[s], "features": features}
    attrs = {
        "medkd_version": "0.1.0", "created_utc": "2026-01-01T00:00:00+00:00", "dataset": dataset,
        "image_size": 28, "task": task, "n_classes": n_classes,
        "label_names": {str(k): f"c{k}" for k in range(n_classes)}, "teacher": "tiny", "backbone": "tiny",
        "weights_sha256": "", "teacher_input_size": 28, "resize": "bicubic", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "torch_version": torch.__version__, "random_init": True,
        "config": {"seed": 0, "milestones": None},
    }  # fmt: skip
    split_attrs = {s: {"n": sizes[s], "data_sha256": data_sha256(images[s], ys[s])} for s in SPLITS}
    head = {
        "weight": weight, "bias": bias, "epochs": 3, "best_epoch": 2, "val_auc": 0.75, "val_acc": 0.5,
        "test_auc": 0.8, "test_acc": 0.5, "lr": 1e-3, "batch_size": 32,
    }  # fmt: skip
    write_cache(path, attrs=attrs, splits=splits, split_attrs=split_attrs, head=head)
    return split_attrs["test"]["data_sha256"]


def write_run(folder: Path, dataset: str, method: str, seed: int, cache: Path, test_sha: str) -> None:
    temperature, alpha = METHODS[method]
    task, n_classes = DATASETS[dataset]
    val_auc, val_acc, test_auc, test_acc = NUMBERS[(dataset, method)][seed]
    t_auc, t_acc = TEACHER_METRICS[dataset]
    teacher = {
        "cache": str(cache), "teacher": "tiny", "teacher_input_size": 28, "weights_sha256": "",
        "fingerprint": dataset[0] * 64, "test_auc": t_auc, "test_acc": t_acc, "test_ece": 0.05,
    }  # fmt: skip
    config = {
        "student": "resnet18", "alpha": alpha, "temperature": temperature or 2.0, "lr": 1e-3, "seed": seed,
        "epochs": 5, "batch_size": 64, "feature_weight": 0.0,
    }  # fmt: skip
    folder.mkdir(parents=True)
    result = RunResult(
        config=config, dataset=dataset, size=28, task=task, n_outputs=n_classes, run_dir=str(folder),
        val={"auc": val_auc, "acc": val_acc}, test={"auc": test_auc, "acc": test_acc},
        baseline=method == "baseline", teacher=teacher, data_sha256={"test": test_sha},
        epochs_run=5, best_epoch=4, wall_seconds=10.0 + seed,
    )  # fmt: skip
    write_result(folder, result)
    write_predictions(folder, labels(dataset), scores(dataset, method, seed), task)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two datasets × (baseline, KD A, KD B) × 3 seeds in one sweep folder; breastmnist's teacher cache
    exists, pathmnist's was deleted after the runs."""
    root = tmp_path_factory.mktemp("layouts")
    out = root / "sweep"
    for dataset in DATASETS:
        cache = root / f"{dataset}.h5"
        test_sha = write_teacher_cache(cache, dataset)
        for method in METHODS:
            for seed in SEEDS:
                write_run(out / f"{dataset}_{method}_s{seed}", dataset, method, seed, cache, test_sha)
    (root / "pathmnist.h5").unlink()
    return out


def run_report(runs_dir: Path, **kwargs) -> tuple[str, str, list]:
    """(stdout, stderr, returned rows) of `report`, read from consoles on string buffers."""
    out, err = Console(file=io.StringIO(), width=250), Console(file=io.StringIO(), width=250)
    rows = report(runs_dir, console=err, out=out, resamples=RESAMPLES, **kwargs)
    return out.file.getvalue(), err.file.getvalue(), rows


def pm(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def written(dataset: str, method: str, column: int) -> list[float]:
    return [numbers[column] for numbers in NUMBERS[(dataset, method)]]


def one_line(err: MedkdError) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- table2


def test_table2_csv_cells_are_the_mean_and_sd_of_the_seeds(runs):
    text, _, methods = run_report(runs, fmt="csv", layout="table2")
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [line["kind"] for line in lines] == ["teacher", "baseline", "kd", "kd"]
    by_method = {line["method"]: line for line in lines}
    assert set(by_method) == {"teacher tiny", "baseline (α=1)", "KD tiny, T=2, α=0.2", "KD tiny, T=4, α=0.5"}
    for dataset in DATASETS:
        teacher = by_method["teacher tiny"]
        assert float(teacher[f"{dataset}_test_auc_mean"]) == TEACHER_METRICS[dataset][0]
        assert teacher[f"{dataset}_test_auc_std"] == "" and teacher[f"{dataset}_delta_auc"] == ""
        for method, label in (("baseline", "baseline (α=1)"), ("kd_a", "KD tiny, T=2, α=0.2")):
            line = by_method[label]
            for column, metric in ((2, "test_auc"), (3, "test_acc")):
                values = written(dataset, method, column)
                assert float(line[f"{dataset}_{metric}_mean"]) == pytest.approx(np.mean(values))
                assert float(line[f"{dataset}_{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
            assert line[f"{dataset}_n_seeds"] == "3"
    assert by_method["baseline (α=1)"]["breastmnist_delta_auc"] == ""
    kd = next(m for m in methods if m["method"] == "KD tiny, T=2, α=0.2")
    assert set(kd["deltas"]) == {("breastmnist", 28), ("pathmnist", 28)}


def test_table2_delta_is_the_paired_bootstrap_of_the_predictions(runs):
    text, _, _ = run_report(runs, fmt="csv", layout="table2")
    line = next(r for r in csv.DictReader(io.StringIO(text)) if r["method"] == "KD tiny, T=4, α=0.5")
    for dataset, (task, _) in DATASETS.items():
        auc = {
            m: np.mean([evaluate(task, labels(dataset), scores(dataset, m, s))["auc"] for s in SEEDS])
            for m in ("baseline", "kd_b")
        }
        delta, low, high = (float(line[f"{dataset}_delta_{k}"]) for k in ("auc", "low", "high"))
        assert delta == pytest.approx(auc["kd_b"] - auc["baseline"])
        assert low < delta < high


def test_table2_markdown_and_table_show_auc_slash_acc(runs):
    text, _, _ = run_report(runs, fmt="markdown", layout="table2")
    lines = text.strip().splitlines()
    assert lines[0].startswith("Table 2: test AUC / ACC, mean ± sd over 3 seed(s)")
    table = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split(" | ")]
    assert header == [
        "method", "breastmnist", "breastmnist Δ AUC vs baseline", "pathmnist", "pathmnist Δ AUC vs baseline",
    ]  # fmt: skip
    cells = {c[0]: c for c in ([x.strip() for x in row.strip("|").split(" | ")] for row in table[2:])}
    kd_a = cells["KD tiny, T=2, α=0.2"]
    expected = f"{pm(written('breastmnist', 'kd_a', 2))} / {pm(written('breastmnist', 'kd_a', 3))}"
    assert kd_a[1] == expected and kd_a[2].startswith("+") and " [" in kd_a[2]
    assert cells["teacher tiny"][3] == f"{TEACHER_METRICS['pathmnist'][0]:.3f} / 0.900"
    assert cells["baseline (α=1)"][2] == "—"
    rich, _, _ = run_report(runs, layout="table2")
    assert "Table 2" in rich and expected in rich and "KD tiny, T=4, α=0.5" in rich


def test_best_setting_is_chosen_by_val_auc_not_test(runs):
    for layout in ("runs", "table2"):
        _, err, _ = run_report(runs, layout=layout)
        best = {line.split(" by val AUC")[0]: line for line in err.splitlines() if line.startswith("best ")}
        assert set(best) == {"best setting on breastmnist", "best setting on pathmnist"}
        for dataset in DATASETS:
            line = best[f"best setting on {dataset}"]
            # KD A has the higher val AUC, KD B the higher test AUC
            assert ": T=2, α=0.2 (teacher tiny, cache " in line and "T=4" not in line
            assert f"test AUC {pm(written(dataset, 'kd_a', 2))}; vs baseline: Δ +" in line
            assert line.endswith("(paired bootstrap, 3 seeds)")
            assert f"by val AUC ({pm(written(dataset, 'kd_a', 0))})" in line


def test_best_setting_without_a_baseline_says_so(runs, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    for folder in copy.glob("pathmnist_baseline_s*"):
        shutil.rmtree(folder)
    text, err, _ = run_report(copy, fmt="csv", layout="table2")
    assert "best setting on pathmnist by val AUC" in err
    assert "no baseline (α=1) on pathmnist to compare with" in err
    line = next(r for r in csv.DictReader(io.StringIO(text)) if r["method"] == "KD tiny, T=2, α=0.2")
    assert line["pathmnist_delta_auc"] == "" and line["breastmnist_delta_auc"] != ""


def test_a_failed_comparison_names_the_runs_not_the_staging_folder(runs, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    (copy / "breastmnist_baseline_s1" / "predictions.npz").unlink()
    text, err, _ = run_report(copy, fmt="markdown", layout="table2")
    line = next(x for x in err.splitlines() if x.startswith("best setting on breastmnist"))
    assert "vs baseline: no interval (" in line and str(copy / "breastmnist_baseline_s1") in line
    assert "medkd-report-" not in line and "(staged)" not in line
    kd_a = next(row for row in text.splitlines() if row.startswith("| KD tiny, T=2, α=0.2 |"))
    assert kd_a.split(" | ")[2] == "n/a"


def test_delta_column_uses_compare_groups(runs, monkeypatch):
    calls = []

    def fake(a_dirs, b_dirs, resamples=2000, seed=0, known=None):
        calls.append((a_dirs, b_dirs))
        auc = SimpleNamespace(delta=0.05, low=0.01, high=0.09, n_seeds=3, excludes_zero=True)
        return SimpleNamespace(metrics={"auc": auc})

    monkeypatch.setattr(medkd.report, "compare_groups", fake)
    text, err, _ = run_report(runs, fmt="markdown", layout="table2")
    assert "+0.050 [+0.010, +0.090]" in text
    assert "vs baseline: Δ +0.050 [+0.010, +0.090] (paired bootstrap, 3 seeds)" in err
    assert len(calls) == 4  # 2 KD settings × 2 datasets, each once although the best line reuses it
    baseline_dirs, kd_dirs = calls[0]
    assert all("baseline" in Path(d).name for d in baseline_dirs) and len(kd_dirs) == 3


# ---------------------------------------------------------------- table4


def test_table4_blocks_per_dataset_and_teacher(runs):
    text, _, rows = run_report(runs, fmt="csv", layout="table4")
    lines = list(csv.DictReader(io.StringIO(text)))
    assert [(r["dataset"], r["temperature"], r["alpha"]) for r in lines] == [
        ("breastmnist", "2.0", "0.2"), ("breastmnist", "4.0", "0.5"),
        ("pathmnist", "2.0", "0.2"), ("pathmnist", "4.0", "0.5"),
    ]  # fmt: skip
    for line, method in zip(lines, ["kd_a", "kd_b", "kd_a", "kd_b"], strict=True):
        for column, metric in ((2, "test_auc"), (3, "test_acc"), (0, "val_auc")):
            values = written(line["dataset"], method, column)
            assert float(line[f"{metric}_mean"]) == pytest.approx(np.mean(values))
            assert float(line[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1))
        assert line["seeds"] == "0;1;2"
    markdown, _, _ = run_report(runs, fmt="markdown", layout="table4")
    assert "**breastmnist — teacher tiny**" in markdown and "**pathmnist — teacher tiny**" in markdown
    row = f"| 4 | 0.5 | 3 | {pm(written('pathmnist', 'kd_b', 2))} / {pm(written('pathmnist', 'kd_b', 3))} |"
    assert row in markdown.splitlines()
    table, _, _ = run_report(runs, layout="table4")
    assert "breastmnist — teacher tiny" in table and "test AUC / ACC" in table


def test_table4_without_kd_runs_is_one_line(runs, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    for folder in copy.glob("*_kd_*"):
        shutil.rmtree(folder)
    with pytest.raises(MedkdError) as err:
        run_report(copy, layout="table4")
    assert "no distillation runs" in one_line(err.value)


# ---------------------------------------------------------------- params


MACHINE = {"cpu": "Test CPU 9000", "cores": 16, "torch_threads": 4, "platform": "Linux-6.1", "versions": {}}


def profile_row(name: str, kind: str, shape: list[int], params: int, macs: int | None, ms: float, ips: float):
    return {
        "name": name, "kind": kind, "runtime": "torch", "input_shape": shape, "parameters": params,
        "macs": macs, "latency_ms": ms, "latency_iqr_ms": [ms * 0.9, ms * 1.1], "throughput": ips,
        "batch_size": 32, "threads": 4, "latency_batch": 1,
    }  # fmt: skip


@pytest.fixture
def profiled(runs, tmp_path) -> Path:
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    student = [profile_row("resnet18 (run breastmnist_kd_a_s0)", "student", [3, 28, 28], 11_200_000,
                           556_000_000, 1.234, 2345.6)]  # fmt: skip
    teacher = [profile_row("dinov2_vits14 teacher", "teacher", [3, 224, 224], 22_056_000, 5_530_000_000,
                           25.5, 61.2)]  # fmt: skip
    (copy / "teachers" / "dinov2").mkdir(parents=True)
    for path, rows in (
        (copy / "breastmnist_kd_a_s0" / PROFILE, student),
        (copy / "teachers/dinov2" / PROFILE, teacher),
    ):
        path.write_text(json.dumps({"medkd_profile": 1, "machine": MACHINE, "rows": rows}))
    return copy


def test_params_layout_lists_every_profile_with_the_machine(profiled):
    from medkd.profiling import PROFILE_FORMAT_VERSION

    assert medkd.report.PROFILE_FORMAT == PROFILE_FORMAT_VERSION
    text, _, rows = run_report(profiled, fmt="markdown", layout="params")
    lines = text.splitlines()
    assert lines[0] == (
        "Measured on Test CPU 9000, 16 logical cores, Linux-6.1, 4 thread(s); latency: median at batch 1; "
        "img/s at batch 32"
    )
    assert lines[2] == "| model | kind | input | params (M) | MACs (G) | latency b1 (ms) | img/s at b32 |"
    assert lines[4] == "| dinov2_vits14 teacher | teacher | 3×224×224 | 22.06 | 5.53 | 25.50 | 61 |"
    assert (
        lines[5] == "| resnet18 (run breastmnist_kd_a_s0) | student | 3×28×28 | 11.20 | 0.556 | 1.23 | 2346 |"
    )
    assert [r["kind"] for r in rows] == ["teacher", "student"]
    table, _, _ = run_report(profiled, layout="params")
    assert "Test CPU 9000" in table and "img/s at b32" in table
    text, _, _ = run_report(profiled, fmt="csv", layout="params")
    line = list(csv.DictReader(io.StringIO(text)))[1]
    assert (
        line["parameters"] == "11200000"
        and line["latency_ms"] == "1.234"
        and line["machine"].startswith("Test")
    )


def test_params_layout_skips_a_broken_profile_and_needs_one(profiled, runs):
    (profiled / "breastmnist_kd_b_s0" / PROFILE).write_text("{not json")
    _, err, rows = run_report(profiled, fmt="csv", layout="params")
    assert len(rows) == 2 and "broken: " in err and "breastmnist_kd_b_s0" in err
    with pytest.raises(MedkdError) as err:
        run_report(runs, layout="params")
    assert "run `medkd profile RUN` first" in one_line(err.value)


# ---------------------------------------------------------------- calibration


def test_calibration_png_written_and_not_overwritten(runs, tmp_path):
    png = tmp_path / "fig" / "calibration.png"
    _, err, _ = run_report(runs, fmt="csv", plot_calibration=png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert f"calibration plot: {png}" in err
    # pathmnist's cache is gone: its teacher curve is left out, with a note, not an error
    assert "calibration plot, pathmnist: teacher tiny: cache" in err and "not found, curve left out" in err
    assert "calibration plot, breastmnist" not in err
    with pytest.raises(MedkdError) as excinfo:
        run_report(runs, plot_calibration=png)
    assert "already exists; pass --force" in one_line(excinfo.value)
    run_report(runs, fmt="csv", plot_calibration=png, force=True)
    data = tmp_path / "data.png"
    data.write_text("not a figure")
    for target, message in ((data, "is not a PNG image"), (tmp_path / "c.h5", "must end in .png")):
        with pytest.raises(MedkdError) as excinfo:
            run_report(runs, plot_calibration=target, force=True)
        assert message in one_line(excinfo.value)
    assert data.read_text() == "not a figure"


def test_calibration_panels_hold_student_teacher_and_baseline(runs):
    results, _ = collect_runs(runs)
    rows = summarise(results)
    panels = {p["dataset"]: p for p in medkd.report.calibration_panels(rows, results)}
    kinds = {name: [c["kind"] for c in p["curves"]] for name, p in panels.items()}
    assert kinds == {"breastmnist": ["student", "teacher", "baseline"], "pathmnist": ["student", "baseline"]}
    student = panels["breastmnist"]["curves"][0]
    assert student["label"] == "student KD T=2, α=0.2 (3 seeds pooled)"
    assert sum(student["bins"]["count"]) == 3 * N_TEST
    pooled = np.concatenate([scores("breastmnist", "kd_a", s) for s in SEEDS])
    expected = expected_calibration_error("binary-class", np.tile(labels("breastmnist"), (3, 1)), pooled)
    assert student["ece"] == pytest.approx(expected)


def test_unknown_layout_and_same_png_are_one_line(runs, tmp_path):
    with pytest.raises(MedkdError) as err:
        run_report(runs, layout="table9")
    assert "unknown --layout 'table9'" in one_line(err.value)
    with pytest.raises(MedkdError) as err:
        run_report(runs, plot=tmp_path / "a.png", plot_calibration=tmp_path / "a.png")
    assert "both name" in one_line(err.value)
