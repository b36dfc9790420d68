"""Launchers: the same sweep trials here, on Ray core tasks and on submitit job arrays.

The `launchers` tests need the extras (`pip install -e '.[ray,slurm]'`) and skip without them. Ray runs
as an instance the test starts on loopback (2 CPUs, one declared GPU) and shuts down; submitit runs its
local executor (the Slurm code path with processes instead of sbatch); a real Slurm test runs only
where `sbatch` exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_cache_config

from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import LaunchConfig, SweepConfig
from medkd.errors import MedkdError
from medkd.files import file_sha256
from medkd.report import collect_runs
from medkd.runs import PREDICTIONS, TRIAL
from medkd.sweep import expand, run_sweep
from medkd.trials import run_trials, stage_cache

HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_SUBMITIT = importlib.util.find_spec("submitit") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray not installed: pip install -e '.[ray]'")
needs_submitit = pytest.mark.skipif(
    not HAS_SUBMITIT, reason="submitit not installed: pip install -e '.[slurm]'"
)
# One epoch of resnet18 at 16 px on 96 images: a trial takes a second or two.
QUICK = ["--student", "resnet18", "--student-size", "16", "--epochs", "1", "--batch-size", "64", "--quiet"]
GRID = ["--alpha", "0.2,0.5,0.8", "--temperature", "1,2,4"]


@pytest.fixture(scope="module")
def cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-teacher cache (28 px teacher input) of the synthetic breastmnist."""
    out = tmp_path_factory.mktemp("launchcache") / "breastmnist_28_tiny.h5"
    return cache_teacher(tiny_cache_config(synthetic_root, out, epochs=2))


