"""Hyperparameter sweeps: a grid of student runs (alpha × temperature × seed × lr) from one teacher cache.

The cache is read once per process and every trial gets the same in-memory copy. Each trial is an
ordinary `distill` run in its own folder `<sweep out>/<trial name>`; a folder whose `result.json`
matches the trial's config is skipped, so a killed sweep resumes where it stopped. `run_trial` takes
and returns plain JSON-able dicts; `medkd.launch` runs the same trials as Ray tasks or a Slurm array.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from medkd.config import DistillConfig, config_fields, make_config, to_dict
from medkd.errors import MedkdError
from medkd.runs import RESULT, config_hash, read_result, write_json

if TYPE_CHECKING:
    from medkd.cache import TeacherCache
    from medkd.launch import LaunchConfig

GRID_KEYS = ("alpha", "temperature", "seed", "lr")
ERROR = "error.json"  # written into a trial's folder when its run fails


def _as_tuple(key: str, value: Any, kind: type) -> tuple:
    """A grid value from TOML or a flag as a tuple: a scalar is a one-element list."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise MedkdError(f"sweep key '{key}' is an empty list; give at least one value")
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise MedkdError(f"sweep key '{key}' must hold numbers, got {values!r}") from None
    duplicates = sorted({v for v in out if out.count(v) > 1})
    if duplicates:
        raise MedkdError(f"sweep key '{key}' lists {', '.join(map(_short, duplicates))} more than once")
    return out


def _as_pairs(value: Any) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple((float(t), float(a)) for t, a in value)
    except (TypeError, ValueError):
        raise MedkdError(
            f"sweep key 'pairs' must be a list of [temperature, alpha] pairs like [[2, 0.2], [5, 0.5]], "
            f"got {value!r}"
        ) from None
    if not pairs:
        raise MedkdError("sweep key 'pairs' is an empty list; give at least one [temperature, alpha] pair")
    if len(set(pairs)) != len(pairs):
        raise MedkdError(f"sweep key 'pairs' lists a pair more than once: {value!r}")
    return pairs


