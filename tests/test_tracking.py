"""Tracking: what the trackers write is read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from medkd.errors import MedkdError
from medkd.tracking import MLFLOW_MISSING, SWEEP_TAG, TENSORBOARD_MISSING, Trackers, open_trackers
from medkd.train import EpochStats

CONFIG = {
    "alpha": 0.2,
    "temperature": 2.0,
    "milestones": [10, 20],
    "cache": ["a.h5", "b.h5"],
    "augment": None,
}
TEST = {"auc": 0.91, "acc": 0.83}
VAL = {"auc": 0.93, "acc": 0.85}


def history(kd: bool, teachers: int = 0) -> list[EpochStats]:
    """Three epochs with distinct numbers; the baseline (kd False) has no KD term."""
    return [
        EpochStats(
            epoch=e,
            loss=1.0 / e,
            ce=0.9 / e,
            kd=0.5 / e if kd else None,
            lr=1e-3 * 0.5 ** (e - 1),
            val_auc=0.7 + 0.05 * e,
            val_acc=0.6 + 0.04 * e,
            seconds=2.0 + e,
            images_per_second=1000.0 + e,
            teacher_weights=[0.25 * e / 3, 1 - 0.25 * e / 3] if teachers else None,
        )
        for e in (1, 2, 3)
    ]


def write(
    tensorboard: str | None, mlflow: str | None, name: str, epochs: list[EpochStats], group: str | None
):
    with open_trackers(tensorboard, mlflow, name, CONFIG, group=group) as trackers:
        for stats in epochs:
            trackers.log_epoch(stats)
        trackers.log_final(TEST, VAL, {"best_epoch": 3.0})


# ---------------------------------------------------------------- TensorBoard


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def test_tensorboard_trials_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    baseline, kd = history(kd=False), history(kd=True, teachers=2)
    write(str(tmp_path), None, "a1.0_T1_s0", baseline, group="grid")
    write(str(tmp_path), None, "a0.2_T2_s0", kd, group="grid")

    # Each trial is its own run folder under the sweep's name.
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["a0.2_T2_s0", "a1.0_T1_s0"]
    for name, epochs in (("a1.0_T1_s0", baseline), ("a0.2_T2_s0", kd)):
        assert len(list((tmp_path / "grid" / name).glob("events.out.tfevents.*"))) == 1
        events = read_events(tmp_path / "grid" / name)
        for tag, attr in (("val/auc", "val_auc"), ("loss/ce", "ce"), ("lr", "lr"), ("loss/total", "loss")):
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [1, 2, 3]
            expected = [np.float32(getattr(stats, attr)) for stats in epochs]
            assert [np.float32(s.value) for s in scalars] == expected, tag
        tags = events.Tags()["scalars"]
        assert "loss/feature" not in tags
        assert [(s.step, s.value) for s in events.Scalars("test/auc")] == [(3, np.float32(0.91))]
        assert [s.value for s in events.Scalars("best_val/acc")] == [np.float32(0.85)]
        assert [s.value for s in events.Scalars("best_epoch")] == [3.0]
        text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert text.startswith("```json\n") and '"milestones": [\n    10,\n    20\n  ]' in text

    baseline_tags = read_events(tmp_path / "grid" / "a1.0_T1_s0").Tags()["scalars"]
    kd_events = read_events(tmp_path / "grid" / "a0.2_T2_s0")
    assert "loss/kd" not in baseline_tags and "teacher_weight/0" not in baseline_tags
    assert [np.float32(s.value) for s in kd_events.Scalars("loss/kd")] == [
        np.float32(0.5 / e) for e in (1, 2, 3)
    ]
    assert [np.float32(s.value) for s in kd_events.Scalars("teacher_weight/1")] == [
        np.float32(1 - 0.25 * e / 3) for e in (1, 2, 3)
    ]


def test_tensorboard_single_run_has_no_group_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    write(str(tmp_path), None, "run1", history(kd=True), group=None)
    assert [p.name for p in tmp_path.iterdir()] == ["run1"]
    assert read_events(tmp_path / "run1").Scalars("val/acc")[-1].step == 3


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module: creating its tables takes seconds. (The file store needs
    MLFLOW_ALLOW_FILE_STORE=true since MLflow 3.7; sqlite is what MLflow now defaults to.)"""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_mlflow_trials_are_runs(mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    write(None, mlflow_uri, "a0.2_T2_s0", history(kd=True, teachers=2), group="grid")
    with pytest.raises(RuntimeError, match="diverged"):  # noqa: SIM117 - the raise is the point
        with open_trackers(None, mlflow_uri, "a1.0_T1_s0", CONFIG, group="grid") as trackers:
            trackers.log_epoch(history(kd=False)[0])
            raise RuntimeError("diverged")

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("grid")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["a0.2_T2_s0", "a1.0_T1_s0"]
    kd, failed = runs["a0.2_T2_s0"], runs["a1.0_T1_s0"]
    assert (kd.info.status, failed.info.status) == ("FINISHED", "FAILED")
    assert kd.data.tags[SWEEP_TAG] == "grid" == failed.data.tags[SWEEP_TAG]
    assert kd.data.params == {
        "alpha": "0.2",
        "temperature": "2.0",
        "milestones": "[10, 20]",
        "cache": '["a.h5", "b.h5"]',
        "augment": "None",
    }

    history_of = lambda run, key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history_of(kd, "val/auc") == [(e, pytest.approx(0.7 + 0.05 * e)) for e in (1, 2, 3)]
    assert history_of(kd, "loss/kd") == [(e, pytest.approx(0.5 / e)) for e in (1, 2, 3)]
    assert history_of(kd, "teacher_weight/0") == [(e, pytest.approx(0.25 * e / 3)) for e in (1, 2, 3)]
    assert kd.data.metrics["test/auc"] == pytest.approx(0.91)
    assert history_of(kd, "test/auc") == [(3, pytest.approx(0.91))]
    assert kd.data.metrics["best_val/auc"] == pytest.approx(0.93)
    # The failed trial logged one baseline epoch and no final metrics.
    assert history_of(failed, "val/acc") == [(1, pytest.approx(0.64))]
    assert "loss/kd" not in failed.data.metrics and "test/auc" not in failed.data.metrics


def test_mlflow_default_uri_and_experiment(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # what "--mlflow" without a URI resolves
    long = {"note": "x" * 10_000, "nested": {"depth": 2}}
    with open_trackers(None, "", "run1", long) as trackers:
        trackers.log_epoch(history(kd=True)[0])

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medkd").experiment_id])
    assert run.info.run_name == "run1" and run.info.status == "FINISHED"
    assert SWEEP_TAG not in run.data.tags
    assert run.data.params["nested.depth"] == "2"
    # Cut to MLflow's limit by medkd: older MLflow raises on a longer value, newer ones warn and cut.
    assert run.data.params["note"] == "x" * MAX_PARAM_VAL_LENGTH
    assert "truncated" not in capfd.readouterr().err


def test_mlflow_bad_uri_is_one_line(mlflow_uri: str) -> None:
    with pytest.raises(MedkdError, match=r"^--mlflow could not start a run at bogus://x: ") as err:
        open_trackers(None, "bogus://x", "run1", CONFIG)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- off, missing packages, closing


def test_both_off_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes any import of these fail, so opening them would raise.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with open_trackers(None, None, "run1", CONFIG) as trackers:
        trackers.log_epoch(history(kd=True)[0])
        trackers.log_final(TEST, VAL)
    assert trackers.trackers == []


def test_missing_packages_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MedkdError) as err:
        open_trackers(str(tmp_path), None, "run1", CONFIG)
    assert str(err.value) == TENSORBOARD_MISSING
    with pytest.raises(MedkdError) as err:
        open_trackers(None, "", "run1", CONFIG)
    assert str(err.value) == MLFLOW_MISSING
    assert list(tmp_path.iterdir()) == []


class FakeTracker:
    def __init__(self, fail_on_close: bool = False) -> None:
        self.closed: list[bool] = []
        self.fail_on_close = fail_on_close

    def log_epoch(self, stats: EpochStats) -> None: ...

    def log_final(self, test, val, extra=None) -> None: ...

    def close(self, failed: bool = False) -> None:
        self.closed.append(failed)
        if self.fail_on_close:
            raise OSError("disk full")


def test_trackers_close_all_once_and_mark_failure() -> None:
    before, broken, after = FakeTracker(), FakeTracker(fail_on_close=True), FakeTracker()
    with pytest.raises(OSError, match="disk full"), Trackers([before, broken, after]):
        pass
    # The broken one stopped neither the trackers before it nor those after it.
    assert before.closed == broken.closed == after.closed == [False]

    first, second = FakeTracker(), FakeTracker()
    trackers = Trackers([first, second])
    with pytest.raises(KeyError), trackers:
        raise KeyError("boom")
    trackers.close()  # a second close is a no-op
    assert first.closed == [True] and second.closed == [True]


def test_a_sweep_logs_each_trial_to_tensorboard(tmp_path: Path) -> None:
    """`medkd sweep --tensorboard DIR`: every trial's epochs are in DIR/<sweep>/<trial>, equal to its
    result.json history, as TensorBoard's own reader parses them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medkd.config import SweepConfig
    from medkd.data import make_synthetic
    from medkd.sweep import run_sweep

    npz = make_synthetic(tmp_path / "d.npz", "binary-class", 2, n_train=48, n_val=24, n_test=24)
    sweep = SweepConfig(
        dataset=str(npz), alpha=(1.0,), seed=(0, 1), student="resnet18", student_size=8, epochs=2,
        out=str(tmp_path / "sweep"), tensorboard=str(tmp_path / "tb"), quiet=True, device="cpu",
    )  # fmt: skip
    results = run_sweep(sweep)
    assert len(results) == 2
    for result in results:
        folder = tmp_path / "tb" / "sweep" / Path(result.run_dir).name
        events = EventAccumulator(str(folder))
        events.Reload()
        auc = events.Scalars("val/auc")
        assert [e.step for e in auc] == [1, 2]
        np.testing.assert_allclose([e.value for e in auc], [h["val_auc"] for h in result.history], rtol=1e-6)
        ce = [e.value for e in events.Scalars("loss/ce")]
        np.testing.assert_allclose(ce, [h["ce"] for h in result.history], rtol=1e-6)
        assert "loss/kd" not in events.Tags()["scalars"]  # the baseline has no KD term
        assert events.Scalars("test/auc")[0].value == pytest.approx(result.test["auc"], rel=1e-6)
