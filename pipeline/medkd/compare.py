"""`medkd compare A B`: does B beat A on the same test images, and by more than chance?

A and B are run folders or folders of runs (sweeps); runs pair by seed. Every metric is recomputed from
each run's `predictions.npz` with `medkd.metrics.evaluate`, so both sides count the same way whichever
medkd wrote their result.json. The 95% interval of B − A is a paired bootstrap over the test images: each
resample draws one index vector and applies it to every run of both sides, so what the runs share (the
images, easy or hard) cancels and what is left is how they differ on them. With 3 or more seed pairs a t
interval over the per-seed deltas says, besides, how much the difference moves with the seed.

The bootstrap is vectorised: a resample is a weight per test image (how often it was drawn), and each
metric is a weighted count over images sorted once, so thousands of resamples take a fraction of a
second. Each vectorised metric is checked against `evaluate` before it is trusted; one whose definition
in `evaluate` differs (a new metric, defined otherwise) is bootstrapped by calling `evaluate` per resample.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medkd.data import is_multilabel
from medkd.errors import MedkdError
from medkd.metrics import ECE_BINS, bin_index, evaluate, top_label
from medkd.runs import RESULT, RunResult, collect_runs, problem_line, read_predictions

METRICS = ("auc", "acc", "balanced_acc", "ece")
LABELS = {"auc": "AUC", "acc": "ACC", "balanced_acc": "balanced ACC", "ece": "ECE"}
LOWER_IS_BETTER = frozenset({"ece"})
FORMATS = ("markdown", "csv", "json")
# Weights of one chunk of resamples at a time (resamples × test images): bounds memory on big test splits.
CHUNK_ELEMENTS = 1 << 21
# The vectorised metrics are checked on the full test set and on one resample drawn from a generator of
# its own, so the check does not move the bootstrap's draws.
CHECK_SEED = 20240917
TOLERANCE = 1e-9
CSV_FIELDS = (
    "metric", "a", "b", "delta", "low", "high", "n_seeds", "seed_low", "seed_high", "excludes_zero",
    "dropped_resamples", "n_test", "resamples", "seed",
)  # fmt: skip
# t(0.975, df) for small df, where the expansion below is off; scipy gives it when installed.
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


# ---------------------------------------------------------------- metrics of weighted test sets


def _auc_columns(task: str, y_true: np.ndarray, y_score: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(is positive, score) of each column `evaluate`'s AUC averages: each label, each class, or one."""
    if is_multilabel(task):
        return [(y_true[:, i] > 0.5, y_score[:, i]) for i in range(y_score.shape[1])]
    y = y_true.reshape(-1)
    if task == "binary-class":
        return [(y == 1, y_score[:, -1])]
    return [(y == k, y_score[:, k]) for k in range(y_score.shape[1])]


def _weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count half, as roc_auc_score's trapezoids) of each row of `weights` (R, N);
    NaN where a row has no positive or no negative. Integer weights keep every sum exact."""
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one group per distinct score
    w, pos = weights[:, order], positive[order]
    positives = np.add.reduceat(w * pos, starts, axis=1)
    negatives = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(negatives, axis=1) - negatives
    wins = (positives * (below + 0.5 * negatives)).sum(axis=1)
    p, q = positives.sum(axis=1), negatives.sum(axis=1)
    defined = (p > 0) & (q > 0)
    return np.where(defined, wins / np.where(defined, p * q, 1.0), np.nan)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the defined values; NaN where none is (no warning)."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=0)
    total = np.where(defined, values, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def auc_resampled(task: str, y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`evaluate`'s AUC of each weighted test set: the mean over the columns defined in it (a class or
    label that a resample lacks is left out, as `evaluate` leaves it out)."""
    columns = _auc_columns(task, y_true, y_score)
    return _nanmean_rows(np.stack([_weighted_auc(t, s, weights) for t, s in columns]))


