"""`medkd compare`: seed pairing, means and intervals against computations written out here, refusals, CLI."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

import medkd.compare
from medkd.cli import main
from medkd.compare import CSV_FIELDS, compare_runs, resampled_metrics, t_975
from medkd.errors import MedkdError
from medkd.metrics import evaluate
from medkd.runs import RunResult, write_predictions, write_result

BINARY = "binary-class"
MULTILABEL = "multi-label, binary-class"
CLOSE = {"rel": 1e-12, "abs": 1e-12}  # sklearn's trapezoids and the rank counts round differently


def write_run(folder: Path, seed: int, y_true: np.ndarray, y_score: np.ndarray, task: str = BINARY,
              test_sha: str = "c" * 64) -> None:  # fmt: skip
    """A finished run folder by hand: result.json and predictions.npz (no checkpoint: compare needs none)."""
    folder.mkdir(parents=True)
    config = {"student": "resnet18", "alpha": 0.5, "temperature": 2.0, "lr": 1e-3, "seed": seed}
    result = RunResult(
        config=config, dataset="breastmnist", size=28, val={"auc": 0.5, "acc": 0.5},
        test={"auc": 0.5, "acc": 0.5}, task=task, data_sha256={"test": test_sha} if test_sha else {},
    )  # fmt: skip
    write_result(folder, result)
    write_predictions(folder, y_true, y_score, task)


def binary_scores(rng: np.random.Generator, y: np.ndarray, skill: float) -> np.ndarray:
    # rounded to 2 decimals: tied scores, which AUC counts half
    p = np.round(np.clip(0.5 + skill * (y - 0.5) + rng.normal(0, 0.25, len(y)), 0, 1), 2)
    return np.column_stack([1 - p, p])


def make_side(folder: Path, y: np.ndarray, seeds, skill: float, rng: np.random.Generator) -> dict:
    scores = {s: binary_scores(rng, y, skill) for s in seeds}
    for s, score in scores.items():
        write_run(folder / f"s{s}", s, y[:, None], score)
    return scores


def labels(n: int, positives: int, seed: int = 0) -> np.ndarray:
    y = np.zeros(n, dtype=np.int64)
    y[np.random.default_rng(seed).choice(n, positives, replace=False)] = 1
    return y


def hand_ece(y: np.ndarray, score: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE of a binary run, bin by bin: (k/B, (k+1)/B], the first holding 0 too."""
    confidence, correct = score.max(axis=1), score.argmax(axis=1) == y
    total = 0.0
    for k in range(bins):
        inside = (confidence <= (k + 1) / bins) & ((confidence > k / bins) | (k == 0))
        total += abs(np.sum(correct[inside] - confidence[inside]))
    return total / len(y)


def files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def sides(tmp_path):
    """Seeds 0, 1, 2 on both sides, B the better, on 40 test images."""
    rng, y = np.random.default_rng(0), labels(40, 15)
    a = make_side(tmp_path / "A", y, (0, 1, 2), 0.2, rng)
    b = make_side(tmp_path / "B", y, (0, 1, 2), 0.45, rng)
    return tmp_path / "A", tmp_path / "B", y, a, b


def test_means_and_delta_are_those_of_sklearn_and_numpy(sides):
    a_dir, b_dir, y, a, b = sides
    comparison = compare_runs(a_dir, b_dir, resamples=20)
    expected = {
        "auc": lambda s: roc_auc_score(y, s[:, 1]),
        "acc": lambda s: np.mean((s[:, 1] > 0.5) == y),
        "balanced_acc": lambda s: balanced_accuracy_score(y, (s[:, 1] > 0.5).astype(int)),
        "ece": lambda s: hand_ece(y, s),
    }
    assert list(comparison.metrics) == ["auc", "acc", "balanced_acc", "ece"]
    for name, metric in expected.items():
        m = comparison.metrics[name]
        mean_a, mean_b = np.mean([metric(s) for s in a.values()]), np.mean([metric(s) for s in b.values()])
        assert (m.a, m.b, m.delta) == pytest.approx((mean_a, mean_b, mean_b - mean_a), **CLOSE), name
        assert m.n_seeds == 3
    assert comparison.seeds_a == comparison.seeds_b == [0, 1, 2]
    assert comparison.n_test == 40 and comparison.notes == []


