"""Every user error: exit code != 0, one line naming the bad value and what is valid, nothing on disk touched.

The table runs the real CLI in-process (`CliRunner`) from a scratch folder holding data, a cache and an
earlier run; a snapshot of every file's bytes before and after proves that nothing was written or changed.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cache_config

import medkd.train
from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.data import make_synthetic_like
from medkd.runs import EPOCH_CHECKPOINT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a busy two-core machine torch's second thread spin-waits: one thread is 5-10x faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scene(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with good data, a good cache, broken variants of both, and a finished run."""
    root = tmp_path_factory.mktemp("scene")
    data = root / "data"
    data.mkdir()
    shutil.copy(synthetic_root / "breastmnist.npz", data)
    cache = cache_teacher(tiny_cache_config(data, root / "good.h5", epochs=2, device="cpu"))
    (root / "empty").mkdir()
    (root / "garbage").mkdir()
    (root / "garbage" / "breastmnist.npz").write_bytes(b"this is not a zip file")
    with np.load(data / "breastmnist.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    (root / "nokeys").mkdir()
    np.savez(root / "nokeys" / "breastmnist.npz", **{k: v for k, v in arrays.items() if k != "train_labels"})
    (root / "badshape").mkdir()
    np.savez(
        root / "badshape" / "breastmnist.npz",
        **{**arrays, "train_images": np.zeros((96, 32, 32), np.uint8)},
    )
    make_synthetic_like(root / "other", "breastmnist", n_train=96, n_val=32, n_test=32, seed=9)

    (root / "text.h5").write_text("not hdf5\n")
    good = cache.read_bytes()
    (root / "truncated.h5").write_bytes(good[: len(good) // 2])

    def edited(name: str, edit) -> None:
        (root / name).write_bytes(good)
        with h5py.File(root / name, "a") as f:
            edit(f)

    edited("v3.h5", lambda f: f.attrs.__setitem__("medkd_format", 3))

    def nan_logits(f: h5py.File) -> None:
        f["train/logits"][3, 1] = np.nan

    def inf_logits(f: h5py.File) -> None:
        f["val/logits"][0, 0] = np.inf

    edited("nan.h5", nan_logits)
    edited("inf.h5", inf_logits)
    (root / "a_file").write_text("a file, not a folder\n")
    (root / "mine").mkdir()
    (root / "mine" / "best.pt").write_bytes(b"the user's own checkpoint")
    (root / "bad.toml").write_text('batch_size = "32"\n')

    def flipped_labels(f: h5py.File) -> None:
        f["test/labels"][...] = 1 - f["test/labels"][...]

    edited("flipped.h5", flipped_labels)
    result = CliRunner().invoke(main, [*BASELINE, "--data-dir", str(data), "--out", str(root / "runs/done")])
    assert result.exit_code == 0, result.output
    return root


BASELINE = [
    "distill",
    "--dataset",
    "breastmnist",
    "--alpha",
    "1",
    "--student",
    "resnet18",
    "--student-size",
    "8",
    "--epochs",
    "1",
]
CACHE_TEACHER = ["cache-teacher", "--dataset", "breastmnist", "--teacher", "tiny", "--teacher-size", "28"]


def kd(cache: str = "good.h5", *extra: str) -> list[str]:
    # An 8 px student: these tests are about what happens around training, so it may learn nothing.
    args = ["--student", "resnet18", "--student-size", "8", "--epochs", "1", "--data-dir", "data"]
    return ["distill", "--cache", cache, *args, *extra]


# (case id, arguments run in the scene folder, substrings the error must contain)
CASES = [
    (
        "unknown-dataset",
        ["distill", "--dataset", "nosuchmnist", "--alpha", "1", "--data-dir", "data"],
        ["unknown dataset flag 'nosuchmnist'; valid:", "breastmnist", "pathmnist"],
    ),
    ("unknown-teacher", [*CACHE_TEACHER[:3], "--teacher", "vit_huge"], ["vit_huge", "dinov2_vitb14"]),
    ("unknown-student", kd("good.h5", "--student", "vgg16"), ["vgg16", "resnet18", "resnet50"]),
    (
        "size-not-offered",
        [*BASELINE, "--data-dir", "data", "--size", "30"],
        ["size 30 is not offered for 'breastmnist'; valid: 28, 64, 128, 224"],
    ),
    (
        "missing-data-file",
        [*BASELINE, "--data-dir", "empty"],
        ["breastmnist.npz not found in empty", "--data-dir", "--download"],
    ),
    ("unreadable-data-file", [*BASELINE, "--data-dir", "garbage"], ["is not a readable .npz file"]),
    (
        "npz-wrong-keys",
        [*BASELINE, "--data-dir", "nokeys"],
        ["missing key 'train_labels'", "train/val/test _images and _labels"],
    ),
    (
        "npz-wrong-shape",
        [*BASELINE, "--data-dir", "badshape"],
        ["train_images is uint8 (96, 32, 32); expected uint8 (N, 28, 28)"],
    ),
    ("missing-cache", kd("missing.h5"), ["missing.h5 not found; make one with `medkd cache-teacher"]),
    ("truncated-cache", kd("truncated.h5"), ["truncated.h5 is not a readable HDF5 file", "cache-teacher"]),
    ("non-hdf5-cache", kd("text.h5"), ["text.h5 is not a readable HDF5 file", "cache-teacher"]),
    ("cache-format-3", kd("v3.h5"), ["has cache format 3; this medkd reads formats 1, 2", "--force"]),
    ("nan-in-logits", kd("nan.h5"), ["nan.h5 has NaN or inf in /train/logits", "rebuild it"]),
    ("inf-in-logits", kd("inf.h5"), ["inf.h5 has NaN or inf in /val/logits", "rebuild it"]),
    (
        "cache-of-other-data",
        kd("good.h5", "--data-dir", "other"),
        ["was built from breastmnist (28 px) train n=96 sha256", "the data given has n=96 sha256"],
    ),
    (
        "cache-of-other-size",
        kd("good.h5", "--dataset", "breastmnist", "--size", "64"),
        ["--size 64 does not match the cache good.h5, built from breastmnist at 28 px", "--size 28"],
    ),
    ("alpha-above-1", kd("good.h5", "--alpha", "1.5"), ["--alpha must be in [0, 1], got 1.5"]),
    ("alpha-below-0", kd("good.h5", "--alpha", "-0.1"), ["--alpha must be in [0, 1], got -0.1"]),
    ("temperature-0", kd("good.h5", "--temperature", "0"), ["--temperature must be > 0, got 0.0"]),
    ("temperature-negative", kd("good.h5", "--temperature", "-2"), ["--temperature must be > 0, got -2.0"]),
    ("temperature-inf", kd("good.h5", "--temperature", "inf"), ["--temperature must be finite, got inf"]),
    ("epochs-0", kd("good.h5", "--epochs", "0"), ["--epochs must be >= 1, got 0"]),
    ("epochs-negative", kd("good.h5", "--epochs", "-3"), ["--epochs must be >= 1, got -3"]),
    ("batch-size-0", kd("good.h5", "--batch-size", "0"), ["--batch-size must be >= 1, got 0"]),
    ("batch-size-negative", kd("good.h5", "--batch-size", "-8"), ["--batch-size must be >= 1, got -8"]),
    (
        "head-epochs-0",
        [*CACHE_TEACHER, "--data-dir", "data", "--epochs", "0", "--out", "new.h5"],
        ["--epochs must be >= 1, got 0"],
    ),
    (
        "run-exists",
        [*BASELINE, "--data-dir", "data", "--out", "runs/done"],
        ["runs/done already holds a finished run; pass --force"],
    ),
    (
        "cache-exists",
        [*CACHE_TEACHER, "--data-dir", "data", "--out", "good.h5"],
        ["good.h5 already exists; pass --force"],
    ),
    (
        "run-folder-unwritable",
        [*BASELINE, "--data-dir", "data", "--out", "a_file/run"],
        ["cannot create run folder a_file/run"],
    ),
    (
        "cache-folder-unwritable",
        [*CACHE_TEACHER, "--data-dir", "data", "--out", "a_file/c.h5"],
        ["cannot create the output folder a_file"],
    ),
    # Never touch a file medkd did not create, --force or not.
    (
        "force-onto-the-data",
        [*CACHE_TEACHER, "--data-dir", "data", "--out", "data/breastmnist.npz", "--force"],
        ["data/breastmnist.npz exists and is not a medkd cache", "even with --force"],
    ),
    (
        "run-into-a-users-folder",
        [*BASELINE, "--data-dir", "data", "--out", "mine", "--force"],
        ["mine holds files medkd did not write (best.pt); give --out a new or empty folder"],
    ),
    (
        "report-plot-onto-the-data",
        ["report", "runs", "--plot", "data/breastmnist.npz", "--force"],
        ["--plot data/breastmnist.npz must end in .png"],
    ),
    (
        "report-plot-onto-a-cache",
        ["report", "runs", "--plot", "good.h5", "--force"],
        ["--plot good.h5 must end in .png"],
    ),
    # Values of the wrong type or range, and a cache whose labels are not the data's.
    (
        "toml-wrong-type",
        [*BASELINE, "--data-dir", "data", "--config", "bad.toml", "--out", "new"],
        ["batch_size must be a whole number like 3, got '32' (str)"],
    ),
    ("seed-beyond-64-bit", kd("good.h5", "--seed", str(2**64)), ["--seed must be in [0, 2^63)"]),
    (
        "device-malformed",
        kd("good.h5", "--device", "cuda:abc"),
        ["--device must be auto, cpu, cuda[:N] or mps"],
    ),
    ("temperature-huge", kd("good.h5", "--temperature", "1e200"), ["--temperature must be <= 10000"]),
    ("cache-labels-not-the-data", kd("flipped.h5"), ["holds test labels other than the data's"]),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below `folder`, with a hash of its bytes: any write shows up."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def invoke(args: list[str]):
    """Run the CLI; an exception other than a user error escapes, so a bug fails the test loudly."""
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_changes_nothing(scene, monkeypatch, args, expected):
    monkeypatch.chdir(scene)
    before = snapshot(scene)
    result = invoke(args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    if result.exit_code == 1:  # a MedkdError (click's usage errors, code 2, add a usage line)
        assert result.stderr.strip() == errors[0]
    assert snapshot(scene) == before


def test_debug_shows_the_traceback(scene, monkeypatch):
    monkeypatch.chdir(scene)
    from medkd.errors import MedkdError

    with pytest.raises(MedkdError, match="has cache format 3"):
        CliRunner().invoke(main, ["--debug", *kd("v3.h5")], catch_exceptions=False)


def _nan_after(monkeypatch, calls: int) -> None:
    """Make the training loss NaN from the `calls`+1-th step on (3 steps per epoch here)."""
    original, seen = medkd.train.kd_loss, []

    def poisoned(*args, **kwargs):
        seen.append(1)
        terms = original(*args, **kwargs)
        return terms._replace(loss=terms.loss * float("nan")) if len(seen) > calls else terms

    monkeypatch.setattr(medkd.train, "kd_loss", poisoned)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(scene, tmp_path, monkeypatch):
    monkeypatch.chdir(scene)
    out = tmp_path / "run"
    args = kd("good.h5", "--epochs", "3", "--batch-size", "32", "--quiet", "--out", str(out))
    _nan_after(monkeypatch, calls=4)  # epoch 1 is steps 1-3; step 2 of epoch 2 is the fifth
    before = snapshot(scene)
    result = invoke(args)
    assert result.exit_code == 1
    error = result.stderr.strip()
    assert "\n" not in error and "Traceback" not in result.output
    assert "training loss became nan at epoch 2, step 2 of 3" in error
    assert f"{EPOCH_CHECKPOINT} keeps epoch 1" in error and "best.pt the best (epoch 1)" in error
    assert sorted(p.name for p in out.iterdir()) == [".medkd-run", "best.pt", EPOCH_CHECKPOINT]
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / EPOCH_CHECKPOINT, weights_only=True)
    assert best["epoch"] == 1 and last["loop"]["epoch"] == 1
    assert all(torch.isfinite(t.float()).all() for t in last["model"].values())
    assert snapshot(scene) == before


def test_nan_in_the_first_epoch_writes_nothing(scene, tmp_path, monkeypatch):
    monkeypatch.chdir(scene)
    _nan_after(monkeypatch, calls=0)
    result = invoke(kd("good.h5", "--quiet", "--out", str(tmp_path / "run")))
    assert result.exit_code == 1
    assert "at epoch 1, step 1 of 3" in result.stderr and "no checkpoint was written" in result.stderr
    assert list((tmp_path / "run").iterdir()) == []


def test_resume_refuses_a_checkpoint_of_another_config(scene, tmp_path, monkeypatch):
    monkeypatch.chdir(scene)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _nan_after(m, calls=3)  # leaves last.pt of epoch 1
        assert invoke(kd("good.h5", "--epochs", "3", "--quiet", "--out", str(out))).exit_code == 1
    before = snapshot(tmp_path)
    result = invoke(kd("good.h5", "--epochs", "3", "--lr", "0.01", "--quiet", "--out", str(out), "--resume"))
    assert result.exit_code == 1
    assert f"{out / EPOCH_CHECKPOINT} is a checkpoint of another config" in result.stderr
    assert "drop --resume to start over" in result.stderr
    assert snapshot(tmp_path) == before
