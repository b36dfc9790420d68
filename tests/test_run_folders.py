"""Run folders are medkd's and have one writer: the marker, the lock, resuming a killed sweep's trial, what
the config hash counts (data, --student-weights), checks before a sweep writes, and paths that look like
rich markup."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import kill_after_steps, tiny_cache_config
from rich.console import Console

import medkd.train
from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import DistillConfig, SweepConfig, to_dict
from medkd.data import make_synthetic_like
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.files import file_sha256
from medkd.runs import EPOCH_CHECKPOINT, MARKER, config_hash, read_result
from medkd.students import build_student
from medkd.sweep import expand, run_sweep
from medkd.trials import finished_result, run_trial

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The baseline at 8 px from 96 training images in batches of 48: 2 steps an epoch, about a second a run.
STEPS = 2
TINY = dict(student="resnet18", student_size=8, batch_size=48, device="cpu", quiet=True)
TINY_ARGS = ["--student", "resnet18", "--student-size", "8", "--batch-size", "48", "--device", "cpu"]
TINY_ARGS += ["--quiet"]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """breastmnist-shaped data with the same sizes as `synthetic_root`'s, but other images."""
    root = tmp_path_factory.mktemp("other")
    make_synthetic_like(root, "breastmnist", n_train=96, n_val=32, n_test=32, seed=2)
    return root


def baseline(root: Path, out: Path, **kwargs) -> DistillConfig:
    values = dict(dataset="breastmnist", alpha=1.0, data_dir=str(root), epochs=1, out=str(out), **TINY)
    return DistillConfig(**{**values, **kwargs})


