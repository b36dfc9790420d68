"""Input validation: values of the wrong type or out of range, inconsistent data files, and the small
reliability fixes around them (file permissions, run-teacher aliases, lazy npz reads, a last batch of one).

Every refusal is one `MedkdError` line, raised before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from medkd.cli import main
from medkd.config import (
    CacheTeacherConfig,
    DistillConfig,
    LaunchConfig,
    SweepConfig,
    make_config,
    make_sweep_config,
    run_teacher_paths,
)
from medkd.data import DeviceSplit, View, load_arrays, make_synthetic_like, prepare_images
from medkd.errors import MedkdError
from medkd.files import write_json
from medkd.students import build_student
from medkd.train import LoopState, train_epochs

BASELINE = {"dataset": "breastmnist", "alpha": 1.0}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- config values of the wrong type


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (DistillConfig, {"alpha": "x"}, "alpha must be a number like 0.5, got 'x' (str)"),
        (DistillConfig, {"batch_size": "32"}, "batch_size must be a whole number like 3, got '32' (str)"),
        (DistillConfig, {"milestones": "5,8"}, "milestones must be a list of whole numbers"),
        (DistillConfig, {"milestones": [5, 7.5]}, "milestones must be a list of whole numbers"),
        (DistillConfig, {"epochs": 1.5}, "epochs must be a whole number like 3, got 1.5 (float)"),
        (DistillConfig, {"epochs": True}, "epochs must be a whole number like 3, got True (bool)"),
        (DistillConfig, {"quiet": "no"}, "quiet must be true or false, got 'no' (str)"),
        (DistillConfig, {"cache": 5}, "cache must be a string or a list of strings (or left out)"),
        (CacheTeacherConfig, {"keep_tokens": 1}, "keep_tokens must be true or false, got 1 (int)"),
        (CacheTeacherConfig, {"views": 2.0}, "views must be a whole number like 3, got 2.0 (float)"),
        (LaunchConfig, {"gpus_per_trial": "1"}, "gpus_per_trial must be a number like 0.5, got '1'"),
        (LaunchConfig, {"slurm_time_min": 1.5}, "slurm_time_min must be a whole number like 3, got 1.5"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line(cls, values, message):
    base = {} if cls is LaunchConfig else {"dataset": "breastmnist"}
    with pytest.raises(MedkdError) as err:
        make_config(cls, {**base, **values}, {})
    assert message in one_line(err)
    assert f"--{next(iter(values)).replace('_', '-')}" in str(err.value)  # names the flag too


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seed": [1.5]}, "sweep key 'seed' must hold whole numbers"),
        ({"seed": [True]}, "sweep key 'seed' must hold whole numbers"),
        ({"alpha": ["0.1"]}, "sweep key 'alpha' must hold numbers"),
        ({"teacher_weighting": [5]}, "sweep key 'teacher_weighting' must hold strings"),
        ({"pairs": [[2, True]]}, "list of [temperature, alpha] pairs"),
        ({"epochs": "3"}, "epochs must be a whole number"),
    ],
)
def test_a_sweep_value_of_the_wrong_type_is_one_line(values, message):
    with pytest.raises(MedkdError) as err:
        make_sweep_config(values, {"cache": "c.h5"})
    assert message in one_line(err)


def test_values_of_the_right_type_are_kept_as_given():
    cfg = make_config(DistillConfig, {**BASELINE, "alpha": 1, "milestones": [5, 8], "max_memory_gb": 2}, {})
    assert (cfg.alpha, cfg.milestones, cfg.max_memory_gb) == (1, (5, 8), 2)  # an int is a float
    assert make_config(DistillConfig, {"cache": ["a.h5", "b.h5"]}, {}).cache == ("a.h5", "b.h5")
    assert (
        make_config(CacheTeacherConfig, {"dataset": "breastmnist", "teacher": ["tiny"]}, {}).teacher == "tiny"
    )
    assert make_config(LaunchConfig, {"gpus_per_trial": 1}, {}).gpus_per_trial == 1
    assert make_sweep_config({"seed": [0, 1], "alpha": [1]}, {"cache": "c.h5"}).alpha == (1.0,)
    assert SweepConfig(cache="c.h5", milestones=[2]).milestones == (2,)


def test_python_callers_are_checked_too():
    with pytest.raises(MedkdError, match="epochs must be a whole number"):
        DistillConfig(**BASELINE, epochs=True)
    with pytest.raises(MedkdError, match="force must be true or false"):
        CacheTeacherConfig(dataset="breastmnist", force="yes")


# ---------------------------------------------------------------- values out of range


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "cuda:-1", "gpu", "cuda:0:1"])
def test_a_malformed_device_is_refused(device):
    with pytest.raises(MedkdError) as err:
        DistillConfig(**BASELINE, device=device)
    assert f"--device must be auto, cpu, cuda[:N] or mps, got '{device}'" in one_line(err)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_a_wellformed_device_is_accepted(device):
    assert DistillConfig(**BASELINE, device=device).device == device


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 10**30])
def test_a_seed_torch_cannot_take_is_refused(seed):
    with pytest.raises(MedkdError) as err:
        DistillConfig(**BASELINE, seed=seed)
    assert f"--seed must be in [0, 2^63) (torch takes 64-bit seeds), got {seed}" in one_line(err)
    with pytest.raises(MedkdError, match="--seed must be in"):
        CacheTeacherConfig(dataset="breastmnist", seed=seed)
    with pytest.raises(MedkdError, match="--seed must be in"):
        SweepConfig(cache="c.h5", seed=(0, seed))


def test_the_largest_seed_is_accepted():
    assert DistillConfig(**BASELINE, seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize("temperature", [1e200, 1e5, 1.0000001e4])
def test_a_temperature_whose_square_overflows_is_refused(temperature):
    with pytest.raises(MedkdError) as err:
        DistillConfig(cache="c.h5", temperature=temperature)
    assert "--temperature must be <= 10000" in one_line(err)
    assert "T² overflows float32" in str(err.value)


def test_the_existing_temperature_messages_are_kept():
    assert DistillConfig(cache="c.h5", temperature=1e4).temperature == 1e4
    with pytest.raises(MedkdError, match=r"--temperature must be finite, got inf"):
        DistillConfig(cache="c.h5", temperature=float("inf"))
    with pytest.raises(MedkdError, match=r"--temperature must be > 0, got 0"):
        DistillConfig(cache="c.h5", temperature=0.0)


# ---------------------------------------------------------------- the CLI: one line, nothing written


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validation")
    make_synthetic_like(root / "data", "breastmnist", n_train=8, n_val=4, n_test=4)
    return root


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A baseline that would train one epoch of a tiny student; a case replaces one of these flags.
QUICK = {"--dataset": "breastmnist", "--alpha": "1", "--student": "resnet18", "--student-size": "8"}
QUICK |= {"--epochs": "1", "--data-dir": "data", "--out": "runs/x", "--device": "cpu"}


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ("epochs = 1.5", {}, "epochs must be a whole number like 3, got 1.5 (float)"),
        ("epochs = true", {}, "epochs must be a whole number like 3, got True (bool)"),
        ('quiet = "no"', {}, "quiet must be true or false, got 'no' (str)"),
        ('alpha = "x"', {}, "alpha must be a number like 0.5, got 'x' (str)"),
        ('batch_size = "32"', {}, "batch_size must be a whole number like 3, got '32' (str)"),
        ('milestones = "5,8"', {}, "milestones must be a list of whole numbers like [5, 8]"),
        ("", {"--device": "cuda:abc"}, "--device must be auto, cpu, cuda[:N] or mps, got 'cuda:abc'"),
        ("", {"--seed": str(2**64)}, "--seed must be in [0, 2^63)"),
        ("", {"--temperature": "1e200"}, "--temperature must be <= 10000"),
    ],
)
def test_the_cli_refuses_in_one_line_and_writes_nothing(scene, monkeypatch, toml, flags, message):
    monkeypatch.chdir(scene)
    key = toml.split("=")[0].strip().replace("_", "-")
    (scene / "bad.toml").write_text(f"[distill]\n{toml}\n")
    # No flag of the file's key, which would override the file.
    options = {k: v for k, v in QUICK.items() if k != f"--{key}"} | flags
    before = files_in(scene)
    args = ["distill", *[part for option in options.items() for part in option], "--config", "bad.toml"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().startswith("Error:") and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert files_in(scene) == before and not (scene / "runs").exists()


# ---------------------------------------------------------------- data files that do not add up


def write_split_file(path: Path, labels, n=(6, 4, 4), facts: dict | None = None) -> Path:
    """A 8 px grayscale MedMNIST-format file with `labels(n)` for a split of n images, and its facts."""
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = np.zeros((count, 8, 8), np.uint8)
        arrays[f"{split}_labels"] = labels(count)
    np.savez(path, **arrays)
    if facts is not None:
        path.with_suffix(".json").write_text(json.dumps({"n_channels": 1, **facts}))
    return path


@pytest.mark.parametrize(
    ("facts", "labels", "message"),
    [
        # a binary file with three label names: trains, then its val AUC crashes after the first epoch
        ({"task": "binary-class", "label": {"0": "a", "1": "b", "2": "c"}}, 3, "needs exactly 2 labels"),
        # a multi-label file of one label: two logits against one target column crash the first step
        ({"task": "multi-label, binary-class", "label": {"0": "a"}}, 2, "needs at least 2 labels"),
    ],
)
def test_facts_whose_label_count_does_not_fit_the_task_are_refused_at_load(tmp_path, facts, labels, message):
    path = write_split_file(tmp_path / "mine.npz", lambda n: np.arange(n)[:, None] % labels, facts=facts)
    with pytest.raises(MedkdError) as err:
        load_arrays(str(path))
    assert message in one_line(err)
    assert "mine.json" in str(err.value)


@pytest.mark.parametrize(
    ("facts", "labels"),
    [
        ({"task": "binary-class", "label": {"0": "a", "1": "b"}}, lambda n: np.zeros((n, 2), np.uint8)),
        (None, lambda n: np.zeros(n, np.uint8)),  # 1-D labels, facts inferred
        (None, lambda n: np.zeros((n, 1, 1), np.uint8)),
    ],
    ids=["two-columns-on-binary", "one-dimensional", "three-dimensional"],
)
def test_labels_of_the_wrong_shape_stay_refused_at_load(tmp_path, facts, labels):
    path = write_split_file(tmp_path / "mine.npz", labels, facts=facts)
    with pytest.raises(MedkdError) as err:
        load_arrays(str(path))
    assert "train_labels has shape" in one_line(err)


@pytest.mark.parametrize(("n", "split"), [((6, 0, 4), "val"), ((0, 4, 4), "train"), ((6, 4, 0), "test")])
def test_an_empty_split_is_refused_at_load(tmp_path, n, split):
    path = write_split_file(tmp_path / "mine.npz", lambda k: np.zeros((k, 1), np.uint8), n=n)
    with pytest.raises(MedkdError) as err:
        load_arrays(str(path))
    assert f"the {split} split is empty (0 images)" in one_line(err)


def test_only_the_six_medmnist_arrays_are_decompressed(tmp_path, monkeypatch):
    arrays = {
        **{f"{s}_images": np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")},
        **{f"{s}_labels": np.zeros((4, 1), np.uint8) for s in ("train", "val", "test")},
        "patient_ids": np.array(["p1", "p2", "p3", "p4"], dtype=object),  # needs pickle to read
        "masks": np.zeros((4, 28, 28), np.uint8),
    }
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    read = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda f, key: read.append(key) or real(f, key))
    loaded = load_arrays("breastmnist", root=tmp_path)
    assert sorted(read) == sorted(k for k in arrays if k.endswith(("_images", "_labels")))
    assert loaded["train"][0].shape == (4, 28, 28)


# ---------------------------------------------------------------- files, run teachers


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "result.json", {"ok": True})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_one_run_teacher_spelt_twice_is_refused(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "a")
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for twice in (f"{a}/", f"{tmp_path}/runs/./a", str(tmp_path / "link"), str(a)):
        with pytest.raises(MedkdError) as err:
            run_teacher_paths(f"run:{a},run:{twice}")
        assert "is listed more than once" in one_line(err)
    with pytest.raises(MedkdError, match="is listed more than once"):
        CacheTeacherConfig(dataset="breastmnist", teacher=f"run:{a},run:{a}/")
    assert run_teacher_paths(f"run:{a},run:{b}/") == [str(a), f"{b}/"]  # as given


# ---------------------------------------------------------------- a last training batch of one image


def test_a_last_batch_of_one_joins_the_batch_before():
    split = DeviceSplit(np.zeros((65, 8, 8), np.uint8), np.zeros((65, 1), np.int64), "binary-class", "cpu")
    view = View(size=8)

    def sizes(n_batch: int, merge: bool) -> list[int]:
        return [len(b.index) for b in split.batches(n_batch, view, merge_single=merge)]

    assert sizes(32, True) == [32, 33] and sizes(32, False) == [32, 32, 1]
    assert sizes(64, True) == [65] and sizes(13, True) == [13] * 5
    one = DeviceSplit(np.zeros((1, 8, 8), np.uint8), np.zeros((1, 1), np.int64), "binary-class", "cpu")
    assert [len(b.index) for b in one.batches(32, view, merge_single=True)] == [1]


def test_a_train_split_of_33_trains_with_batch_32_at_8_px():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (33, 8, 8), dtype=np.uint8)
    labels = (np.arange(33) % 2)[:, None].astype(np.int64)
    train = DeviceSplit(images, labels, "binary-class", "cpu")
    val = DeviceSplit(images[:4], labels[:4], "binary-class", "cpu")
    view = View(size=8)
    model = build_student("resnet18", 2, 8)
    before = copy.deepcopy(model).train()
    loop = LoopState.create(model, 1e-3, 1, None, seed=0)
    steps = []
    (stats,) = train_epochs(
        model, train, val, view, loop, teacher_logits=None, alpha=1.0, temperature=1.0, batch_size=32,
        on_step=lambda: steps.append(1),
    )  # fmt: skip
    assert len(steps) == 1  # one batch of all 33 images
    # The epoch's loss is the mean over its 33 images: the one step's cross-entropy on all of them.
    with torch.no_grad():
        expected = F.cross_entropy(before(prepare_images(torch.from_numpy(images), view)), train.targets)
    assert stats.loss == pytest.approx(expected.item(), rel=1e-4)
