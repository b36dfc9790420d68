"""The run folder, the one owner of its files: names, the typed result, checkpoints, errors, trial times.

A run folder holds, once finished, `result.json` (a `RunResult`), `best.pt` (the best epoch's weights)
and `predictions.npz` (test labels and scores). While it trains, `last.pt` holds its latest epoch
(model, optimizer, scheduler, shuffling RNG, best-so-far), so `distill --resume` continues it; it is
removed when the run finishes. A sweep trial that failed leaves `error.json`; one that ran on a
launcher leaves `trial.json` (host, pid, job, start and end). Every file is written to a temporary name
and renamed (`medkd.files.atomic_path`): a folder without `result.json` is a run that did not finish.

A folder is medkd's when medkd marked it: `.medkd-run` (JSON: medkd version, created_utc, the config hash,
and the pid and host of its latest writer) is written when medkd creates or claims a run folder. A folder
of files medkd did not write is refused, with or without --force, so nothing of the user's is overwritten
or deleted; run folders of a medkd before the marker count as medkd's (`_older_run_folder`). The marker is
also the run folder's lock: the process writing the run holds an exclusive `flock` on it for the whole
run, so a second writer is refused, and the OS lets go of it when the holder dies, however it dies.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import platform
import socket
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from medkd import __version__
from medkd.config import ADDED_DEFAULTS, RUN_OPTIONS
from medkd.errors import MedkdError, first_line
from medkd.files import atomic_path, file_sha256, temporary_files, write_json

RESULT = "result.json"
CHECKPOINT = "best.pt"
PREDICTIONS = "predictions.npz"
EPOCH_CHECKPOINT = "last.pt"
ERROR = "error.json"
TRIAL = "trial.json"
SWEEP = "sweep.json"  # in a sweep's folder: its config and trial names
PROFILE = "profile.json"  # `medkd profile RUN`: the student's size and speed on a named machine
MARKER = ".medkd-run"  # medkd made or claimed this folder; its flock is held by the one process writing it
RUN_FILES = (RESULT, CHECKPOINT, PREDICTIONS, EPOCH_CHECKPOINT, ERROR, TRIAL, PROFILE)
# Any of these makes a folder a run folder (finished, unfinished or failed) for `medkd report`.
RUN_MARKERS = (RESULT, CHECKPOINT, PREDICTIONS, ERROR)
# 2: the grid keys (alpha, temperature, lr, seed, student) live in `config` only. 1 also copied them
# to the top level; it reads as 2.
RESULT_FORMAT = 2
LEGACY_COPIES = ("student", "alpha", "temperature", "lr", "seed")
RERUN = "rerun the run with `medkd distill --force`"


# What readers of a result use (report, sweeps, --resume), and the JSON types it must have: a result.json
# that is valid JSON of another shape ({"config": 5}, a metric "x") is one line, not a traceback where the
# value is first used.
NUMBER, TEXT, WHOLE, NONE = (int, float), (str,), (int,), (type(None),)
RESULT_TYPES = {
    "config": (dict,), "dataset": TEXT, "size": WHOLE, "val": (dict,), "test": (dict,),
    "student_size": WHOLE + NONE, "teacher": (dict, *NONE), "teachers": (list, *NONE),
    "teacher_weighting": TEXT + NONE, "augment": (dict, *NONE), "data_sha256": (dict,),
    "epochs_run": WHOLE + NONE, "best_epoch": WHOLE + NONE, "wall_seconds": NUMBER,
}  # fmt: skip
CONFIG_TYPES = {
    "student": TEXT, "alpha": NUMBER, "temperature": NUMBER, "lr": NUMBER, "seed": WHOLE,
    "epochs": WHOLE + NONE, "batch_size": WHOLE + NONE, "milestones": (list, *NONE), "patience": WHOLE + NONE,
    "interpolation": TEXT + NONE, "student_weights": TEXT + NONE, "feature_weight": NUMBER + NONE,
}  # fmt: skip
METRIC_TYPES = {"auc": NUMBER, "acc": NUMBER}
TEACHER_TYPES = {
    "teacher": TEXT + NONE, "teacher_input_size": WHOLE + NONE, "weights_sha256": TEXT + NONE,
    "cache": TEXT + NONE, "test_auc": NUMBER, "test_acc": NUMBER,
}  # fmt: skip
AUGMENT_TYPES = {"preset": TEXT, "views": WHOLE + NONE}
TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


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
    # Images resized to the student's size were rounded to 8 bits (`medkd.data.View.rounded`; runs of
    # medkd before it trained on the unrounded resize, and are evaluated and exported so).
    rounded: bool = False
    baseline: bool = False
    teacher: dict[str, Any] | None = None  # the cache's teacher, fingerprint and test metrics (one cache)
    teachers: list[dict[str, Any]] | None = None  # the same of every cache of a multi-teacher run
    teacher_weighting: str | None = None  # how a multi-teacher run weighed them (TEACHER_WEIGHTINGS)
    augment: dict[str, Any] | None = None  # {"preset", "views": K stored views or None (on the fly)}
    data_sha256: dict[str, str] = field(default_factory=dict)
    dataset_sha256: str | None = None  # the sha256 of a custom dataset's file (None for a MedMNIST flag)
    student_weights_sha256: str | None = None  # the sha256 of the --student-weights file it started from
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
        """Check a parsed result.json (format 1 or 2): its keys, and the JSON types of what readers use; a
        file that is not one is one line naming the gap."""
        if not isinstance(data, dict) or "medkd_result" not in data:
            raise MedkdError(f"{where} is not a medkd result (no 'medkd_result' key)")
        if data["medkd_result"] not in (1, RESULT_FORMAT):
            raise MedkdError(
                f"{where} has result format {data['medkd_result']}; this medkd reads 1 and {RESULT_FORMAT}: "
                f"upgrade medkd, or {RERUN}"
            )
        try:
            result = cls._checked(data, where)
        except (TypeError, ValueError, KeyError, AttributeError) as err:  # a shape no rule below names
            raise MedkdError(
                f"{where}: not a medkd result of the expected shape ({first_line(err)})"
            ) from err
        problem = _type_problem(result)
        if problem:
            raise MedkdError(f"{where}: {problem}; {RERUN}")
        return result

    @classmethod
    def _checked(cls, data: dict[str, Any], where: str | os.PathLike) -> RunResult:
        config = data.get("config")
        problem = _fields_problem(data, RESULT_TYPES, "") or _fields_problem(
            config if isinstance(config, dict) else {}, CONFIG_TYPES, "config."
        )
        if problem:
            raise MedkdError(f"{where}: {problem}; {RERUN}")
        known = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
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


def _wrong(value: Any, kinds: tuple[type, ...]) -> bool:
    return not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)


def _fields_problem(values: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> str | None:
    """The first present key of `values` whose value is not of its type in `types`, as a phrase."""
    for key, kinds in types.items():
        if key in values and _wrong(values[key], kinds):
            names = " or ".join(TYPE_NAMES.get(k, "null") for k in kinds if not (k is int and float in kinds))
            return f"{where}{key} must be {names}, got {repr(values[key])[:60]}"
    return None


def _type_problem(result: RunResult) -> str | None:
    """What in `result` the report cannot read (a key of the wrong JSON type), or None."""
    problem = _fields_problem(vars(result), RESULT_TYPES, "")
    if problem:
        return problem
    nested = [(result.config, CONFIG_TYPES, "config."), (result.augment or {}, AUGMENT_TYPES, "augment.")]
    nested += [(getattr(result, split), METRIC_TYPES, f"{split}.") for split in ("val", "test")]
    teachers = result.teacher_summaries()
    if any(not isinstance(t, dict) for t in teachers):
        return "teachers must be a list of objects"
    nested += [(t, TEACHER_TYPES, "teacher.") for t in teachers]
    for values, types, where in nested:
        problem = _fields_problem(values, types, where)
        if problem:
            return problem
    if any(("test_auc" in t) != ("test_acc" in t) for t in teachers):
        return "a teacher holds test_auc without test_acc, or test_acc without test_auc"
    if result.teachers and any(not isinstance(t.get("teacher"), str) for t in teachers):
        return "each of teachers must name its teacher (a string)"
    if any(_wrong(v, TEXT) for v in result.data_sha256.values()):
        return "data_sha256 must map splits to strings"
    if any(_wrong(m, WHOLE) for m in result.config.get("milestones") or ()):
        return "config.milestones must be a list of integers"
    return None


# ---------------------------------------------------------------- the config hash


def config_hash(
    config: dict[str, Any],
    cache_fingerprint: str | tuple[str, ...] | None = None,
    data_sha256: dict[str, str] | None = None,
    weights_sha256: str | None = None,
) -> str:
    """A short fingerprint of what a run computes: its config without the options that steer output and
    speed, not results (`medkd.config.RUN_OPTIONS`: out, device, threads, compile, trackers, …), and what it
    learns from, by content, not by path (`RunIdentity`).

    With a cache, pass its content fingerprint (`TeacherCache.fingerprint`), or all of them for several
    caches: a cache then counts by what it holds, not by its path, so a copy of the same cache elsewhere
    is the same config, and several caches count as a set, in any order. The fingerprint holds the data
    the cache was built from (and a run refuses other data), so the split sha256s `data_sha256` count only
    for a run without a cache. `weights_sha256`, the --student-weights file's sha256, stands for its path.
    """
    return _hash(config, RunIdentity(cache_fingerprint, data_sha256, weights_sha256), RUN_OPTIONS)


def legacy_config_hash(
    config: dict[str, Any],
    cache_fingerprint: str | tuple[str, ...] | None = None,
    data_sha256: dict[str, str] | None = None,
    weights_sha256: str | None = None,
) -> str:
    """The hash medkd 0.1 stored, which counted `download` too: only to accept its epoch checkpoints."""
    identity = RunIdentity(cache_fingerprint, data_sha256, weights_sha256)
    return _hash(config, identity, tuple(k for k in RUN_OPTIONS if k != "download"))


def _hash(config: dict[str, Any], identity: RunIdentity, skip: tuple[str, ...]) -> str:
    relevant = {
        k: v
        for k, v in config.items()
        if k not in skip and not (k in ADDED_DEFAULTS and ADDED_DEFAULTS[k] == v)
    }
    fingerprint = identity.fingerprint
    if config.get("cache") is not None and isinstance(fingerprint, str):
        relevant["cache"] = {"fingerprint": fingerprint}
    elif config.get("cache") is not None and fingerprint is not None:
        relevant["cache"] = {"fingerprints": sorted(fingerprint)}
    elif config.get("cache") is None and identity.data_sha256:
        relevant["data"] = {split: identity.data_sha256[split] for split in sorted(identity.data_sha256)}
    if config.get("student_weights") is not None and identity.weights_sha256:
        relevant["student_weights"] = {"sha256": identity.weights_sha256}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    """What a run learns from beside its config, by content: the caches' fingerprint (a tuple for several;
    None without), the data's split sha256s, the sha256 of the --student-weights file (None without).
    Known once per sweep and shared by its trials; JSON-plain through `to_json` for engine workers."""

    fingerprint: str | tuple[str, ...] | None = None
    data_sha256: dict[str, str] | None = None
    weights_sha256: str | None = None
    # The caches' fingerprints as medkd hashed them before they counted the labels (`legacy_fingerprint`),
    # so runs and checkpoints made then still count as this config.
    legacy_fingerprint: str | tuple[str, ...] | None = None

    def config_hash(self, config: dict[str, Any]) -> str:
        return config_hash(config, self.fingerprint, self.data_sha256, self.weights_sha256)

    def hashes(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The hashes a run or checkpoint of this config may carry: today's first, then medkd 0.1's (with
        --download), and both again with the caches' legacy fingerprint."""
        prints = [self.fingerprint]
        if self.legacy_fingerprint is not None and self.legacy_fingerprint != self.fingerprint:
            prints.append(self.legacy_fingerprint)
        found = []
        for p in prints:
            found.append(config_hash(config, p, self.data_sha256, self.weights_sha256))
            found.append(legacy_config_hash(config, p, self.data_sha256, self.weights_sha256))
        return tuple(found)

    def to_json(self) -> dict[str, Any]:
        fingerprint = list(self.fingerprint) if isinstance(self.fingerprint, tuple) else self.fingerprint
        legacy = self.legacy_fingerprint
        return {
            "fingerprint": fingerprint,
            "data_sha256": self.data_sha256,
            "weights_sha256": self.weights_sha256,
            "legacy_fingerprint": list(legacy) if isinstance(legacy, tuple) else legacy,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunIdentity:
        fingerprint, legacy = (
            tuple(v) if isinstance(v, list) else v
            for v in (data.get("fingerprint"), data.get("legacy_fingerprint"))
        )
        return cls(fingerprint, data.get("data_sha256"), data.get("weights_sha256"), legacy)


def student_weights_sha256(path: str | os.PathLike | None) -> str | None:
    """The sha256 of a --student-weights file (None without one, or when it is missing: the student's
    build then says so); remembered per file version, as a sweep asks once per trial."""
    if path is None or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return _weights_sha256(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _weights_sha256(path: str, _mtime_ns: int, _size: int) -> str:
    return file_sha256(path)


def same_experiment(result: RunResult, expected_hash: str | tuple[str, ...]) -> bool:
    """Does this result come from the config with `expected_hash`? Recomputed from its stored config, cache
    fingerprint, data sha256s and student weights sha256, so results written under medkd 0.1's hash rule
    (which counted --download) match. A result that started from --student-weights without the file's
    sha256 (medkd before it counted the file) is another config: what it started from is not known."""
    identity = RunIdentity(result.fingerprint(), result.data_sha256, result.student_weights_sha256)
    expected = (expected_hash,) if isinstance(expected_hash, str) else expected_hash
    return identity.config_hash(result.config) in expected


# ---------------------------------------------------------------- the folder


def foreign_files(run_dir: str | os.PathLike) -> list[str]:
    """The files in `run_dir` that medkd did not write, by name: none when the folder is missing, holds no
    files (subfolders aside), carries the marker, or is a run folder of a medkd before the marker."""
    run_dir = Path(run_dir)
    try:
        names = sorted(e.name for e in os.scandir(run_dir) if not e.is_dir(follow_symlinks=False))
    except OSError:  # missing, a file, or unreadable: making or writing the folder says what is wrong
        return []
    if not names or MARKER in names or _older_run_folder(run_dir, names):
        return []
    return names


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Refuse a folder that holds files medkd did not write (the user's, whatever their names)."""
    names = foreign_files(run_dir)
    if names:
        shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        raise MedkdError(
            f"{run_dir} holds files medkd did not write ({shown}); give --out a new or empty folder"
        )


def _older_run_folder(run_dir: Path, names: list[str]) -> bool:
    """A run folder of a medkd before the marker: its result.json, trial.json or error.json in medkd's
    format, or an epoch checkpoint of medkd's (a killed run to resume)."""
    signs = {
        RESULT: lambda d: "medkd_result" in d,
        TRIAL: lambda d: {"launcher", "started", "finished"} <= set(d),
        ERROR: lambda d: {"error", "config"} <= set(d),
    }
    for name, looks_right in signs.items():
        if name in names and looks_right(_json_object(run_dir / name)):
            return True
    return EPOCH_CHECKPOINT in names and checkpoint_hash(run_dir / EPOCH_CHECKPOINT) is not None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunDirBusy(MedkdError):
    """Another process holds the run folder's lock: it is writing that run now."""


# The run folders this process holds, by real path, so a trial that claims its folder can call `distill`,
# which claims it too. A flock belongs to one open file: a second open in this process would be refused.
_CLAIMS: dict[str, _Claim] = {}


@contextmanager
def claim_run_dir(run_dir: str | os.PathLike, chash: str = "") -> Iterator[None]:
    """Be `run_dir`'s one writer until the block ends: refuse a folder of files medkd did not write, make
    the folder, and lock its marker (non-blocking: a folder another process writes is `RunDirBusy`, with
    its pid). Re-entrant in one process. A block that fails having changed no other file in the folder
    puts the marker back as it was (a marker it made is removed) and, if the run's work had not begun
    (`prepare_run_dir`), removes the folders it made: bad input leaves the disk as it was."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _CLAIMS:
        _CLAIMS[key].write(chash)
        yield
        return
    check_run_dir(run_dir)
    claim = _Claim.take(run_dir, chash)
    _CLAIMS[key] = claim
    try:
        yield
    except BaseException:
        claim.undo_if_untouched()
        raise
    finally:
        del _CLAIMS[key]
        os.close(claim.fd)  # lets go of the lock


@dataclass
class _Claim:
    run_dir: Path
    fd: int  # the marker, opened and locked
    made_dirs: list[Path]  # the folders the claim made, deepest first
    old_marker: bytes | None  # the marker's content before the claim (None: the claim made it)
    before: dict[str, tuple[int, int]]  # the folder's other files before the claim: name → (mtime_ns, size)
    started: bool = False  # the run's work began (`prepare_run_dir`): its folder stays

    @classmethod
    def take(cls, run_dir: Path, chash: str) -> _Claim:
        if run_dir.exists() and not run_dir.is_dir():
            raise MedkdError(
                f"cannot create run folder {run_dir}: it is a file; give --out a new or empty folder"
            )
        before = _files(run_dir)
        made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MedkdError(f"cannot create run folder {run_dir}: {err.strerror}") from err
        try:
            fd, made_marker = _lock_marker(run_dir)
        except BaseException:
            _remove_dirs(made)
            raise
        claim = cls(run_dir, fd, made, None if made_marker else _read_all(fd), before)
        claim.write(chash)
        return claim

    def write(self, chash: str) -> None:
        """The marker's content: kept from its first writer (created_utc), else this process's. Written in
        place under the lock, not renamed into place: a new file would carry no lock."""
        try:
            old = json.loads(_read_all(self.fd) or b"{}")
        except ValueError:
            old = {}
        old = old if isinstance(old, dict) else {}
        marker = {
            "medkd_run": 1,
            "medkd_version": __version__,
            "created_utc": old.get("created_utc") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config_hash": chash or old.get("config_hash", ""),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        _write_all(self.fd, (json.dumps(marker, indent=2) + "\n").encode())

    def undo_if_untouched(self) -> None:
        """After a failure that changed no other file in the folder: the marker as it was (or gone, if the
        claim made it), and before the run's work began, the folders the claim made gone too."""
        if _files(self.run_dir) != self.before:
            return
        if self.old_marker is None:
            (self.run_dir / MARKER).unlink(missing_ok=True)
        else:
            _write_all(self.fd, self.old_marker)
        if not self.started:
            _remove_dirs(self.made_dirs)


def _read_all(fd: int) -> bytes:
    return os.pread(fd, max(os.fstat(fd).st_size, 1), 0)


def _write_all(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """The folder's files but the marker: name → (mtime_ns, size)."""
    try:
        entries = [e for e in os.scandir(folder) if not e.is_dir(follow_symlinks=False) and e.name != MARKER]
        return {e.name: (e.stat().st_mtime_ns, e.stat().st_size) for e in entries}
    except OSError:
        return {}


def _remove_dirs(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that is not empty now is someone's
        try:
            folder.rmdir()
        except OSError:
            return


def _lock_marker(run_dir: Path) -> tuple[int, bool]:
    """Open the marker (made if missing) and lock it; (its file descriptor, whether it was made here)."""
    path = run_dir / MARKER
    while True:
        try:
            try:
                fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                fd, made = os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # removed between the two opens (an undone claim): try again
            continue
        except OSError as err:
            raise MedkdError(
                f"run folder {run_dir} is not writable ({err.strerror}); --out elsewhere"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(
                f"{run_dir} is being written by another medkd process ({marker_holder(run_dir)}); wait for "
                f"it or --out elsewhere"
            ) from None
        except OSError:  # a file system without locks (some NFS and Lustre mounts): nothing to hold
            pass
        if _same_file(fd, path):
            return fd, made
        os.close(fd)  # the marker opened was taken away meanwhile (an undone claim): lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def marker_holder(run_dir: str | os.PathLike) -> str:
    """Who wrote the run folder last, from its marker: `pid N` (`on HOST` when another host)."""
    marker = _json_object(Path(run_dir) / MARKER)
    if "pid" not in marker:
        return "pid unknown"
    host = marker.get("host")
    return f"pid {marker['pid']}" + (f" on {host}" if host and host != socket.gethostname() else "")


def run_dir_busy(run_dir: str | os.PathLike) -> bool:
    """Is another process writing `run_dir` now (holding its marker's lock)? A quick shared probe."""
    if os.path.realpath(run_dir) in _CLAIMS:
        return False
    try:
        fd = os.open(Path(run_dir) / MARKER, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """In a claimed run folder (`claim_run_dir`): refuse a finished run there unless `force`, and drop the
    temporary files of killed writers (in medkd's own folder only: the user's are never touched)."""
    assert os.path.realpath(run_dir) in _CLAIMS, f"{run_dir} is not claimed"
    _CLAIMS[os.path.realpath(run_dir)].started = True
    if (run_dir / RESULT).exists() and not force:
        raise MedkdError(
            f"{run_dir} already holds a finished run; pass --force to overwrite or --out elsewhere"
        )
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
    """Record a trial's failure as `error.json` in its folder (made if need be); `medkd report` lists it.
    Not in a folder of files medkd did not write: the failure is then that folder's, and says so."""
    run_dir = Path(run_dir)
    if foreign_files(run_dir):
        return
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


def checkpoint_hash(path: Path) -> str | None:
    """The config hash a medkd epoch checkpoint was saved under; None when `path` is not one (missing,
    unreadable, someone else's). Maps the file instead of reading its tensors: cheap for a big model."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a file that is not its own; all mean "not one"
        return None
    if not isinstance(stored, dict) or not {"model", "loop"} <= set(stored):
        return None
    return str(stored.get("config_hash", ""))


def versions() -> dict[str, str]:
    return {
        "medkd": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


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


def problem_line(problem: dict[str, Any]) -> str:
    return f"{problem['status']}: {problem['run_dir']} ({problem['reason']})"
