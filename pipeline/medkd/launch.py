"""Scale-out for `medkd sweep`: the same trials as Ray core tasks or a Slurm job array (submitit).

The engines only schedule. What makes a trial safe to run more than once (retries, requeues, a rerun
of the whole sweep) lives in `medkd.trials`: each engine task runs `run_trials` on its share, and the
sweep then reads what happened from the run folders, never from the engine.
"""

from __future__ import annotations

import importlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medkd.config import LaunchConfig
from medkd.errors import MedkdError, first_line
from medkd.runs import ERROR, RESULT, RunIdentity, write_error
from medkd.trials import run_trials, trial_env

ENGINES = {"ray": "ray", "slurm": "submitit"}  # launcher → the module it needs


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
    for key in ("out", "data_dir"):
        if config.get(key):
            config[key] = str(Path(config[key]).resolve())
    if isinstance(config.get("cache"), list):  # several caches
        config["cache"] = [str(Path(p).resolve()) for p in config["cache"]]
    elif config.get("cache"):
        config["cache"] = str(Path(config["cache"]).resolve())
    return config


def launch_trials(
    trials: list[dict[str, Any]],
    launch: LaunchConfig,
    cache: str | tuple[str, ...] | None,
    out: Path,
    on_done: Callable[[dict[str, Any]], None],
    identity: RunIdentity | None = None,
) -> None:
    """Run `trials` on Ray or Slurm and wait for all of them; `on_done(trial)` as each one ends.

    `identity` is what the trials learn from, known to the sweep (workers then need not read it again).
    A trial the engine lost (a worker killed, a job out of time) gets an error.json saying so.
    """
    check_launcher(launch)
    env = trial_env(cache, launch.launcher, launch.stage_cache, identity)
    tasks = [absolute(t) for t in trials]
    by_out = {t["out"]: original for t, original in zip(tasks, trials, strict=True)}
    if launch.launcher == "ray":
        _launch_ray(tasks, launch, env, lambda t: on_done(by_out[t["out"]]))
    elif launch.launcher == "slurm":
        _launch_slurm(tasks, launch, env, out, lambda t: on_done(by_out[t["out"]]))
    else:
        raise MedkdError(f"launch_trials runs trials on Ray or Slurm, not '{launch.launcher}'")


def _lost(config: dict[str, Any], why: str) -> None:
    run_dir = Path(config["out"])
    if not (run_dir / RESULT).exists() and not (run_dir / ERROR).exists():
        write_error(run_dir, config, RuntimeError(why))


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
                        _lost(config, f"Ray lost the trial: {first_line(err)}")
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