def baseline_sweep(root: Path, out: Path, **kwargs) -> SweepConfig:
    values = dict(dataset="breastmnist", alpha=(1.0,), data_dir=str(root), epochs=1, out=str(out), **TINY)
    return SweepConfig(**{**values, **kwargs})


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@contextmanager
def held_elsewhere(run_dir: Path, pid: int = 4242):
    """The run folder as another medkd process writing it holds it: marked, its marker locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    marker.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    fd = os.open(marker, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: this process's own claim is refused like any other
    try:
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- case 2: whose folder


def test_a_folder_of_the_users_files_is_refused_with_or_without_force(synthetic_root, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("best.pt", "last.pt", "predictions.npz", ".best.pt.x1y2.tmp"):
        (mine / name).write_bytes(f"the user's own {name}".encode())
    before = snapshot(mine)
    for force in (False, True):
        with pytest.raises(MedkdError) as err:
            distill(baseline(synthetic_root, mine, force=force))
        assert str(err.value) == (
            f"{mine} holds files medkd did not write (.best.pt.x1y2.tmp, best.pt, last.pt, …); give --out a "
            f"new or empty folder"
        )
        assert snapshot(mine) == before  # nothing overwritten, deleted or added (no marker)
    args = ["distill", "--dataset", "breastmnist", "--alpha", "1", "--data-dir", str(synthetic_root)]
    result = CliRunner().invoke(main, [*args, *TINY_ARGS, "--epochs", "1", "--out", str(mine), "--force"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert snapshot(mine) == before


def test_a_run_folder_of_an_older_medkd_is_accepted_and_marked(synthetic_root, tmp_path):
    run_dir = tmp_path / "old"
    first = distill(baseline(synthetic_root, run_dir))
    marker = json.loads((run_dir / MARKER).read_text())
    assert set(marker) >= {"medkd_version", "created_utc", "config_hash", "pid"}
    assert marker["config_hash"] == first.config_hash and marker["pid"] == os.getpid()
    (run_dir / MARKER).unlink()  # as a medkd before the marker left it
    (run_dir / ".best.pt.killed.tmp").write_bytes(b"a killed writer's leftover")
    before = snapshot(run_dir)
    with pytest.raises(MedkdError, match="already holds a finished run; pass --force"):
        distill(baseline(synthetic_root, run_dir))
    assert snapshot(run_dir) == before  # refused on bad input: not even marked
    distill(baseline(synthetic_root, run_dir, force=True))
    assert json.loads((run_dir / MARKER).read_text())["created_utc"]
    assert not (run_dir / ".best.pt.killed.tmp").exists()  # a leftover in a marked folder is dropped
    # A trial that only failed under an older medkd left error.json alone: its folder is medkd's too.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "error.json").write_text(
        json.dumps({"error": "RuntimeError: x", "config": {}, "traceback": ""})
    )
    distill(baseline(synthetic_root, failed))
    assert (failed / "result.json").is_file() and (failed / MARKER).is_file()


# ---------------------------------------------------------------- case 4: one writer


def test_a_second_distill_on_a_folder_being_written_is_one_line(synthetic_root, tmp_path):
    run_dir = tmp_path / "busy"
    args = ["distill", "--dataset", "breastmnist", "--alpha", "1", "--data-dir", str(synthetic_root)]
    with held_elsewhere(run_dir):
        before = snapshot(run_dir)
        result = CliRunner().invoke(main, [*args, *TINY_ARGS, "--epochs", "1", "--out", str(run_dir)])
        assert snapshot(run_dir) == before
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert (
        f"{run_dir} is being written by another medkd process (pid 4242); wait for it or --out elsewhere"
        in result.output
    )
    distill(baseline(synthetic_root, run_dir))  # the lock went with its holder: the folder is free


def test_a_sweep_skips_a_trial_another_process_writes_and_does_not_fail_it(synthetic_root, tmp_path):
    sweep = baseline_sweep(synthetic_root, tmp_path / "s", seed=(0, 1))
    busy = Path(expand(sweep)[1]["out"])
    log = io.StringIO()
    with held_elsewhere(busy):
        results = run_sweep(sweep, console=Console(file=log, width=400))
    text = log.getvalue()
    assert [r.seed for r in results] == [0]
    assert "a1_t2_s1 running elsewhere, skipped here: another medkd process (pid 4242) writes it" in text
    assert "1 trial(s) ran, 0 skipped, 1 running elsewhere (not finished here: a1_t2_s1)" in text
    assert "failed" not in text and not (busy / "error.json").exists() and not (busy / "result.json").exists()
    log = io.StringIO()
    assert len(run_sweep(sweep, console=Console(file=log, width=400))) == 2  # now it runs here
    assert "1 trial(s) ran, 1 skipped" in log.getvalue()


SWEEP_WHEN_TOLD = """
import pathlib, sys, time
from medkd.cli import main
pathlib.Path(sys.argv[1]).touch()  # imported: ready
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.005)
main(sys.argv[3:])
"""


def test_two_sweeps_on_one_folder_train_every_trial_once(synthetic_root, tmp_path):
    out, go = tmp_path / "sweep", tmp_path / "go"
    args = ["sweep", "--dataset", "breastmnist", "--alpha", "1", "--seed", "0,1,2,3", "--data-dir"]
    args += [str(synthetic_root), *TINY_ARGS, "--epochs", "2", "--out", str(out)]
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-c", SWEEP_WHEN_TOLD, str(r), str(go), *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in sweeps) and time.monotonic() < deadline
            time.sleep(0.01)
        go.touch()  # both start their sweep at once
        outputs = [p.communicate(timeout=120)[1] for p in sweeps]
    finally:
        for p in sweeps:
            if p.poll() is None:
                p.kill()
    for p, err in zip(sweeps, outputs, strict=True):
        assert p.returncode == 0, err
    for seed in range(4):
        name = f"a1_t2_s{seed}"
        ran = [p.pid for p, err in zip(sweeps, outputs, strict=True) if f"{name} ran in " in err]
        assert len(ran) == 1, outputs  # trained exactly once, by one of the two
        run_dir = out / name
        assert json.loads((run_dir / "trial.json").read_text())["pid"] == ran[0]
        result = read_result(run_dir)
        assert len(result.history) == 2 and [h["epoch"] for h in result.history] == [1, 2]
        assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == result.best_epoch
        for err in outputs:  # each sweep says what it did with every trial, once
            said = [f"{name} ran in ", f"{name} skipped (finished", f"{name} running elsewhere"]
            assert sum(err.count(s) for s in said) == 1, err


# ---------------------------------------------------------------- case 5: a killed sweep resumes


def count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    real, calls = medkd.train.kd_loss, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(medkd.train, "kd_loss", counted)
    return calls


def test_a_killed_sweep_resumes_its_interrupted_trial(synthetic_root, tmp_path, monkeypatch):
    sweep = baseline_sweep(synthetic_root, tmp_path / "s", epochs=2, quiet=False)
    run_dir = Path(expand(sweep)[0]["out"])
    # Killed in epoch 2: last.pt holds epoch 1.
    kill_after_steps(monkeypatch, "kd_loss", STEPS + 1, lambda: run_sweep(sweep, console=Console(quiet=True)))
    checkpoint = torch.load(run_dir / EPOCH_CHECKPOINT, weights_only=True)
    assert checkpoint["loop"]["epoch"] == 1 and not (run_dir / "result.json").exists()
    steps, log = count_steps(monkeypatch), io.StringIO()
    (result,) = run_sweep(sweep, console=Console(file=log, width=400))
    assert len(steps) == STEPS  # epoch 2 only
    assert f"resuming {run_dir} after epoch 1 of 2" in log.getvalue()
    assert result.history[0] == checkpoint["history"][0]  # epoch 1 is the killed run's
    assert [h["epoch"] for h in result.history] == [1, 2] and not (run_dir / EPOCH_CHECKPOINT).exists()


def test_a_killed_trial_of_another_config_starts_over(synthetic_root, tmp_path, monkeypatch):
    sweep = baseline_sweep(synthetic_root, tmp_path / "s", epochs=2)
    kill_after_steps(monkeypatch, "kd_loss", STEPS + 1, lambda: run_sweep(sweep, console=Console(quiet=True)))
    changed = baseline_sweep(synthetic_root, tmp_path / "s", epochs=2, lr=(1e-2,), quiet=False)
    assert expand(changed)[0]["out"] == expand(sweep)[0]["out"]  # the same folder, another config
    steps, log = count_steps(monkeypatch), io.StringIO()
    (result,) = run_sweep(changed, console=Console(file=log, width=400))
    assert len(steps) == 2 * STEPS and result.lr == 1e-2
    assert "its epoch checkpoint is of another config" in log.getvalue() and "resuming" not in log.getvalue()


# ---------------------------------------------------------------- case 6: what the hash counts


def test_the_hash_counts_a_baselines_data_and_a_cache_holds_its_own():
    plain = to_dict(DistillConfig(dataset="breastmnist", alpha=1.0))
    a, b = {"train": "a", "val": "v", "test": "t"}, {"train": "b", "val": "v", "test": "t"}
    assert config_hash(plain, None, a) != config_hash(plain, None, b)
    kd = to_dict(DistillConfig(cache="c.h5"))
    assert config_hash(kd, "f", a) == config_hash(kd, "f", b) == config_hash(kd, "f")  # hashes kept
    weights = to_dict(DistillConfig(cache="c.h5", student_weights="init.pt"))
    moved = {**weights, "student_weights": "elsewhere/init.pt"}
    assert config_hash(weights, "f", None, "1" * 64) == config_hash(moved, "f", None, "1" * 64)
    assert config_hash(weights, "f", None, "1" * 64) != config_hash(weights, "f", None, "2" * 64)


def test_a_baseline_sweep_on_other_data_is_another_config(synthetic_root, other_data, tmp_path):
    run_sweep(baseline_sweep(synthetic_root, tmp_path / "s"), console=Console(quiet=True))
    with pytest.raises(MedkdError, match="holds a run of another config .* pass --force"):
        run_sweep(baseline_sweep(other_data, tmp_path / "s"), console=Console(quiet=True))


def test_resume_refuses_a_checkpoint_trained_on_other_data(synthetic_root, other_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    kill = lambda: distill(baseline(synthetic_root, run_dir, epochs=2))  # noqa: E731
    kill_after_steps(monkeypatch, "kd_loss", STEPS + 1, kill)
    assert (run_dir / EPOCH_CHECKPOINT).is_file()
    with pytest.raises(MedkdError, match="is a checkpoint of another config"):
        distill(baseline(other_data, run_dir, epochs=2, resume=True))
    result = distill(baseline(synthetic_root, run_dir, epochs=2, resume=True))  # its own data resumes it
    assert result.epochs_run == 2


def test_a_changed_student_weights_file_is_another_config(synthetic_root, tmp_path):
    init = tmp_path / "init.pt"
    torch.manual_seed(1)
    torch.save({"model": build_student("resnet18", 2, 8).state_dict()}, init)
    (config,) = expand(baseline_sweep(synthetic_root, tmp_path / "s", student_weights=str(init)))
    result, sha = run_trial(config), file_sha256(init)
    assert finished_result(config) == result
    copy = tmp_path / "copy.pt"
    shutil.copy(init, copy)
    assert finished_result({**config, "student_weights": str(copy)}) == result  # counted by content
    torch.manual_seed(2)
    torch.save({"model": build_student("resnet18", 2, 8).state_dict()}, init)
    with pytest.raises(MedkdError, match="holds a run of another config"):
        finished_result(config)
    assert result.student_weights_sha256 == sha  # what it started from, in result.json


# ---------------------------------------------------------------- case 9: a sweep checks before it writes


@pytest.fixture(scope="module")
def cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "bm.h5"
    return cache_teacher(tiny_cache_config(synthetic_root, out, epochs=2, device="cpu"))


def sweep_args(cache: Path, root: Path, out: Path) -> list[str]:
    return ["sweep", "--cache", str(cache), "--data-dir", str(root), "--alpha", "0.2,0.5", *TINY_ARGS]


def test_a_sweep_on_data_its_cache_was_not_built_from_is_one_line_and_writes_nothing(
    cache, other_data, tmp_path
):
    out = tmp_path / "s"
    result = CliRunner().invoke(
        main, [*sweep_args(cache, other_data, out), "--epochs", "1", "--out", str(out)]
    )
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "was built from breastmnist (28 px) train n=96 sha256" in result.output
    assert not out.exists()


def test_a_sweep_out_that_is_a_file_or_read_only_is_one_line(cache, synthetic_root, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    result = CliRunner().invoke(main, [*sweep_args(cache, synthetic_root, a_file), "--out", str(a_file)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"--out {a_file} is a file" in result.output and a_file.read_text() == "not a folder"
    if os.geteuid() == 0:
        return  # root writes into read-only folders
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = CliRunner().invoke(main, [*sweep_args(cache, synthetic_root, locked), "--out", str(locked)])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"cannot write the sweep folder {locked}" in result.output and not any(locked.iterdir())


# ---------------------------------------------------------------- item 10: paths that look like markup


def test_paths_with_brackets_are_printed_as_they_are(synthetic_root, tmp_path):
    out = tmp_path / "runs[" / "bold]" / "exp[red]"  # `[/bold]` and `[red]`: rich markup, if parsed
    args = ["distill", "--dataset", "breastmnist", "--alpha", "1", "--data-dir", str(synthetic_root)]
    args += ["--student", "resnet18", "--student-size", "8", "--batch-size", "48", "--epochs", "1"]
    args += ["--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}: best epoch 1" in result.stderr
    sweep = tmp_path / "sweeps[" / "x]" / "s[red]"
    args = ["sweep", "--dataset", "breastmnist", "--alpha", "1", "--data-dir", str(synthetic_root)]
    result = CliRunner().invoke(main, [*args, *TINY_ARGS, "--epochs", "1", "--out", str(sweep)])
    assert result.exit_code == 0, result.output
    assert f"sweep {sweep}: 1 trial(s) ran, 0 skipped" in result.stderr


def test_a_run_made_before_the_fingerprint_counted_labels_still_counts_as_finished(tmp_path, synthetic_root):
    """A result.json whose cache fingerprint is the legacy one (medkd before it hashed the labels) is the
    same experiment for sweeps and --resume; any other fingerprint is another config."""
    from medkd.cache import TeacherCache

    cache = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "c.h5"))
    cfg = DistillConfig(
        cache=str(cache), student="resnet18", student_size=8, epochs=1, out=str(tmp_path / "run"),
        data_dir=str(synthetic_root), quiet=True, device="cpu",
    )  # fmt: skip
    distill(cfg)
    path = tmp_path / "run" / "result.json"
    data = json.loads(path.read_text())
    legacy = TeacherCache(cache).legacy_fingerprint
    assert legacy != data["teacher"]["fingerprint"]
    data["teacher"]["fingerprint"] = legacy
    path.write_text(json.dumps(data))
    assert finished_result(to_dict(cfg)) is not None
    assert distill(DistillConfig(**{**to_dict(cfg), "resume": True})).best_epoch == 1  # nothing retrained
    data["teacher"]["fingerprint"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(MedkdError, match="holds a run of another config"):
        finished_result(to_dict(cfg))
