"""Hyperparameter sweeps: a grid of student runs (alpha × temperature × seed × lr) from one teacher cache.

Each trial is an ordinary `distill` run in its own folder `<sweep out>/<trial name>` (`medkd.trials`);
a folder whose `result.json` matches the trial's config is skipped, so a killed sweep resumes where it
stopped. Locally the cache is read once and every trial shares the in-memory copy; `medkd.launch` runs
the same trials as Ray tasks or a Slurm array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medkd.cache import MAKE_ONE
from medkd.config import DistillConfig, LaunchConfig, SweepConfig, cache_paths, short_number, to_dict
from medkd.errors import MedkdError
from medkd.files import write_json
from medkd.launch import check_launcher, launch_trials
from medkd.runs import SWEEP, RunResult, read_result, trial_seconds
from medkd.trials import finished_result, run_trials, trial_env, trial_status


def trial_name(trial: dict[str, Any], many_lrs: bool, many_teachers: bool = False) -> str:
    """`a0.2_t2_s0`, with `_lr0.0001` appended when the sweep has more than one lr, and the teacher
    weighting (`_confidence`) when it has several caches."""
    name = f"a{short_number(trial['alpha'])}_t{short_number(trial['temperature'])}_s{trial['seed']}"
    name += f"_lr{short_number(trial['lr'])}" if many_lrs else ""
    return name + (f"_{trial['teacher_weighting']}" if many_teachers else "")


def expand(sweep: SweepConfig) -> list[dict[str, Any]]:
    """One JSON-plain DistillConfig dict per trial, with `out = <sweep out>/<trial name>`."""
    out, many_lrs, many_teachers = sweep.out_path(), len(sweep.lr) > 1, len(cache_paths(sweep.cache)) > 1
    trials = []
    for point in sweep.grid():
        name = trial_name(point, many_lrs, many_teachers)
        cfg = DistillConfig(**sweep.shared(), **point, out=str(out / name))
        trials.append(to_dict(cfg))
    return trials


def run_sweep(
    sweep: SweepConfig, console: Console | None = None, launch: LaunchConfig | None = None
) -> list[RunResult]:
    """Run every unfinished trial of `sweep`, here one after another or on `launch`'s engine; return results.

    Locally the cache is read once, and only if a trial needs training; Ray and Slurm tasks open it
    themselves. A failed trial leaves error.json and the others go on; the sweep then fails with one line
    naming them, and rerunning it runs only those. Results are read back from disk.
    """
    console = console or Console(stderr=True)
    launch = launch or LaunchConfig()
    check_launcher(launch)
    trials, out = expand(sweep), sweep.out_path()
    for path in cache_paths(sweep.cache):  # before anything is written
        if not Path(path).is_file():
            raise MedkdError(f"teacher cache {path} not found; {MAKE_ONE}")
    finished = [finished_result(config) for config in trials]  # refuses a clash before any work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP, {"sweep": to_dict(sweep), "trials": [Path(t["out"]).name for t in trials]})
    width, number = len(str(len(trials))), {t["out"]: i for i, t in enumerate(trials, 1)}
    for config, result in zip(trials, finished, strict=True):
        if result is not None:
            console.print(
                f"[{number[config['out']]:>{width}}/{len(trials)}] {Path(config['out']).name} skipped "
                f"(finished): test AUC {result.test['auc']:.4f}",
                soft_wrap=True,
            )
    todo = [config for config, result in zip(trials, finished, strict=True) if result is None]

    def show(config: dict[str, Any], seconds: float) -> None:
        status, text = trial_status(config)
        prefix = f"[{number[config['out']]:>{width}}/{len(trials)}] {escape(Path(config['out']).name)}"
        verb = f"ran in {seconds:.0f} s" if status == "finished" else "[red]failed[/]"
        console.print(f"{prefix} {verb}: {escape(text)}", soft_wrap=True)

    if launch.launcher == "local":
        # With --quiet, distill's own progress bar and summary are silenced; the status line remains.
        trial_console = Console(stderr=True, quiet=True) if sweep.quiet else console
        run_trials(todo, trial_env(sweep.cache, "local", launch.stage_cache), trial_console, show)
    elif todo:
        console.print(f"sweep {out}: {len(todo)} trial(s) to run on {launch.launcher}", soft_wrap=True)
        launch_trials(
            todo, launch, sweep.cache, out, lambda config: show(config, trial_seconds(config["out"]))
        )
    failed = [
        (Path(t["out"]).name, reason)
        for t in todo
        for status, reason in [trial_status(t)]
        if status != "finished"
    ]
    console.print(
        f"sweep {out}: {len(todo) - len(failed)} trial(s) ran, {len(trials) - len(todo)} skipped"
        + (f", {len(failed)} failed" if failed else ""),
        soft_wrap=True,
    )
    if failed:
        names = ", ".join(name for name, _ in failed[:5]) + (", …" if len(failed) > 5 else "")
        raise MedkdError(
            f"{len(failed)} of {len(trials)} trials failed ({names}; {failed[0][0]}: {failed[0][1]}); each "
            f"left error.json, `medkd report {out}` lists them, and rerunning the sweep retries only them"
        )
    return [read_result(t["out"]) for t in trials]
