"""Stage two: student runs from a cache (and the baseline), their run folders, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TASK_FLAGS, tiny_cache_config

from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import DistillConfig
from medkd.data import make_synthetic_like
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.metrics import evaluate


def make_cache(root: Path, flag: str, out: Path) -> Path:
    return cache_teacher(tiny_cache_config(root, out, dataset=flag))


@pytest.fixture(scope="module")
def caches(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("caches")
    return {flag: make_cache(synthetic_root, flag, folder / f"{flag}.h5") for flag in TASK_FLAGS.values()}


def quick(**kwargs) -> DistillConfig:
    # resnet18 at 16 px (resized from 28): a third of the work at 28 px, and the blobs stay visible.
    defaults = dict(student="resnet18", student_size=16, epochs=2, batch_size=32, quiet=True)
    return DistillConfig(**{**defaults, **kwargs})


def overwrite_logits(path: Path, logits: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        f["train/logits"][...] = logits


@pytest.mark.parametrize("flip_logits", [False, True])
def test_teacher_logits_are_looked_up_by_dataset_index(synthetic_root, caches, tmp_path, flip_logits):
    # Logits that spell out each image's label: with alpha=0 the labels reach the student only through
    # them, so a student fed by batch position (shuffled batches) would learn noise. The control gives
    # every image the other class's logits: the student then learns the opposite, so the test can fail.
    # (A shuffled control is too weak here: 32 test images leave chance AUC anywhere in 0.3-0.8.)
    cache = tmp_path / "onehot.h5"
    cache.write_bytes(caches["breastmnist"].read_bytes())
    with h5py.File(cache, "r") as f:
        labels = f["train/labels"][:, 0]
    logits = 8.0 * (np.eye(2)[1 - labels if flip_logits else labels] - 0.5)
    overwrite_logits(cache, logits.astype(np.float32))
    result = distill(
        quick(cache=str(cache), data_dir=str(synthetic_root), alpha=0.0, epochs=2, out=str(tmp_path / "run"))
    )
    if flip_logits:
        assert result.test["auc"] < 0.5, result.history
    else:
        assert result.test["auc"] > 0.9


@pytest.mark.parametrize("flag", list(TASK_FLAGS.values()))
@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_run_folder_is_complete_for_every_task(synthetic_root, caches, tmp_path, flag, alpha):
    cfg = quick(
        cache=str(caches[flag]),
        data_dir=str(synthetic_root),
        alpha=alpha,
        epochs=1,
        out=str(tmp_path / "run"),
    )
    result = distill(cfg)
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir())
    assert names == [".medkd-run", "best.pt", "predictions.npz", "result.json"]  # the marker: medkd's folder
    saved = json.loads((run / "result.json").read_text())
    assert saved["config"]["alpha"] == alpha and saved["dataset"] == flag
    assert saved["baseline"] is (alpha == 1.0)
    assert saved["teacher"]["teacher"] == "tiny" and saved["teacher"]["medkd_format"] == 2
    assert saved["teacher"]["test_auc"] == TeacherCache(caches[flag]).teacher_metrics("test")["auc"]
    assert len(saved["history"]) == 1 and saved["best_epoch"] == 1
    epoch = saved["history"][0]  # the loss and its two terms, each a mean over the training images
    if alpha == 1.0:
        assert epoch["kd"] is None and epoch["loss"] == pytest.approx(epoch["ce"], rel=1e-6)
    else:
        assert epoch["kd"] >= 0 and epoch["ce"] > 0
        assert epoch["loss"] == pytest.approx(alpha * epoch["ce"] + (1 - alpha) * epoch["kd"], rel=1e-5)
    for key in ("wall_seconds", "train_images_per_second", "device", "versions", "val", "test"):
        assert key in saved
    # Anyone can recompute the test metrics from predictions.npz.
    with np.load(run / "predictions.npz") as p:
        recomputed = evaluate(str(p["task"]), p["y_true"], p["y_score"])
    assert recomputed == pytest.approx(result.test)


def test_baseline_needs_no_cache(synthetic_root, tmp_path):
    result = distill(
        quick(
            dataset="pathmnist", alpha=1.0, data_dir=str(synthetic_root), epochs=4, out=str(tmp_path / "base")
        )
    )
    assert result.teacher is None and result.baseline
    assert result.test["auc"] > 0.6


def test_same_seed_same_run_on_cpu(synthetic_root, caches, tmp_path):
    runs = [
        distill(
            quick(
                cache=str(caches["retinamnist"]),
                data_dir=str(synthetic_root),
                epochs=1,
                out=str(tmp_path / f"r{i}"),
            )
        )
        for i in range(2)
    ]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    other = distill(
        quick(
            cache=str(caches["retinamnist"]),
            data_dir=str(synthetic_root),
            epochs=1,
            seed=1,
            out=str(tmp_path / "r2"),
        )
    )
    assert other.history[0]["loss"] != runs[0].history[0]["loss"]


def test_patience_stops_early(synthetic_root, tmp_path):
    result = distill(
        quick(
            dataset="breastmnist",
            alpha=1.0,
            data_dir=str(synthetic_root),
            epochs=30,
            lr=1e-7,
            patience=2,
            out=str(tmp_path / "p"),
        )
    )
    assert result.epochs_run < 30
    assert result.epochs_run - result.best_epoch == 2


def test_cache_from_other_data_is_refused_and_nothing_written(caches, tmp_path):
    other = tmp_path / "other"
    make_synthetic_like(other, "breastmnist", n_train=96, n_val=32, n_test=32, seed=7)
    with pytest.raises(MedkdError, match="sha256"):
        distill(quick(cache=str(caches["breastmnist"]), data_dir=str(other), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_dataset_must_match_the_cache(synthetic_root, caches, tmp_path):
    with pytest.raises(MedkdError, match="does not match the cache"):
        distill(
            quick(
                cache=str(caches["breastmnist"]),
                dataset="pathmnist",
                data_dir=str(synthetic_root),
                out=str(tmp_path / "run"),
            )
        )


def test_finished_run_is_not_overwritten_without_force(synthetic_root, tmp_path):
    cfg = quick(
        dataset="breastmnist", alpha=1.0, data_dir=str(synthetic_root), epochs=1, out=str(tmp_path / "r")
    )
    distill(cfg)
    before = (tmp_path / "r" / "result.json").read_text()
    with pytest.raises(MedkdError, match="--force"):
        distill(cfg)
    assert (tmp_path / "r" / "result.json").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
        (["--alpha", "-0.1"], "--alpha must be in [0, 1], got -0.1"),
        (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--temperature", "-2"], "--temperature must be > 0, got -2.0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (
            ["--student", "vgg16"],
            "unknown student 'vgg16'; valid: resnet18, resnet50 or timm:<any timm model id>",
        ),
        (["--cache", "missing.h5"], "not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(caches, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    base = ["distill", "--cache", str(caches["breastmnist"]), "--out", "runs/x"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_cli_config_file_and_flags_override(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "recipe.toml"
    config.write_text(
        'epochs = 3\n[distill]\nstudent = "resnet18"\nalpha = 1.0\n[cache_teacher]\nteacher = "tiny"\n'
    )
    result = CliRunner().invoke(
        main,
        [
            "distill",
            "--config",
            str(config),
            "--dataset",
            "breastmnist",
            "--data-dir",
            str(synthetic_root),
            "--epochs",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    saved = json.loads((tmp_path / run_dir / "result.json").read_text())
    assert saved["config"]["epochs"] == 1 and saved["config"]["student"] == "resnet18"
    assert saved["baseline"]


def test_cli_unknown_config_key_lists_known_ones(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("alpah = 0.3\n")
    result = CliRunner().invoke(main, ["distill", "--config", str(config), "--dataset", "breastmnist"])
    assert result.exit_code != 0
    assert "unknown config key(s) alpah" in result.output and "alpha" in result.output
