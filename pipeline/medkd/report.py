"""`medkd report`: every run below a folder, grouped over seeds, as a table, CSV or Markdown.

Runs are read from their `result.json` alone; nothing is re-run. A folder that holds run files but
no valid `result.json` (unreadable, or valid JSON of the wrong shape) is listed as incomplete or broken,
never dropped. The plot lives in `medkd.plots`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medkd.compare import Comparison, compare_results
from medkd.datasets import dataset_name
from medkd.errors import MedkdError
from medkd.plots import check_png_out, plot_ablation
from medkd.plots import plot_calibration as plot_reliability  # `report`'s argument has the name
from medkd.runs import (  # noqa: F401  (collect_runs and problem_line: report's names since 0.1)
    PREDICTIONS,
    PROFILE,
    RESULT,
    RunResult,
    collect_runs,
    problem_line,
    read_predictions,
    read_result,
)

FORMATS = ("table", "csv", "markdown")
# runs: every configuration (today's table); table2: methods × datasets (the paper's Table 2); table4: (T, α)
# per dataset × teacher (Table 4); params: size and speed from profile.json files (Table 3).
LAYOUTS = ("runs", "table2", "table4", "params")
RELIABILITY_BINS = 15  # the bins of evaluate's ECE, so a diagram and the ECE in its legend agree
METRICS = ("val_auc", "val_acc", "test_auc", "test_acc")
KIND_ORDER = {"teacher": 0, "baseline": 1, "kd": 2}
# What makes two runs the same experiment (seed aside); shown in the table and the CSV.
GROUP_FIELDS = (
    "dataset",
    "size",
    "teacher",
    "student",
    "student_size",
    "alpha",
    "temperature",
    "lr",
    "epochs",
    "augment",
    "feature_weight",
)
CSV_FIELDS = (
    "kind",
    *GROUP_FIELDS,
    "batch_size",
    "n_seeds",
    "seeds",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
    "best_epoch_mean",
    "epochs_run_mean",
    "wall_seconds_mean",
)


# ---------------------------------------------------------------- finding runs


# ---------------------------------------------------------------- grouping over seeds


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); no std from a single value."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def _identity(teacher: dict[str, Any]) -> tuple:
    # One backbone with another head, or cross-fitted, is another teacher: its logits differ.
    return (
        teacher.get("teacher"),
        teacher.get("teacher_input_size"),
        teacher.get("weights_sha256"),
        teacher.get("head"),
        teacher.get("cross_fit") or 1,
    )


def teacher_label(teacher: dict[str, Any]) -> str | None:
    """A cache's teacher by name, with `[attention head, cross-fit 5]` where it is not one linear probe."""
    name = teacher.get("teacher")
    extras = ["attention head"] if teacher.get("head") == "attention" else []
    if (teacher.get("cross_fit") or 1) >= 2:
        extras.append(f"cross-fit {teacher['cross_fit']}")
    return None if name is None else name + (f" [{', '.join(extras)}]" if extras else "")


def _teacher_name(result: RunResult) -> str | None:
    """The teacher column of a student run: the cache's teacher, or `A + B (confidence)` for several."""
    if result.teachers:
        return " + ".join(sorted(map(teacher_label, result.teachers))) + f" ({result.teacher_weighting})"
    return teacher_label(result.teacher or {})


def _run_key(result: RunResult) -> tuple:
    cfg, baseline = result.config, result.baseline
    # Several teachers count as a set (a run stores them sorted by fingerprint), with their weighting.
    identity = (tuple(sorted(map(_identity, result.teacher_summaries()))), result.teacher_weighting)
    return (
        result.dataset,
        result.size,
        "baseline" if baseline else "kd",
        None if baseline else identity,  # a baseline learns from labels only: its teacher does not matter
        result.student,
        result.student_size,
        result.alpha,
        None if baseline else result.temperature,
        result.lr,
        cfg.get("epochs"),
        cfg.get("batch_size"),
        tuple(cfg.get("milestones") or ()),
        cfg.get("patience"),
        cfg.get("interpolation"),
        cfg.get("student_weights"),
        result.data_sha256.get("test"),  # synthetic and genuine data of one flag differ
        _augment_label(result),
        cfg.get("feature_weight", 0.0),
    )


def _augment_label(result: RunResult) -> str:
    """`medmnist-v8` (K stored views of a cache), `medmnist` (drawn on the fly), or "" (no augmentation)."""
    augment = result.augment
    if not augment:
        return ""
    return augment["preset"] + (f"-v{augment['views']}" if augment.get("views") else "")


def _student_row(runs: list[RunResult]) -> dict[str, Any]:
    first = runs[0]
    baseline = first.baseline
    row = {
        "kind": "baseline" if baseline else "kd",
        "dataset": dataset_name(first.dataset),
        "size": first.size,
        "teacher": None if baseline else _teacher_name(first),
        "student": first.student,
        "student_size": first.student_size,
        "alpha": first.alpha,
        "temperature": None if baseline else first.temperature,
        "lr": first.lr,
        "epochs": first.config.get("epochs"),
        "augment": _augment_label(first),
        "feature_weight": first.config.get("feature_weight", 0.0),
        "batch_size": first.config.get("batch_size"),
        "n_seeds": len(runs),
        "seeds": sorted(r.seed for r in runs),
        "run_dirs": sorted(r.run_dir for r in runs),
        # Which teachers (and cache files) a KD row learned from: table2's rows and the best-setting line.
        "teacher_ids": None if baseline else tuple(sorted(map(_identity, first.teacher_summaries()))),
        "caches": sorted({t["cache"] for r in runs for t in r.teacher_summaries() if t.get("cache")}),
    }
    for metric in METRICS:
        split, name = metric.split("_")
        row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([getattr(r, split)[name] for r in runs])
    row["best_epoch_mean"] = float(np.mean([r.best_epoch or math.nan for r in runs]))
    row["epochs_run_mean"] = float(np.mean([r.epochs_run or math.nan for r in runs]))
    row["wall_seconds_mean"] = float(np.mean([r.wall_seconds for r in runs]))
    return row


