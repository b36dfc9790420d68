"""Shared fixtures: MedMNIST-format synthetic data made by the tests, and the genuine files if present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medkd.config import CacheTeacherConfig
from medkd.data import make_synthetic_like

# The genuine MedMNIST v2 files (breastmnist, pneumoniamnist at 28 px), outside the project.
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"

# One flag per MedMNIST task type; pathmnist and retinamnist are RGB, the others grayscale.
TASK_FLAGS = {
    "binary-class": "breastmnist",
    "multi-class": "pathmnist",
    "ordinal-regression": "retinamnist",
    "multi-label, binary-class": "chestmnist",
}

torch.set_num_threads(2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"genuine MedMNIST files not found in {REAL_DATA}")
    for item in items:
        if "realdata" in item.keywords and not (REAL_DATA / "breastmnist.npz").is_file():
            item.add_marker(skip)


def tiny_cache_config(root: Path, out: Path, **kwargs) -> CacheTeacherConfig:
    """Stage one as the tests run it: the tiny random teacher at 28 px on breastmnist, 3 head epochs."""
    values = dict(
        dataset="breastmnist",
        teacher="tiny",
        teacher_size=28,
        epochs=3,
        data_dir=str(root),
        out=str(out),
        quiet=True,
        min_teacher_auc=0,  # the random tiny teacher may be near chance; these tests are not about quality
    )
    return CacheTeacherConfig(**{**values, **kwargs})


def kill_after_steps(monkeypatch: pytest.MonkeyPatch, loss: str, steps: int, run) -> None:
    """Run `run()` with `medkd.train.<loss>` (the loop's loss function) raising KeyboardInterrupt once it
    has been called `steps` times, as a Ctrl-C in the middle of an epoch; epoch checkpoints every epoch."""
    import medkd.distill
    import medkd.train

    real, calls = getattr(medkd.train, loss), {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(medkd.distill, "EPOCH_CHECKPOINT_SECONDS", 0.0)
        m.setattr(medkd.train, loss, dies)
        with pytest.raises(KeyboardInterrupt):
            run()


@pytest.fixture
def real_data() -> Path:
    return REAL_DATA


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with small synthetic files for one flag of every task type (28 px)."""
    root = tmp_path_factory.mktemp("medmnist")
    for flag in TASK_FLAGS.values():
        make_synthetic_like(root, flag, n_train=96, n_val=32, n_test=32, seed=1)
    return root
