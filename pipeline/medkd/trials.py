"""One idempotent trial, and the loop over trials that the local, Ray and Slurm launchers all run.

A trial is a `DistillConfig` as a JSON-plain dict whose `out` is its run folder. What makes it safe to
run more than once (retries, requeues, a rerun of the whole sweep, two sweeps on one folder) lives here:
a trial holds its folder's lock while it runs (`medkd.runs.claim_run_dir`), so a folder another process
is writing is skipped, not trained twice; under the lock, a trial whose folder already holds its result
returns it, and one killed mid-run resumes from its epoch checkpoint; every file is written to a
temporary name and renamed; a failure becomes `error.json` in its folder; the cache is opened by the
process that runs the trial, read-only.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from medkd.cache import TeacherCache, run_fingerprint
from medkd.config import DistillConfig, cache_paths, to_dict
from medkd.distill import Inputs, distill, load_inputs, resumable
from medkd.errors import MedkdError
from medkd.files import atomic_path, file_sha256
from medkd.runs import (
    CHECKPOINT,
    EPOCH_CHECKPOINT,
    ERROR,
    RESULT,
    RunDirBusy,
    RunIdentity,
    RunResult,
    claim_run_dir,
    foreign_files,
    marker_holder,
    read_error,
    read_result,
    run_dir_busy,
    same_experiment,
    student_weights_sha256,
    write_error,
    write_trial,
)


def trial_config(config: dict[str, Any]) -> DistillConfig:
    """The DistillConfig of a trial dict; a dict that is not one is one line."""
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


def trial_identity(cfg: DistillConfig) -> RunIdentity:
    """What a trial's config hash counts beside its config, read from the files: the caches' fingerprints,
    the --student-weights file's sha256 and, for a trial without a cache (whose data no fingerprint holds),
    the data's split sha256s, which loads the data. A sweep knows it once for all its trials instead."""
    data = load_inputs(cfg).data_sha256 if not cache_paths(cfg.cache) else None
    weights = student_weights_sha256(cfg.student_weights)
    return RunIdentity(run_fingerprint(cfg.cache), data, weights, run_fingerprint(cfg.cache, legacy=True))


def finished_result(config: dict[str, Any], identity: RunIdentity | None = None) -> RunResult | None:
    """The result of this trial if its folder already holds it; None if it has not finished.

    `identity` is what the trial learns from (`trial_identity`, read from the files when not given). A
    `result.json` of another config (or an unreadable one) is refused unless the trial has `force`.
    """
    cfg = trial_config(config)
    run_dir = Path(cfg.out)
    if not (run_dir / RESULT).exists():
        return None
    identity = identity or trial_identity(cfg)
    hashes = identity.hashes(to_dict(cfg))  # today's first
    try:
        result = read_result(run_dir)
    except MedkdError as err:
        result, stored = None, f"unreadable ({err})"
    else:
        if same_experiment(result, hashes):
            return result
        stored = result.config_hash
    if cfg.force:
        return None
    raise MedkdError(
        f"{run_dir / RESULT} holds a run of another config (hash {stored}, this trial "
        f"{hashes[0]}); pass --force to retrain it, or --out elsewhere"
    )


def run_trial(
    config: dict[str, Any],
    cache: TeacherCache | list[TeacherCache] | None = None,
    console: Console | None = None,
    inputs: Inputs | None = None,
    identity: RunIdentity | None = None,
) -> RunResult:
    """Run one trial unless its folder already holds its result; return the result.

    `cache` is the `TeacherCache` (or, for several caches, the list) already in memory (else `distill`
    reads `config["cache"]`); `inputs` the caches and data a sweep read once (`load_inputs`), `identity`
    what it learns from. A folder another process is writing is `RunDirBusy`. A trial killed mid-run
    resumes from its epoch checkpoint when that is of this config, else starts over. A run that fails
    leaves `error.json` in its folder, which `medkd report` lists, and raises.
    """
    return claimed_trial(config, cache, console, inputs, identity)[0]


def claimed_trial(
    config: dict[str, Any],
    cache: TeacherCache | list[TeacherCache] | None,
    console: Console | None,
    inputs: Inputs | None,
    identity: RunIdentity | None,
    launcher: str | None = None,
) -> tuple[RunResult, bool]:
    """`run_trial` with whether it trained (False: the folder held its result); `launcher`: write
    trial.json. The finished check, the resume and the training all happen under the folder's lock."""
    cfg = trial_config(config)
    run_dir, started = Path(cfg.out), time.time()
    with claim_run_dir(run_dir):
        if identity is None and ((run_dir / RESULT).exists() or (run_dir / EPOCH_CHECKPOINT).exists()):
            identity = inputs.identity(cfg) if inputs is not None else trial_identity(cfg)
        done = finished_result(config, identity)
        if done is not None:
            return done, False
        (run_dir / ERROR).unlink(missing_ok=True)  # a retry: the old failure no longer describes the folder
        resume = identity is not None and resumable(run_dir, to_dict(cfg), identity)
        if (run_dir / EPOCH_CHECKPOINT).exists() and not resume:
            (console or Console(stderr=True, quiet=cfg.quiet)).print(
                f"{escape(str(run_dir))}: its epoch checkpoint is of another config (or has no {CHECKPOINT} "
                f"beside it), so the trial starts over",
                soft_wrap=True,
            )
        try:
            result = distill(
                dataclasses.replace(cfg, resume=resume), console=console, cache=cache, inputs=inputs
            )
        except Exception as err:
            write_error(run_dir, config, err)
            raise
        if launcher is not None:
            write_trial(run_dir, trial_times(launcher, started))
        return result, True


