"""Killed runs lose nothing: `distill --resume` ends where an uninterrupted run ends, `cache-teacher`
picks its feature pass up after the last complete chunk, and a run knows its cache by content, not path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cache_config

import medkd.cache_teacher
import medkd.distill
from medkd.cache import TeacherCache, cache_fingerprint
from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import CacheTeacherConfig, DistillConfig, to_dict
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.partial import partial_path
from medkd.runs import EPOCH_CHECKPOINT, RunResult, config_hash, write_result
from medkd.sweep import finished_result

# One thread per process: the runs compared must use the same kernels, and a busy 2-core machine
# runs two single-threaded processes faster than two that each spin two threads.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cache_config(root: Path, out: Path, **kwargs) -> CacheTeacherConfig:
    return tiny_cache_config(root, out, **{"epochs": 2, "feature_batch_size": 16, "device": "cpu", **kwargs})


@pytest.fixture(scope="module")
def cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cache_teacher(cache_config(synthetic_root, tmp_path_factory.mktemp("cache") / "bm.h5"))


def distill_cmd(cache: Path, root: Path, out: Path, *extra: str) -> list[str]:
    # Milestones and patience inside the run, so the scheduler and the patience counter cross the kill.
    options = ["--alpha", "0.5", "--student", "resnet18", "--student-size", "8", "--epochs", "3"]
    options += ["--milestones", "2", "--patience", "2"]
    return [
        "distill",
        "--cache",
        str(cache),
        "--data-dir",
        str(root),
        *options,
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def test_killed_distill_resumes_to_the_uninterrupted_result(cache, synthetic_root, tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    medkd = [sys.executable, "-m", "medkd.cli"]
    reference = subprocess.Popen(
        medkd + distill_cmd(cache, synthetic_root, ref_dir), env=ENV, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        medkd + distill_cmd(cache, synthetic_root, run_dir), env=ENV, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / EPOCH_CHECKPOINT).exists():
            assert victim.poll() is None, "the run ended before its first epoch checkpoint"
            assert time.monotonic() < deadline, "no epoch checkpoint after 240 s"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)  # no cleanup runs, as with a lost node or an OOM kill
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert not (run_dir / "result.json").exists()
    checkpoint = torch.load(run_dir / EPOCH_CHECKPOINT, weights_only=True)
    assert checkpoint["loop"]["epoch"] == 1 and len(checkpoint["history"]) == 1

    # In this process (one thread, like the subprocesses): saves starting a third Python with torch.
    resumed = CliRunner().invoke(main, distill_cmd(cache, synthetic_root, run_dir, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run_dir} after epoch 1 of 3" in resumed.stderr
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err

    ref, res = (json.loads((d / "result.json").read_text()) for d in (ref_dir, run_dir))
    # Epoch 1 came from the checkpoint, not from a second training pass (its timing is the killed run's).
    assert res["history"][0] == checkpoint["history"][0]
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in ref["history"]]
    assert [h["lr"] for h in res["history"]] == [1e-3, 1e-3, 1e-4]
    assert res["test"] == ref["test"] and res["val"] == ref["val"] and res["best_epoch"] == ref["best_epoch"]
    assert res["config_hash"] == ref["config_hash"]
    ref_best, res_best = (torch.load(d / "best.pt", weights_only=True) for d in (ref_dir, run_dir))
    assert ref_best["epoch"] == res_best["epoch"]
    assert ref_best["model"].keys() == res_best["model"].keys()
    for name, tensor in ref_best["model"].items():
        assert torch.equal(tensor, res_best["model"][name]), name
    with np.load(ref_dir / "predictions.npz") as a, np.load(run_dir / "predictions.npz") as b:
        assert np.array_equal(a["y_score"], b["y_score"])
    # The epoch checkpoint and the killed writer's temporary files are gone; the marker stays.
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [".medkd-run", "best.pt", "predictions.npz", "result.json"]


def test_an_interrupted_run_resumes_its_optimizer_and_schedule(cache, synthetic_root, tmp_path, monkeypatch):
    # SGD's momentum buffers and the cosine schedule after a warm-up both cross the interruption.
    def config(out: Path, **kwargs) -> DistillConfig:
        return DistillConfig(
            cache=str(cache), data_dir=str(synthetic_root), alpha=0.5, student="resnet18", student_size=8,
            epochs=3, patience=2, optimizer="sgd", weight_decay=0.01, schedule="cosine", warmup_epochs=1,
            device="cpu", quiet=True, out=str(out), **kwargs,
        )  # fmt: skip

    ref = distill(config(tmp_path / "reference"))
    epochs = medkd.distill.train_epochs

    def stopped_after_one_epoch(*args, **kwargs):
        it = epochs(*args, **kwargs)
        yield next(it)  # the caller writes best.pt and last.pt for epoch 1 before asking for epoch 2
        raise KeyboardInterrupt

    run_dir = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(medkd.distill, "train_epochs", stopped_after_one_epoch)
        with pytest.raises(KeyboardInterrupt):
            distill(config(run_dir))
    checkpoint = torch.load(run_dir / EPOCH_CHECKPOINT, weights_only=True)
    assert checkpoint["loop"]["epoch"] == 1 and not (run_dir / "result.json").exists()
    res = distill(config(run_dir, resume=True))
    assert res.history[0] == checkpoint["history"][0]  # epoch 1 came from the checkpoint
    # Epoch 1 warms up at lr/100, then cosine over epochs 2-3: 1, then cos²(π/4) = 1/2.
    assert [h["lr"] for h in res.history] == pytest.approx([1e-5, 1e-3, 5e-4], rel=1e-12)
    assert [h["lr"] for h in res.history] == [h["lr"] for h in ref.history]
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    assert res.test == ref.test and res.val == ref.val and res.best_epoch == ref.best_epoch


def count_feature_calls(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Count the teacher's feature chunks; with `fail_at`, die (like a kill) in that chunk."""
    original, calls = medkd.cache_teacher.encode, []

    def counted(teacher, images, *args, **kwargs):
        calls.append(len(images))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(teacher, images, *args, **kwargs)

    monkeypatch.setattr(medkd.cache_teacher, "encode", counted)
    return calls


