"""`medkd demo`: the whole pipeline in a few minutes on the CPU, on synthetic MedMNIST-format data.

Synthetic data made on the fly → a teacher that knows the data (a ResNet18 trained at the full 28 px for
longer than the students) → its cache (`run:` teacher) → supervised baseline student → one KD run → a 2×2
sweep from the same cache (which skips the KD run, already done) → report table, ablation plot, and one
sentence on what the table shows. Every step is the library call the matching command makes.

The demo writes only into a folder it made (or found empty), and marks it with `.medkd-demo`; `--force`
redoes a demo in a marked folder and refuses any other non-empty one. Its report holds the runs it trained,
never other runs a user keeps there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher
from medkd.config import CacheTeacherConfig, DistillConfig, SweepConfig
from medkd.data import dataset_info, make_synthetic_like
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.plots import plot_ablation
from medkd.report import print_table, render_markdown, render_table, summarise
from medkd.runs import RunResult
from medkd.sweep import expand, run_sweep
from medkd.trials import run_trial

FLAG = "octmnist"  # its task and label count (multi-class, 4 classes, grayscale); the images are synthetic
SIZES = dict(n_train=400, n_val=100, n_test=100)
# The students see the 28 px images at 16 px for 2 epochs: a third of the work, and under-trained, which
# is where a teacher's soft labels help most. The teacher trains twice as long (at 28 px it would cost
# the demo a minute more).
STUDENT = dict(student="resnet18", student_size=16, epochs=2, batch_size=32, lr=1e-3)
TEACHER = dict(student="resnet18", student_size=16, epochs=4, batch_size=32, lr=1e-3)
ALPHAS, TEMPERATURES = (0.2, 0.5), (2.0, 4.0)
MARKER = ".medkd-demo"  # in a folder the demo made: what `--force` may redo


def verdict(baseline: RunResult, kd_runs: list[RunResult]) -> str:
    """One sentence on what the table shows: the KD setting that is best on val, against the baseline, on
    test (chosen on val, so the comparison is fair), and the paper's setting when it is another."""
    best = max(kd_runs, key=lambda r: (r.val["auc"], r.val["acc"]))
    paper = next((r for r in kd_runs if r.alpha == 0.2 and r.temperature == 2.0), best)
    gain = best.test["acc"] - baseline.test["acc"]
    how = "helped" if gain > 0 and best.test["auc"] >= baseline.test["auc"] else "did not help"
    text = (
        f"Distillation {how} here: the best KD setting on val (α = {best.alpha:g}, T = {best.temperature:g}) "
        f"gives the under-trained student test ACC {best.test['acc']:.3f} (AUC {best.test['auc']:.3f}) "
        f"against {baseline.test['acc']:.3f} (AUC {baseline.test['auc']:.3f}) from the labels alone"
    )
    if paper is not best:
        text += (
            f"; the paper's α = 0.2, T = 2 gives test ACC {paper.test['acc']:.3f} "
            f"(AUC {paper.test['auc']:.3f}), soft labels weighing 0.8 against 0.2 for labels seen twice"
        )
    return text + "."


def claim_folder(out: Path, force: bool) -> Path:
    """Make `out` the demo's folder, marked with MARKER: a new or empty folder, or (with `force`) one an
    earlier demo marked. Any other non-empty folder is the user's, and refused with or without `force`."""
    if out.exists() and not out.is_dir():
        raise MedkdError(f"--out {out} is a file; give a new or empty folder for the demo")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise MedkdError(
                f"{out} is not empty and is not a medkd demo folder (no {MARKER} in it); give --out a new "
                f"or empty folder (--force only redoes an earlier demo)"
            )
        if not force:
            raise MedkdError(f"{out} already holds a medkd demo; pass --force to redo it there, or --out DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("made by `medkd demo`: `medkd demo --force` may redo this folder\n")
    except OSError as err:
        raise MedkdError(f"cannot create the demo folder {out}: {err.strerror}") from err
    return out


def run_demo(
    out: str | Path = "medkd-demo", quiet: bool = False, force: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run the demo into `out`; return the paths it wrote, the summary rows and the seconds it took."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = claim_folder(Path(out), force)
    data_dir, runs = out / "data", out / "runs"
    teacher_run = out / "teacher"
    cache_path = out / "cache" / f"{FLAG}_28_run-teacher.h5"
    info = dataset_info(FLAG)

    def step(number: int, text: str) -> None:
        console.print(
            f"[bold]\\[{number}/7][/] {escape(text)}  [dim]({time.perf_counter() - started:.0f} s)[/]",
            soft_wrap=True,
        )

    console.print(
        "[bold yellow]medkd demo on SYNTHETIC data:[/] MedMNIST-format images of class-specific blobs, "
        f"shaped like {FLAG} ({info['task']}, {len(info['label'])} classes, 28 px). Not medical images; "
        "the numbers only show that the pipeline works."
    )
    step(1, f"synthetic data: {SIZES['n_train']}/{SIZES['n_val']}/{SIZES['n_test']} train/val/test images")
    make_synthetic_like(data_dir, FLAG, **SIZES, seed=0)

    step(
        2, f"teacher: resnet18 trained for {TEACHER['epochs']} epochs (the students get {STUDENT['epochs']})"
    )
    run = dict(dataset=FLAG, data_dir=str(data_dir), force=force, quiet=quiet)
    distill(DistillConfig(alpha=1.0, out=str(teacher_run), **TEACHER, **run), console=console)

    step(3, "teacher cache: the teacher run's logits and features, once per image (`--teacher run:`)")
    cache_teacher(
        CacheTeacherConfig(teacher=f"run:{teacher_run}", out=str(cache_path), **run), console=console
    )
    cache = TeacherCache(cache_path)  # read once; every student run below shares it

    step(4, "supervised baseline (α = 1): resnet18 student at 16 px from the labels alone")
    common = dict(cache=str(cache_path), data_dir=str(data_dir), force=force, quiet=quiet, **STUDENT)
    baseline = distill(
        DistillConfig(alpha=1.0, out=str(runs / "baseline"), **common), console=console, cache=cache
    )

    sweep = SweepConfig(alpha=ALPHAS, temperature=TEMPERATURES, seed=(0,), out=str(runs / "sweep"), **common)
    kd_run = next(t for t in expand(sweep) if t["alpha"] == 0.2 and t["temperature"] == 2.0)
    step(5, f"knowledge distillation at T = 2, α = 0.2 (the paper's setting) → {kd_run['out']}")
    run_trial(kd_run, cache=cache, console=console)

    step(6, "sweep α ∈ {0.2, 0.5} × T ∈ {2, 4}: the KD run above is one of its trials, so it is skipped")
    kd_runs = run_sweep(sweep, console=console)

    step(7, "report")
    rows = summarise([baseline, *kd_runs])  # the demo's own runs only, whatever else lies in runs/
    print_table(console, render_table(rows, title=f"{runs} (synthetic {FLAG}-shaped data)"))
    console.print(verdict(baseline, kd_runs), soft_wrap=True, markup=False)
    (out / "report.md").write_text(render_markdown(rows))
    plot = plot_ablation(rows, out / "report.png")

    seconds = time.perf_counter() - started
    console.print(
        f"demo finished in {seconds:.0f} s: data, cache, runs, report.md and report.png in {out}/",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return {
        "out": str(out),
        "data": str(data_dir / f"{FLAG}.npz"),
        "teacher": str(teacher_run),
        "cache": str(cache_path),
        "runs": str(runs),
        "report": str(out / "report.md"),
        "plot": str(plot),
        "rows": rows,
        "seconds": seconds,
    }
