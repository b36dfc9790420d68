"""`medkd report`: every run below a folder, grouped over seeds, as a table, CSV or Markdown.

Runs are read from their `result.json` alone; nothing is re-run. A folder that holds run files but
no valid `result.json` (unreadable, or valid JSON of the wrong shape) is listed as incomplete or broken,
never dropped. The plot lives in `medkd.plots`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medkd.datasets import dataset_name
from medkd.errors import MedkdError
from medkd.plots import check_png_out, plot_ablation
from medkd.runs import CHECKPOINT, ERROR, PREDICTIONS, RESULT, RUN_MARKERS, RunResult, read_error, read_result

FORMATS = ("table", "csv", "markdown")
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


def collect_runs(runs_dir: str | Path) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """`(results, problems)` below `runs_dir`: each valid `result.json` (its `run_dir` set to the folder it
    is in now), and `{"run_dir", "status": "incomplete" | "broken", "reason"}` for every folder with run
    files but no valid result.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise MedkdError(f"{root} is not a folder; give the folder that holds run folders (e.g. runs/)")
    folders = sorted({p.parent for name in RUN_MARKERS for p in root.rglob(name) if p.is_file()})
    results, problems = [], []
    for folder in folders:
        if (folder / RESULT).is_file():
            try:
                result = read_result(folder)
            except MedkdError as err:
                problems.append({"run_dir": str(folder), "status": "broken", "reason": str(err)})
                continue
            result.run_dir = str(folder)
            results.append(result)
        elif (folder / ERROR).is_file():
            reason = read_error(folder) or f"{ERROR} present (unreadable)"
            problems.append({"run_dir": str(folder), "status": "broken", "reason": reason})
        else:
            present = ", ".join(n for n in (CHECKPOINT, PREDICTIONS) if (folder / n).is_file())
            reason = f"{present} but no {RESULT}: killed, or still running"
            problems.append({"run_dir": str(folder), "status": "incomplete", "reason": reason})
    return results, problems


# ---------------------------------------------------------------- grouping over seeds


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); no std from a single value."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def _identity(teacher: dict[str, Any]) -> tuple:
    return (teacher.get("teacher"), teacher.get("teacher_input_size"), teacher.get("weights_sha256"))


def _teacher_name(result: RunResult) -> str | None:
    """The teacher column of a student run: the cache's teacher, or `A + B (confidence)` for several."""
    if result.teachers:
        return " + ".join(t["teacher"] for t in result.teachers) + f" ({result.teacher_weighting})"
    return (result.teacher or {}).get("teacher")


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
        key = (
            r.dataset,
            r.size,
            teacher.get("teacher"),
            teacher.get("teacher_input_size"),
            teacher.get("weights_sha256"),
            r.data_sha256.get("test"),
        )
        cache_id = (teacher.get("cache"), teacher["test_auc"], teacher["test_acc"])
        caches.setdefault(key, {})[cache_id] = teacher
    rows = []
    for (dataset, size, name, *_), found in caches.items():
        row = dict.fromkeys(CSV_FIELDS)
        row.update(
            kind="teacher",
            dataset=dataset_name(dataset),
            size=size,
            teacher=name,
            n_seeds=len(found),
            seeds=[],
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


def _display(row: dict[str, Any]) -> list[str]:
    """The table cells of a row, shared by the rich table and Markdown."""
    kind = row["kind"]
    teacher = {"teacher": f"{row['teacher']} (teacher)", "baseline": "baseline (α=1)"}.get(
        kind, row["teacher"] or "—"
    )
    student = "—" if kind == "teacher" else row["student"]
    if kind != "teacher" and row["student_size"] not in (None, row["size"]):
        student += f"@{row['student_size']}"
    extras = [row.get("augment") or "", f"β={row['feature_weight']:g}" if row.get("feature_weight") else ""]
    if kind != "teacher" and any(extras):  # how it trained: augmentation, feature distillation
        student += f" ({', '.join(e for e in extras if e)})"
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


def problem_line(problem: dict[str, Any]) -> str:
    return f"{problem['status']}: {problem['run_dir']} ({problem['reason']})"


# ---------------------------------------------------------------- the command


def report(
    runs_dir: str | Path,
    fmt: str = "table",
    plot: str | Path | None = None,
    console: Console | None = None,
    out: Console | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Collect, summarise and print the runs below `runs_dir` (`out`: stdout), problems on `console`
    (stderr); optionally write the ablation plot, a new .png (`force`: or over an earlier PNG). Returns the
    summary rows."""
    if fmt not in FORMATS:
        raise MedkdError(f"unknown --format '{fmt}'; valid: {', '.join(FORMATS)}")
    if plot is not None:  # before any work: a data file or cache given by mistake is never overwritten
        plot = check_png_out(plot, force, flag="--plot", make_folder=True)
    console = console or Console(stderr=True)
    out = out or Console()
    results, problems = collect_runs(runs_dir)
    for problem in problems:
        console.print(problem_line(problem), style="yellow", highlight=False, markup=False, soft_wrap=True)
    if not results:
        raise MedkdError(
            f"no finished runs below {runs_dir} (no valid {RESULT}); make some with `medkd distill` or "
            f"`medkd sweep`"
        )
    rows = summarise(results)
    if fmt == "table":
        title = f"{runs_dir}: {len(results)} run(s), mean ± std over seeds"
        print_table(out, render_table(rows, title=title))
    else:
        text = render_csv(rows) if fmt == "csv" else render_markdown(rows)
        out.file.write(text)
        out.file.flush()
    if plot is not None:
        written = plot_ablation(rows, plot)
        console.print(f"ablation plot: {written}", highlight=False, markup=False, soft_wrap=True)
    return rows
