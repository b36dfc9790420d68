"""The run folder, the one owner of its files: names, the typed result, checkpoints, errors, trial times.

A run folder holds, once finished, `result.json` (a `RunResult`), `best.pt` (the best epoch's weights)
and `predictions.npz` (test labels and scores). While it trains, `last.pt` holds its latest epoch
(model, optimizer, scheduler, shuffling RNG, best-so-far), so `distill --resume` continues it; it is
removed when the run finishes. A sweep trial that failed leaves `error.json`; one that ran on a
launcher leaves `trial.json` (host, pid, job, start and end). Every file is written to a temporary name
and renamed (`medkd.files.atomic_path`): a folder without `result.json` is a run that did not finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from medkd import __version__
from medkd.config import ADDED_DEFAULTS, RUN_OPTIONS
from medkd.errors import MedkdError, first_line
from medkd.files import atomic_path, temporary_files, write_json

RESULT = "result.json"
CHECKPOINT = "best.pt"
PREDICTIONS = "predictions.npz"
EPOCH_CHECKPOINT = "last.pt"
ERROR = "error.json"
TRIAL = "trial.json"
SWEEP = "sweep.json"  # in a sweep's folder: its config and trial names
PROFILE = "profile.json"  # `medkd profile RUN`: the student's size and speed on a named machine
RUN_FILES = (RESULT, CHECKPOINT, PREDICTIONS, EPOCH_CHECKPOINT, ERROR, TRIAL, PROFILE)
# Any of these makes a folder a run folder (finished, unfinished or failed) for `medkd report`.
RUN_MARKERS = (RESULT, CHECKPOINT, PREDICTIONS, ERROR)
# 2: the grid keys (alpha, temperature, lr, seed, student) live in `config` only. 1 also copied them
# to the top level; it reads as 2.
RESULT_FORMAT = 2
LEGACY_COPIES = ("student", "alpha", "temperature", "lr", "seed")


@dataclass
class RunResult:
    """What `result.json` holds: the config, what it was trained from, and what came out."""

    config: dict[str, Any]  # the DistillConfig as saved (`medkd.config.to_dict`)
    dataset: str
    size: int
    val: dict[str, float]  # {"auc", "acc"} of the best epoch
    test: dict[str, float]
    run_dir: str = ""
    config_hash: str = ""
    task: str = ""
    n_outputs: int = 0
    student_size: int | None = None
    baseline: bool = False
    teacher: dict[str, Any] | None = None  # the cache's teacher, fingerprint and test metrics (one cache)
    teachers: list[dict[str, Any]] | None = None  # the same of every cache of a multi-teacher run
    teacher_weighting: str | None = None  # how a multi-teacher run weighed them (TEACHER_WEIGHTINGS)
    augment: dict[str, Any] | None = None  # {"preset", "views": K stored views or None (on the fly)}
    data_sha256: dict[str, str] = field(default_factory=dict)
    dataset_sha256: str | None = None  # the sha256 of a custom dataset's file (None for a MedMNIST flag)
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int = 0
    wall_seconds: float = float("nan")
    train_images_per_second: float = float("nan")
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    medkd_result: int = RESULT_FORMAT

    @property
    def student(self) -> str:
        return self.config["student"]

    @property
    def alpha(self) -> float:
        return float(self.config["alpha"])

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    @property
    def lr(self) -> float:
        return float(self.config["lr"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def fingerprint(self) -> str | tuple[str, ...] | None:
        """The content fingerprint of the cache the run learned from (all of them for several caches;
        None without a cache)."""
        if self.teachers:
            return tuple(t["fingerprint"] for t in self.teachers)
        return (self.teacher or {}).get("fingerprint")

    def teacher_summaries(self) -> list[dict[str, Any]]:
        """Every cache's summary the run learned from: one, several, or none."""
        return self.teachers or ([self.teacher] if self.teacher else [])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str | os.PathLike) -> RunResult:
        """Check a parsed result.json (format 1 or 2); a file that is not one is one line naming the gap."""
        if not isinstance(data, dict) or "medkd_result" not in data:
            raise MedkdError(f"{where} is not a medkd result (no 'medkd_result' key)")
        if data["medkd_result"] not in (1, RESULT_FORMAT):
            raise MedkdError(
                f"{where} has result format {data['medkd_result']}; this medkd reads 1 and {RESULT_FORMAT}: "
                f"upgrade medkd, or rerun the run with `medkd distill --force`"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
        config = data.get("config")
        if isinstance(config, dict):
            missing += [k for k in LEGACY_COPIES if k not in config]
        if missing:
            raise MedkdError(f"{where} lacks {', '.join(missing)}")
        for split in ("val", "test"):
            if not isinstance(data[split], dict) or not {"auc", "acc"} <= set(data[split]):
                raise MedkdError(f"{where}: '{split}' must hold auc and acc, got {data[split]!r}")
        # Format 1 copied these config keys to the top level; the copies must agree, then they go.
        for key in LEGACY_COPIES:
            if key in data and data[key] != config[key]:
                raise MedkdError(
                    f"{where}: top-level {key} {data[key]!r} differs from config {config[key]!r}"
                )
        values = {k: v for k, v in data.items() if k in known}
        values["medkd_result"] = RESULT_FORMAT
        values.setdefault("baseline", float(config["alpha"]) == 1.0)
        return cls(**values)


# ---------------------------------------------------------------- the config hash


def config_hash(config: dict[str, Any], cache_fingerprint: str | tuple[str, ...] | None = None) -> str:
    """A short fingerprint of what a run computes: its config without the options that steer output
    (`medkd.config.RUN_OPTIONS`: out, force, quiet, data_dir, device, resume, download).

    With a cache, pass its content fingerprint (`TeacherCache.fingerprint`), or all of them for several
    caches: a cache then counts by what it holds, not by its path, so a copy of the same cache elsewhere
    is the same config, and several caches count as a set, in any order.
    """
    return _hash(config, cache_fingerprint, RUN_OPTIONS)


def legacy_config_hash(config: dict[str, Any], cache_fingerprint: str | tuple[str, ...] | None = None) -> str:
    """The hash medkd 0.1 stored, which counted `download` too: only to accept its epoch checkpoints."""
    return _hash(config, cache_fingerprint, tuple(k for k in RUN_OPTIONS if k != "download"))


def _hash(
    config: dict[str, Any], cache_fingerprint: str | tuple[str, ...] | None, skip: tuple[str, ...]
) -> str:
    relevant = {
        k: v
        for k, v in config.items()
        if k not in skip and not (k in ADDED_DEFAULTS and ADDED_DEFAULTS[k] == v)
    }
    if config.get("cache") is not None and isinstance(cache_fingerprint, str):
        relevant["cache"] = {"fingerprint": cache_fingerprint}
    elif config.get("cache") is not None and cache_fingerprint is not None:
        relevant["cache"] = {"fingerprints": sorted(cache_fingerprint)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def same_experiment(result: RunResult, expected_hash: str) -> bool:
    """Does this result come from the config with `expected_hash`? Recomputed from its stored config and
    cache fingerprint, so results written under medkd 0.1's hash rule (which counted --download) match."""
    return config_hash(result.config, result.fingerprint()) == expected_hash


# ---------------------------------------------------------------- the folder


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Create `run_dir`; refuse a finished run there unless `force` (unfinished leftovers are replaced)."""
    if (run_dir / RESULT).exists() and not force:
        raise MedkdError(
            f"{run_dir} already holds a finished run; pass --force to overwrite or --out elsewhere"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedkdError(f"cannot create run folder {run_dir}: {err.strerror}") from err
    if not os.access(run_dir, os.W_OK):
        raise MedkdError(f"run folder {run_dir} is not writable")
    # Temporary files of a killed writer are never renamed: they are ours to drop.
    for name in RUN_FILES:
        for leftover in temporary_files(run_dir, name):
            leftover.unlink(missing_ok=True)


def write_result(run_dir: str | os.PathLike, result: RunResult) -> None:
    """Write `result.json`, checked by the same validator that reads it."""
    data = result.to_json()
    RunResult.from_json(data, Path(run_dir) / RESULT)
    write_json(Path(run_dir) / RESULT, data)


def read_result(run_dir: str | os.PathLike) -> RunResult:
    """The result of a finished run, or a one-line error saying what is wrong with its result.json."""
    path = Path(run_dir) / RESULT
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MedkdError(f"{path} not found: the run did not finish") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedkdError(f"{path} is not valid JSON ({err})") from err
    return RunResult.from_json(data, path)


def write_predictions(run_dir: Path, y_true: Any, y_score: Any, task: str) -> None:
    with atomic_path(run_dir / PREDICTIONS) as tmp, open(tmp, "wb") as f:
        np.savez(f, y_true=y_true, y_score=y_score, task=np.array(task))


def read_predictions(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """`predictions.npz` as `{"y_true", "y_score", "task"}`; a missing or unreadable file is one line."""
    path = Path(run_dir) / PREDICTIONS
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in ("y_true", "y_score", "task")}
    except FileNotFoundError:
        raise MedkdError(
            f"run {run_dir} has no {PREDICTIONS}; rerun it with `medkd distill --force`"
        ) from None
    except Exception as err:  # a damaged zip raises several types; all mean the same here
        raise MedkdError(f"cannot read {path} as a medkd {PREDICTIONS} ({first_line(err)})") from err
    data["task"] = str(data["task"])
    return data


def write_error(run_dir: str | os.PathLike, config: dict[str, Any], err: BaseException) -> None:
    """Record a trial's failure as `error.json` in its folder (made if need be); `medkd report` lists it."""
    run_dir = Path(run_dir)
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


def read_error(run_dir: str | os.PathLike) -> str | None:
    """The one-line reason in a folder's `error.json`; None if it has none or it cannot be read."""
    try:
        return str(json.loads((Path(run_dir) / ERROR).read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_trial(run_dir: str | os.PathLike, times: dict[str, Any]) -> None:
    write_json(Path(run_dir) / TRIAL, times)


def trial_seconds(run_dir: str | os.PathLike) -> float:
    """How long a launched trial ran, from its trial.json (0 when it has none, e.g. it failed)."""
    try:
        times = json.loads((Path(run_dir) / TRIAL).read_text())
        return float(times["finished"]) - float(times["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """A medkd checkpoint (weights only): a dict; anything else is one line saying `what` it should be."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for a damaged file; all mean the same here
        raise MedkdError(f"cannot read {path} as {what} ({first_line(err)})") from err
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise MedkdError(f"{path} is not {what} (no 'model' state dict)")
    return stored


def versions() -> dict[str, str]:
    return {
        "medkd": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
