"""Hyperparameter sweeps: a grid of student runs (alpha × temperature × seed × lr) from one teacher cache.

The cache is read once per process and every trial gets the same in-memory copy. Each trial is an
ordinary `distill` run in its own folder `<sweep out>/<trial name>`; a folder whose `result.json`
matches the trial's config is skipped, so a killed sweep resumes where it stopped. `run_trial` takes
and returns plain JSON-able dicts, so other launchers (Ray, Slurm) can call it as it is.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from medkd.config import DistillConfig, config_fields, make_config, to_dict
from medkd.errors import MedkdError
from medkd.runs import RESULT, config_hash, read_result, write_json

if TYPE_CHECKING:
    from medkd.cache import TeacherCache

GRID_KEYS = ("alpha", "temperature", "seed", "lr")
ERROR = "error.json"  # written into a trial's folder when its run fails after the folder was made


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
        return {k: getattr(self, k) for k in config_fields(DistillConfig) if k not in skip}

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
    if stored == config_hash(to_dict(cfg)):
        return result
    if cfg.force:
        return None
    raise MedkdError(
        f"{run_dir / RESULT} holds a run of another config (hash {stored}, this trial "
        f"{config_hash(to_dict(cfg))}); pass --force to retrain it, or --out elsewhere"
    )


def run_trial(
    config: dict[str, Any], cache: TeacherCache | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run one trial (a DistillConfig as a dict) unless its folder already holds its result; return it.

    `cache` is a `TeacherCache` already in memory (else `distill` reads `config["cache"]`). A run that
    fails after making its folder leaves `error.json` there, which `medkd report` lists.
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
        if run_dir.is_dir():
            write_json(run_dir / ERROR, {"error": f"{type(err).__name__}: {err}", "config": to_dict(cfg)})
        raise


def run_sweep(sweep: SweepConfig, console: Console | None = None) -> list[dict[str, Any]]:
    """Run every trial of `sweep` here, one after another, skipping finished ones; return their results.

    The cache is read once, and only if a trial needs training. Results are read back from disk.
    """
    from medkd.cache import MAKE_ONE

    console = console or Console(stderr=True)
    trials, out = expand(sweep), sweep.out_path()
    if sweep.cache is not None and not Path(sweep.cache).is_file():  # before anything is written
        raise MedkdError(f"teacher cache {sweep.cache} not found; {MAKE_ONE}")
    finished = [finished_result(config) is not None for config in trials]  # refuses a clash before any work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"sweep": to_dict(sweep), "trials": [Path(t["out"]).name for t in trials]})
    # With --quiet, distill's own progress bar and summary are silenced; the status line below remains.
    trial_console = Console(stderr=True, quiet=True) if sweep.quiet else console
    cache, width, ran = None, len(str(len(trials))), 0
    for i, config in enumerate(trials, 1):
        name, start = Path(config["out"]).name, time.perf_counter()
        prefix = f"[{i:>{width}}/{len(trials)}] {name}"
        if finished[i - 1]:
            result = read_result(config["out"])
            console.print(
                f"{prefix} skipped (finished): test AUC {result['test']['auc']:.4f}", soft_wrap=True
            )
            continue
        if cache is None and sweep.cache is not None:
            from medkd.cache import TeacherCache

            cache = TeacherCache(sweep.cache)
        result = run_trial(config, cache=cache, console=trial_console)
        ran += 1
        console.print(
            f"{prefix} ran in {time.perf_counter() - start:.0f} s: val AUC {result['val']['auc']:.4f}, "
            f"test AUC {result['test']['auc']:.4f} ACC {result['test']['acc']:.4f}",
            soft_wrap=True,
        )
    console.print(f"sweep {out}: {ran} trial(s) ran, {len(trials) - ran} skipped", soft_wrap=True)
    return [read_result(t["out"]) for t in trials]