def _short(value: float) -> str:
    """`2.0` → `2`, `0.2` → `0.2`, `1e-4` → `0.0001`: short, and exact (trial names must not collide)."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


@dataclass(frozen=True)
class SweepConfig:
    """A grid of distill runs: lists for the grid keys, one value for everything else.

    `alpha` × `temperature` is the grid, or `pairs` lists (temperature, alpha) pairs instead (Table 4).
    `alpha` and `temperature` left as None mean the distill defaults (0.2 and 2).
    """

    cache: str | None = None
    dataset: str | None = None
    size: int = 28
    alpha: tuple[float, ...] | None = None
    temperature: tuple[float, ...] | None = None
    pairs: tuple[tuple[float, float], ...] | None = None
    seed: tuple[int, ...] = (0,)
    lr: tuple[float, ...] = (1e-3,)
    student: str = "resnet50"
    student_size: int | None = None
    student_weights: str | None = None
    interpolation: str = "bicubic"
    epochs: int = 100
    batch_size: int = 32
    milestones: tuple[int, ...] | None = None
    patience: int | None = None
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    force: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.pairs is not None and (self.alpha is not None or self.temperature is not None):
            raise MedkdError(
                "give either pairs (a list of [temperature, alpha]) or the alpha × temperature grid, not both"
            )
        normal = {
            "alpha": None if self.alpha is None else _as_tuple("alpha", self.alpha, float),
            "temperature": None
            if self.temperature is None
            else _as_tuple("temperature", self.temperature, float),
            "pairs": None if self.pairs is None else _as_pairs(self.pairs),
            "seed": _as_tuple("seed", self.seed, int),
            "lr": _as_tuple("lr", self.lr, float),
        }
        for key, value in normal.items():
            object.__setattr__(self, key, value)
        for trial in self.grid():  # every trial must be a valid distill config before anything runs
            DistillConfig(**self.shared(), **trial)

    def shared(self) -> dict[str, Any]:
        """The distill options every trial has in common (everything but the grid and `out`)."""
        skip = {*GRID_KEYS, "pairs", "out"}
        # A distill option a sweep does not set (e.g. `resume`) keeps distill's default.
        keys = [k for k in config_fields(DistillConfig) if k not in skip and hasattr(self, k)]
        return {k: getattr(self, k) for k in keys}

    def grid(self) -> list[dict[str, Any]]:
        """The grid points in order: `{"alpha", "temperature", "seed", "lr"}` per trial."""
        if self.pairs is not None:
            points = [(a, t) for t, a in self.pairs]
        else:
            alphas = self.alpha if self.alpha is not None else (DistillConfig.alpha,)
            temperatures = self.temperature if self.temperature is not None else (DistillConfig.temperature,)
            points = list(itertools.product(alphas, temperatures))
        return [
            {"alpha": a, "temperature": t, "seed": s, "lr": lr}
            for lr, (a, t), s in itertools.product(self.lr, points, self.seed)
        ]

    def out_path(self) -> Path:
        """`--out`, else `runs/sweep_<cache name>_<student>` (or `_<dataset>_<size>` without a cache)."""
        if self.out:
            return Path(self.out)
        source = Path(self.cache).stem if self.cache else f"{self.dataset}_{self.size}"
        return Path("runs") / f"sweep_{source}_{self.student}"


def make_sweep_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> SweepConfig:
    """A SweepConfig from a config file's values and flags; a flag's grid replaces the file's grid.

    `--alpha`/`--temperature` on the command line drop the file's `pairs`, and `--pairs` drops the
    file's `alpha` and `temperature`, so a flag never collides with the file it overrides.
    """
    file_values = dict(file_values)
    given = {k for k, v in overrides.items() if v is not None}
    if given & {"alpha", "temperature"}:
        file_values.pop("pairs", None)
    if "pairs" in given:
        file_values.pop("alpha", None)
        file_values.pop("temperature", None)
    return make_config(SweepConfig, file_values, overrides)


def trial_name(trial: dict[str, Any], many_lrs: bool) -> str:
    """`a0.2_t2_s0`, with `_lr0.0001` appended when the sweep has more than one lr."""
    name = f"a{_short(trial['alpha'])}_t{_short(trial['temperature'])}_s{trial['seed']}"
    return name + (f"_lr{_short(trial['lr'])}" if many_lrs else "")


def expand(sweep: SweepConfig) -> list[dict[str, Any]]:
    """One JSON-plain DistillConfig dict per trial, with `out = <sweep out>/<trial name>`."""
    out, many_lrs = sweep.out_path(), len(sweep.lr) > 1
    trials = []
    for point in sweep.grid():
        cfg = DistillConfig(**sweep.shared(), **point, out=str(out / trial_name(point, many_lrs)))
        trials.append(to_dict(cfg))
    return trials


def _config(config: dict[str, Any]) -> DistillConfig:
    config = dict(config)
    if config.get("milestones") is not None:
        config["milestones"] = tuple(config["milestones"])
    try:
        cfg = DistillConfig(**config)
    except TypeError as err:  # a key DistillConfig does not know
        raise MedkdError(f"not a distill config: {err}".replace("__init__() ", "")) from err
    if not cfg.out:
        raise MedkdError("a sweep trial needs its run folder in 'out'")
    return cfg


def finished_result(config: dict[str, Any]) -> dict[str, Any] | None:
    """The result of this trial if its folder already holds it; None if it has not finished.

    A `result.json` of another config (or an unreadable one) is refused unless the trial has `force`.
    """
    cfg = _config(config)
    run_dir = Path(cfg.out)
    if not (run_dir / RESULT).exists():
        return None
    try:
        result = read_result(run_dir)
        stored = result.get("config_hash") if isinstance(result, dict) else None
    except MedkdError as err:
        stored, result = f"unreadable ({err})", None
    from medkd.cache import cache_fingerprint

    expected = config_hash(to_dict(cfg), cache_fingerprint(cfg.cache) if cfg.cache else None)
    if stored == expected:
        return result
    if cfg.force:
        return None
    raise MedkdError(
        f"{run_dir / RESULT} holds a run of another config (hash {stored}, this trial "
        f"{expected}); pass --force to retrain it, or --out elsewhere"
    )


def write_error(config: dict[str, Any], err: BaseException) -> None:
    """Record a trial's failure as `error.json` in its folder (made if need be); `medkd report` lists it."""
    import traceback

    run_dir = Path(config["out"])
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            run_dir / ERROR,
            {
                "error": f"{type(err).__name__}: {err}",
                "config": config,
                "traceback": "".join(traceback.format_exception(err)),
            },
        )
    except OSError:  # an unwritable folder: the caller still has the original error to report
        pass


