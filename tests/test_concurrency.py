"""Concurrent readers: several distill processes read one cache at once, even when it is locked.

Readers open the cache read-only with HDF5 file locking off (`locking=False`). The test holds an exclusive
lock on the cache while two `medkd distill` processes read it, as a writer holding the file or a shared
filesystem that refuses locks would; a reader that asked HDF5 for a lock fails there (the control).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from conftest import tiny_cache_config

from medkd.cache_teacher import cache_teacher

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("cache") / "bm.h5"
        cfg = tiny_cache_config(synthetic_root, out, epochs=2, device="cpu")
        return cache_teacher(cfg)
    finally:
        torch.set_num_threads(threads)


def test_two_distill_processes_read_one_locked_cache_at_once(cache, synthetic_root, tmp_path):
    fd, runs = os.open(cache, os.O_RDONLY), []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() not in ("FALSE", "0"):
            with pytest.raises(OSError, match="lock"):  # the control: a locking reader is refused here
                h5py.File(cache, "r", locking=True)
        runs += [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "medkd.cli", "distill", "--cache", str(cache)),
                    *("--data-dir", str(synthetic_root), "--student", "resnet18", "--student-size", "8"),
                    *("--epochs", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / f"run{i}")),
                ],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
        os.close(fd)  # releases the lock
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
    results = [json.loads((tmp_path / f"run{i}" / "result.json").read_text()) for i in range(2)]
    assert results[0]["test"] == results[1]["test"]  # same seed, same cache: the same run twice
    assert results[0]["teacher"]["fingerprint"] == results[1]["teacher"]["fingerprint"]
