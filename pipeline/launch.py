"""Scale-out for `medkd sweep`: the same trials as Ray core tasks or a Slurm job array (submitit).

The engines only schedule. What makes a trial safe to run more than once (retries, requeues, a rerun
of the whole sweep) lives in the trial: a JSON-plain config, a finished trial returns its result.json
(`medkd.sweep.run_trial`), every file is written to a temporary name and renamed, a failure becomes
`error.json` in the trial's folder, and the cache is opened inside the trial, read-only with HDF5
locking off. The sweep then reads what happened from the run folders, never from the engine.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medkd.data import file_sha256
from medkd.errors import MedkdError
from medkd.runs import RESULT, atomic_path, write_json

LAUNCHERS = ("local", "ray", "slurm")
ENGINES = {"ray": "ray", "slurm": "submitit"}  # launcher → the module it needs
SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit executors; "local" runs the array as local processes
TRIAL = "trial.json"  # where and when a trial ran: host, pid, launcher, job id, start and end (epoch s)


@dataclass(frozen=True)
class LaunchConfig:
    """Where a sweep's trials run and what each one is given (`medkd sweep --launcher ...`)."""

    launcher: str = "local"
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time_min: int = 60
    slurm_max_parallel: int | None = None
    slurm_trials_per_job: int = 1
    slurm_cluster: str = "slurm"
    stage_cache: str | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise MedkdError(message)

        check(
            self.launcher in LAUNCHERS, f"unknown --launcher '{self.launcher}'; valid: {', '.join(LAUNCHERS)}"
        )
        check(self.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial:g}")
        check(self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial:g}")
        check(self.slurm_time_min >= 1, f"--slurm-time-min must be >= 1, got {self.slurm_time_min}")
        check(
            self.slurm_max_parallel is None or self.slurm_max_parallel >= 1,
            f"--slurm-max-parallel must be >= 1, got {self.slurm_max_parallel}",
        )
        check(
            self.slurm_trials_per_job >= 1,
            f"--slurm-trials-per-job must be >= 1, got {self.slurm_trials_per_job}",
        )
        check(
            self.slurm_cluster in SLURM_CLUSTERS,
            f"unknown slurm_cluster '{self.slurm_cluster}'; valid: {', '.join(SLURM_CLUSTERS)}",
        )
        # Options of another launcher are almost always a forgotten --launcher: say so instead of ignoring.
        check(self.launcher == "ray" or self.ray_address is None, "--ray-address needs --launcher ray")
        for name in ("slurm_partition", "slurm_max_parallel"):
            check(
                self.launcher == "slurm" or getattr(self, name) is None,
                f"--{name.replace('_', '-')} needs --launcher slurm",
            )
        if self.launcher == "slurm":
            # Slurm hands out whole CPUs and GPUs; packing several trials into one task is
            # --slurm-trials-per-job (they run one after another on the task's GPU).
            for name in ("gpus_per_trial", "cpus_per_trial"):
                value = getattr(self, name)
                check(
                    float(value).is_integer(),
                    f"--{name.replace('_', '-')} {value:g}: Slurm gives whole CPUs and GPUs; use "
                    f"--launcher ray for fractions, or --slurm-trials-per-job to pack small trials",
                )


