"""evaluate() against medmnist.evaluator.getAUC/getACC, hand-checked cases, and scores_from_logits."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import roc_auc_score

from medkd.metrics import evaluate, scores_from_logits

MULTILABEL = "multi-label, binary-class"
# (task, columns of y_score): binary gets two, as medkd gives it two logits
CASES = [
    ("binary-class", 2),
    ("multi-class", 9),
    ("ordinal-regression", 5),
    (MULTILABEL, 14),
]


def random_case(task: str, n_out: int, seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Labels as in the .npz (N, 1) or (N, 14), and probabilities from random logits."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 2, size=(n, n_out)))
    if task == MULTILABEL:
        y_true = (rng.random((n, n_out)) < 0.3).astype(np.int64)
    else:
        y_true = rng.integers(0, n_out, size=(n, 1)).astype(np.int64)
    return y_true, scores_from_logits(task, logits).numpy()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_evaluate_equals_medmnist(task: str, n_out: int, seed: int) -> None:
    y_true, y_score = random_case(task, n_out, seed)
    result = evaluate(task, y_true, y_score)
    assert {"auc", "acc", "balanced_acc", "ece", "brier"} <= set(result)
    assert isinstance(result["auc"], float) and isinstance(result["acc"], float)
    assert result["auc"] == pytest.approx(getAUC(y_true, y_score, task), abs=1e-12)
    assert result["acc"] == pytest.approx(getACC(y_true, y_score, task), abs=1e-12)


@pytest.mark.parametrize(("task", "n_out"), CASES)
def test_evaluate_equals_medmnist_on_informative_scores(task: str, n_out: int) -> None:
    # scores correlated with the labels, so AUC/ACC are far from chance and ties in ACC matter
    rng = np.random.default_rng(11)
    y_true, _ = random_case(task, n_out, 11)
    logits = rng.normal(0, 1, size=(len(y_true), n_out))
    if task == MULTILABEL:
        logits += 1.5 * (2 * y_true - 1)
    else:
        logits[np.arange(len(y_true)), y_true[:, 0]] += 1.5
    y_score = scores_from_logits(task, torch.from_numpy(logits)).numpy()
    result = evaluate(task, y_true, y_score)
    assert result["auc"] > 0.75
    assert result["auc"] == pytest.approx(getAUC(y_true, y_score, task), abs=1e-12)
    assert result["acc"] == pytest.approx(getACC(y_true, y_score, task), abs=1e-12)


def test_evaluate_accepts_flat_labels_and_float32_scores() -> None:
    y_true, y_score = random_case("multi-class", 5, 3)
    reference = evaluate("multi-class", y_true, y_score)
    flat = evaluate("multi-class", y_true[:, 0], y_score.astype(np.float32))
    assert flat["acc"] == reference["acc"]
    assert flat["auc"] == pytest.approx(reference["auc"], abs=1e-6)


def auc_acc(result: dict[str, float]) -> dict[str, float]:
    return {k: result[k] for k in ("auc", "acc")}


def test_binary_uses_the_positive_column() -> None:
    y_true = np.array([[0], [0], [1], [1]])
    # column 1 ranks the positives highest; column 0 would rank them lowest
    y_score = np.array([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    assert auc_acc(evaluate("binary-class", y_true, y_score)) == {"auc": 1.0, "acc": 1.0}
    # threshold at 0.5 on the positive class: 0.4 → 0, 0.55 → 1
    y_score = np.array([[0.3, 0.7], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    result = evaluate("binary-class", y_true, y_score)
    assert result["acc"] == 0.75
    assert result["auc"] == pytest.approx(0.75)  # pairs: (0.7 vs .55 wrong), others right → 3/4


@pytest.mark.parametrize("task", ["binary-class", "multi-class", "ordinal-regression", MULTILABEL])
def test_perfect_and_reversed_scores(task: str) -> None:
    if task == MULTILABEL:
        y_true = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
        perfect = np.where(y_true == 1, 0.9, 0.1)
        reversed_ = 1 - perfect
        assert auc_acc(evaluate(task, y_true, perfect)) == {"auc": 1.0, "acc": 1.0}
        assert auc_acc(evaluate(task, y_true, reversed_)) == {"auc": 0.0, "acc": 0.0}
        return
    n_classes = 2 if task == "binary-class" else 4
    y_true = np.array([[0], [1], [2], [3], [1], [0], [3], [2]]) % n_classes
    onehot = np.eye(n_classes)[y_true[:, 0]]
    perfect = 0.1 / n_classes + 0.9 * onehot
    # the true class gets the lowest score, every other class an equal higher one
    reversed_ = (1 - onehot) / (n_classes - 1)
    assert auc_acc(evaluate(task, y_true, perfect)) == {"auc": 1.0, "acc": 1.0}
    result = evaluate(task, y_true, reversed_)
    assert auc_acc(result) == {"auc": 0.0, "acc": 0.0}


def test_multilabel_acc_is_per_label_mean() -> None:
    y_true = np.array([[1, 0], [0, 0], [1, 1]])
    y_score = np.array([[0.7, 0.2], [0.6, 0.1], [0.8, 0.4]])
    # label 0: 2/3 right (0.6 > .5 but label 0); label 1: 2/3 right (0.4 < .5 but label 1)
    assert evaluate(MULTILABEL, y_true, y_score)["acc"] == pytest.approx(2 / 3)
    assert evaluate(MULTILABEL, y_true, y_score)["auc"] == pytest.approx((1.0 + 1.0) / 2)


def test_multilabel_label_absent_from_y_true_is_skipped() -> None:
    y_true, y_score = random_case(MULTILABEL, 14, 7, n=40)
    y_true[:, 3] = 0  # label 3 never occurs
    y_true[:, 9] = 1  # label 9 always occurs
    # medmnist itself cannot score this: older sklearn raises, newer warns and returns nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(ValueError):
            assert np.isnan(getAUC(y_true, y_score, MULTILABEL))
    result = evaluate(MULTILABEL, y_true, y_score)
    assert np.isfinite(result["auc"])
    defined = [i for i in range(14) if i not in (3, 9)]
    expected = np.mean([roc_auc_score(y_true[:, i], y_score[:, i]) for i in defined])
    assert result["auc"] == pytest.approx(expected, abs=1e-12)
    # and it is not the mean over all 14 with the undefined ones counted as 0 or 0.5
    assert result["auc"] != pytest.approx(
        np.sum([roc_auc_score(y_true[:, i], y_score[:, i]) for i in defined]) / 14
    )
    assert result["acc"] == pytest.approx(getACC(y_true, y_score, MULTILABEL), abs=1e-12)


def test_multiclass_class_absent_from_y_true_is_skipped() -> None:
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 3, size=(30, 1))  # classes 0..2 of 4
    y_score = scores_from_logits("multi-class", torch.from_numpy(rng.normal(size=(30, 4)))).numpy()
    result = evaluate("multi-class", y_true, y_score)
    expected = np.mean([roc_auc_score(y_true[:, 0] == k, y_score[:, k]) for k in range(3)])
    assert result["auc"] == pytest.approx(expected, abs=1e-12)
    assert result["acc"] == pytest.approx(np.mean(y_score.argmax(1) == y_true[:, 0]))


def test_no_defined_auc_gives_nan() -> None:
    y_true = np.ones((5, 1), dtype=np.int64)
    y_score = np.tile([0.3, 0.7], (5, 1))
    result = evaluate("binary-class", y_true, y_score)
    assert np.isnan(result["auc"])
    assert result["acc"] == 1.0


def test_scores_from_logits_softmax() -> None:
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for task in ("multi-class", "binary-class", "ordinal-regression"):
        scores = scores_from_logits(task, logits)
        torch.testing.assert_close(scores.sum(dim=1), torch.ones(16, dtype=torch.float64))
        expected = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
        torch.testing.assert_close(scores, expected)
        assert torch.equal(scores.argmax(1), logits.argmax(1))


def test_scores_from_logits_sigmoid_for_multilabel() -> None:
    logits = torch.randn(16, 14, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    scores = scores_from_logits(MULTILABEL, logits)
    torch.testing.assert_close(scores, 1 / (1 + torch.exp(-logits)))
    assert not torch.allclose(scores.sum(dim=1), torch.ones(16, dtype=torch.float64))
    # each label on its own: changing one logit changes only its own score
    bumped = logits.clone()
    bumped[:, 0] += 5
    changed = scores_from_logits(MULTILABEL, bumped) != scores
    assert changed[:, 0].all() and not changed[:, 1:].any()
