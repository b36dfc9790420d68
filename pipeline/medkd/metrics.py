"""AUC and ACC with MedMNIST's conventions (`medmnist.evaluator.getAUC/getACC`), tolerant of tiny splits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from medkd.data import is_multilabel

ECE_BINS = 15  # evaluate's `ece`: 15 equal-width bins, as calibration papers use


def scores_from_logits(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Probabilities the metrics expect: sigmoid per label (multi-label), softmax otherwise."""
    return torch.sigmoid(logits) if is_multilabel(task) else torch.softmax(logits, dim=1)


def _mean_auc(columns: list[tuple[np.ndarray, np.ndarray]]) -> float:
    # A label with one class only (small val splits) has no AUC: medmnist's getAUC then gives NaN or
    # raises, depending on the scikit-learn version; we average the defined ones, which equals getAUC
    # whenever getAUC is defined.
    aucs = [roc_auc_score(t, s) for t, s in columns if 0 < t.sum() < len(t)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _auc_acc(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    # MedMNIST's getAUC/getACC; kept apart so the extra metrics cannot change these two values.
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


def _arrays(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y_true), np.asarray(y_score, dtype=np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """`num / den`, NaN where `den` is 0 (a rate with nothing to count is undefined, not 0)."""
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN slice; an undefined mean is an expected outcome on tiny splits.
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def _counts(task: str, y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, ...]:
    """One-vs-rest `(tp, fp, fn, tn)` per class (single-label) or per label (multi-label), as floats.

    Predictions follow `acc`: a label or the binary positive class when its score > 0.5, else the argmax.
    """
    if is_multilabel(task):
        pred, truth = y_score > 0.5, y_true > 0.5
        tp = (pred & truth).sum(axis=0)
        fp = (pred & ~truth).sum(axis=0)
        fn = (~pred & truth).sum(axis=0)
        tn = len(pred) - tp - fp - fn
        return tuple(c.astype(np.float64) for c in (tp, fp, fn, tn))
    y = y_true.reshape(-1).astype(np.int64)
    if task == "binary-class":
        n_classes, pred = 2, (y_score[:, -1] > 0.5).astype(np.int64)
    else:
        n_classes, pred = y_score.shape[1], y_score.argmax(axis=1)
    # one bincount is the whole confusion matrix; sklearn's costs ~0.6 ms a call, every epoch
    matrix = np.bincount(y * n_classes + pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    tp = np.diag(matrix).astype(np.float64)
    fn = matrix.sum(axis=1) - tp
    fp = matrix.sum(axis=0) - tp
    return tp, fp, fn, len(y) - tp - fp - fn


def _rates(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, np.ndarray]:
    tp, fp, fn, tn = _counts(task, y_true, y_score)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def top_label(task: str, y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(confidence, correct)`, each (N, G): G = 1 top-label column, or one per label ([1 - p, p]): what
    the ECE bins (here and in `medkd.compare`'s bootstrap)."""
    if is_multilabel(task):
        confidence = np.maximum(y_score, 1 - y_score)
        correct = (y_score > 0.5) == (y_true > 0.5)  # argmax of [1 - p, p] picks 1 - p on a tie
        return confidence, correct.astype(np.float64)
    y = y_true.reshape(-1)
    correct = y_score.argmax(axis=1) == y
    return y_score.max(axis=1)[:, None], correct.astype(np.float64)[:, None]


def bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Each confidence's ECE bin, 0 … bins − 1."""
    # right-closed bins (k/bins, (k+1)/bins], with 0 in the first; k/bins, not linspace, so that a
    # confidence of exactly k/bins lands in bin k - 1 as written
    return np.searchsorted(np.arange(1, bins) / bins, confidence, side="left")


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    n, groups = confidence.shape
    if n == 0:
        return float("nan")
    flat = (bin_index(confidence, bins) + bins * np.arange(groups)).ravel()
    # Σ_b (n_b / N)|acc_b − conf_b| = Σ_b |Σ_{i in b} (correct_i − conf_i)| / N
    gap = np.bincount(flat, weights=(correct - confidence).ravel(), minlength=bins * groups)
    return float(np.abs(gap).reshape(groups, bins).sum(axis=1).mean() / n)


def _brier(task: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    if y_score.shape[0] == 0:
        return float("nan")
    if is_multilabel(task):
        return float(np.mean((y_score - (y_true > 0.5)) ** 2))
    y = y_true.reshape(-1).astype(np.int64)
    if task == "binary-class":
        return float(np.mean((y_score[:, -1] - (y == 1)) ** 2))
    diff = y_score.copy()
    diff[np.arange(len(y)), y] -= 1
    return float(np.mean(np.sum(diff**2, axis=1)))


def expected_calibration_error(
    task: str, y_true: np.ndarray, y_score: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE = Σ_b (n_b / N)|acc_b − conf_b| over `bins` equal-width bins of the largest
    probability ((0, 1/bins], ..., ((bins-1)/bins, 1], 0 in the first).

    Single-label (binary included): the softmax columns' max and argmax. Multi-label: the mean over labels
    of each label's binary ECE on [1 − p, p]. NaN for no images.
    """
    y_true, y_score = _arrays(y_true, y_score)
    return _ece(*top_label(task, y_true, y_score), bins)


def brier_score(task: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Brier score. Multi-class/ordinal: mean over images of Σ_k (p_k − onehot_k)²; binary: mean
    (p_1 − y)², sklearn's `brier_score_loss` (half the multi-class formula on two columns); multi-label:
    the mean over labels of each label's binary Brier. NaN for no images.
    """
    y_true, y_score = _arrays(y_true, y_score)
    return _brier(task, y_true, y_score)


def per_class(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, list[float]]:
    """One-vs-rest `{"auc", "sensitivity", "specificity", "f1"}` lists, one entry per class (binary: class
    0 then class 1) or per label (multi-label, threshold 0.5); NaN where undefined (a class absent from
    `y_true`, or present in every image)."""
    y_true, y_score = _arrays(y_true, y_score)
    if is_multilabel(task):
        columns = [(y_true[:, i] > 0.5, y_score[:, i]) for i in range(y_score.shape[1])]
    else:
        y = y_true.reshape(-1)
        columns = [(y == k, y_score[:, k]) for k in range(y_score.shape[1])]
    auc = [float(roc_auc_score(t, s)) if 0 < t.sum() < len(t) else float("nan") for t, s in columns]
    return {"auc": auc, **{k: v.tolist() for k, v in _rates(task, y_true, y_score).items()}}


def reliability_bins(task: str, y_true: np.ndarray, y_score: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Reliability-diagram data over the ECE's bins: `{"edges"}` (bins + 1) and per bin `{"count",
    "confidence", "accuracy"}` (means; NaN for an empty bin). Multi-label pools every label's top-label
    [1 − p, p], so the ECE these give can be below `expected_calibration_error`'s per-label mean."""
    y_true, y_score = _arrays(y_true, y_score)
    confidence, correct = (a.ravel() for a in top_label(task, y_true, y_score))
    index = bin_index(confidence, bins)
    count = np.bincount(index, minlength=bins)
    return {
        "edges": (np.arange(bins + 1) / bins).tolist(),
        "count": count.tolist(),
        "confidence": _ratio(np.bincount(index, weights=confidence, minlength=bins), count).tolist(),
        "accuracy": _ratio(np.bincount(index, weights=correct, minlength=bins), count).tolist(),
    }


def evaluate(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Metrics of probabilities `y_score` (N, C) against labels `y_true` (N, L), as floats (NaN if undefined).

    - `auc`, `acc`: exactly MedMNIST's getAUC/getACC.
    - `balanced_acc`: sklearn's `balanced_accuracy_score` of the predicted classes (binary: 1 when its score
      > 0.5; else argmax), the mean recall over the classes present in `y_true`; multi-label: the mean over
      labels of each label's (threshold 0.5).
    - `sensitivity`, `specificity`, `f1`: binary: of the positive class (recall of class 1, recall of class
      0, F1 of class 1), as medical papers report them; multi-class/ordinal: macro means over classes,
      one-vs-rest; multi-label: macro means over labels. Macro means skip undefined classes, as `auc` does
      (multi-class `sensitivity` therefore equals `balanced_acc`).
    - `ece`: `expected_calibration_error` with ECE_BINS (15) bins; `brier`: `brier_score`.
    """
    y_true, y_score = _arrays(y_true, y_score)
    result = _auc_acc(task, y_true, y_score)
    rates = _rates(task, y_true, y_score)
    sens, spec = rates["sensitivity"], rates["specificity"]
    if is_multilabel(task):
        both = np.stack([sens, spec])
        balanced = _nanmean(_ratio(np.nansum(both, axis=0), np.sum(~np.isnan(both), axis=0)))
        summary = {k: _nanmean(v) for k, v in rates.items()}
    elif task == "binary-class":
        balanced = _nanmean(sens)  # recall of class 0 and class 1
        summary = {"sensitivity": float(sens[1]), "specificity": float(spec[1]), "f1": float(rates["f1"][1])}
    else:
        balanced = _nanmean(sens)
        summary = {k: _nanmean(v) for k, v in rates.items()}
    return {
        **result,
        "balanced_acc": balanced,
        **summary,
        "ece": _ece(*top_label(task, y_true, y_score), ECE_BINS),
        "brier": _brier(task, y_true, y_score),
    }


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
