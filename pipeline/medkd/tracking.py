"""Experiment tracking for `--tensorboard DIR` and `--mlflow [URI]`: each run, or each sweep trial, becomes
one TensorBoard run folder and/or one MLflow run with the per-epoch history and the final metrics.

Both are off by default and then cost nothing: tensorboard and mlflow are imported only when asked for.
A failed log write raises like any other error: a tracker asked for by a flag that silently stops logging
would be worse than a run that stops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from medkd import __version__
from medkd.errors import MedkdError, first_line

if TYPE_CHECKING:  # medkd.train imports torch
    from medkd.train import EpochStats

DEFAULT_EXPERIMENT = "medkd"  # the MLflow experiment of single runs; a sweep's trials go under its name
SWEEP_TAG = "medkd.sweep"
TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install 'medkd[track]'"
MLFLOW_MISSING = "--mlflow needs mlflow: pip install 'medkd[mlflow]'"


def epoch_scalars(stats: EpochStats) -> dict[str, float]:
    """One epoch's numbers under the names both trackers use; terms a run does not have are left out."""
    values: dict[str, float | None] = {
        "loss/total": stats.loss,
        "loss/ce": stats.ce,
        "loss/kd": stats.kd,
        "loss/feature": stats.feature,
        "val/auc": stats.val_auc,
        "val/acc": stats.val_acc,
        "lr": stats.lr,
        "speed/images_per_second": stats.images_per_second,
        "speed/epoch_seconds": stats.seconds,
    }
    for i, weight in enumerate(stats.teacher_weights or []):
        values[f"teacher_weight/{i}"] = weight
    return {name: float(value) for name, value in values.items() if value is not None}


def final_scalars(
    test: dict[str, float], val: dict[str, float], extra: dict[str, float] | None = None
) -> dict[str, float]:
    """The end-of-run numbers: `test/<k>`, `best_val/<k>` (the selected epoch), `extra` under its keys."""
    out = {f"test/{k}": float(v) for k, v in test.items()}
    out.update({f"best_val/{k}": float(v) for k, v in val.items()})
    out.update({k: float(v) for k, v in (extra or {}).items()})
    return out


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as flat `a.b` string params: lists become JSON, everything else `str()`."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