def read_cache(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{s}/{k}": f[s][k][()] for s in ("train", "val", "test") for k in ("features", "logits")}


def test_cache_teacher_resumes_after_the_last_complete_chunk(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(medkd.cache_teacher, "FEATURE_CHUNK_BATCHES", 2)  # chunks of 32 images
    reference = cache_teacher(cache_config(synthetic_root, tmp_path / "ref" / "c.h5"))
    out = tmp_path / "c.h5"
    with monkeypatch.context() as m:
        calls = count_feature_calls(m, fail_at=3)  # train (96 images) is chunks 1-3: killed in the third
        with pytest.raises(KeyboardInterrupt):
            cache_teacher(cache_config(synthetic_root, out))
    partial = partial_path(out)
    assert not out.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        assert f["train"].attrs["done"] == 64 and "val" not in f

    calls = count_feature_calls(monkeypatch)
    cache_teacher(cache_config(synthetic_root, out))
    assert calls == [32, 32, 32]  # the last train chunk, then val and test: the first two are not redone
    assert not partial.exists()
    expected, got = read_cache(reference), read_cache(out)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_partial_features_of_other_arguments_are_redone(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(medkd.cache_teacher, "FEATURE_CHUNK_BATCHES", 2)
    out = tmp_path / "c.h5"
    with monkeypatch.context() as m:
        count_feature_calls(m, fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            cache_teacher(cache_config(synthetic_root, out))
    calls = count_feature_calls(monkeypatch)
    cache_teacher(cache_config(synthetic_root, out, seed=1))  # another random-init teacher
    assert calls == [32, 32, 32, 32, 32]  # every chunk again
    partial = partial_path(out)
    partial.write_bytes(b"half a chunk")  # a damaged partial file is redone, not trusted
    calls.clear()
    cache_teacher(cache_config(synthetic_root, out, force=True))
    assert len(calls) == 5 and not partial.exists()


def test_a_copied_cache_is_the_same_config_and_an_edited_one_is_not(cache, tmp_path):
    copy, edited = tmp_path / "elsewhere" / "copy.h5", tmp_path / "edited.h5"
    copy.parent.mkdir()
    shutil.copy(cache, copy)
    shutil.copy(cache, edited)
    with h5py.File(edited, "r+") as f:
        f["train/logits"][0, 0] += 1.0
    fingerprint = TeacherCache(cache).fingerprint
    assert cache_fingerprint(copy) == fingerprint != cache_fingerprint(edited)
    original = to_dict(DistillConfig(cache=str(cache), out=str(tmp_path / "trial")))
    run = tmp_path / "trial"
    run.mkdir()
    result = RunResult(
        config=original, dataset="breastmnist", size=28, val={"auc": 0.5, "acc": 0.5},
        test={"auc": 0.5, "acc": 0.5}, config_hash=config_hash(original, fingerprint),
        teacher={"fingerprint": fingerprint},
    )  # fmt: skip
    write_result(run, result)
    # The sweep's finished-trial check: the same trial through the copy is finished ...
    assert finished_result({**original, "cache": str(copy)}) is not None
    # ... and through a cache with other logits it is another config.
    with pytest.raises(MedkdError, match="holds a run of another config"):
        finished_result({**original, "cache": str(edited)})
