"""The ablation plot of `medkd report --plot` (the paper's Figure 4), from `medkd.report.summarise` rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

from medkd.errors import MedkdError
from medkd.files import atomic_path


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
