"""AUC and ACC with MedMNIST's conventions (`medmnist.evaluator.getAUC/getACC`), tolerant of tiny splits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from medkd.data import is_multilabel


def scores_from_logits(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities the metrics expect: sigmoid per label (multi-label), softmax otherwise."""
    return torch.sigmoid(logits) if is_multilabel(task) else torch.softmax(logits, dim=1)


def _mean_auc(columns: list[tuple[np.ndarray, np.ndarray]]) -> float:
    # A label with one class only (small val splits) has no AUC: medmnist's getAUC then gives NaN or
    # raises, depending on the scikit-learn version; we average the defined ones, which equals getAUC
    # whenever getAUC is defined.
    aucs = [roc_auc_score(t, s) for t, s in columns if 0 < t.sum() < len(t)]
    return float(np.mean(aucs)) if aucs else float("nan")


def evaluate(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """`{"auc", "acc"}` of probabilities `y_score` (N, C) against labels `y_true` (N, L), as MedMNIST does."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    if is_multilabel(task):
        auc = _mean_auc([(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])])
        acc = float(np.mean((y_score > 0.5) == (y_true > 0.5)))  # mean over labels of per-label accuracy
        return {"auc": auc, "acc": acc}
    y = y_true.reshape(-1)
    if task == "binary-class":
        positive = y_score[:, -1]
        return {"auc": _mean_auc([(y, positive)]), "acc": float(np.mean((positive > 0.5) == (y == 1)))}
    auc = _mean_auc([((y == k).astype(np.float64), y_score[:, k]) for k in range(y_score.shape[1])])
    return {"auc": auc, "acc": float(np.mean(y_score.argmax(axis=1) == y))}


@dataclass
class BestEpoch:
    """The best epoch so far by val AUC, for the head's and the student's training alike.

    The first epoch always counts; after it a NaN AUC (a val split with one class) never beats a number,
    and ties keep the earlier epoch. `stale` counts the epochs since the best, for early stopping.
    """

    auc: float | None = None
    epoch: int = 0
    stale: int = 0

    def update(self, epoch: int, auc: float) -> bool:
        """Record epoch `epoch`'s val AUC; True if it is the new best."""
        best = self.auc
        better = best is None or (not math.isnan(auc) and (math.isnan(best) or auc > best))
        if better:
            self.auc, self.epoch, self.stale = auc, epoch, 0
        else:
            self.stale += 1
        return better