class Tracker(Protocol):
    """Where one run's history goes."""

    def log_epoch(self, stats: EpochStats) -> None: ...

    def log_final(
        self, test: dict[str, float], val: dict[str, float], extra: dict[str, float] | None = None
    ) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TensorBoardTracker:
    """One TensorBoard run folder: scalars per epoch (step = epoch), the final metrics, the config as text."""

    def __init__(self, log_dir: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MedkdError(TENSORBOARD_MISSING) from err
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.step = 0
        # A fenced block keeps the JSON's indentation: TensorBoard renders text as Markdown.
        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2, default=str)}\n```", 0)

    def log_epoch(self, stats: EpochStats) -> None:
        for name, value in epoch_scalars(stats).items():
            self.writer.add_scalar(name, value, stats.epoch)
        self.step = stats.epoch
        # Flushed every epoch so a `tensorboard --logdir` open during training shows it (the writer's
        # own timer waits two minutes).
        self.writer.flush()

    def log_final(
        self, test: dict[str, float], val: dict[str, float], extra: dict[str, float] | None = None
    ) -> None:
        for name, value in final_scalars(test, val, extra).items():
            self.writer.add_scalar(name, value, self.step)

    def close(self, failed: bool = False) -> None:
        # TensorBoard has no run status; a failed run is the one whose curves stop early.
        self.writer.close()


class MLflowTracker:
    """One MLflow run, through an explicit client: no fluent active run, so trials in one process never
    nest. Params are the flattened config, metrics carry the TensorBoard names (MLflow allows `/`)."""

    def __init__(
        self, uri: str | None, experiment: str, run_name: str, config: dict[str, Any], tags: dict[str, str]
    ) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        except ImportError as err:
            raise MedkdError(MLFLOW_MISSING) from err
        resolved = uri or mlflow.get_tracking_uri()  # None: $MLFLOW_TRACKING_URI, else MLflow's default
        # mlflow-skinny alone has no SQL store, and MLflow 3.7+ defaults to sqlite:///mlflow.db.
        if resolved.startswith("sqlite") and importlib.util.find_spec("sqlalchemy") is None:
            raise MedkdError(f"--mlflow {resolved} needs sqlalchemy and alembic: pip install 'medkd[mlflow]'")
        self._Metric = Metric
        self.step = 0
        try:
            self.client = mlflow.MlflowClient(tracking_uri=resolved)
            experiment_id = self._experiment_id(experiment, MlflowException)
            tags = {**tags, "medkd.version": __version__}
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        except MlflowException as err:
            raise MedkdError(
                f"--mlflow could not start a run at {resolved}: {first_line(err)}; give a tracking URI"
                " MLflow can open (sqlite:///mlflow.db, http://HOST:5000)"
            ) from err
        params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten_config(config).items()]
        try:
            for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        except BaseException:
            self.close(failed=True)  # not left RUNNING in the UI
            raise

    def _experiment_id(self, name: str, mlflow_exception: type[Exception]) -> str:
        """The id of experiment `name`, created on first use (parallel trials may race to create it)."""
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except mlflow_exception:
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise MedkdError(
                f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore"
                f" --experiment-id {found.experiment_id}) or delete it for good (mlflow gc)"
            )
        return found.experiment_id

    def _log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._Metric(name, value, now, step) for name, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, stats: EpochStats) -> None:
        self._log(epoch_scalars(stats), stats.epoch)
        self.step = stats.epoch

    def log_final(
        self, test: dict[str, float], val: dict[str, float], extra: dict[str, float] | None = None
    ) -> None:
        self._log(final_scalars(test, val, extra), self.step)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


@dataclass
class Trackers:
    """The trackers of one run, each call forwarded to all; empty when tracking is off. As a context
    manager it closes them, marking the run failed when the block raised."""

    trackers: list[Tracker] = field(default_factory=list)

    def log_epoch(self, stats: EpochStats) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(stats)

    def log_final(
        self, test: dict[str, float], val: dict[str, float], extra: dict[str, float] | None = None
    ) -> None:
        for tracker in self.trackers:
            tracker.log_final(test, val, extra)

    def close(self, failed: bool = False) -> None:
        # Every tracker is closed even if one raises (an MLflow run must not stay RUNNING); then it raises.
        trackers, self.trackers = self.trackers, []
        with contextlib.ExitStack() as stack:
            for tracker in trackers:
                stack.callback(tracker.close, failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)


def open_trackers(
    tensorboard: str | None,
    mlflow: str | None,
    run_name: str,
    config: dict[str, Any],
    group: str | None = None,
) -> Trackers:
    """The trackers the flags ask for: TensorBoard in `tensorboard/[group/]run_name`; an MLflow run named
    `run_name` in experiment `group` (else "medkd") at URI `mlflow` ("": MLflow's default; None: off)."""
    out = Trackers()
    try:
        if tensorboard is not None:
            log_dir = Path(tensorboard) / group / run_name if group else Path(tensorboard) / run_name
            out.trackers.append(TensorBoardTracker(log_dir, config))
        if mlflow is not None:
            tags = {SWEEP_TAG: group} if group else {}
            experiment = group or DEFAULT_EXPERIMENT
            out.trackers.append(MLflowTracker(mlflow or None, experiment, run_name, config, tags))
    except BaseException:
        out.close(failed=True)
        raise
    return out


def check_trackers(tensorboard: str | None, mlflow: str | None) -> None:
    """Refuse a tracker whose package is missing before a run writes anything (`open_trackers` would
    find out only once the run folder exists)."""
    if tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        raise MedkdError(TENSORBOARD_MISSING)
    if mlflow is not None and importlib.util.find_spec("mlflow") is None:
        raise MedkdError(MLFLOW_MISSING)
