"""A finished run rebuilt as the network it trained: `result.json`'s config + `best.pt`, checked.

One loader for everything that uses a trained student after its run: `run:` teachers
(`medkd.run_teacher`), `export`, `predict`, `profile` and the figures (`medkd.deploy`, `medkd.profiling`,
`medkd.embeddings`, `medkd.saliency`). Every refusal is one line naming the folder in the caller's words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from medkd.config import RUN_OPTIONS
from medkd.data import SPLITS, View, data_sha256, load_medmnist
from medkd.errors import MedkdError, first_line
from medkd.files import file_sha256
from medkd.runs import CHECKPOINT, RESULT, RunResult, load_checkpoint, read_result
from medkd.students import build_student


@dataclass(frozen=True)
class TrainedRun:
    """One finished run, ready to predict: its network (eval mode, on the CPU) and what it recorded."""

    path: Path
    result: RunResult
    model: nn.Module
    checkpoint_sha256: str
    checkpoint_epoch: int
    role: str = "run"  # how messages name it: "teacher run" for a run: teacher

    @property
    def view(self) -> View:
        """The view the run trained and evaluated with (`distill`: student size, interpolation, 0.5/0.5)."""
        interpolation = self.result.config.get("interpolation") or "bicubic"
        size = self.result.student_size or self.result.size
        return View(size, interpolation=interpolation, rounded=bool(self.result.rounded))

    def split(self, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`(images uint8, labels)` of one split of the data the run was trained on; data that differs
        from what the run recorded (its split sha256) is refused."""
        if split not in SPLITS:
            raise MedkdError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        images, labels = load_medmnist(self.result.dataset, split, int(self.result.size), data_dir)
        self.check_data(split, images, labels)
        return images, labels

    def check_data(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Refuse a split other than the one the run recorded (its sha256), e.g. one read for another run."""
        recorded = self.result.data_sha256.get(split)
        if recorded is not None and recorded != data_sha256(images, labels):
            raise MedkdError(
                f"{self.role} {self.path} was trained on other {self.result.dataset} data ({split} sha256 "
                f"{recorded[:12]}…) than the data folder holds; point --data-dir at its data"
            )


def load_trained_run(run_dir: str | Path, role: str = "run") -> TrainedRun:
    """Rebuild a finished run's network from its `result.json` config and `best.pt`; refuse anything else.

    `role` names the folder in messages ("run", "teacher run").
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise MedkdError(f"{role} folder {path} not found; give the folder of a finished medkd run")
    result = read_result(path)
    checkpoint = path / CHECKPOINT
    if not checkpoint.is_file():
        raise MedkdError(
            f"{role} {path} has no {CHECKPOINT}; it did not finish, or the file was removed: "
            f"rerun it with `medkd distill --out {path} --force`"
        )
    what = f"{role} {path}"
    try:
        stored = load_checkpoint(checkpoint, "a medkd checkpoint")
    except MedkdError as err:
        raise MedkdError(f"{what}: {err}; it must be the best.pt that `medkd distill` wrote there") from err
    saved = stored.get("config")
    if not isinstance(saved, dict) or _strip(saved) != _strip(result.config):
        raise MedkdError(
            f"{what}: {checkpoint} was saved by another run than {path / RESULT} describes "
            f"(its config differs); put back that run's best.pt or rerun it"
        )
    try:
        model = build_student(result.student, result.n_outputs, result.student_size)
        model.load_state_dict(stored["model"], strict=True)
    except (RuntimeError, MedkdError) as err:
        first = first_line(err)
        raise MedkdError(
            f"{what}: {checkpoint} does not fit {result.student} with {result.n_outputs} outputs at "
            f"{result.student_size} px ({first})"
        ) from err
    model.eval().requires_grad_(False)
    return TrainedRun(path, result, model, file_sha256(checkpoint), int(stored.get("epoch", 0)), role)


def _strip(config: dict) -> dict:
    # A checkpoint whose config differs from result.json only in run options still belongs to that run.
    return {k: v for k, v in config.items() if k not in RUN_OPTIONS}