def hand_bootstrap(y, a, b, seeds, resamples, seed, metric) -> tuple[float, float, int]:
    """The paired bootstrap as a loop: one index vector per resample, the same for every run."""
    rng, deltas, dropped = np.random.default_rng(seed), [], 0
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        values = [metric(y[idx], b[s][idx]) - metric(y[idx], a[s][idx]) for s in seeds]
        if any(math.isnan(v) for v in values):
            dropped += 1
        else:
            deltas.append(np.mean(values))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return low, high, dropped


def auc_or_nan(y, s):
    return roc_auc_score(y, s[:, 1]) if 0 < y.sum() < len(y) else math.nan


def balanced(y, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample may lack a class the predictions hold
        return balanced_accuracy_score(y, (s[:, 1] > 0.5).astype(int))


def test_bootstrap_interval_is_the_hand_written_loop_and_drops_resamples_without_auc(tmp_path):
    # 3 positives in 24: about one resample in seven draws none, so AUC is undefined there
    rng, y = np.random.default_rng(1), labels(24, 3, seed=1)
    a = make_side(tmp_path / "A", y, (0, 1, 2), 0.2, rng)
    b = make_side(tmp_path / "B", y, (0, 1, 2), 0.5, rng)
    comparison = compare_runs(tmp_path / "A", tmp_path / "B", resamples=300, seed=5)
    checks = {
        "auc": auc_or_nan,
        "acc": lambda t, s: accuracy_score(t, s[:, 1] > 0.5),
        "balanced_acc": balanced,
        "ece": lambda t, s: hand_ece(t, s),
    }
    for name, metric in checks.items():
        low, high, dropped = hand_bootstrap(y, a, b, (0, 1, 2), 300, 5, metric)
        m = comparison.metrics[name]
        assert (m.low, m.high) == pytest.approx((low, high), **CLOSE), name
        assert m.dropped_resamples == dropped, name
    assert comparison.metrics["auc"].dropped_resamples > 10
    assert comparison.metrics["acc"].dropped_resamples == 0
    assert "300 resamples without a defined value dropped" in comparison.metrics["auc"].verdict(24, 300)


def multiclass(rng, n=30, k=4):
    y = rng.integers(0, k - 1, (n, 1))
    y[-1] = k - 1  # a class of one image: most resamples lack it, and its AUC column is left out
    s = rng.random((n, k)) ** 2
    s[np.arange(n), y[:, 0]] += 0.4
    return y, np.round(s / s.sum(axis=1, keepdims=True), 1)


def multilabel(rng, n=30, k=3):
    y = (rng.random((n, k)) < 0.25).astype(np.int64)
    y[:, 2] = 0
    y[0, 2] = 1  # a label with one positive
    return y, np.round(np.clip(0.3 * y + rng.random((n, k)) * 0.7, 0, 1), 1)


def binary(rng, n=30):
    y = labels(n, 4, seed=3)[:, None]
    return y, binary_scores(rng, y[:, 0], 0.3)


def sklearn_auc(task, y, s):
    """AUC as sklearn gives it: the positive, or the mean over the classes/labels present, one-vs-rest."""
    if task == BINARY:
        return auc_or_nan(y[:, 0], s)
    truth = y if task == MULTILABEL else (y[:, 0][:, None] == np.arange(s.shape[1]))
    aucs = [roc_auc_score(truth[:, k], s[:, k]) for k in range(s.shape[1]) if 0 < truth[:, k].sum() < len(y)]
    return np.mean(aucs) if aucs else math.nan


@pytest.mark.parametrize(
    "task,make", [(BINARY, binary), ("multi-class", multiclass), ("ordinal-regression", multiclass),
                  (MULTILABEL, multilabel)],
)  # fmt: skip
def test_vectorised_metrics_equal_evaluate_and_sklearn_on_every_resample(task, make):
    rng = np.random.default_rng(2)
    y, s = make(rng)
    idx = np.stack([rng.integers(0, len(y), len(y)) for _ in range(150)])
    fast = resampled_metrics(task, y, s, idx)
    for r, i in enumerate(idx):
        slow = evaluate(task, y[i], s[i])
        for name, values in fast.items():
            if name in slow:
                assert values[r] == pytest.approx(slow[name], nan_ok=True, **CLOSE), (name, r)
        assert fast["auc"][r] == pytest.approx(sklearn_auc(task, y[i], s[i]), nan_ok=True, **CLOSE), r


def test_seed_interval_is_the_t_interval_of_the_per_seed_deltas(tmp_path):
    rng, y = np.random.default_rng(4), labels(30, 12)
    a = make_side(tmp_path / "A", y, (0, 1, 2, 3), 0.3, rng)
    b = make_side(tmp_path / "B", y, (0, 1, 2, 3), 0.4, rng)
    m = compare_runs(tmp_path / "A", tmp_path / "B", resamples=10).metrics["auc"]
    d = np.array([roc_auc_score(y, b[s][:, 1]) - roc_auc_score(y, a[s][:, 1]) for s in range(4)])
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert (m.seed_low, m.seed_high) == pytest.approx((d.mean() - half, d.mean() + half), **CLOSE)
    assert m.seed_deltas == pytest.approx(list(d), **CLOSE)


def test_two_seeds_give_no_seed_interval(sides, tmp_path):
    a_dir, b_dir, y, a, b = sides
    for s in (1, 2):
        write_run(tmp_path / "B2" / f"s{s}", s, y[:, None], b[s])
    m = compare_runs(a_dir, tmp_path / "B2", resamples=10).metrics["auc"]
    assert m.n_seeds == 2 and m.seed_low is None and m.seed_high is None


def test_t_quantile_without_scipy_is_close_to_scipys(monkeypatch):
    expected = {df: stats.t.ppf(0.975, df) for df in range(1, 80)}
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` now fails
    for df, value in expected.items():
        assert t_975(df) == pytest.approx(value, abs=2e-4), df


def test_runs_pair_by_their_common_seeds(tmp_path):
    rng, y = np.random.default_rng(5), labels(30, 10)
    a = make_side(tmp_path / "A", y, (0, 1, 2), 0.2, rng)
    b = make_side(tmp_path / "B", y, (1, 2, 3), 0.4, rng)
    comparison = compare_runs(tmp_path / "A", tmp_path / "B", resamples=10)
    assert comparison.seeds_a == comparison.seeds_b == [1, 2]
    assert [Path(r).name for r in comparison.runs_a] == ["s1", "s2"]
    assert [Path(r).name for r in comparison.runs_b] == ["s1", "s2"]
    expected = np.mean([roc_auc_score(y, b[s][:, 1]) - roc_auc_score(y, a[s][:, 1]) for s in (1, 2)])
    assert comparison.metrics["auc"].delta == pytest.approx(expected, **CLOSE)
    assert any("A: seed 0 without a partner" in n for n in comparison.notes)
    assert any("B: seed 3 without a partner" in n for n in comparison.notes)


def test_one_run_pairs_with_one_run_of_another_seed_only(sides, tmp_path):
    a_dir, _, y, a, b = sides
    write_run(tmp_path / "one", 7, y[:, None], b[0])
    comparison = compare_runs(a_dir / "s0", tmp_path / "one", resamples=10)
    assert (comparison.seeds_a, comparison.seeds_b) == ([0], [7])
    assert any("paired as they are" in n for n in comparison.notes)
    assert "0/7" in comparison.markdown()
    with pytest.raises(MedkdError, match="no seed in common"):
        compare_runs(a_dir, tmp_path / "one")


def refusal(a: Path, b: Path, root: Path) -> str:
    """The CLI's error for A B: one line, exit code 1, and nothing written below `root`."""
    before = files(root)
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--resamples", "5"])
    assert result.exit_code == 1, result.output
    assert files(root) == before
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_refusals_are_one_line_and_write_nothing(sides, tmp_path):
    a_dir, b_dir, y, a, b = sides
    write_run(tmp_path / "other_data" / "s0", 0, y[:, None], b[0], test_sha="d" * 64)
    line = refusal(a_dir, tmp_path / "other_data", tmp_path)
    assert "not on the same test split" in line and "A/s0" in line and "other_data/s0" in line
    flipped = y.copy()
    flipped[0] = 1 - flipped[0]
    write_run(tmp_path / "other_labels" / "s0", 0, flipped[:, None], b[0])
    line = refusal(a_dir, tmp_path / "other_labels", tmp_path)
    assert "differ at 1 of 40 images" in line and "A/s0" in line and "other_labels/s0" in line
    (tmp_path / "empty").mkdir()
    assert "no finished runs below" in refusal(a_dir, tmp_path / "empty", tmp_path)
    make_side(tmp_path / "far", y, (5, 6), 0.3, np.random.default_rng(0))
    assert "no seed in common" in refusal(a_dir, tmp_path / "far", tmp_path)
    write_run(tmp_path / "B" / "again" / "s0", 0, y[:, None], b[0])  # two runs of seed 0 below B
    assert "runs of seed 0" in refusal(a_dir, b_dir, tmp_path)
    assert "on both sides" in refusal(a_dir, a_dir, tmp_path)


def test_a_side_with_a_broken_run_compares_the_rest_and_says_so(sides):
    a_dir, b_dir, *_ = sides
    (b_dir / "broken").mkdir()
    (b_dir / "broken" / "result.json").write_text("{")
    comparison = compare_runs(a_dir, b_dir, resamples=10)
    assert comparison.seeds_b == [0, 1, 2]
    assert any(n.startswith("B: left out broken") for n in comparison.notes)


def test_a_metric_evaluate_defines_otherwise_is_bootstrapped_with_evaluate(sides, monkeypatch):
    a_dir, b_dir, y, a, b = sides

    def other_ece(*args):
        values = evaluate(*args)
        return {**values, "ece": 2 * values["ece"] + values["acc"]}  # not what the vectorised form gives

    monkeypatch.setattr(medkd.compare, "evaluate", other_ece)
    comparison = compare_runs(a_dir, b_dir, resamples=40, seed=1)
    assert any(n.startswith("ece: evaluate defines it otherwise") for n in comparison.notes)

    def ece(t, s):
        return other_ece(BINARY, t[:, None], s)["ece"]

    low, high, dropped = hand_bootstrap(y, a, b, (0, 1, 2), 40, 1, ece)
    m = comparison.metrics["ece"]
    assert (m.low, m.high, m.dropped_resamples) == pytest.approx((low, high, dropped), **CLOSE)


def invoke(*args: str):
    result = CliRunner().invoke(main, ["compare", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_cli_json_csv_and_markdown(sides):
    a_dir, b_dir, *_ = sides
    data = json.loads(invoke(a_dir, b_dir, "--format", "json", "--resamples", "30", "--seed", "2").stdout)
    assert set(data) >= {"auc", "acc", "balanced_acc", "ece", "runs", "n_test", "resamples", "seed"}
    assert (data["n_test"], data["resamples"], data["seed"]) == (40, 30, 2)
    assert len(data["runs"]["a"]) == len(data["runs"]["b"]) == 3
    auc = data["auc"]
    assert auc["delta"] == pytest.approx(auc["b"] - auc["a"]) and auc["n_seeds"] == 3
    assert isinstance(auc["excludes_zero"], bool) and auc["seed_low"] is not None
    assert auc == compare_runs(a_dir, b_dir, resamples=30, seed=2).to_json()["auc"]

    rows = list(csv.reader(io.StringIO(invoke(a_dir, b_dir, "--format", "csv", "--resamples", "30").stdout)))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [r[0] for r in rows[1:]] == ["auc", "acc", "balanced_acc", "ece"]

    text = invoke(a_dir, b_dir, "--resamples", "30").stdout
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| metric | A | B | B − A |") and len(table) == 2 + 4
    assert "- test AUC: B − A = " in text and "bootstrap over 40 test images, 3 seeds" in text


def test_help():
    result = CliRunner().invoke(main, ["compare", "--help"])
    assert result.exit_code == 0 and "--resamples" in result.output and "--format" in result.output


def test_help_imports_no_torch_or_numpy():
    code = (
        "import sys\nfrom medkd.cli import main\n"
        "try:\n    main(['compare', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'sklearn')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out and out.strip().endswith("HEAVY []"), out[-500:]
