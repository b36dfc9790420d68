"""Property tests (hypothesis) of the KD loss and the metrics, on many random shapes and values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from medmnist.evaluator import getACC, getAUC

from medkd.losses import kd_loss
from medkd.metrics import evaluate, scores_from_logits

MULTILABEL = "multi-label, binary-class"
SETTINGS = settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ in the checkout

finite = st.floats(-10, 10, allow_nan=False, width=32)
temperatures = st.floats(0.5, 8.0)


@st.composite
def logit_pairs(draw, multilabel: bool | None = None):
    """(student, teacher, target, multilabel): logits (B, C) float32 and targets as the loss wants them."""
    if multilabel is None:
        multilabel = draw(st.booleans())
    b, c = draw(st.integers(1, 8)), draw(st.integers(2, 6))
    student = torch.from_numpy(draw(arrays(np.float32, (b, c), elements=finite)))
    teacher = torch.from_numpy(draw(arrays(np.float32, (b, c), elements=finite)))
    if multilabel:
        target = torch.from_numpy(draw(arrays(np.int64, (b, c), elements=st.integers(0, 1)))).float()
    else:
        target = torch.from_numpy(draw(arrays(np.int64, (b,), elements=st.integers(0, c - 1))))
    return student, teacher, target, multilabel


@SETTINGS
@given(logit_pairs(), temperatures)
def test_kd_term_is_never_negative(pair, temperature):
    student, teacher, target, multilabel = pair
    soft = kd_loss(student, teacher, target, 0.0, temperature, multilabel).loss  # alpha 0: T²·KL alone
    assert soft.item() >= -1e-5 * temperature**2


@SETTINGS
@given(logit_pairs(multilabel=False), temperatures, st.data())
def test_kd_term_ignores_a_constant_added_to_a_row(pair, temperature, data):
    student, teacher, target, _ = pair
    rows = len(student)
    s_shift = torch.tensor(data.draw(st.lists(st.floats(-20, 20), min_size=rows, max_size=rows)))
    t_shift = torch.tensor(data.draw(st.lists(st.floats(-20, 20), min_size=rows, max_size=rows)))
    plain = kd_loss(student, teacher, target, 0.0, temperature).loss
    shifted = kd_loss(student + s_shift[:, None], teacher + t_shift[:, None], target, 0.0, temperature).loss
    # float32 logits up to 30 in size: the softmax sees them to ~1e-6, and T² scales that up.
    assert shifted.item() == pytest.approx(plain.item(), rel=1e-4, abs=1e-5 * temperature**2 + 1e-5)


@SETTINGS
@given(logit_pairs(), temperatures, st.floats(0.0, 1.0))
def test_a_student_equal_to_its_teacher_gets_only_the_hard_gradient(pair, temperature, alpha):
    # KL(t || s) is minimal at s = t, so its gradient vanishes there: the step is alpha x the CE step.
    # Fails if the teacher were not detached, the KD term used the wrong direction, or T² leaked into CE.
    student, _, target, multilabel = pair
    s = student.clone().requires_grad_(True)
    kd_loss(s, student.clone(), target, alpha, temperature, multilabel).loss.backward()
    c = student.clone().requires_grad_(True)
    hard = F.binary_cross_entropy_with_logits(c, target) if multilabel else F.cross_entropy(c, target)
    hard.backward()
    torch.testing.assert_close(s.grad, alpha * c.grad, rtol=1e-4, atol=1e-5 * temperature)


TASKS = ("binary-class", "multi-class", "ordinal-regression", MULTILABEL)


@st.composite
def scored_labels(draw, every_class: bool):
    """(task, y_true (N, L) int64, y_score (N, C) probabilities), as medkd's models produce them.

    With `every_class`, each class (or each label's 0 and 1) occurs, so every AUC is defined.
    """
    task = draw(st.sampled_from(TASKS))
    c = 2 if task == "binary-class" else draw(st.integers(2, 6))
    n = draw(st.integers(2 * c, 40))
    if task == MULTILABEL:
        y_true = draw(arrays(np.int64, (n, c), elements=st.integers(0, 1)))
        if every_class:
            y_true[0], y_true[1] = 1, 0
    else:
        y_true = draw(arrays(np.int64, (n, 1), elements=st.integers(0, c - 1)))
        if every_class:
            y_true[:c, 0] = np.arange(c)
    # Coarse logits make ties (equal scores) common: AUC and argmax must treat them as medmnist does.
    logits = draw(arrays(np.float64, (n, c), elements=st.integers(-3, 3).map(float)))
    y_score = scores_from_logits(task, torch.from_numpy(logits)).numpy()
    return task, y_true, y_score


@SETTINGS
@given(scored_labels(every_class=False))
def test_metrics_do_not_depend_on_the_order_of_the_images(case):
    # A permutation applied to labels and scores together changes nothing; one applied to the scores
    # alone (labels out of step, as an index bug would leave them) is what the check guards against.
    task, y_true, y_score = case
    order = np.random.default_rng(len(y_true)).permutation(len(y_true))
    result, shuffled = evaluate(task, y_true, y_score), evaluate(task, y_true[order], y_score[order])
    assert shuffled["acc"] == pytest.approx(result["acc"], abs=1e-12)
    assert (math.isnan(result["auc"]) and math.isnan(shuffled["auc"])) or shuffled["auc"] == pytest.approx(
        result["auc"], abs=1e-12
    )


@SETTINGS
@given(scored_labels(every_class=True))
def test_metrics_equal_medmnist(case):
    task, y_true, y_score = case
    result = evaluate(task, y_true, y_score)
    assert result["auc"] == pytest.approx(getAUC(y_true, y_score, task), abs=1e-12)
    assert result["acc"] == pytest.approx(getACC(y_true, y_score, task), abs=1e-12)