def sweep_args(cache: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--cache", str(cache), "--data-dir", str(root), "--out", str(out), *QUICK, *extra]


def outcomes(out: Path) -> dict[str, tuple]:
    """Per trial folder: (config hash, val and test metrics) of its result.json."""
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
    return {n: (r["config_hash"], r["val"], r["test"]) for n, r in results.items()}


def obstruct(trial_dir: Path) -> None:
    """Make a trial fail mid-run: a folder where its best.pt must go (the rename onto it fails)."""
    (trial_dir / "best.pt").mkdir(parents=True)


def fails_then_reruns_only_it(cache: Path, root: Path, out: Path, *launcher: str) -> None:
    args = sweep_args(cache, root, out, "--alpha", "0.2,0.5,0.8", *launcher)
    obstruct(out / "a0.5_t2_s0")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    error_line = result.output.strip().splitlines()[-1]
    assert error_line.startswith("Error: 1 of 3 trials failed (a0.5_t2_s0; a0.5_t2_s0: IsADirectoryError")
    assert "2 trial(s) ran, 0 skipped, 1 failed" in result.output
    results, problems = collect_runs(out)
    assert sorted(Path(r.run_dir).name for r in results) == ["a0.2_t2_s0", "a0.8_t2_s0"]
    assert [(Path(p["run_dir"]).name, p["status"]) for p in problems] == [("a0.5_t2_s0", "broken")]
    assert "IsADirectoryError" in problems[0]["reason"]

    shutil.rmtree(out / "a0.5_t2_s0" / "best.pt")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "a0.5_t2_s0 ran in" in result.output and "1 trial(s) ran, 2 skipped" in result.output
    assert not (out / "a0.5_t2_s0" / "error.json").exists()
    assert collect_runs(out)[1] == []


# --- always: the local launcher and the pieces every engine relies on ---------------------------------


def test_local_failed_trial_is_reported_and_a_rerun_runs_only_it(cache, synthetic_root, tmp_path):
    fails_then_reruns_only_it(cache, synthetic_root, tmp_path / "sweep")
    trial = json.loads((tmp_path / "sweep" / "a0.5_t2_s0" / TRIAL).read_text())
    assert trial["launcher"] == "local" and trial["started"] <= trial["finished"]


@pytest.mark.parametrize(("launcher", "module"), [("ray", "ray"), ("slurm", "submitit")])
def test_missing_engine_is_one_line_with_the_install_command(
    cache, synthetic_root, tmp_path, monkeypatch, launcher, module
):
    monkeypatch.setitem(sys.modules, module, None)  # `import ray` now raises ImportError
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, sweep_args(cache, synthetic_root, out, "--launcher", launcher))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"pip install 'medkd[{launcher}]'" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"launcher": "slurm", "gpus_per_trial": 0.5},
            "--gpus-per-trial 0.5: Slurm gives whole CPUs and GPUs",
        ),
        ({"ray_address": "auto"}, "--ray-address needs --launcher ray"),
        ({"launcher": "ray", "slurm_partition": "gpu"}, "--slurm-partition needs --launcher slurm"),
        ({"launcher": "slurm", "slurm_trials_per_job": 0}, "--slurm-trials-per-job must be >= 1"),
        ({"launcher": "ray", "gpus_per_trial": -1}, "--gpus-per-trial must be >= 0"),
    ],
)
def test_bad_launch_options_are_one_clear_error(values, message):
    with pytest.raises(MedkdError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        LaunchConfig(**values)


def test_stage_cache_copies_once_per_node_checks_sha256_and_survives_a_race(cache, tmp_path, monkeypatch):
    sha = file_sha256(cache)
    monkeypatch.setenv("NODE_TMP", str(tmp_path / "node"))
    barrier, staged = threading.Barrier(4), []

    def stage() -> None:
        barrier.wait()
        staged.append(stage_cache(cache, "$NODE_TMP/medkd", sha))

    threads = [threading.Thread(target=stage) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (copy,) = set(staged)
    assert copy.parent == tmp_path / "node" / "medkd" and file_sha256(copy) == sha
    assert sorted(p.name for p in copy.parent.iterdir()) == sorted([copy.name, f".{copy.name}.lock"])
    mtime = copy.stat().st_mtime_ns
    assert stage_cache(cache, tmp_path / "node" / "medkd", sha) == copy and copy.stat().st_mtime_ns == mtime

    with pytest.raises(MedkdError, match="has sha256 .* the cache changed during the sweep"):
        stage_cache(cache, tmp_path / "other", "0" * 64)
    assert [p.name for p in (tmp_path / "other").iterdir()] == [
        ".breastmnist_28_tiny.0000000000000000.h5.lock"
    ]


def test_engine_task_skips_finished_trials_and_records_failures(cache, synthetic_root, tmp_path):
    """`run_trials` is what Ray and Slurm execute: idempotent, and no exception escapes it."""
    sweep = SweepConfig(
        cache=str(cache), alpha=(0.2, 0.5), data_dir=str(synthetic_root), out=str(tmp_path / "s"),
        student="resnet18", student_size=16, epochs=1, batch_size=64, quiet=True,
    )  # fmt: skip
    trials = expand(sweep)
    env = {"caches": [str(cache)], "cache_sha256": [file_sha256(cache)], "stage_dir": str(tmp_path / "node")}
    env["launcher"] = "test"
    obstruct(Path(trials[1]["out"]))
    assert run_trials(trials, env) == ["ran", "failed"]
    assert (tmp_path / "node").is_dir()  # the trial read the staged copy
    assert json.loads((Path(trials[1]["out"]) / "error.json").read_text())["error"].startswith(
        "IsADirectoryError"
    )
    before = (Path(trials[0]["out"]) / "result.json").stat().st_mtime_ns
    assert run_trials(trials[:1], env) == ["done"]  # a retry of a finished trial trains nothing
    assert (Path(trials[0]["out"]) / "result.json").stat().st_mtime_ns == before


# --- Ray ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    """A Ray instance on loopback only: 2 CPUs and one declared GPU (nothing real behind it)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.mark.launchers
@needs_ray
def test_ray_3x3_sweep_gives_the_same_results_as_local(ray_instance, cache, synthetic_root, tmp_path):
    # One thread on both sides (a Ray worker gets one per CPU it asked for): the same float arithmetic.
    grid = (*GRID, "--threads", "1")
    local = CliRunner().invoke(main, sweep_args(cache, synthetic_root, tmp_path / "local", *grid))
    assert local.exit_code == 0, local.output
    args = sweep_args(cache, synthetic_root, tmp_path / "ray", *grid, "--launcher", "ray")
    on_ray = CliRunner().invoke(main, args)
    assert on_ray.exit_code == 0, on_ray.output
    assert on_ray.output.count(" ran in ") == 9 and "9 trial(s) ran, 0 skipped" in on_ray.output
    expected, got = outcomes(tmp_path / "local"), outcomes(tmp_path / "ray")
    assert len(expected) == 9 and got.keys() == expected.keys()
    for name in expected:  # the same config hash; the same scores up to the float noise of thread counts
        assert got[name][0] == expected[name][0]
        # Not AUC to 1e-6: two near-tied test images can swap rank under that noise, moving AUC by one pair
        # (1/240 here). The scores themselves are the invariant.
        scores = [np.load(tmp_path / side / name / PREDICTIONS)["y_score"] for side in ("local", "ray")]
        np.testing.assert_allclose(scores[1], scores[0], atol=2e-3)  # training amplifies it to ~1e-4
        assert got[name][1]["auc"] == pytest.approx(expected[name][1]["auc"], abs=0.05)  # val
    trial = json.loads((tmp_path / "ray" / "a0.2_t1_s0" / TRIAL).read_text())
    assert trial["launcher"] == "ray" and trial["pid"] != os.getpid()

    again = CliRunner().invoke(main, args)  # the sweep reads what is done from disk: nothing to run
    assert again.exit_code == 0 and "0 trial(s) ran, 9 skipped" in again.output


@pytest.mark.launchers
@needs_ray
def test_ray_failed_trial_is_reported_and_a_rerun_runs_only_it(ray_instance, cache, synthetic_root, tmp_path):
    fails_then_reruns_only_it(cache, synthetic_root, tmp_path / "sweep", "--launcher", "ray")


@pytest.mark.launchers
@needs_ray
def test_ray_packs_four_trials_onto_one_gpu_at_a_quarter_each(ray_instance, cache, synthetic_root, tmp_path):
    out = tmp_path / "sweep"
    pack = ["--launcher", "ray", "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5"]
    result = CliRunner().invoke(
        main, sweep_args(cache, synthetic_root, out, "--alpha", "0.2,0.4,0.6,0.8", "--epochs", "3", *pack)
    )
    assert result.exit_code == 0, result.output
    spans = [json.loads(p.read_text()) for p in out.glob(f"*/{TRIAL}")]
    assert len(spans) == 4 and len({s["pid"] for s in spans}) == 4
    # All four were running at one moment: the last to start began before the first to end finished.
    assert max(s["started"] for s in spans) < min(s["finished"] for s in spans), spans


@pytest.mark.launchers
@needs_ray
def test_ray_refuses_more_than_the_cluster_has(ray_instance, cache, synthetic_root, tmp_path):
    args = sweep_args(cache, synthetic_root, tmp_path / "s", "--launcher", "ray", "--gpus-per-trial", "2")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--gpus-per-trial 2, but this Ray cluster has 1 GPUs in all" in result.output  # not a hang


# --- submitit and Slurm -------------------------------------------------------------------------------


@pytest.mark.launchers
@needs_submitit
def test_submitit_local_executor_runs_packed_trials(cache, synthetic_root, tmp_path):
    """The Slurm code path (a job array of packs) with submitit's local executor instead of sbatch."""
    sweep = SweepConfig(
        cache=str(cache), alpha=(0.2, 0.5), temperature=(1.0, 2.0), data_dir=str(synthetic_root),
        out=str(tmp_path / "s"), student="resnet18", student_size=16, epochs=1, batch_size=64, quiet=True,
    )  # fmt: skip
    launch = LaunchConfig(launcher="slurm", slurm_cluster="local", slurm_trials_per_job=2, slurm_time_min=10)
    results = run_sweep(sweep, launch=launch)
    assert len(results) == 4 and all(r.config_hash for r in results)
    pids = [json.loads((Path(t["out"]) / TRIAL).read_text())["pid"] for t in expand(sweep)]
    assert pids[0] == pids[1] != pids[2] == pids[3]  # two array tasks, two trials each, in order
    assert sum(p.name.isdigit() for p in (tmp_path / "s" / ".submitit").iterdir()) == 2  # a folder per job


@pytest.mark.launchers
@needs_submitit
@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="Slurm is here")
def test_slurm_without_sbatch_is_one_line_before_any_work(cache, synthetic_root, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, sweep_args(cache, synthetic_root, out, "--launcher", "slurm"))
    assert result.exit_code == 1 and "needs sbatch, which is not on PATH" in result.output
    assert not out.exists()


@pytest.mark.launchers
@needs_submitit
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no Slurm here (sbatch not on PATH)")
def test_slurm_sweep_on_the_cluster(cache, synthetic_root, tmp_path):
    """Needs --basetemp on a file system the compute nodes share (the data, cache and runs live there)."""
    out = tmp_path / "sweep"
    args = sweep_args(cache, synthetic_root, out, "--alpha", "0.2,0.8", "--launcher", "slurm")
    result = CliRunner().invoke(main, [*args, "--slurm-trials-per-job", "2", "--slurm-time-min", "15"])
    assert result.exit_code == 0, result.output
    assert len(outcomes(out)) == 2
    trial = json.loads((out / "a0.2_t2_s0" / TRIAL).read_text())
    assert trial["launcher"] == "slurm" and trial["slurm_job"]