def run_trial(
    config: dict[str, Any], cache: TeacherCache | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run one trial (a DistillConfig as a dict) unless its folder already holds its result; return it.

    `cache` is a `TeacherCache` already in memory (else `distill` reads `config["cache"]`). A run that
    fails leaves `error.json` in its folder, which `medkd report` lists, and raises.
    """
    from medkd.distill import distill

    cfg = _config(config)
    done = finished_result(config)
    if done is not None:
        return done
    run_dir = Path(cfg.out)
    (run_dir / ERROR).unlink(missing_ok=True)  # a retry: the old failure no longer describes the folder
    try:
        return distill(cfg, console=console, cache=cache)
    except Exception as err:
        write_error(to_dict(cfg), err)
        raise


def trial_status(config: dict[str, Any]) -> tuple[str, str]:
    """("finished", metrics) or ("failed", reason) of a trial that was run, read from its folder.

    The sweep refused foreign results before it started, so a result.json here is this trial's.
    """
    run_dir = Path(config["out"])
    try:
        result = read_result(run_dir)
    except MedkdError:
        result = None
    if isinstance(result, dict) and "test" in result:
        return "finished", (
            f"val AUC {result['val']['auc']:.4f}, test AUC {result['test']['auc']:.4f} "
            f"ACC {result['test']['acc']:.4f}"
        )
    try:
        return "failed", str(json.loads((run_dir / ERROR).read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return "failed", "no result.json: the trial did not finish"


def run_sweep(
    sweep: SweepConfig, console: Console | None = None, launch: LaunchConfig | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished trial of `sweep`, here one after another or on `launch`'s engine; return results.

    Locally the cache is read once, and only if a trial needs training; Ray and Slurm tasks open it
    themselves. A failed trial leaves error.json and the others go on; the sweep then fails with one line
    naming them, and rerunning it runs only those. Results are read back from disk.
    """
    from medkd.cache import MAKE_ONE
    from medkd.launch import LaunchConfig, check_launcher, launch_trials

    console = console or Console(stderr=True)
    launch = launch or LaunchConfig()
    check_launcher(launch)
    trials, out = expand(sweep), sweep.out_path()
    if sweep.cache is not None and not Path(sweep.cache).is_file():  # before anything is written
        raise MedkdError(f"teacher cache {sweep.cache} not found; {MAKE_ONE}")
    finished = [finished_result(config) is not None for config in trials]  # refuses a clash before any work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"sweep": to_dict(sweep), "trials": [Path(t["out"]).name for t in trials]})
    width, todo = len(str(len(trials))), []
    for i, config in enumerate(trials, 1):
        if finished[i - 1]:
            result = read_result(config["out"])
            console.print(
                f"[{i:>{width}}/{len(trials)}] {Path(config['out']).name} skipped (finished): "
                f"test AUC {result['test']['auc']:.4f}",
                soft_wrap=True,
            )
        else:
            todo.append(config)

    number = {t["out"]: i for i, t in enumerate(trials, 1)}

    def show(config: dict[str, Any], seconds: float) -> None:
        status, text = trial_status(config)
        prefix = f"[{number[config['out']]:>{width}}/{len(trials)}] {escape(Path(config['out']).name)}"
        verb = f"ran in {seconds:.0f} s" if status == "finished" else "[red]failed[/]"
        console.print(f"{prefix} {verb}: {escape(text)}", soft_wrap=True)

    if launch.launcher == "local":
        _run_here(sweep, launch, todo, console, show)
    elif todo:
        console.print(f"sweep {out}: {len(todo)} trial(s) to run on {launch.launcher}", soft_wrap=True)
        launch_trials(todo, launch, sweep.cache, out, lambda config: show(config, _wall_seconds(config)))
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


def _run_here(
    sweep: SweepConfig,
    launch: LaunchConfig,
    todo: list[dict[str, Any]],
    console: Console,
    show: Callable[[dict[str, Any], float], None],
) -> None:
    """The local launcher: the trials one after another in this process, sharing one in-memory cache."""
    from medkd.launch import TRIAL, file_sha256, provenance, stage_cache

    # With --quiet, distill's own progress bar and summary are silenced; the status line remains.
    trial_console = Console(stderr=True, quiet=True) if sweep.quiet else console
    cache = None
    for config in todo:
        started, start = time.time(), time.perf_counter()
        if cache is None and sweep.cache is not None:
            from medkd.cache import TeacherCache

            path = sweep.cache
            if launch.stage_cache:
                path = stage_cache(path, launch.stage_cache, file_sha256(path))
            cache = TeacherCache(path)
        try:
            run_trial(config, cache=cache, console=trial_console)
        except Exception:  # already in the trial's error.json, and shown below: the other trials go on
            pass
        else:
            write_json(Path(config["out"]) / TRIAL, provenance("local", started))
        show(config, time.perf_counter() - start)


def _wall_seconds(config: dict[str, Any]) -> float:
    """How long an engine's trial ran, from its trial.json (0 when it has none, e.g. it failed)."""
    from medkd.launch import TRIAL

    try:
        times = json.loads((Path(config["out"]) / TRIAL).read_text())
        return float(times["finished"]) - float(times["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
