"""The metrics beyond AUC/ACC (balanced accuracy, sensitivity, specificity, F1, ECE, Brier, per-class,
reliability bins) against hand-worked cases and independent sklearn computations."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from medkd.metrics import (
    brier_score,
    evaluate,
    expected_calibration_error,
    per_class,
    reliability_bins,
    scores_from_logits,
)

MULTILABEL = "multi-label, binary-class"
KEYS = {"auc", "acc", "balanced_acc", "sensitivity", "specificity", "f1", "ece", "brier"}
# (task, columns of y_score): binary gets two columns, as medkd gives it two logits
CASES = [("binary-class", 2), ("multi-class", 4), ("ordinal-regression", 5), (MULTILABEL, 3)]


def random_case(task: str, n_out: int, seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Labels shaped as in the .npz and probabilities from logits that carry some signal."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, n_out))
    if task == MULTILABEL:
        y_true = (rng.random((n, n_out)) < 0.35).astype(np.int64)
        logits += 1.0 * (2 * y_true - 1)
    else:
        y_true = rng.integers(0, n_out, size=(n, 1)).astype(np.int64)
        logits[np.arange(n), y_true[:, 0]] += 1.0
    return y_true, scores_from_logits(task, torch.from_numpy(logits)).numpy()


def predicted(task: str, y_score: np.ndarray) -> np.ndarray:
    """medmnist's ACC predictions: > 0.5 per label / on the positive column, else argmax."""
    if task == MULTILABEL:
        return (y_score > 0.5).astype(np.int64)
    if task == "binary-class":
        return (y_score[:, 1] > 0.5).astype(np.int64)
    return y_score.argmax(axis=1)