def _teacher_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (dataset, teacher): its test AUC/ACC, over the distinct caches the runs used (every cache
    of a multi-teacher run)."""
    caches: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    pairs = [(run, teacher) for run in results for teacher in run.teacher_summaries()]
    for r, teacher in pairs:
        if "test_auc" not in teacher:
            continue
        key = (r.dataset, r.size, teacher_label(teacher), *_identity(teacher)[1:], r.data_sha256.get("test"))
        cache_id = (teacher.get("cache"), teacher["test_auc"], teacher["test_acc"])
        caches.setdefault(key, {})[cache_id] = teacher
    rows = []
    for key, found in caches.items():
        dataset, size, name = key[:3]
        row = dict.fromkeys(CSV_FIELDS)
        row.update(
            kind="teacher",
            dataset=dataset_name(dataset),
            size=size,
            teacher=name,
            n_seeds=len(found),
            seeds=[],
            teacher_input_size=key[3],
            weights_sha256=key[4],
        )
        row["run_dirs"] = sorted(str(c) for c, *_ in found)
        for metric in ("test_auc", "test_acc"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([t[metric] for t in found.values()])
        rows.append(row)
    return rows


def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
    """Rows of mean ± std over seeds: one per teacher, per baseline config and per KD config.

    Each row has `kind` ("teacher", "baseline", "kd"), the GROUP_FIELDS, `n_seeds`, `seeds`,
    `<split>_<auc|acc>_<mean|std>` (std is the sample std, None for one seed), `best_epoch_mean`,
    `epochs_run_mean`, `wall_seconds_mean` and `run_dirs`. Teacher rows carry test metrics only.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_run_key(r), []).append(r)
    rows = _teacher_rows(results) + [_student_row(runs) for runs in groups.values()]

    def order(row: dict[str, Any]) -> tuple:
        return tuple(
            (v is None, v if v is not None else 0)
            for v in (
                row["dataset"],
                row["size"],
                KIND_ORDER[row["kind"]],
                row["teacher"],
                row["student"],
                row["student_size"],
                row["lr"],
                row["epochs"],
                row["alpha"],
                row["temperature"],
                row["augment"],
                row["feature_weight"],
            )
        )

    return sorted(rows, key=order)


# ---------------------------------------------------------------- output


def _pm(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _extras(row: dict[str, Any]) -> list[str]:
    """How a student trained besides α and T: its augmentation and feature-distillation weight β."""
    beta = f"β={row['feature_weight']:g}" if row.get("feature_weight") else ""
    return [e for e in (row.get("augment") or "", beta) if e]


def _display(row: dict[str, Any]) -> list[str]:
    """The table cells of a row, shared by the rich table and Markdown."""
    kind = row["kind"]
    teacher = {"teacher": f"{row['teacher']} (teacher)", "baseline": "baseline (α=1)"}.get(
        kind, row["teacher"] or "—"
    )
    student = "—" if kind == "teacher" else row["student"]
    if kind != "teacher" and row["student_size"] not in (None, row["size"]):
        student += f"@{row['student_size']}"
    extras = _extras(row)
    if kind != "teacher" and extras:  # how it trained: augmentation, feature distillation
        student += f" ({', '.join(extras)})"
    epochs = "—" if kind == "teacher" else f"{row['best_epoch_mean']:.1f} / {row['epochs_run_mean']:.0f}"
    return [
        row["dataset"],
        str(row["size"]),
        teacher,
        student,
        "—" if row["alpha"] is None else f"{row['alpha']:g}",
        "—" if row["temperature"] is None else f"{row['temperature']:g}",
        "—" if row["lr"] is None else f"{row['lr']:g}",
        "—" if kind == "teacher" else str(row["n_seeds"]),
        *(_pm(row, m) for m in METRICS),
        epochs,
        "—" if kind == "teacher" else f"{row['wall_seconds_mean']:.0f} s",
    ]


HEADERS = (
    "dataset", "size", "teacher", "student", "α", "T", "lr", "seeds",
    "val AUC", "val ACC", "test AUC", "test ACC", "epoch best/run", "time",
)  # fmt: skip


def render_table(rows: list[dict[str, Any]], title: str = "", compact: bool = True) -> Table:
    """A rich table of summarised rows (mean ± std over seeds).

    `compact` moves dataset, size, lr and seeds into the title when every row shares them.
    """
    cells = [_display(row) for row in rows]
    keep, shared = list(range(len(HEADERS))), []
    if compact:
        for i, header in enumerate(HEADERS):
            values = {c[i] for c in cells} - {"—"}
            if header in ("dataset", "size", "lr", "seeds") and len(values) == 1:
                keep.remove(i)
                shared.append(f"{header} {values.pop()}")
    title = " — ".join(filter(None, [title, ", ".join(shared)]))
    # Rich reads [..] in strings as markup: a path like runs/x[bold]y must print as it is.
    table = Table(title=escape(title) or None, box=box.SIMPLE_HEAD)
    for i in keep:
        table.add_column(
            HEADERS[i], justify="left" if HEADERS[i] in ("dataset", "teacher", "student") else "right"
        )
    for row, row_cells in zip(rows, cells, strict=True):
        style = {"teacher": "cyan", "baseline": "magenta"}.get(row["kind"])
        table.add_row(*(escape(row_cells[i]) for i in keep), style=style)
    return table


def print_table(console: Console, table: Table, min_width: int = 140) -> None:
    """Print `table`; into a file or pipe (no terminal width to follow) at least `min_width` wide."""
    if console.is_terminal or console.quiet:
        console.print(table)
    else:
        Console(file=console.file, width=max(console.width, min_width), no_color=console.no_color).print(
            table
        )


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table of summarised rows."""
    aligns = [":--" if h in ("dataset", "teacher", "student") else "--:" for h in HEADERS]
    lines = ["| " + " | ".join(HEADERS) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(_display(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]]) -> str:
    """CSV, one line per row, mean and std in separate columns at full precision (empty = not defined)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS}
        cells["seeds"] = ";".join(str(s) for s in row.get("seeds") or [])
        writer.writerow(cells)
    return buffer.getvalue()


