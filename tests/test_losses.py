"""kd_loss against an independent numpy/plain-python computation, plus its limits and identities."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from medkd.errors import MedkdError
from medkd.losses import hard_loss, kd_loss


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def ref_kl_multiclass(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """sum_c p log(p/q), averaged over the batch, with p = softmax(t/T), q = softmax(s/T)."""
    p = np_softmax(t.double().numpy() / T)
    q = np_softmax(s.double().numpy() / T)
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


def ref_kl_multilabel(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    """Bernoulli KL per label, averaged over labels and batch."""
    p = np_sigmoid(t.double().numpy() / T)
    q = np_sigmoid(s.double().numpy() / T)
    return float(np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))


def ref_ce(s: torch.Tensor, y: torch.Tensor) -> float:
    q = np_softmax(s.double().numpy())
    return float(-np.mean(np.log(q[np.arange(len(y)), y.numpy()])))


def ref_bce(s: torch.Tensor, y: torch.Tensor) -> float:
    q = np_sigmoid(s.double().numpy())
    y = y.double().numpy()
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def multiclass_batch(seed: int = 0, B: int = 8, C: int = 5, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g) * scale
    t = torch.randn(B, C, generator=g) * scale
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def multilabel_batch(seed: int = 0, B: int = 8, L: int = 4, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, generator=g) * scale
    t = torch.randn(B, L, generator=g) * scale
    y = torch.randint(0, 2, (B, L), generator=g).float()
    return s, t, y


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_multiclass_matches_reference(alpha, T):
    s, t, y = multiclass_batch()
    expected = alpha * ref_ce(s, y) + (1 - alpha) * T**2 * ref_kl_multiclass(s, t, T)
    assert kd_loss(s, t, y, alpha, T).loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_multilabel_matches_reference(alpha, T):
    s, t, y = multilabel_batch()
    expected = alpha * ref_bce(s, y) + (1 - alpha) * T**2 * ref_kl_multilabel(s, t, T)
    got = kd_loss(s, t, y, alpha, T, multilabel=True).loss.item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_alpha_one_is_plain_ce_and_needs_no_teacher():
    s, t, y = multiclass_batch()
    assert torch.equal(kd_loss(s, None, y, 1.0, 2.0).loss, F.cross_entropy(s, y))
    assert torch.equal(kd_loss(s, t, y, 1.0, 2.0).loss, F.cross_entropy(s, y))
    assert torch.equal(hard_loss(s, y), F.cross_entropy(s, y))


def test_alpha_one_is_plain_bce_and_needs_no_teacher():
    s, _, y = multilabel_batch()
    expected = F.binary_cross_entropy_with_logits(s, y)
    assert torch.equal(kd_loss(s, None, y, 1.0, 4.0, multilabel=True).loss, expected)
    assert torch.equal(hard_loss(s, y, multilabel=True), expected)


@pytest.mark.parametrize("T", [1.0, 3.0, 8.0])
def test_alpha_zero_is_t_squared_kl(T):
    s, t, y = multiclass_batch(seed=1)
    assert kd_loss(s, t, y, 0.0, T).loss.item() == pytest.approx(T**2 * ref_kl_multiclass(s, t, T), rel=1e-5)
    s, t, y = multilabel_batch(seed=1)
    got = kd_loss(s, t, y, 0.0, T, multilabel=True).loss.item()
    assert got == pytest.approx(T**2 * ref_kl_multilabel(s, t, T), rel=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_identical_logits_give_zero_kd(multilabel):
    s, _, y = multilabel_batch() if multilabel else multiclass_batch()
    terms = kd_loss(s, s.clone(), y, 0.0, 2.0, multilabel=multilabel)
    assert terms.loss.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("T,scale", [(100.0, 3.0), (1.0, 50.0), (2.0, 50.0), (100.0, 50.0)])
def test_gradients_finite(multilabel, T, scale):
    s, t, y = multilabel_batch(scale=scale) if multilabel else multiclass_batch(scale=scale)
    s = s.clamp(-50, 50).requires_grad_(True)
    t = t.clamp(-50, 50).requires_grad_(True)
    loss = kd_loss(s, t, y, 0.2, T, multilabel=multilabel).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    assert t.grad is None  # the teacher is frozen: no gradient reaches its logits


def test_extreme_opposite_logits_stay_finite():
    s = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-50.0, 50.0, 0.0]])
    loss = kd_loss(s, t, torch.tensor([0]), 0.0, 1.0).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    s = torch.tensor([[50.0, -50.0]], requires_grad=True)
    loss = kd_loss(s, -s.detach(), torch.tensor([[1.0, 0.0]]), 0.0, 1.0, multilabel=True).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_multiclass_invariant_to_per_row_shifts():
    s, t, y = multiclass_batch(seed=2)
    shift = torch.randn(s.shape[0], 1, generator=torch.Generator().manual_seed(3)) * 10
    base = kd_loss(s, t, y, 0.3, 2.0).loss
    assert kd_loss(s, t + shift, y, 0.3, 2.0).loss.item() == pytest.approx(base.item(), rel=1e-5)
    assert kd_loss(s + shift, t, y, 0.3, 2.0).loss.item() == pytest.approx(base.item(), rel=1e-5)


def test_golden_value_multiclass():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
    y = [1, 2]
    alpha, T = 0.2, 2.0

    def softmax(row, temp=1.0):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    ce = sum(-math.log(softmax(r)[k]) for r, k in zip(s, y, strict=True)) / 2
    kl = 0.0
    for rs, rt in zip(s, t, strict=True):
        p, q = softmax(rt, T), softmax(rs, T)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = alpha * ce + (1 - alpha) * T**2 * kl / 2
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, T).loss.item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(0.4236666, abs=1e-6)  # the same number, frozen against regressions


def test_golden_value_multilabel():
    s = [[1.0, -2.0], [0.5, 3.0]]
    t = [[2.0, -1.0], [-0.5, 1.0]]
    y = [[1.0, 0.0], [0.0, 1.0]]
    alpha, T = 0.5, 2.0

    def sig(v):
        return 1 / (1 + math.exp(-v))

    bce = kl = 0.0
    for rs, rt, ry in zip(s, t, y, strict=True):
        for vs, vt, vy in zip(rs, rt, ry, strict=True):
            bce += -(vy * math.log(sig(vs)) + (1 - vy) * math.log(1 - sig(vs)))
            p, q = sig(vt / T), sig(vs / T)
            kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    expected = alpha * bce / 4 + (1 - alpha) * T**2 * kl / 4
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, T, multilabel=True).loss.item()
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha_raises(alpha):
    s, t, y = multiclass_batch()
    with pytest.raises(MedkdError, match=r"alpha.*\[0, 1\].*" + str(alpha)):
        kd_loss(s, t, y, alpha, 2.0)


@pytest.mark.parametrize("T", [0.0, -2.0, float("inf")])
def test_bad_temperature_raises(T):
    s, t, y = multiclass_batch()
    with pytest.raises(MedkdError, match=r"temperature.*> 0.*" + str(T)):
        kd_loss(s, t, y, 0.5, T)


def test_missing_teacher_below_alpha_one_raises():
    s, _, y = multiclass_batch()
    with pytest.raises(MedkdError, match="teacher logits"):
        kd_loss(s, None, y, 0.5, 2.0)


def test_teacher_shape_mismatch_raises():
    s, _, y = multiclass_batch(C=5)
    with pytest.raises(MedkdError, match=r"\(8, 4\).*\(8, 5\)"):
        kd_loss(s, torch.zeros(8, 4), y, 0.5, 2.0)


logit_rows = st.lists(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=4
)


@settings(max_examples=50, deadline=None)
@given(s=logit_rows, t=logit_rows, T=st.floats(0.5, 10.0), multilabel=st.booleans())
def test_kd_part_non_negative(s, t, T, multilabel):
    n = min(len(s), len(t))
    s, t = torch.tensor(s[:n]), torch.tensor(t[:n])
    y = torch.zeros(n, 3) if multilabel else torch.zeros(n, dtype=torch.long)
    assert kd_loss(s, t, y, 0.0, T, multilabel=multilabel).loss.item() >= -1e-5


def test_the_terms_add_up_and_the_baseline_has_no_kd_term():
    torch.manual_seed(3)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    terms = kd_loss(s, t, y, 0.3, 2.0)
    assert terms.ce.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms.kd.item() == pytest.approx(4.0 * ref_kl_multiclass(s, t, 2.0), rel=1e-5)
    assert terms.loss.item() == pytest.approx(0.3 * terms.ce.item() + 0.7 * terms.kd.item(), rel=1e-6)
    assert kd_loss(s, t, y, 1.0, 2.0).kd is None