def split_launch(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split sweep options (flags or a `[sweep]` table) into (LaunchConfig keys, the rest)."""
    keys = {f.name for f in fields(LaunchConfig)}
    return {k: v for k, v in values.items() if k in keys}, {k: v for k, v in values.items() if k not in keys}


def check_launcher(launch: LaunchConfig) -> None:
    """Fail before any work when the launcher cannot run here: its engine is not installed (the message
    gives the install command), or Slurm has no `sbatch`."""
    module = ENGINES.get(launch.launcher)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        raise MedkdError(
            f"--launcher {launch.launcher} needs {module}, which is not installed: "
            f"pip install 'medkd[{launch.launcher}]' (in a clone: pip install -e '.[{launch.launcher}]')"
        ) from None
    if launch.launcher == "slurm" and launch.slurm_cluster == "slurm" and shutil.which("sbatch") is None:
        raise MedkdError(
            "--launcher slurm needs sbatch, which is not on PATH: run the sweep on a Slurm login node"
        )


def stage_cache(source: str | os.PathLike, stage_dir: str | os.PathLike, sha256: str) -> Path:
    """Copy the cache `source` into `stage_dir` (node-local disk) once per node; return the checked copy.

    The copy goes to a temporary name, is checked against `sha256` and only then renamed, so a reader
    never sees a half or corrupt copy; a lock file makes trials racing on one node copy it once (and
    the rename keeps them safe where the folder's file system ignores locks). The copy's name holds
    the hash, so a rebuilt cache is staged anew. `stage_dir` may use `~` and `$VARS` (`$TMPDIR`),
    expanded on the node.
    """
    import fcntl

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


def trial_env(cache: str | None, launch: LaunchConfig) -> dict[str, Any]:
    """What every trial task gets besides its config: the cache's absolute path, and where to stage it."""
    if cache is None:
        return {"cache": None, "cache_sha256": None, "stage_dir": None, "launcher": launch.launcher}
    return {
        "cache": str(Path(cache).resolve()),
        # Hashed once here, so each node checks its copy against the file the sweep was started with.
        "cache_sha256": file_sha256(cache) if launch.stage_cache else None,
        "stage_dir": launch.stage_cache,
        "launcher": launch.launcher,
    }


def run_trials(configs: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """Run trials one after another in this process (one engine task); return "ran"/"done"/"failed" each.

    This is what Ray and Slurm execute. The cache is opened (staged first with `stage_dir`) once, when
    the first trial that needs it starts. No exception escapes: a failure is that trial's error.json.
    """
    from medkd.cache import TeacherCache
    from medkd.sweep import finished_result, run_trial, write_error

    cache: list[TeacherCache] = []

    def open_cache() -> TeacherCache | None:
        if env["cache"] is None:
            return None
        if not cache:
            path = env["cache"]
            if env["stage_dir"]:
                path = stage_cache(path, env["stage_dir"], env["cache_sha256"])
            cache.append(TeacherCache(path))
        return cache[0]

    statuses = []
    for config in configs:
        started = time.time()
        try:
            if finished_result(config) is not None:  # a retry or requeue of a trial that finished
                statuses.append("done")
                continue
            run_trial(config, cache=open_cache())
        except Exception as err:  # the trial's own failure: recorded in its folder, the sweep goes on
            write_error(config, err)
            statuses.append("failed")
            continue
        write_json(Path(config["out"]) / TRIAL, provenance(env["launcher"], started))
        statuses.append("ran")
    return statuses


def provenance(launcher: str, started: float) -> dict[str, Any]:
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


class TrialPack:
    """`run_trials` as a callable submitit can requeue: on timeout or preemption the same pack is
    resubmitted, and its finished trials are skipped."""

    def __call__(self, configs: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
        return run_trials(configs, env)

    def checkpoint(self, configs: list[dict[str, Any]], env: dict[str, Any]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, configs, env)


def absolute(config: dict[str, Any]) -> dict[str, Any]:
    """A trial config with absolute paths, for a worker in another working directory or on another node.

    The config hash counts the cache by its content, not its path, so the result is the same trial's.
    """
    config = dict(config)
    for key in ("out", "data_dir", "cache"):
        if config.get(key):
            config[key] = str(Path(config[key]).resolve())
    return config


def launch_trials(
    trials: list[dict[str, Any]],
    launch: LaunchConfig,
    cache: str | None,
    out: Path,
    on_done: Callable[[dict[str, Any]], None],
) -> None:
    """Run `trials` on Ray or Slurm and wait for all of them; `on_done(trial)` as each one ends.

    A trial the engine lost (a worker killed, a job out of time) gets an error.json saying so.
    """
    check_launcher(launch)
    env = trial_env(cache, launch)
    tasks = [absolute(t) for t in trials]
    by_out = {t["out"]: original for t, original in zip(tasks, trials, strict=True)}
    if launch.launcher == "ray":
        _launch_ray(tasks, launch, env, lambda t: on_done(by_out[t["out"]]))
    elif launch.launcher == "slurm":
        _launch_slurm(tasks, launch, env, out, lambda t: on_done(by_out[t["out"]]))
    else:
        raise MedkdError(f"launch_trials runs trials on Ray or Slurm, not '{launch.launcher}'")


def _lost(config: dict[str, Any], why: str) -> None:
    from medkd.sweep import ERROR, write_error

    run_dir = Path(config["out"])
    if not (run_dir / RESULT).exists() and not (run_dir / ERROR).exists():
        write_error(config, RuntimeError(why))


def _launch_ray(
    tasks: list[dict[str, Any]], launch: LaunchConfig, env: dict[str, Any], on_done: Callable
) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        # No address and no RAY_ADDRESS: a Ray instance on this node with its CPUs and GPUs.
        ray.init(address=launch.ray_address)
    try:
        # A task asking for more than the whole cluster has would wait forever: say so instead.
        have = ray.cluster_resources()
        asks = (("CPU", launch.cpus_per_trial, "cpus"), ("GPU", launch.gpus_per_trial, "gpus"))
        for kind, need, flag in asks:
            if need > have.get(kind, 0):
                raise MedkdError(
                    f"--{flag}-per-trial {need:g}, but this Ray cluster has {have.get(kind, 0):g} {kind}s in "
                    f"all; ask for less, or join a cluster that has them (--ray-address)"
                )
        remote = ray.remote(run_trials)
        resources = {
            "num_cpus": launch.cpus_per_trial,
            "num_gpus": launch.gpus_per_trial,
            "max_retries": 3,  # a dead worker (OOM, lost node) reruns the trial; an exception does not
        }
        pending = {
            remote.options(name=f"medkd {Path(t['out']).name}", **resources).remote([t], env): t
            for t in tasks
        }
        try:
            while pending:
                # A timeout, so Ctrl-C is seen: a wait without one blocks signals until a trial ends.
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    config = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as err:
                        _lost(config, f"Ray lost the trial: {str(err).strip().splitlines()[0]}")
                    on_done(config)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _launch_slurm(
    tasks: list[dict[str, Any]], launch: LaunchConfig, env: dict[str, Any], out: Path, on_done: Callable
) -> None:
    import submitit

    size = launch.slurm_trials_per_job
    packs = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    executor = submitit.AutoExecutor(folder=out / ".submitit" / "%j", cluster=launch.slurm_cluster)
    executor.update_parameters(
        name=f"medkd-{out.name}",
        timeout_min=launch.slurm_time_min,
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=math.ceil(launch.cpus_per_trial),
        gpus_per_node=int(launch.gpus_per_trial),
        slurm_partition=launch.slurm_partition,
        slurm_array_parallelism=launch.slurm_max_parallel or len(packs),
    )
    jobs = executor.map_array(TrialPack(), packs, [env] * len(packs))
    pack_of = {job.job_id: pack for job, pack in zip(jobs, packs, strict=True)}
    poll = 1.0 if launch.slurm_cluster != "slurm" else 15.0  # sacct is shared: poll a cluster gently
    try:
        for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
            try:
                job.result()
            except Exception as err:  # the job failed or timed out, not a trial (those return "failed")
                for config in pack_of[job.job_id]:
                    _lost(config, f"Slurm job {job.job_id} ended without the trial: {str(err).strip()[:300]}")
            for config in pack_of[job.job_id]:
                on_done(config)
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        raise