# ---------------------------------------------------------------- datasets, best settings, baselines


def _dataset_key(row: dict[str, Any]) -> tuple[str, int]:
    return row["dataset"], row["size"]


def dataset_labels(rows: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """A column label per (dataset, size): the dataset, with its size where it comes at several."""
    keys = sorted({_dataset_key(r) for r in rows})
    sizes = Counter(name for name, _ in keys)
    return {k: k[0] if sizes[k[0]] == 1 else f"{k[0]} {k[1]} px" for k in keys}


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def best_settings(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The KD row of each (dataset, size) with the highest mean val AUC (val ACC breaks ties, then the
    first in order). Test metrics never choose: a setting picked on the test split overstates itself."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        if row["kind"] != "kd" or not _defined(row["val_auc_mean"]):
            continue
        key = _dataset_key(row)
        if key not in best or _val_rank(row) > _val_rank(best[key]):
            best[key] = row
    return best


def _val_rank(row: dict[str, Any]) -> tuple[float, float]:
    acc = row["val_acc_mean"]
    return row["val_auc_mean"], acc if _defined(acc) else -math.inf


def baseline_for(
    rows: list[dict[str, Any]], key: tuple[str, int], like: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The baseline a KD row `like` is measured against on dataset `key`: the same augmentation when one
    has it, else any; then the same student, then the most seeds."""
    candidates = [r for r in rows if r["kind"] == "baseline" and _dataset_key(r) == key]
    if not candidates:
        return None
    like = like or {}

    def rank(row: dict[str, Any]) -> tuple:
        same_student = (row["student"], row["student_size"]) == (
            like.get("student"),
            like.get("student_size"),
        )
        return row["augment"] == like.get("augment", ""), same_student, row["n_seeds"]

    return max(candidates, key=rank)


def compare_groups(
    a_dirs: list[str],
    b_dirs: list[str],
    resamples: int = 2000,
    seed: int = 0,
    known: dict[str, RunResult] | None = None,
) -> Comparison:
    """`medkd.compare.compare_results` (B − A) of two sets of run folders (a sweep's folder holds every
    configuration, so report compares the folders of one row's runs, not a folder); `known` holds results
    already read, by run folder (report's own), so they are not read again."""
    known = known or {}
    runs = []
    for dirs in (a_dirs, b_dirs):
        results = [known.get(d) or _read_run(d) for d in dirs]
        runs.append(sorted(results, key=lambda r: r.seed))
    return compare_results(runs[0], runs[1], "baseline", "setting", resamples=resamples, seed=seed)


def _read_run(run_dir: str) -> RunResult:
    result = read_result(run_dir)
    result.run_dir = str(run_dir)
    return result


@dataclass
class Delta:
    """A KD row's test AUC against its baseline: the `MetricDelta`, or why there is none."""

    baseline: dict[str, Any] | None
    auc: Any = None  # medkd.compare.MetricDelta
    reason: str = ""


class AucDeltas:
    """Paired-bootstrap test AUC deltas of KD rows against their baseline, each pair compared once (the
    best-setting line and table2's Δ column share them)."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        resamples: int = 2000,
        seed: int = 0,
        results: list[RunResult] | None = None,
    ):
        self.rows, self.resamples, self.seed = rows, resamples, seed
        self.known = {r.run_dir: r for r in results or []}  # collect_runs read them: not read again
        self._done: dict[tuple, Delta] = {}

    def __call__(self, row: dict[str, Any]) -> Delta:
        baseline = baseline_for(self.rows, _dataset_key(row), row)
        if baseline is None:
            return Delta(None, reason="no baseline")
        key = (tuple(baseline["run_dirs"]), tuple(row["run_dirs"]))
        if key not in self._done:
            try:
                comparison = compare_groups(
                    baseline["run_dirs"], row["run_dirs"], self.resamples, self.seed, known=self.known
                )
                self._done[key] = Delta(baseline, comparison.metrics["auc"])
            except MedkdError as err:
                self._done[key] = Delta(baseline, reason=str(err))
        return self._done[key]


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.3f}"


def delta_text(delta: Any) -> str:
    """`+0.035 [+0.010, +0.061]` from a `MetricDelta`; no interval where no resample defined one."""
    if math.isnan(delta.low):
        return f"{_signed(delta.delta)} (no interval)"
    return f"{_signed(delta.delta)} [{_signed(delta.low)}, {_signed(delta.high)}]"


def setting_label(row: dict[str, Any]) -> str:
    """`T=2, α=0.2, medmnist-v8 (teacher tiny, cache c.h5)`: a KD setting and what it learned from."""
    parts = [f"T={row['temperature']:g}", f"α={row['alpha']:g}", *_extras(row)]
    source = f"teacher {row['teacher']}"
    if row.get("caches"):
        source += f", cache {', '.join(row['caches'])}"
    return f"{', '.join(parts)} ({source})"


def best_setting_lines(rows: list[dict[str, Any]], deltas: AucDeltas) -> list[str]:
    """One line per dataset: its best KD setting by val AUC, its test AUC and its Δ vs the baseline."""
    labels, lines = dataset_labels(rows), []
    for key, row in sorted(best_settings(rows).items()):
        head = (
            f"best setting on {labels[key]} by val AUC ({_pm(row, 'val_auc')}): {setting_label(row)}: "
            f"test AUC {_pm(row, 'test_auc')}"
        )
        delta = deltas(row)
        if delta.baseline is None:
            lines.append(f"{head}; no baseline (α=1) on {labels[key]} to compare with")
            continue
        which = f"baseline ({delta.baseline['augment']})" if delta.baseline["augment"] else "baseline"
        if delta.auc is None:
            lines.append(f"{head}; vs {which}: no interval ({delta.reason})")
            continue
        seeds = f"{delta.auc.n_seeds} seed{'s' * (delta.auc.n_seeds != 1)}"
        lines.append(f"{head}; vs {which}: Δ {delta_text(delta.auc)} (paired bootstrap, {seeds})")
    return lines


# ---------------------------------------------------------------- table2: methods × datasets

METHOD_FIELDS = ("student", "student_size", "alpha", "temperature", "lr", "epochs", "batch_size", "augment",
                 "feature_weight")  # fmt: skip
# Shown in a method's label only where the runs differ in them.
VARYING = (("student", "student"), ("student_size", "student px"), ("lr", "lr"), ("epochs", "epochs"),
           ("batch_size", "batch"))  # fmt: skip


def _method_key(row: dict[str, Any], per_dataset: set[str]) -> tuple:
    """What makes rows of several datasets one method: the teacher's identity, not its per-dataset cache,
    and not the fields of a dataset's one recipe (`per_dataset`)."""
    if row["kind"] == "teacher":
        return (
            "teacher",
            *_recipe_identity((row["teacher"], row.get("teacher_input_size"), row.get("weights_sha256"))),
        )
    ids = row.get("teacher_ids")
    ids = ids and tuple(_recipe_identity(i) for i in ids)
    return (row["kind"], ids, *(row[f] for f in METHOD_FIELDS if f not in per_dataset))


def _recipe_identity(identity: tuple) -> tuple:
    """A `run:` teacher is trained on each dataset, so its weights differ by dataset: across datasets
    it is one method by its runs' names (the folders of one recipe), not by its weights' sha256."""
    name, size, sha, *rest = identity
    return (name, size, None if str(name).startswith("run:") else sha, *rest)


def dataset_recipes(rows: list[dict[str, Any]]) -> tuple[set[str], dict[tuple[str, int], str]]:
    """The VARYING fields that differ between datasets but take one value within each (a study trains every
    arm of a dataset one way, e.g. fewer epochs on a larger set), and each dataset's values of them,
    e.g. "epochs 10, batch 32": table2 shows them under the dataset instead of in every method."""
    values: dict[str, dict[tuple[str, int], set]] = {f: {} for f, _ in VARYING}
    for row in rows:
        if row["kind"] != "teacher":
            for f, _ in VARYING:
                values[f].setdefault(_dataset_key(row), set()).add(row[f])
    fields = {
        f
        for f, by_dataset in values.items()
        if len(by_dataset) > 1
        and all(len(v) == 1 for v in by_dataset.values())
        and len(set().union(*by_dataset.values())) > 1
    }
    names = dict(VARYING)
    text = {
        key: ", ".join(
            f"{names[f]} {_number_text(next(iter(values[f][key])))}" for f, _ in VARYING if f in fields
        )
        for key in sorted({_dataset_key(r) for r in rows if r["kind"] != "teacher"})
    }
    return fields, text


def _number_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _method_label(row: dict[str, Any], varying: set[str]) -> str:
    if row["kind"] == "teacher":
        size = f" @{row['teacher_input_size']} px" if "teacher_input_size" in varying else ""
        return f"teacher {row['teacher']}{size}"
    if row["kind"] == "baseline":
        parts = ["baseline (α=1)"]
    else:
        parts = [f"KD {row['teacher']}", f"T={row['temperature']:g}", f"α={row['alpha']:g}"]
    return ", ".join(parts + _how_trained(row, varying))


def _how_trained(row: dict[str, Any], varying: set[str]) -> list[str]:
    """Augmentation, β, and whichever of student, lr, epochs and batch the runs differ in."""
    shown = [(name, row[f]) for f, name in VARYING if f in varying]
    return _extras(row) + [f"{name} {_number_text(v)}" for name, v in shown]


def _varying(rows: list[dict[str, Any]]) -> set[str]:
    students = [r for r in rows if r["kind"] != "teacher"]
    found = {f for f, _ in VARYING if len({r[f] for r in students}) > 1} - dataset_recipes(rows)[0]
    sizes: dict[str, set] = {}
    for r in rows:
        if r["kind"] == "teacher":
            sizes.setdefault(r["teacher"], set()).add(r.get("teacher_input_size"))
    return found | ({"teacher_input_size"} if any(len(s) > 1 for s in sizes.values()) else set())


def table2_rows(rows: list[dict[str, Any]], deltas: AucDeltas) -> list[dict[str, Any]]:
    """One dict per method: `kind`, `method` (its label), `cells` {(dataset, size): summary row} and
    `deltas` {(dataset, size): Delta} (KD rows on datasets with a baseline)."""
    methods: dict[tuple, dict[str, Any]] = {}
    per_dataset = dataset_recipes(rows)[0]
    for row in rows:
        key, variant = _method_key(row, per_dataset), 0
        # Two configurations that map to one method on one dataset stay two rows, never one mean.
        while _dataset_key(row) in methods.get((key, variant), {}).get("cells", {}):
            variant += 1
        method = methods.setdefault((key, variant), {"kind": row["kind"], "first": row, "cells": {}})
        method["cells"][_dataset_key(row)] = row
        method["variant"] = variant
    varying = _varying(rows)
    table = []
    for method in methods.values():
        label = _method_label(method.pop("first"), varying)
        method["method"] = label + (f" #{method['variant'] + 1}" if method["variant"] else "")
        method["deltas"] = {}
        if method["kind"] == "kd":
            for key, row in method["cells"].items():
                delta = deltas(row)
                if delta.baseline is not None:
                    method["deltas"][key] = delta
        table.append(method)
    return sorted(table, key=_method_order)


def _method_order(method: dict[str, Any]) -> tuple:
    row = next(iter(method["cells"].values()))
    fields = ("teacher", "student", "student_size", "lr", "epochs", "temperature", "alpha", "augment",
              "feature_weight")  # fmt: skip
    values = tuple((row.get(f) is None, row.get(f) if row.get(f) is not None else 0) for f in fields)
    return KIND_ORDER[method["kind"]], values, method["variant"]


def _cell(row: dict[str, Any] | None, show_seeds: bool) -> str:
    if row is None:
        return "—"
    seeds = f" (n={row['n_seeds']})" if show_seeds and row["kind"] != "teacher" else ""
    return f"{_pm(row, 'test_auc')} / {_pm(row, 'test_acc')}{seeds}"


def _table2_grid(
    rows: list[dict[str, Any]], methods: list[dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    """Headers and cells shared by the rich table and Markdown: a method column, then per dataset its
    "test AUC / ACC" and, where a KD row has a baseline there, its Δ AUC vs the baseline."""
    labels, recipes = dataset_labels(rows), dataset_recipes(rows)[1]
    with_delta = {k for m in methods for k in m["deltas"]}
    seeds = {r["n_seeds"] for m in methods for r in m["cells"].values() if r["kind"] != "teacher"}
    headers, cells = ["method"], [[m["method"]] for m in methods]
    for key, label in labels.items():
        headers.append(f"{label} ({recipes[key]})" if recipes.get(key) else label)
        for line, method in zip(cells, methods, strict=True):
            line.append(_cell(method["cells"].get(key), len(seeds) > 1))
        if key in with_delta:
            headers.append(f"{label} Δ AUC vs baseline")
            for line, method in zip(cells, methods, strict=True):
                delta = method["deltas"].get(key)
                line.append("—" if delta is None else "n/a" if delta.auc is None else delta_text(delta.auc))
    return headers, cells


def _seed_caption(methods: list[dict[str, Any]]) -> str:
    seeds = sorted({r["n_seeds"] for m in methods for r in m["cells"].values() if r["kind"] != "teacher"})
    span = "–".join(map(str, sorted({seeds[0], seeds[-1]}))) if seeds else "0"
    return (
        f"test AUC / ACC, mean ± sd over {span} seed(s) (teachers: over their caches); Δ: test AUC − "
        f"baseline's, 95% paired bootstrap interval over the test images"
    )


def _table2_csv(rows: list[dict[str, Any]], methods: list[dict[str, Any]]) -> str:
    """Full precision: per dataset the test AUC/ACC mean and std, seeds, and Δ AUC with its interval."""
    labels = dataset_labels(rows)
    prefixes = {k: label.replace(" px", "px").replace(" ", "_") for k, label in labels.items()}
    stats = ("test_auc_mean", "test_auc_std", "test_acc_mean", "test_acc_std", "n_seeds")
    deltas = ("delta_auc", "delta_low", "delta_high")
    fields = ["kind", "method", *(f"{p}_{s}" for p in prefixes.values() for s in (*stats, *deltas))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for method in methods:
        line: dict[str, Any] = {"kind": method["kind"], "method": method["method"]}
        for key, prefix in prefixes.items():
            row, delta = method["cells"].get(key) or {}, method["deltas"].get(key)
            line.update({f"{prefix}_{s}": row.get(s) for s in stats})
            if delta is not None and delta.auc is not None:
                values = (delta.auc.delta, delta.auc.low, delta.auc.high)
                line.update({f"{prefix}_{d}": v for d, v in zip(deltas, values, strict=True)})
        writer.writerow({k: "" if line.get(k) is None else line[k] for k in fields})
    return buffer.getvalue()


# ---------------------------------------------------------------- table4: (T, α) per dataset × teacher

BLOCK_FIELDS = ("teacher_ids", "student", "student_size", "lr", "epochs", "batch_size", "augment",
                "feature_weight")  # fmt: skip
TABLE4_CSV = ("dataset", "size", "teacher", "student", "student_size", "augment", "feature_weight", "lr",
              "epochs", "temperature", "alpha", "n_seeds", "seeds",
              *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")))  # fmt: skip


def table4_blocks(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """`(title, KD rows sorted by (T, α))`, one block per dataset × teacher (and student, augmentation, β,
    lr and epochs, where the runs differ in them)."""
    labels, varying = dataset_labels(rows), _varying(rows)
    blocks: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "kd":
            blocks.setdefault((_dataset_key(row), *(row[f] for f in BLOCK_FIELDS)), []).append(row)
    out = []
    for key, block in blocks.items():
        first = block[0]
        extras = _how_trained(first, varying)
        title = f"{labels[key[0]]} — teacher {first['teacher']}" + (
            f" ({', '.join(extras)})" if extras else ""
        )
        out.append((title, sorted(block, key=lambda r: (r["temperature"], r["alpha"]))))
    return out


def _table4_cells(row: dict[str, Any]) -> list[str]:
    return [f"{row['temperature']:g}", f"{row['alpha']:g}", str(row["n_seeds"]), _cell(row, False)]


TABLE4_HEADERS = ("T", "α", "seeds", "test AUC / ACC")


def _print_table4(out: Console, blocks: list[tuple[str, list[dict[str, Any]]]], fmt: str) -> None:
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=TABLE4_CSV, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in (r for _, block in blocks for r in block):
            cells = {k: "" if row.get(k) is None else row[k] for k in TABLE4_CSV}
            writer.writerow({**cells, "seeds": ";".join(map(str, row["seeds"]))})
        _write(out, buffer.getvalue())
    elif fmt == "markdown":
        parts = []
        for title, block in blocks:
            lines = [
                f"**{title}**",
                "",
                "| " + " | ".join(TABLE4_HEADERS) + " |",
                "| --: | --: | --: | --: |",
            ]
            parts.append("\n".join(lines + ["| " + " | ".join(_table4_cells(r)) + " |" for r in block]))
        _write(out, "\n\n".join(parts) + "\n")
    else:
        for title, block in blocks:
            table = Table(title=escape(title), box=box.SIMPLE_HEAD)
            for header in TABLE4_HEADERS:
                table.add_column(header, justify="right")
            for row in block:
                table.add_row(*(escape(c) for c in _table4_cells(row)))
            print_table(out, table, min_width=80)


# ---------------------------------------------------------------- params: the paper's Table 3

PROFILE_FORMAT = 1  # medkd.profiling.PROFILE_FORMAT_VERSION; not imported: it loads every backbone
PROFILE_KINDS = ("teacher", "student", "onnx")
PARAMS_CSV = ("name", "kind", "runtime", "input", "parameters", "macs", "latency_ms", "latency_batch",
              "throughput", "batch_size", "threads", "machine", "profile")  # fmt: skip
PROFILE_NUMBERS = {
    "parameters": int,
    "latency_ms": (int, float),
    "throughput": (int, float),
    "batch_size": int,
}


def machine_label(machine: Any) -> str:
    """`CPU, N logical cores, platform` from a profile's `machine`."""
    if not isinstance(machine, dict):
        return "an unnamed machine"
    parts = [str(machine.get("cpu") or "unknown CPU")]
    if machine.get("cores"):
        parts.append(f"{machine['cores']} logical cores")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    return ", ".join(parts)


def read_profile(path: Path) -> list[dict[str, Any]]:
    """The rows of one `medkd profile` JSON, each with its `machine` (a label) and `profile` (the path)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedkdError(f"{path} is not readable JSON ({' '.join(str(err).split())})") from err
    if not isinstance(data, dict) or data.get("medkd_profile") != PROFILE_FORMAT:
        raise MedkdError(f"{path} is not a medkd profile (format {PROFILE_FORMAT}); rerun `medkd profile`")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise MedkdError(f"{path}: 'rows' must be a non-empty list of objects; rerun `medkd profile`")
    out = []
    for i, row in enumerate(rows):
        wrong = [k for k, kind in PROFILE_NUMBERS.items() if not isinstance(row.get(k), kind)]
        if wrong or not isinstance(row.get("name"), str):
            raise MedkdError(f"{path}: row {i} lacks or mistypes {', '.join(wrong or ['name'])}")
        shape = row.get("input_shape") or []
        out.append({
            **row, "input": "×".join(map(str, shape)), "latency_batch": row.get("latency_batch", 1),
            "machine": machine_label(data.get("machine")), "profile": str(path),
        })  # fmt: skip
    return out


def collect_profiles(runs_dir: str | Path, console: Console) -> list[dict[str, Any]]:
    """Every profile row below `runs_dir` (teachers, students, ONNX exports); an unreadable profile.json
    is listed on `console` and left out; none at all is one error line."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise MedkdError(f"{root} is not a folder; give the folder that holds run folders (e.g. runs/)")
    rows, broken = [], 0
    for path in sorted(p for p in root.rglob(PROFILE) if p.is_file()):
        try:
            rows += read_profile(path)
        except MedkdError as err:
            broken += 1
            console.print(f"broken: {err}", style="yellow", highlight=False, markup=False, soft_wrap=True)
    if not rows:
        found = f" ({broken} unreadable)" if broken else ""
        raise MedkdError(
            f"no {PROFILE} below {runs_dir}{found}: run `medkd profile RUN` first on each run to list (and "
            f"`medkd profile TEACHER --out {Path(runs_dir) / 'teachers' / 'NAME' / PROFILE}` for a teacher)"
        )
    return sorted(rows, key=lambda r: (_kind_rank(r.get("kind")), r["name"], r["profile"]))


def _kind_rank(kind: Any) -> int:
    return PROFILE_KINDS.index(kind) if kind in PROFILE_KINDS else len(PROFILE_KINDS)


def _params_grid(rows: list[dict[str, Any]]) -> tuple[str, list[str], list[list[str]]]:
    """The first line (the machine, the batch) and the table's headers and cells."""
    machines, batches = {r["machine"] for r in rows}, {r["batch_size"] for r in rows}
    threads = {r.get("threads") for r in rows}
    shared_batch = len(batches) == 1
    headers = ["model", "kind", "input", "params (M)", "MACs (G)", "latency b1 (ms)",
               f"img/s at b{next(iter(batches))}" if shared_batch else "img/s (at batch)"]  # fmt: skip
    headers += ["threads"] * (len(threads) > 1) + ["machine"] * (len(machines) > 1)
    cells = []
    for r in rows:
        latency = f"{r['latency_ms']:.2f}" + (f" (b{r['latency_batch']})" if r["latency_batch"] != 1 else "")
        line = [r["name"], str(r.get("kind") or "—"), r["input"] or "—", f"{r['parameters'] / 1e6:.2f}",
                "—" if r.get("macs") is None else f"{r['macs'] / 1e9:.3g}", latency,
                f"{r['throughput']:.0f}" + ("" if shared_batch else f" (b{r['batch_size']})")]  # fmt: skip
        line += [str(r.get("threads"))] * (len(threads) > 1) + [r["machine"]] * (len(machines) > 1)
        cells.append(line)
    where = f"measured on {machines.pop()}" if len(machines) == 1 else f"measured on {len(machines)} machines"
    if len(threads) == 1:
        where += f", {threads.pop()} thread(s)"
    batch = f"img/s at batch {next(iter(batches))}" if shared_batch else "img/s at each profile's batch"
    return f"{where}; latency: median at batch 1; {batch}", headers, cells


def _print_params(out: Console, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=PARAMS_CSV, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if r.get(k) is None else r[k] for k in PARAMS_CSV} for r in rows)
        _write(out, buffer.getvalue())
        return
    first, headers, cells = _params_grid(rows)
    if fmt == "markdown":
        _write(
            out,
            f"{first[0].upper()}{first[1:]}\n\n" + _markdown(headers, cells, {"model", "kind", "machine"}),
        )
        return
    table = Table(title=escape(f"Model size and CPU speed — {first}"), box=box.SIMPLE_HEAD)
    for header in headers:
        table.add_column(header, justify="left" if header in ("model", "kind", "machine") else "right")
    for line in cells:
        table.add_row(*(escape(c) for c in line))
    print_table(out, table, min_width=100)


# ---------------------------------------------------------------- calibration


def _curve(label: str, kind: str, task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, Any]:
    from medkd.metrics import expected_calibration_error, reliability_bins

    bins = reliability_bins(task, y_true, y_score, bins=RELIABILITY_BINS)
    ece = expected_calibration_error(task, y_true, y_score, bins=RELIABILITY_BINS)
    return {"label": label, "kind": kind, "bins": bins, "ece": ece}


def _pooled_curve(label: str, kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """One curve of a row's runs, test predictions pooled over its seeds."""
    predictions = [read_predictions(d) for d in row["run_dirs"]]
    y_true = np.concatenate([np.asarray(p["y_true"]).reshape(len(p["y_score"]), -1) for p in predictions])
    y_score = np.concatenate([np.asarray(p["y_score"], dtype=np.float64) for p in predictions])
    seeds = f"{len(predictions)} seed{'s' * (len(predictions) != 1)}" + " pooled" * (len(predictions) > 1)
    return _curve(f"{label} ({seeds})", kind, predictions[0]["task"], y_true, y_score)


def _teacher_curves(row: dict[str, Any], by_dir: dict[str, RunResult]) -> tuple[list[dict], list[str]]:
    """The teacher's test probabilities from each cache the row learned from, where the cache is still
    there and holds the runs' test data; a note for each one left out."""
    from medkd.cache import TeacherCache
    from medkd.metrics import scores_from_logits

    first = by_dir[row["run_dirs"][0]]
    curves, notes = [], []
    for summary in first.teacher_summaries():
        name, path = summary.get("teacher") or "teacher", summary.get("cache")
        if not path or not Path(path).is_file():
            notes.append(f"teacher {name}: cache {path or '(not recorded)'} not found, curve left out")
            continue
        try:
            cache = TeacherCache(path)
        except MedkdError as err:
            notes.append(f"teacher {name}: curve left out ({err})")
            continue
        stored, ran = cache.split_attrs["test"].get("data_sha256"), first.data_sha256.get("test")
        if stored and ran and stored != ran:
            notes.append(f"teacher {name}: {path} now holds other test data than the runs, curve left out")
            continue
        scores = scores_from_logits(cache.task, cache.logits["test"]).numpy().astype(np.float64)
        curves.append(_curve(f"teacher {name}", "teacher", cache.task, cache.labels["test"], scores))
    return curves, notes


def calibration_panels(rows: list[dict[str, Any]], results: list[RunResult]) -> list[dict[str, Any]]:
    """One reliability panel per dataset: its best KD setting by val AUC (students pooled over seeds), the
    teacher that setting learned from, and the baseline; notes say what was left out."""
    by_dir = {r.run_dir: r for r in results}
    best, panels = best_settings(rows), []
    for key, label in dataset_labels(rows).items():
        kd, notes = best.get(key), []
        baseline = baseline_for(rows, key, kd)
        setting = f"KD T={kd['temperature']:g}, α={kd['alpha']:g}" if kd else ""
        students = _pooled_or_note("student", f"student {setting}", kd, notes)
        teacher, missing = _teacher_curves(kd, by_dir) if kd else ([], [])
        notes += missing
        base = _pooled_or_note("baseline", "baseline (α=1)", baseline, notes)
        if kd or baseline:
            title = f"{label}: best by val AUC {setting} ({kd['teacher']})" if kd else f"{label}: no KD run"
            # student, teacher, baseline: the legend reads teacher vs student first
            curves = students + teacher + base
            panels.append({"title": title, "curves": curves, "notes": notes, "dataset": label})
    return panels


def _pooled_or_note(kind: str, label: str, row: dict[str, Any] | None, notes: list[str]) -> list[dict]:
    if row is None:
        return []
    try:
        return [_pooled_curve(label, kind, row)]
    except MedkdError as err:
        notes.append(f"{kind}: curve left out ({err})")
        return []


# ---------------------------------------------------------------- shared output


def _write(out: Console, text: str) -> None:
    out.file.write(text)
    out.file.flush()


def _markdown(headers: list[str], cells: list[list[str]], left: set[str]) -> str:
    """A GitHub-flavoured Markdown table; `|` in a cell is escaped."""
    aligns = [":--" if h in left else "--:" for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def _print_table2(out: Console, rows: list[dict[str, Any]], methods: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "csv":
        _write(out, _table2_csv(rows, methods))
        return
    headers, cells = _table2_grid(rows, methods)
    caption = _seed_caption(methods)
    if fmt == "markdown":
        _write(out, f"Table 2: {caption}.\n\n" + _markdown(headers, cells, {"method"}))
        return
    table = Table(title=f"Table 2 — {escape(caption)}", box=box.SIMPLE_HEAD)
    for header in headers:
        table.add_column(escape(header), justify="left" if header == "method" else "right")
    for method, line in zip(methods, cells, strict=True):
        style = {"teacher": "cyan", "baseline": "magenta"}.get(method["kind"])
        table.add_row(*(escape(c) for c in line), style=style)
    print_table(out, table)


def _say(console: Console, line: str, style: str | None = None) -> None:
    console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------- the command


def _png_targets(plot: Any, calibration: Any, force: bool) -> tuple[Path | None, Path | None]:
    """Both figure targets checked before any work: a data file or cache given by mistake is never
    overwritten, and one file is not asked to hold two figures."""
    plot = None if plot is None else check_png_out(plot, force, flag="--plot", make_folder=True)
    if calibration is not None:
        calibration = check_png_out(calibration, force, flag="--plot-calibration", make_folder=True)
        if plot is not None and plot.resolve() == calibration.resolve():
            raise MedkdError(f"--plot and --plot-calibration both name {plot}; give two file names")
    return plot, calibration


def _print_layout(
    layout: str, fmt: str, rows: list[dict[str, Any]], deltas: AucDeltas, out: Console, title: str
) -> list[dict[str, Any]]:
    """Print the runs' `layout` ("runs", "table2" or "table4") on `out`; returns its rows."""
    if layout == "table2":
        methods = table2_rows(rows, deltas)
        _print_table2(out, rows, methods, fmt)
        return methods
    if layout == "table4":
        blocks = table4_blocks(rows)
        if not blocks:
            raise MedkdError("no distillation runs (alpha < 1) to tabulate by (T, α); use --layout runs")
        _print_table4(out, blocks, fmt)
        return [r for _, block in blocks for r in block]
    if fmt == "table":
        print_table(out, render_table(rows, title=title))
    else:
        _write(out, render_csv(rows) if fmt == "csv" else render_markdown(rows))
    return rows


def report(
    runs_dir: str | Path,
    fmt: str = "table",
    plot: str | Path | None = None,
    console: Console | None = None,
    out: Console | None = None,
    force: bool = False,
    layout: str = "runs",
    plot_calibration: str | Path | None = None,
    resamples: int = 2000,
) -> list[dict[str, Any]]:
    """Collect, summarise and print the runs below `runs_dir` in `layout` (LAYOUTS) on `out` (stdout);
    problems, notes and the best setting per dataset by val AUC on `console` (stderr), so that CSV and
    Markdown on stdout stay clean. Optionally writes the ablation plot and the reliability diagrams, each a
    new .png (`force`: or over an earlier PNG). Returns the layout's rows ("runs": the summary rows;
    "table2": one dict per method; "table4": the KD rows; "params": the profile rows)."""
    if fmt not in FORMATS:
        raise MedkdError(f"unknown --format '{fmt}'; valid: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise MedkdError(f"unknown --layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    plot, calibration = _png_targets(plot, plot_calibration, force)
    console = console or Console(stderr=True)
    out = out or Console()
    printed: list[dict[str, Any]] = []
    if layout == "params":
        printed = collect_profiles(runs_dir, console)
        _print_params(out, printed, fmt)
        if plot is None and calibration is None:  # a profile needs no finished run
            return printed
    results, problems = collect_runs(runs_dir)
    for problem in problems:
        _say(console, problem_line(problem), style="yellow")
    if not results:
        raise MedkdError(
            f"no finished runs below {runs_dir} (no valid {RESULT}); make some with `medkd distill` or "
            f"`medkd sweep`"
        )
    rows = summarise(results)
    deltas = AucDeltas(rows, resamples, results=results)
    if layout != "params":
        title = f"{runs_dir}: {len(results)} run(s), mean ± std over seeds"
        printed = _print_layout(layout, fmt, rows, deltas, out, title)
    if layout in ("runs", "table2"):
        for line in best_setting_lines(rows, deltas):
            _say(console, line)
    if plot is not None:
        _say(console, f"ablation plot: {plot_ablation(rows, plot)}")
    if calibration is not None:
        panels = calibration_panels(rows, results)
        for panel in panels:
            for note in panel["notes"]:
                _say(console, f"calibration plot, {panel['dataset']}: {note}", style="yellow")
        _say(console, f"calibration plot: {plot_reliability(panels, calibration, RELIABILITY_BINS)}")
    return printed
