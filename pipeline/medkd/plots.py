"""The ablation plot of `medkd report --plot` (the paper's Figure 4), from `medkd.report.summarise` rows,
the reliability diagrams of `medkd report --plot-calibration`, and the rules every PNG medkd writes
follows (`medkd tsne`, `medkd gradcam`, `medkd demo` too): it ends in .png, and `--force` replaces only a
PNG, never a user's data file, cache or model.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

from medkd.errors import MedkdError
from medkd.files import atomic_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- PNG targets


def check_png_out(
    out: str | os.PathLike, force: bool, flag: str = "--out", make_folder: bool = False
) -> Path:
    """Refuse a `flag` target that is not a new .png (in an existing folder, unless `make_folder`);
    `force` replaces only a PNG image, so a user's data file is never overwritten."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise MedkdError(f"{flag} {path} must end in .png; give a PNG file name such as {path.stem}.png")
    if path.is_dir():
        raise MedkdError(f"{flag} {path} is a folder; give a .png file name")
    if make_folder:  # the folder is made when the PNG is written; none of it may be a file
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise MedkdError(f"{flag} {path}: {blocker} is a file, not a folder; choose another {flag}")
    elif not path.parent.is_dir():
        raise MedkdError(f"{flag} {path}: folder {path.parent} does not exist")
    if not path.exists():
        return path
    if not force:
        raise MedkdError(f"{path} already exists; pass --force to replace it, or {flag} elsewhere")
    if not is_png(path):
        raise MedkdError(
            f"{path} exists and is not a PNG image: --force replaces only a PNG figure; choose another {flag}"
        )
    return path


def is_png(path: str | os.PathLike) -> bool:
    """Does the file start with the PNG signature (a figure medkd may replace)?"""
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


# ---------------------------------------------------------------- the ablation plot


def _most_common(values: list[float]) -> float:
    """The most frequent value; a tie goes to the smallest (T=2 and α=0.2, the paper's choice, win ties)."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def plot_ablation(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Test AUC and ACC vs α (at the most common T) and vs T (at the most common α), mean ± std over
    seeds, with the supervised baseline and the teacher as dashed lines; written as a PNG to `path`."""
    kd = [r for r in rows if r["kind"] == "kd"]
    if not kd:
        raise MedkdError("nothing to plot: no distillation runs (alpha < 1) were found")
    context_fields = ("dataset", "size", "teacher", "student", "student_size", "lr", "epochs", "batch_size")
    contexts = Counter(tuple(r[f] for f in context_fields) for r in kd)
    context = dict(zip(context_fields, contexts.most_common(1)[0][0], strict=True))
    kd = [r for r in kd if all(r[f] == v for f, v in context.items())]
    fixed_t = _most_common([r["temperature"] for r in kd])
    fixed_a = _most_common([r["alpha"] for r in kd])
    same = ("dataset", "size", "student", "student_size", "lr", "epochs", "batch_size")
    baseline = [r for r in rows if r["kind"] == "baseline" and all(r[f] == context[f] for f in same)]
    teacher = [
        r
        for r in rows
        if r["kind"] == "teacher" and all(r[f] == context[f] for f in ("dataset", "size", "teacher"))
    ]

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"test_auc": "tab:blue", "test_acc": "tab:orange"}
    panels = [
        (axes[0], "alpha", [r for r in kd if r["temperature"] == fixed_t], f"T = {fixed_t:g}, varying α",
         "α (weight of the hard-label loss)"),
        (axes[1], "temperature", [r for r in kd if r["alpha"] == fixed_a], f"α = {fixed_a:g}, varying T",
         "temperature T"),
    ]  # fmt: skip
    for ax, x_key, points, title, xlabel in panels:
        points = sorted(points, key=lambda r: r[x_key])
        xs = [r[x_key] for r in points]
        for metric, label in (("test_auc", "AUC"), ("test_acc", "ACC")):
            ys = [r[f"{metric}_mean"] for r in points]
            errs = [r[f"{metric}_std"] or 0.0 for r in points]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, color=colours[metric],
                        label=f"student (KD) test {label}")  # fmt: skip
            for ref, style, name in (
                (baseline, "--", "baseline α=1"),
                (teacher, "-.", f"teacher ({context['teacher']})"),
            ):
                if ref:
                    ax.axhline(ref[0][f"{metric}_mean"], linestyle=style, color=colours[metric], alpha=0.7,
                               label=f"{name} test {label}")  # fmt: skip
        if not points:
            ax.text(0.5, 0.5, "no runs here", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test metric (mean ± std over seeds)")
    seeds = sorted({r["n_seeds"] for r in kd})
    seeds_text = "–".join(map(str, sorted({seeds[0], seeds[-1]}))) + (" seed" if seeds == [1] else " seeds")
    fig.suptitle(
        f"KD ablation — {context['dataset']} {context['size']} px, {context['student']} student from "
        f"{context['teacher'] or 'teacher'}, {seeds_text} per point"
    )
    # One legend for both panels: students first, then baseline, then teacher; AUC before ACC in each.
    entries = {}
    for ax in axes:
        entries.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    kinds = ("student", "baseline", "teacher")
    labels = sorted(entries, key=lambda lab: (kinds.index(lab.split()[0]), "ACC" in lab))
    handles = [entries[lab] for lab in labels]
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


# ---------------------------------------------------------------- reliability diagrams

CURVE_COLOURS = {"student": "tab:blue", "teacher": "tab:green", "baseline": "tab:red"}
CURVE_STYLES = {"student": "-", "teacher": "-.", "baseline": "--"}


def _reliability_panel(ax: Any, panel: dict[str, Any]) -> None:
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, label="perfect calibration")
    for curve in panel["curves"]:
        bins = curve["bins"]
        # An empty bin has no confidence or accuracy (NaN): drawing it would break the line.
        points = [
            (c, a)
            for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"], strict=True)
            if n and not (math.isnan(c) or math.isnan(a))
        ]
        ece = "n/a" if math.isnan(curve["ece"]) else f"{curve['ece']:.3f}"
        kind = curve["kind"]
        ax.plot(
            [c for c, _ in points], [a for _, a in points], marker="o", markersize=3.5,
            color=CURVE_COLOURS.get(kind), linestyle=CURVE_STYLES.get(kind, "-"),
            label=f"{curve['label']} — ECE {ece}",
        )  # fmt: skip
    if panel.get("notes"):  # what is missing is said where it is missing, not only on the console
        ax.text(0.98, 0.02, "\n".join(panel["notes"]), ha="right", va="bottom", fontsize="x-small",
                color="0.35", wrap=True, transform=ax.transAxes)  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(textwrap.fill(panel["title"], 48), fontsize="medium")  # the setting's name can be long
    ax.set_xlabel("confidence (mean in bin)")
    ax.set_ylabel("accuracy in bin")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="x-small")


def plot_calibration(panels: list[dict[str, Any]], path: str | Path, bins: int = 15) -> Path:
    """Reliability diagrams, one panel per dataset, written as a PNG to `path`.

    Each panel is `{"title", "curves", "notes"}`; a curve is `{"label", "kind"` (student, teacher or
    baseline)`, "bins"` (`medkd.metrics.reliability_bins`)`, "ece"}`; notes (a curve left out, and why)
    are printed in the panel."""
    if not panels:
        raise MedkdError("nothing to plot: no run with test predictions to draw a reliability diagram of")
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.8 * cols, 4.9 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _reliability_panel(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    # Two short lines: one panel is 4.8 inches wide, and a one-line title ran off both edges.
    fig.suptitle(f"Reliability on the test split, teacher vs student\n({bins} equal-width confidence bins)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