def reference_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE by an explicit loop over the right-closed bins (lo, hi], 0 in the first."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi)
        if b == 0:
            inside |= confidence == 0
        if inside.any():
            total += inside.sum() / len(confidence) * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def old_auc_acc(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """A verbatim copy of `evaluate` before the extra metrics, to pin "auc"/"acc" bit for bit."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)

    def mean_auc(columns):
        aucs = [roc_auc_score(t, s) for t, s in columns if 0 < t.sum() < len(t)]
        return float(np.mean(aucs)) if aucs else float("nan")

    if task == MULTILABEL:
        auc = mean_auc([(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])])
        return {"auc": auc, "acc": float(np.mean((y_score > 0.5) == (y_true > 0.5)))}
    y = y_true.reshape(-1)
    if task == "binary-class":
        positive = y_score[:, -1]
        return {"auc": mean_auc([(y, positive)]), "acc": float(np.mean((positive > 0.5) == (y == 1)))}
    auc = mean_auc([((y == k).astype(np.float64), y_score[:, k]) for k in range(y_score.shape[1])])
    return {"auc": auc, "acc": float(np.mean(y_score.argmax(axis=1) == y))}


# --- hand-worked ECE -------------------------------------------------------------------------------


def test_ece_hand_computed_multiclass() -> None:
    # 15 bins: bin b is (b/15, (b+1)/15]; 1/3 = 5/15, 0.4 = 6/15, 0.4667 = 7/15, 0.6667 = 10/15, ...
    y_score = np.array(
        [
            [0.90, 0.05, 0.05],  # conf 0.90 → bin 13 (0.867, 0.933], y 0: right
            [0.92, 0.04, 0.04],  # conf 0.92 → bin 13, y 1: wrong
            [0.10, 0.70, 0.20],  # conf 0.70 → bin 10 (0.667, 0.733], y 1: right
            [0.20, 0.10, 0.70],  # conf 0.70 → bin 10, y 0: wrong
            [0.30, 0.30, 0.40],  # conf 0.40 = 6/15 exactly → bin 5 (0.333, 0.4] (right-closed), y 2: right
            [0.45, 0.35, 0.20],  # conf 0.45 → bin 6 (0.4, 0.467], y 1: wrong
            [1.00, 0.00, 0.00],  # conf 1.00 → bin 14 (0.933, 1], y 0: right
            [0.36, 0.34, 0.30],  # conf 0.36 → bin 5, y 0: right
        ]
    )
    y_true = np.array([[0], [1], [1], [0], [2], [1], [0], [0]])
    # bin 13: 2/8 · |0.5 − 0.91| = 0.1025; bin 10: 2/8 · |0.5 − 0.7| = 0.05;
    # bin 5: 2/8 · |1 − 0.38| = 0.155;     bin 6: 1/8 · |0 − 0.45| = 0.05625; bin 14: 1/8 · 0 = 0
    expected = 0.1025 + 0.05 + 0.155 + 0.05625
    assert expected == pytest.approx(0.36375)
    assert expected_calibration_error("multi-class", y_true, y_score) == pytest.approx(expected, abs=1e-12)
    assert evaluate("multi-class", y_true, y_score)["ece"] == pytest.approx(expected, abs=1e-12)
    # left-closed bins would put 0.4 with 0.45 in bin 6 and give 0.25125 instead
    assert expected_calibration_error("multi-class", y_true, y_score) != pytest.approx(0.25125)

    rel = reliability_bins("multi-class", y_true, y_score)
    assert len(rel["edges"]) == 16 and rel["edges"][0] == 0.0 and rel["edges"][-1] == 1.0
    assert rel["count"] == [0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 2, 0, 0, 2, 1]
    assert rel["confidence"][5] == pytest.approx(0.38) and rel["accuracy"][5] == 1.0
    assert rel["confidence"][13] == pytest.approx(0.91) and rel["accuracy"][13] == 0.5
    assert np.isnan(rel["confidence"][0]) and np.isnan(rel["accuracy"][7])


def test_ece_hand_computed_binary_and_multilabel() -> None:
    # binary: top label of the two columns
    y_score = np.array([[0.2, 0.8], [0.6, 0.4], [0.05, 0.95], [0.5, 0.5]])
    y_true = np.array([[1], [1], [1], [0]])
    # conf .8 right (bin 11), .6 wrong (bin 8), .95 right (bin 14), .5 right (tie → class 0; bin 7)
    expected = (0.2 + 0.6 + 0.05 + 0.5) / 4
    assert expected_calibration_error("binary-class", y_true, y_score) == pytest.approx(expected, abs=1e-12)

    # multi-label: each label's ECE on [1 − p, p], then the mean over labels
    y_score = np.array([[0.8, 0.1], [0.3, 0.1], [0.5, 0.9]])
    y_true = np.array([[1, 0], [1, 0], [0, 1]])
    # label 0: conf .8 right (bin 11), .7 wrong (bin 10), .5 right (tie → 0; bin 7) → (.2 + .7 + .5) / 3
    # label 1: conf .9 right, three times, all in bin 13 → |1 − .9| = .1
    expected = (1.4 / 3 + 0.1) / 2
    assert expected_calibration_error(MULTILABEL, y_true, y_score) == pytest.approx(expected, abs=1e-12)
    # the reliability bins pool the 6 (image, label) pairs: bins 7, 10, 11 hold one each, bin 13 three
    rel = reliability_bins(MULTILABEL, y_true, y_score)
    assert rel["count"][7] == 1 and rel["count"][10] == 1 and rel["count"][11] == 1 and rel["count"][13] == 3
    assert sum(rel["count"]) == 6
    assert rel["accuracy"][10] == 0.0 and rel["confidence"][13] == pytest.approx(0.9)


def test_ece_bins_argument() -> None:
    y_score = np.array([[0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    y_true = np.array([[1], [1], [0]])
    # one bin: |mean correct − mean conf| = |1/3 − (0.7 + 0.6 + 0.9)/3|
    one = expected_calibration_error("binary-class", y_true, y_score, bins=1)
    assert one == pytest.approx(abs(1 / 3 - 2.2 / 3), abs=1e-12)
    assert len(reliability_bins("binary-class", y_true, y_score, bins=4)["count"]) == 4


# --- against independent computations on random data ---------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_ece_against_loop_reference(task: str, n_out: int, seed: int) -> None:
    y_true, y_score = random_case(task, n_out, seed)
    if task == MULTILABEL:
        truth = y_true == 1
        per_label = [
            reference_ece(np.maximum(y_score[:, i], 1 - y_score[:, i]), (y_score[:, i] > 0.5) == truth[:, i])
            for i in range(n_out)
        ]
        expected = float(np.mean(per_label))
    else:
        expected = reference_ece(y_score.max(1), y_score.argmax(1) == y_true[:, 0])
    assert expected_calibration_error(task, y_true, y_score) == pytest.approx(expected, abs=1e-12)
    assert evaluate(task, y_true, y_score)["ece"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_reliability_bins_against_sklearn_calibration_curve(task: str, n_out: int) -> None:
    y_true, y_score = random_case(task, n_out, 4)
    if task == MULTILABEL:
        confidence = np.maximum(y_score, 1 - y_score).ravel()
        correct = ((y_score > 0.5) == (y_true == 1)).ravel()
    else:
        confidence, correct = y_score.max(1), y_score.argmax(1) == y_true[:, 0]
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=15)
    rel = reliability_bins(task, y_true, y_score)
    filled = np.array(rel["count"]) > 0
    assert sum(rel["count"]) == confidence.size
    np.testing.assert_allclose(np.array(rel["accuracy"])[filled], prob_true, atol=1e-12)
    np.testing.assert_allclose(np.array(rel["confidence"])[filled], prob_pred, atol=1e-12)
    assert np.isnan(np.array(rel["accuracy"])[~filled]).all()
    if task != MULTILABEL:  # single-label: the bins give the ECE itself
        counts = np.array(rel["count"])[filled]
        gaps = np.abs(prob_true - prob_pred)
        ece = float(np.sum(counts / confidence.size * gaps))
        assert expected_calibration_error(task, y_true, y_score) == pytest.approx(ece, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_brier_against_sklearn(task: str, n_out: int, seed: int) -> None:
    y_true, y_score = random_case(task, n_out, seed)
    if task == MULTILABEL:
        expected = np.mean([brier_score_loss(y_true[:, i], y_score[:, i]) for i in range(n_out)])
    elif task == "binary-class":
        expected = brier_score_loss(y_true[:, 0], y_score[:, 1])
    else:
        expected = brier_score_loss(y_true[:, 0], y_score, labels=list(range(n_out)))
        onehot = np.eye(n_out)[y_true[:, 0]]
        assert expected == pytest.approx(np.mean(np.sum((y_score - onehot) ** 2, axis=1)), abs=1e-12)
    assert brier_score(task, y_true, y_score) == pytest.approx(expected, abs=1e-12)
    assert evaluate(task, y_true, y_score)["brier"] == pytest.approx(expected, abs=1e-12)


def sklearn_rates(task: str, y_true: np.ndarray, y_score: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class (per-label) sensitivity, specificity and F1 from sklearn, NaN where undefined."""
    pred = predicted(task, y_score)
    if task == MULTILABEL:
        matrices = [confusion_matrix(y_true[:, i], pred[:, i], labels=[0, 1]) for i in range(y_true.shape[1])]
        f1 = f1_score(y_true, pred, average=None, zero_division=np.nan)
        sens = recall_score(y_true, pred, average=None, zero_division=np.nan)
    else:
        n_classes = y_score.shape[1]
        labels = list(range(n_classes))
        y = y_true[:, 0]
        full = confusion_matrix(y, pred, labels=labels)
        # one-vs-rest 2×2 matrices [[tn, fp], [fn, tp]] from the full one
        matrices = []
        for k in labels:
            tp = full[k, k]
            fn, fp = full[k].sum() - tp, full[:, k].sum() - tp
            matrices.append(np.array([[len(y) - tp - fn - fp, fp], [fn, tp]]))
        f1 = f1_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        sens = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    spec = []
    for m in matrices:
        tn, fp = m[0]
        spec.append(tn / (tn + fp) if tn + fp else np.nan)
    return {
        "sensitivity": np.asarray(sens, float),
        "specificity": np.array(spec),
        "f1": np.asarray(f1, float),
    }


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_rates_and_balanced_acc_against_sklearn(task: str, n_out: int, seed: int) -> None:
    y_true, y_score = random_case(task, n_out, seed)
    result = evaluate(task, y_true, y_score)
    pred = predicted(task, y_score)
    ref = sklearn_rates(task, y_true, y_score)
    if task == MULTILABEL:
        balanced = np.mean([balanced_accuracy_score(y_true[:, i], pred[:, i]) for i in range(n_out)])
        assert result["f1"] == pytest.approx(f1_score(y_true, pred, average="macro"), abs=1e-12)
        assert result["sensitivity"] == pytest.approx(recall_score(y_true, pred, average="macro"), abs=1e-12)
        assert result["specificity"] == pytest.approx(np.mean(ref["specificity"]), abs=1e-12)
    elif task == "binary-class":
        y = y_true[:, 0]
        balanced = balanced_accuracy_score(y, pred)
        # the positive class's figures, as medical papers report them
        assert result["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1), abs=1e-12)
        assert result["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-12)
        assert result["f1"] == pytest.approx(f1_score(y, pred, pos_label=1), abs=1e-12)
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert result["sensitivity"] == pytest.approx(tp / (tp + fn)) and result[
            "specificity"
        ] == pytest.approx(tn / (tn + fp))
    else:
        y = y_true[:, 0]
        balanced = balanced_accuracy_score(y, pred)
        assert result["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"), abs=1e-12)
        assert result["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
        assert result["specificity"] == pytest.approx(np.mean(ref["specificity"]), abs=1e-12)
        assert result["sensitivity"] == pytest.approx(result["balanced_acc"], abs=1e-12)
    assert result["balanced_acc"] == pytest.approx(balanced, abs=1e-12)


@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_per_class_against_sklearn(task: str, n_out: int) -> None:
    y_true, y_score = random_case(task, n_out, 9)
    got = per_class(task, y_true, y_score)
    assert set(got) == {"auc", "sensitivity", "specificity", "f1"}
    for values in got.values():
        assert len(values) == n_out and all(isinstance(v, float) for v in values)
    ref = sklearn_rates(task, y_true, y_score)
    for key in ("sensitivity", "specificity", "f1"):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-12)
    if task == MULTILABEL:
        aucs = [roc_auc_score(y_true[:, i], y_score[:, i]) for i in range(n_out)]
    else:
        aucs = [roc_auc_score(y_true[:, 0] == k, y_score[:, k]) for k in range(n_out)]
    np.testing.assert_allclose(got["auc"], aucs, atol=1e-12)
    if task == "binary-class":
        # one-vs-rest on two classes: class 0's sensitivity is class 1's specificity, and vice versa
        assert (
            got["sensitivity"][0] == got["specificity"][1] and got["sensitivity"][1] == got["specificity"][0]
        )
        result = evaluate(task, y_true, y_score)
        assert result["sensitivity"] == got["sensitivity"][1] and result["f1"] == got["f1"][1]
    else:
        result = evaluate(task, y_true, y_score)
        for key in ("sensitivity", "specificity", "f1"):
            assert result[key] == pytest.approx(np.mean(got[key]), abs=1e-12)
        assert result["auc"] == pytest.approx(np.mean(got["auc"]), abs=1e-12)


# --- auc/acc unchanged ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("task", "n_out"), [*CASES, ("multi-class", 9), (MULTILABEL, 14)])
def test_auc_acc_unchanged(task: str, n_out: int, seed: int) -> None:
    y_true, y_score = random_case(task, n_out, seed)
    result = evaluate(task, y_true, y_score)
    assert set(result) == KEYS
    assert all(type(v) is float for v in result.values())
    old = old_auc_acc(task, y_true, y_score)
    assert result["auc"] == old["auc"] and result["acc"] == old["acc"]  # bit for bit
    try:
        from medmnist.evaluator import getACC, getAUC
    except ImportError:
        return
    assert result["auc"] == pytest.approx(getAUC(y_true, y_score, task), abs=1e-12)
    assert result["acc"] == pytest.approx(getACC(y_true, y_score, task), abs=1e-12)


# --- calibration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["binary-class", "multi-class", MULTILABEL])
def test_perfectly_calibrated_scores_have_ece_near_zero(task: str) -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    if task == MULTILABEL:
        y_score = rng.random((n, 3))
        y_true = (rng.random((n, 3)) < y_score).astype(np.int64)
    else:
        y_score = rng.dirichlet(np.ones(2 if task == "binary-class" else 4), size=n)
        # label k with probability p_k: the first cumulative probability above a uniform draw
        cumulative = np.cumsum(y_score, axis=1)
        y_true = (rng.random((n, 1)) > cumulative).sum(axis=1, keepdims=True)
        y_true = np.minimum(y_true, y_score.shape[1] - 1)  # guard the cumsum's rounding below 1
    assert expected_calibration_error(task, y_true, y_score) < 0.01
    # and an overconfident version of the same scores is clearly miscalibrated
    sharpened = y_score**3
    if task != MULTILABEL:
        sharpened /= sharpened.sum(axis=1, keepdims=True)
    else:
        sharpened = sharpened / (sharpened + (1 - y_score) ** 3)
    assert expected_calibration_error(task, y_true, sharpened) > 0.05


def test_perfect_predictions() -> None:
    y_true = np.array([[0], [1], [2], [3], [1], [0]])
    onehot = np.eye(4)[y_true[:, 0]]
    result = evaluate("multi-class", y_true, onehot)
    expected = {
        "balanced_acc": 1.0,
        "sensitivity": 1.0,
        "specificity": 1.0,
        "f1": 1.0,
        "ece": 0.0,
        "brier": 0.0,
    }
    assert {k: result[k] for k in expected} == expected


# --- undefined cases -----------------------------------------------------------------------------


def test_multiclass_class_absent_from_y_true() -> None:
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 3, size=(60, 1))  # class 3 of 4 never occurs
    logits = rng.normal(size=(60, 4))
    logits[:, 3] -= 10  # and is never predicted
    y_score = scores_from_logits("multi-class", torch.from_numpy(logits)).numpy()
    got = per_class("multi-class", y_true, y_score)
    assert np.isnan(got["auc"][3]) and np.isnan(got["sensitivity"][3]) and np.isnan(got["f1"][3])
    assert got["specificity"][3] == 1.0  # nothing predicted as 3 among the images that are not 3
    assert not np.isnan(got["auc"][:3]).any() and not np.isnan(got["f1"][:3]).any()
    result = evaluate("multi-class", y_true, y_score)
    assert all(np.isfinite(v) for v in result.values())
    # macro means skip the undefined class rather than count it as 0
    assert result["sensitivity"] == pytest.approx(np.mean(got["sensitivity"][:3]))
    assert result["f1"] == pytest.approx(np.mean(got["f1"][:3]))
    assert result["balanced_acc"] == pytest.approx(balanced_accuracy_score(y_true[:, 0], y_score.argmax(1)))

    # predicted but absent: F1 is defined (0), sensitivity is not; sklearn agrees on the balanced accuracy
    y_score[0] = [0.0, 0.0, 0.0, 1.0]
    got = per_class("multi-class", y_true, y_score)
    assert got["f1"][3] == 0.0 and np.isnan(got["sensitivity"][3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        expected = balanced_accuracy_score(y_true[:, 0], y_score.argmax(1))
    assert evaluate("multi-class", y_true, y_score)["balanced_acc"] == pytest.approx(expected, abs=1e-12)


def test_binary_one_class_only() -> None:
    y_true = np.ones((6, 1), dtype=np.int64)
    y_score = np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])
    result = evaluate("binary-class", y_true, y_score)
    assert np.isnan(result["auc"]) and np.isnan(result["specificity"])
    assert result["sensitivity"] == pytest.approx(4 / 6)
    assert result["balanced_acc"] == pytest.approx(4 / 6)  # sklearn: the mean over present classes
    assert result["f1"] == pytest.approx(2 * 4 / (2 * 4 + 0 + 2))
    assert np.isfinite(result["ece"]) and np.isfinite(result["brier"])
    got = per_class("binary-class", y_true, y_score)
    assert np.isnan(got["auc"]).all() and np.isnan(got["sensitivity"][0]) and np.isnan(got["specificity"][1])


def test_multilabel_label_absent_and_always_present() -> None:
    y_true, y_score = random_case(MULTILABEL, 3, 6, n=80)
    y_true[:, 1] = 0
    y_true[:, 2] = 1
    got = per_class(MULTILABEL, y_true, y_score)
    assert np.isnan(got["auc"][1]) and np.isnan(got["sensitivity"][1]) and not np.isnan(got["specificity"][1])
    assert np.isnan(got["auc"][2]) and np.isnan(got["specificity"][2]) and not np.isnan(got["sensitivity"][2])
    result = evaluate(MULTILABEL, y_true, y_score)
    pred = predicted(MULTILABEL, y_score)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns for the one-class labels
        balanced = np.mean([balanced_accuracy_score(y_true[:, i], pred[:, i]) for i in range(3)])
    assert result["balanced_acc"] == pytest.approx(balanced, abs=1e-12)
    assert result["sensitivity"] == pytest.approx(np.nanmean(got["sensitivity"]), abs=1e-12)
    assert result["specificity"] == pytest.approx(np.nanmean(got["specificity"]), abs=1e-12)


def test_no_images_gives_nan_calibration() -> None:
    empty_true, empty_score = np.zeros((0, 1), dtype=np.int64), np.zeros((0, 4))
    assert np.isnan(expected_calibration_error("multi-class", empty_true, empty_score))
    assert np.isnan(brier_score("multi-class", empty_true, empty_score))
    assert sum(reliability_bins("multi-class", empty_true, empty_score)["count"]) == 0


def test_accepts_flat_labels_and_float32_scores() -> None:
    y_true, y_score = random_case("multi-class", 4, 3)
    reference = evaluate("multi-class", y_true, y_score)
    flat = evaluate("multi-class", y_true[:, 0], y_score.astype(np.float32))
    for key in KEYS:
        assert flat[key] == pytest.approx(reference[key], abs=1e-6)


# --- speed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "n_out"), [("multi-class", 10), (MULTILABEL, 10)])
def test_evaluate_is_cheap(task: str, n_out: int) -> None:
    y_true, y_score = random_case(task, n_out, 0, n=1000)
    evaluate(task, y_true, y_score)  # warm up imports and caches
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        evaluate(task, y_true, y_score)
        best = min(best, time.perf_counter() - start)
    # ~12 ms on a 2-core machine, almost all of it sklearn's AUCs; the best of 5 keeps CI noise out
    assert best < 0.05, f"evaluate took {best * 1e3:.1f} ms"