def trial_status(config: dict[str, Any]) -> tuple[str, str]:
    """("finished", metrics), ("elsewhere", who) or ("failed", reason) of a trial that was run, read
    from its folder; "elsewhere": another process is writing it now.

    The sweep refused foreign results before it started, so a result.json here is this trial's.
    """
    run_dir = Path(config["out"])
    try:
        result = read_result(run_dir)
    except MedkdError:
        reason = read_error(run_dir)
        if reason is None and run_dir_busy(run_dir):
            return "elsewhere", f"running elsewhere ({marker_holder(run_dir)})"
        if reason is None and foreign_files(run_dir):
            reason = f"{run_dir} holds files medkd did not write; give the trial a new or empty folder"
        return "failed", reason or "no result.json: the trial did not finish"
    return "finished", (
        f"val AUC {result.val['auc']:.4f}, test AUC {result.test['auc']:.4f} ACC {result.test['acc']:.4f}"
    )


def trial_env(
    cache: str | tuple[str, ...] | None,
    launcher: str,
    stage_dir: str | None,
    identity: RunIdentity | None = None,
) -> dict[str, Any]:
    """What every trial gets besides its config: the caches' absolute paths, where to stage them, and what
    the trials learn from (`identity`, known once per sweep: workers then read no file to know it)."""
    paths = [str(Path(p).resolve()) for p in cache_paths(cache)]
    return {
        "caches": paths,
        # Hashed once here, so each node checks its copy against the file the sweep was started with.
        "cache_sha256": [file_sha256(p) for p in paths] if stage_dir and paths else None,
        "stage_dir": stage_dir if paths else None,
        "launcher": launcher,
        "identity": identity.to_json() if identity is not None else None,
    }


def run_trials(
    configs: list[dict[str, Any]],
    env: dict[str, Any],
    console: Console | None = None,
    on_done: Callable[[dict[str, Any], float, str], None] | None = None,
    inputs: Inputs | None = None,
) -> list[str]:
    """Run trials one after another in this process; return "ran"/"done"/"failed"/"elsewhere" for each.

    The local launcher calls this with all its trials and the `inputs` it read once (every trial shares
    them), a Ray task or Slurm array task with its share. Without `inputs` the caches are opened (staged
    first with `stage_dir`) once, when the first trial that needs training starts. No exception escapes:
    a failure is that trial's error.json; a trial whose folder another process is writing is skipped as
    "elsewhere" (not a failure). `on_done(config, seconds, status)` runs after each trial.
    """
    opened: list[TeacherCache] = []
    identity = RunIdentity.from_json(env["identity"]) if env.get("identity") else None

    def open_cache() -> TeacherCache | list[TeacherCache] | None:
        if not env["caches"] or inputs is not None:
            return None
        if not opened:
            for i, path in enumerate(env["caches"]):
                if env["stage_dir"]:
                    path = stage_cache(path, env["stage_dir"], env["cache_sha256"][i])
                opened.append(TeacherCache(path))
        return opened[0] if len(opened) == 1 else list(opened)

    statuses = []
    for config in configs:
        start = time.perf_counter()
        try:
            if finished_result(config, identity) is not None:  # a retry or requeue of a trial that finished
                status = "done"
            else:
                _, trained = claimed_trial(config, open_cache(), console, inputs, identity, env["launcher"])
                status = "ran" if trained else "done"  # "done": it finished elsewhere meanwhile
        except RunDirBusy:
            status = "elsewhere"
        except Exception as err:  # the trial's own failure: recorded in its folder, the others go on
            write_error(config["out"], config, err)
            status = "failed"
        statuses.append(status)
        if on_done is not None:
            on_done(config, time.perf_counter() - start, status)
    return statuses


def trial_times(launcher: str, started: float) -> dict[str, Any]:
    """trial.json: where the trial ran (host, pid, Slurm job) and when (epoch seconds)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "launcher": launcher,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": f"{job}_{task}" if job and task else job,
        "started": started,
        "finished": time.time(),
    }


def stage_cache(source: str | os.PathLike, stage_dir: str | os.PathLike, sha256: str) -> Path:
    """Copy the cache `source` into `stage_dir` (node-local disk) once per node; return the checked copy.

    The copy goes to a temporary name, is checked against `sha256` and only then renamed, so a reader
    never sees a half or corrupt copy; a lock file makes trials racing on one node copy it once (and
    the rename keeps them safe where the folder's file system ignores locks). The copy's name holds
    the hash, so a rebuilt cache is staged anew. `stage_dir` may use `~` and `$VARS` (`$TMPDIR`),
    expanded on the node.
    """
    stage_dir = Path(os.path.expandvars(os.path.expanduser(str(stage_dir))))
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedkdError(f"cannot create the --stage-cache folder {stage_dir}: {err.strerror}") from err
    staged = stage_dir / f"{Path(source).stem}.{sha256[:16]}.h5"
    if staged.is_file():
        return staged
    with open(stage_dir / f".{staged.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if staged.is_file():  # another trial on this node staged it while we waited
            return staged
        with atomic_path(staged) as tmp:
            shutil.copyfile(source, tmp)
            copied = file_sha256(tmp)
            if copied != sha256:
                raise MedkdError(
                    f"the copy of {source} in {stage_dir} has sha256 {copied[:12]}…, the cache "
                    f"{sha256[:12]}…: "
                    f"the cache changed during the sweep or the copy is corrupt; rerun the sweep"
                )
    return staged