def _correct(task: str, y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Each image's share of right predictions (of its labels, for multi-label), as `evaluate`'s ACC."""
    if is_multilabel(task):
        return ((y_score > 0.5) == (y_true > 0.5)).mean(axis=1)
    y = y_true.reshape(-1)
    if task == "binary-class":
        return ((y_score[:, -1] > 0.5) == (y == 1)).astype(np.float64)
    return (y_score.argmax(axis=1) == y).astype(np.float64)


def acc_resampled(task: str, y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights @ _correct(task, y_true, y_score) / weights.sum(axis=1)


def _classes(task: str, y_true: np.ndarray, y_score: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(true class, predicted class) per image, for each label whose balanced accuracy is averaged."""
    if is_multilabel(task):
        return [
            ((y_true[:, i] > 0.5).astype(int), (y_score[:, i] > 0.5).astype(int))
            for i in range(y_score.shape[1])
        ]
    y = y_true.reshape(-1).astype(int)
    if task == "binary-class":
        return [(y, (y_score[:, -1] > 0.5).astype(int))]
    return [(y, y_score.argmax(axis=1))]


def balanced_acc_resampled(
    task: str, y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    per_label = []
    for truth, predicted in _classes(task, y_true, y_score):
        recalls = []
        for k in np.unique(truth):
            member = truth == k
            total = weights @ member.astype(np.float64)
            hits = weights @ (member & (predicted == k)).astype(np.float64)
            recalls.append(np.where(total > 0, hits / np.where(total > 0, total, 1.0), np.nan))
        per_label.append(_nanmean_rows(np.stack(recalls)))  # a class a resample lacks has no recall
    return np.mean(per_label, axis=0)


def ece_resampled(task: str, y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`evaluate`'s "ece" (`medkd.metrics.top_label` confidences in `bin_index`'s ECE_BINS bins) of every
    weighted resample at once."""
    confidence, hit = top_label(task, y_true, y_score)
    n, groups = confidence.shape
    # Σ_b (n_b / N)|acc_b − conf_b| = Σ_b |Σ_{i in b} (hit_i − conf_i)| / N: a weighted sum per bin
    gap = np.zeros((n, groups * ECE_BINS))
    cells = bin_index(confidence, ECE_BINS) + ECE_BINS * np.arange(groups)
    np.add.at(gap, (np.repeat(np.arange(n), groups), cells.ravel()), (hit - confidence).ravel())
    return np.abs(weights @ gap).sum(axis=1) / (weights.sum(axis=1) * groups)


RESAMPLED: dict[str, Callable[[str, np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "auc": auc_resampled,
    "acc": acc_resampled,
    "balanced_acc": balanced_acc_resampled,
    "ece": ece_resampled,
}


def image_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of `n` test images is drawn in each row of `idx` (R, n): (R, n) float counts."""
    rows = idx.shape[0]
    flat = (idx + np.arange(rows)[:, None] * n).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def resampled_metrics(
    task: str, y_true: np.ndarray, y_score: np.ndarray, idx: np.ndarray, metrics: tuple[str, ...] = METRICS
) -> dict[str, np.ndarray]:
    """Each metric of `(y_true[i], y_score[i])` for every index row `i` of `idx` (R, N), vectorised."""
    weights = image_weights(np.atleast_2d(idx), len(y_true))
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    return {m: RESAMPLED[m](task, y_true, y_score, weights) for m in metrics}


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    try:
        from scipy.stats import t
    except ImportError:  # scipy is optional: a table, then the Cornish-Fisher expansion (error < 1e-4)
        if df <= len(T_975):
            return T_975[df - 1]
        z = 1.959963984540054
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return float(t.ppf(0.975, df))


# ---------------------------------------------------------------- the comparison


@dataclass
class MetricDelta:
    """B − A of one test metric: seed means, the paired-bootstrap 95% interval, the interval over seeds."""

    name: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    n_seeds: int
    seed_low: float | None
    seed_high: float | None
    dropped_resamples: int
    seed_deltas: list[float] = field(default_factory=list)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)  # False for a NaN interval: nothing shown

    def verdict(self, n_test: int, resamples: int) -> str:
        """One line: the delta, its interval and whether it excludes 0."""
        label = f"test {LABELS.get(self.name, self.name)}"
        if self.name in LOWER_IS_BETTER:
            label += " (lower is better)"
        seeds = f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        if self.seed_low is not None:
            seeds += f"; over seeds [{_signed(self.seed_low)}, {_signed(self.seed_high)}]"
        if self.dropped_resamples:
            seeds += f"; {self.dropped_resamples} of {resamples} resamples without a defined value dropped"
        line = f"{label}: B − A = {_signed(self.delta)}"
        if math.isnan(self.low):
            return (
                f"{line} (bootstrap over {n_test} test images, {seeds}): no interval, no resample defined it"
            )
        line += f" [{_signed(self.low)}, {_signed(self.high)}] (bootstrap over {n_test} test images, {seeds})"
        return line + (
            ": the interval excludes 0"
            if self.excludes_zero
            else ": the interval includes 0: no difference shown"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "a": _number(self.a),
            "b": _number(self.b),
            "delta": _number(self.delta),
            "low": _number(self.low),
            "high": _number(self.high),
            "n_seeds": self.n_seeds,
            "seed_low": _number(self.seed_low),
            "seed_high": _number(self.seed_high),
            "excludes_zero": self.excludes_zero,
            "dropped_resamples": self.dropped_resamples,
            "seed_deltas": [_number(d) for d in self.seed_deltas],
        }


@dataclass
class Comparison:
    """`medkd compare A B`: the paired runs and one `MetricDelta` per test metric."""

    a: str
    b: str
    runs_a: list[str]
    runs_b: list[str]
    seeds_a: list[int]
    seeds_b: list[int]
    n_test: int
    resamples: int
    seed: int
    metrics: dict[str, MetricDelta]
    notes: list[str] = field(default_factory=list)

    def verdicts(self) -> list[str]:
        return [m.verdict(self.n_test, self.resamples) for m in self.metrics.values()]

    def to_json(self) -> dict[str, Any]:
        return {
            **{name: m.to_json() for name, m in self.metrics.items()},
            "runs": {"a": self.runs_a, "b": self.runs_b},
            "seeds": {"a": self.seeds_a, "b": self.seeds_b},
            "n_test": self.n_test,
            "resamples": self.resamples,
            "seed": self.seed,
            "notes": self.notes,
        }

    def csv(self) -> str:
        """One row per metric at full precision (empty: not defined)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for name, m in self.metrics.items():
            values = m.to_json()
            row = {"metric": name, "n_test": self.n_test, "resamples": self.resamples, "seed": self.seed}
            row.update({k: values[k] for k in CSV_FIELDS if k in values})
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buffer.getvalue()

    def markdown(self) -> str:
        """A heading line, a table of the metrics, the verdicts and the notes."""
        pairs = ", ".join(
            str(s) if s == t else f"{s}/{t}" for s, t in zip(self.seeds_a, self.seeds_b, strict=True)
        )
        lines = [
            f"**B − A** — A: `{_cell(self.a)}`, B: `{_cell(self.b)}`; {len(self.runs_a)} pair"
            f"{'s' * (len(self.runs_a) != 1)} of runs, seeds {pairs}; {self.n_test} test images, "
            f"{self.resamples} paired bootstrap resamples (seed {self.seed})",
            "",
            "| metric | A | B | B − A | 95% CI, bootstrap | 95% CI, seeds | excludes 0 |",
            "| :-- | --: | --: | --: | --: | --: | :-: |",
        ]
        for m in self.metrics.values():
            seeds = "—" if m.seed_low is None else f"[{_signed(m.seed_low)}, {_signed(m.seed_high)}]"
            boot = "—" if math.isnan(m.low) else f"[{_signed(m.low)}, {_signed(m.high)}]"
            lines.append(
                f"| test {LABELS.get(m.name, m.name)} | {_plain(m.a)} | {_plain(m.b)} | {_signed(m.delta)} "
                f"| {boot} | {seeds} | {'yes' if m.excludes_zero else 'no'} |"
            )
        lines += ["", *(f"- {v}" for v in self.verdicts())]
        if self.notes:
            lines += ["", "Notes:", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _signed(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def _plain(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


# ---------------------------------------------------------------- finding and pairing runs


@dataclass
class _Run:
    result: RunResult
    y_true: np.ndarray
    y_score: np.ndarray
    task: str
    values: dict[str, float] = field(default_factory=dict)  # reference_metrics on the whole test set

    @property
    def name(self) -> str:
        return self.result.run_dir


def _side(path: str | Path, which: str, notes: list[str]) -> list[RunResult]:
    """The finished runs below `path`, at most one per seed; the unfinished and broken go to `notes`."""
    results, problems = collect_runs(path)
    notes += [f"{which}: left out {problem_line(p)}" for p in problems]
    if not results:
        extra = f"; {len(problems)} incomplete or broken" if problems else ""
        raise MedkdError(
            f"no finished runs below {path} (no valid {RESULT}{extra}); give a run folder or a sweep"
        )
    by_seed: dict[int, list[str]] = {}
    for r in results:
        by_seed.setdefault(r.seed, []).append(r.run_dir)
    for seed, dirs in by_seed.items():
        if len(dirs) > 1:
            raise MedkdError(
                f"{path} holds {len(dirs)} runs of seed {seed} ({dirs[0]}, {dirs[1]}); give a folder of one "
                f"configuration, one run per seed"
            )
    return sorted(results, key=lambda r: r.seed)


def _pair(a: str | Path, b: str | Path, runs_a: list[RunResult], runs_b: list[RunResult], notes: list[str]):
    """(A run, B run) pairs: by common seed; one run with one run whatever their seeds."""
    same = {os.path.realpath(r.run_dir) for r in runs_a} & {os.path.realpath(r.run_dir) for r in runs_b}
    if same:
        raise MedkdError(
            f"{sorted(same)[0]} is on both sides (A {a}, B {b}); give two different sets of runs"
        )
    seeds_a, seeds_b = {r.seed: r for r in runs_a}, {r.seed: r for r in runs_b}
    common = sorted(set(seeds_a) & set(seeds_b))
    if common:
        for which, side in (("A", seeds_a), ("B", seeds_b)):
            alone = sorted(set(side) - set(common))
            if alone:
                shown = ", ".join(str(s) for s in alone)
                notes.append(f"{which}: seed{'s' * (len(alone) > 1)} {shown} without a partner left out")
        return [(seeds_a[s], seeds_b[s]) for s in common]
    if len(runs_a) == 1 and len(runs_b) == 1:
        notes.append(f"one run on each side, seeds {runs_a[0].seed} and {runs_b[0].seed}: paired as they are")
        return [(runs_a[0], runs_b[0])]
    raise MedkdError(
        f"A {a} (seeds {_seed_list(seeds_a)}) and B {b} (seeds {_seed_list(seeds_b)}) have no seed in "
        f"common; runs pair by seed (a single run pairs only with a single run): give runs of the same seeds"
    )


def _seed_list(by_seed: dict[int, RunResult]) -> str:
    return ", ".join(str(s) for s in sorted(by_seed))


def _load(result: RunResult) -> _Run:
    predictions = read_predictions(result.run_dir)
    y_true, y_score = np.asarray(predictions["y_true"]), np.asarray(predictions["y_score"], dtype=np.float64)
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_score.ndim != 2 or len(y_score) != len(y_true):
        raise MedkdError(
            f"{result.run_dir}: predictions.npz holds {len(y_true)} labels but scores of shape "
            f"{y_score.shape}; rerun it with `medkd distill --force`"
        )
    return _Run(result, y_true, y_score, predictions["task"])


def _check_same_split(x: _Run, y: _Run) -> None:
    """Refuse two runs that were not tested on the same images: their data's hash, task and labels."""
    hx, hy = x.result.data_sha256.get("test"), y.result.data_sha256.get("test")
    where = f"{x.name} and {y.name} are not on the same test split"
    if hx and hy and hx != hy:
        raise MedkdError(f"{where} (test data sha256 {hx[:12]}… vs {hy[:12]}…); compare runs of one dataset")
    if x.task != y.task:
        raise MedkdError(f"{where} ({x.task} vs {y.task} predictions)")
    if x.y_true.shape != y.y_true.shape:
        raise MedkdError(f"{where} (test labels of shape {x.y_true.shape} vs {y.y_true.shape})")
    differ = int(np.any(x.y_true != y.y_true, axis=1).sum())
    if differ:
        raise MedkdError(
            f"{where} (their predictions.npz test labels differ at {differ} of {len(x.y_true)} images)"
        )


def _matches(values: np.ndarray, expected: list[float]) -> bool:
    return all(
        (math.isnan(v) and math.isnan(e)) or abs(v - e) <= TOLERANCE
        for v, e in zip(values, expected, strict=True)
    )


def _vectorised(run: _Run, metrics: tuple[str, ...]) -> set[str]:
    """The metrics whose vectorised form gives the reference values on this run (whole set, one resample)."""
    n = len(run.y_true)
    idx = np.stack([np.arange(n), np.random.default_rng(CHECK_SEED).integers(0, n, n)])
    fast = resampled_metrics(run.task, run.y_true, run.y_score, idx, metrics)
    drawn = evaluate(run.task, run.y_true[idx[1]], run.y_score[idx[1]])
    return {m for m in metrics if _matches(fast[m], [run.values[m], drawn[m]])}


def _resample_values(
    run: _Run, idx: np.ndarray, weights: np.ndarray, metrics: tuple[str, ...], fast: set[str]
) -> dict[str, np.ndarray]:
    """The run's metrics on each resample: vectorised where trusted, else `evaluate` on each."""
    values = {m: RESAMPLED[m](run.task, run.y_true, run.y_score, weights) for m in metrics if m in fast}
    slow = [m for m in metrics if m not in fast]
    if slow:
        drawn = [evaluate(run.task, run.y_true[i], run.y_score[i]) for i in idx]
        values.update({m: np.array([d[m] for d in drawn]) for m in slow})
    return values


def _bootstrap(
    pairs: list[tuple[_Run, _Run]], metrics: tuple[str, ...], fast: set[str], resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each metric's mean over pairs of B − A on every resample (NaN: undefined in some run)."""
    n = len(pairs[0][0].y_true)
    rng = np.random.default_rng(seed)
    deltas = {m: np.empty(resamples) for m in metrics}
    chunk = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, resamples, chunk):
        # One call per resample: the draws are those of a loop of rng.integers(0, n, n), chunk or not.
        idx = np.stack([rng.integers(0, n, n) for _ in range(min(chunk, resamples - start))])
        weights = image_weights(idx, n)
        total = {m: np.zeros(len(idx)) for m in metrics}
        for x, y in pairs:
            vx, vy = (_resample_values(run, idx, weights, metrics, fast) for run in (x, y))
            for m in metrics:
                total[m] += vy[m] - vx[m]
        for m in metrics:
            deltas[m][start : start + len(idx)] = total[m] / len(pairs)
    return deltas


def _metric_delta(name: str, pairs: list[tuple[_Run, _Run]], deltas: np.ndarray) -> MetricDelta:
    a = float(np.mean([x.values[name] for x, _ in pairs]))
    b = float(np.mean([y.values[name] for _, y in pairs]))
    kept = deltas[~np.isnan(deltas)]
    low, high = np.percentile(kept, [2.5, 97.5]) if len(kept) else (math.nan, math.nan)
    per_seed = np.array([y.values[name] - x.values[name] for x, y in pairs])
    seed_low = seed_high = None
    if len(per_seed) >= 3:
        half = t_975(len(per_seed) - 1) * per_seed.std(ddof=1) / math.sqrt(len(per_seed))
        seed_low, seed_high = float(per_seed.mean() - half), float(per_seed.mean() + half)
    return MetricDelta(
        name, a, b, b - a, float(low), float(high), len(pairs), seed_low, seed_high,
        int(len(deltas) - len(kept)), [float(d) for d in per_seed],
    )  # fmt: skip


def compare_runs(a: str | Path, b: str | Path, resamples: int = 2000, seed: int = 0) -> Comparison:
    """B − A of the test metrics of two run folders or sweeps, runs paired by seed, with 95% intervals
    from a paired bootstrap over the test images (`resamples` draws of `default_rng(seed)`)."""
    notes: list[str] = []
    return compare_results(_side(a, "A", notes), _side(b, "B", notes), str(a), str(b), resamples, seed, notes)


def compare_results(
    runs_a: list[RunResult],
    runs_b: list[RunResult],
    a: str = "A",
    b: str = "B",
    resamples: int = 2000,
    seed: int = 0,
    notes: list[str] | None = None,
) -> Comparison:
    """`compare_runs` of two lists of finished runs (`RunResult`s with their `run_dir`), named `a` and `b`
    in messages: what `medkd report` compares a setting's runs against its baseline's with."""
    if resamples < 1:
        raise MedkdError(f"--resamples must be at least 1, got {resamples}")
    notes = [] if notes is None else notes
    result_pairs = _pair(a, b, runs_a, runs_b, notes)
    pairs = [(_load(x), _load(y)) for x, y in result_pairs]
    for x, y in pairs:
        _check_same_split(x, y)
    reference = pairs[0][0]
    for run in (r for pair in pairs for r in pair):  # one index vector serves every pair: one test set
        _check_same_split(reference, run)
        run.values = evaluate(run.task, run.y_true, run.y_score)
    metrics = METRICS
    fast = set(metrics)
    for run in (r for pair in pairs for r in pair):
        fast &= _vectorised(run, metrics)
    for m in metrics:
        if m not in fast:
            notes.append(f"{m}: evaluate defines it otherwise than the vectorised form; bootstrapped with "
                         f"evaluate on each resample (slower)")  # fmt: skip
    deltas = _bootstrap(pairs, metrics, fast, resamples, seed)
    return Comparison(
        a=str(a), b=str(b),
        runs_a=[x.name for x, _ in pairs], runs_b=[y.name for _, y in pairs],
        seeds_a=[x.result.seed for x, _ in pairs], seeds_b=[y.result.seed for _, y in pairs],
        n_test=len(reference.y_true), resamples=resamples, seed=seed,
        metrics={m: _metric_delta(m, pairs, deltas[m]) for m in metrics},
        notes=notes,
    )  # fmt: skip
