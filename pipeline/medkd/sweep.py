"""Hyperparameter sweeps: a grid of student runs (alpha × temperature × seed × lr) from one teacher cache.

Each trial is an ordinary `distill` run in its own folder `<sweep out>/<trial name>` (`medkd.trials`);
a folder whose `result.json` matches the trial's config is skipped, and a trial killed mid-run resumes from
its epoch checkpoint, so a killed sweep resumes where it stopped. A trial another process is writing (a
second sweep on the same folder) is skipped and reported as not finished here. The caches and the data are
read and checked against each other once, before anything is written; locally every trial shares that
in-memory copy; `medkd.launch` runs the same trials as Ray tasks or a Slurm array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medkd.config import DistillConfig, LaunchConfig, SweepConfig, cache_paths, short_number, to_dict
from medkd.distill import Inputs, load_inputs
from medkd.errors import MedkdError
from medkd.files import write_json
from medkd.launch import check_launcher, launch_trials
from medkd.runs import (
    RESULT,
    SWEEP,
    RunIdentity,
    RunResult,
    check_run_dir,
    marker_holder,
    read_result,
    trial_seconds,
)
from medkd.trials import finished_result, run_trials, trial_config, trial_env, trial_status


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
    """Run every unfinished trial of `sweep`, here one after another or on `launch`'s engine; return the
    results of the trials that have finished.

    First the caches and the data are read and checked (`sweep_inputs`): bad input is one line and writes
    nothing. Locally the trials share that copy; Ray and Slurm tasks open them themselves. A failed trial
    leaves error.json and the others go on; the sweep then fails with one line naming them, and rerunning
    it runs only those. A trial another process is writing is skipped, and reported as not finished here.
    Results are read back from disk.
    """
    console = console or Console(stderr=True)
    launch = launch or LaunchConfig()
    check_launcher(launch)
    trials, out = expand(sweep), sweep.out_path()
    inputs, identity = sweep_inputs(trials)
    finished = [finished_result(config, identity) for config in trials]  # refuses a clash before any work
    for config in trials:
        check_run_dir(config["out"])
    write_sweep_folder(out, sweep, trials)
    width, number = len(str(len(trials))), {t["out"]: i for i, t in enumerate(trials, 1)}
    for config, result in zip(trials, finished, strict=True):
        if result is not None:
            name = escape(Path(config["out"]).name)
            console.print(
                f"[{number[config['out']]:>{width}}/{len(trials)}] {name} skipped "
                f"(finished): test AUC {result.test['auc']:.4f}",
                soft_wrap=True,
            )
    todo = [config for config, result in zip(trials, finished, strict=True) if result is None]
    statuses: dict[str, str] = {}

    def show(config: dict[str, Any], seconds: float, ran: str | None = None) -> None:
        if ran == "elsewhere":  # another process holds its folder (it may have finished it by now)
            status, text = "elsewhere", f"another medkd process ({marker_holder(config['out'])}) writes it"
        else:
            status, text = trial_status(config)
        if ran == "done":  # another process finished it between the sweep's start and the trial's turn
            status = "done"
        statuses[config["out"]] = status
        prefix = f"[{number[config['out']]:>{width}}/{len(trials)}] {escape(Path(config['out']).name)}"
        verb = {
            "finished": f"ran in {seconds:.0f} s",
            "done": "skipped (finished elsewhere)",
            "elsewhere": "running elsewhere, skipped here",
        }
        console.print(f"{prefix} {verb.get(status, '[red]failed[/]')}: {escape(text)}", soft_wrap=True)

    if launch.launcher == "local":
        # With --quiet, distill's own progress bar and summary are silenced; the status line remains.
        trial_console = Console(stderr=True, quiet=True) if sweep.quiet else console
        env = trial_env(sweep.cache, "local", launch.stage_cache, identity)
        run_trials(todo, env, trial_console, show, inputs)
    elif todo:
        inputs = None  # the engine's workers read their own copy: let go of this one
        console.print(
            f"sweep {escape(str(out))}: {len(todo)} trial(s) to run on {launch.launcher}", soft_wrap=True
        )
        launch_trials(
            todo,
            launch,
            sweep.cache,
            out,
            lambda config: show(config, trial_seconds(config["out"])),
            identity,
        )
    return sweep_outcome(trials, todo, statuses, out, console)


def sweep_inputs(trials: list[dict[str, Any]]) -> tuple[Inputs, RunIdentity]:
    """The caches and data every trial reads (one read of each, checked against each other as `distill`
    checks them), and what the trials learn from: the config hash of each needs the caches' fingerprints,
    or the data's split sha256s for a grid without a cache. The trials differ only in grid keys, which
    change neither, so one read serves them all."""
    first = trial_config(trials[0])
    inputs = load_inputs(first)
    return inputs, inputs.identity(first)


def write_sweep_folder(out: Path, sweep: SweepConfig, trials: list[dict[str, Any]]) -> None:
    """Make the sweep's folder and write its sweep.json; a file or unwritable `out` is one line."""
    if out.exists() and not out.is_dir():
        raise MedkdError(f"--out {out} is a file; give the sweep a new folder or one of an earlier sweep")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SWEEP, {"sweep": to_dict(sweep), "trials": [Path(t["out"]).name for t in trials]})
    except OSError as err:
        raise MedkdError(
            f"cannot write the sweep folder {out} ({err.strerror or err}); give --out a writable folder"
        ) from err


def sweep_outcome(
    trials: list[dict[str, Any]],
    todo: list[dict[str, Any]],
    statuses: dict[str, str],
    out: Path,
    console: Console,
) -> list[RunResult]:
    """Say what the sweep did (ran, skipped, running elsewhere: not finished here, failed), and fail with
    one line naming the failed trials; else return the results of every trial that has finished."""
    state = {t["out"]: statuses.get(t["out"]) or trial_status(t)[0] for t in todo}
    failed = [(Path(o).name, trial_status({"out": o})[1]) for o, s in state.items() if s == "failed"]
    elsewhere = [Path(o).name for o, s in state.items() if s == "elsewhere"]
    ran, skipped = (sum(s == kind for s in state.values()) for kind in ("finished", "done"))
    console.print(
        f"sweep {escape(str(out))}: {ran} trial(s) ran, {len(trials) - len(todo) + skipped} skipped"
        + (
            f", {len(elsewhere)} running elsewhere (not finished here: {', '.join(elsewhere)})"
            if elsewhere
            else ""
        )
        + (f", {len(failed)} failed" if failed else ""),
        soft_wrap=True,
    )
    if failed:
        names = ", ".join(name for name, _ in failed[:5]) + (", …" if len(failed) > 5 else "")
        raise MedkdError(
            f"{len(failed)} of {len(trials)} trials failed ({names}; {failed[0][0]}: {failed[0][1]}); each "
            f"left error.json, `medkd report {out}` lists them, and rerunning the sweep retries only them"
        )
    return [read_result(t["out"]) for t in trials if (Path(t["out"]) / RESULT).exists()]
