"""The distillation loss: alpha * hard-label loss + (1 - alpha) * T^2 * KL(teacher_T || student_T)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medkd.errors import MedkdError


def hard_loss(student_logits: torch.Tensor, target: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Supervised loss: CE on int64 (B,) targets, or BCEWithLogits on float (B, L) targets in {0, 1}."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(student_logits, target.to(student_logits.dtype))
    return F.cross_entropy(student_logits, target)


def _kd_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, multilabel: bool
) -> torch.Tensor:
    # fp32 whatever the student's dtype: bf16 log-probabilities lose the small KL differences.
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    if not multilabel:
        return F.kl_div(
            F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True
        )
    # Bernoulli KL per label; logsigmoid of +x and -x gives log p and log(1 - p) without cancellation.
    log_p, log_1mp = F.logsigmoid(t), F.logsigmoid(-t)
    log_q, log_1mq = F.logsigmoid(s), F.logsigmoid(-s)
    kl = log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)  # (B, L)
    return kl.mean()


class KDLoss(NamedTuple):
    """The loss and its two terms, all scalars: `loss = alpha * ce + (1 - alpha) * kd`."""

    loss: torch.Tensor
    ce: torch.Tensor  # the hard-label loss (CE, or BCE for multi-label)
    kd: torch.Tensor | None  # T^2 * KL(teacher_T || student_T); None at alpha == 1 (no teacher used)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    target: torch.Tensor,
    alpha: float,
    temperature: float,
    multilabel: bool = False,
) -> KDLoss:
    """`alpha * hard + (1 - alpha) * T^2 * KL` with its terms; at alpha == 1 the teacher is unused (may be
    None) and `kd` is None."""
    if not 0.0 <= alpha <= 1.0:
        raise MedkdError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 < temperature < math.inf:
        raise MedkdError(f"temperature must be a finite number > 0, got {temperature}")
    hard = hard_loss(student_logits, target, multilabel)
    if alpha == 1.0:
        return KDLoss(hard, hard, None)
    if teacher_logits is None:
        raise MedkdError(
            f"alpha={alpha} < 1 needs teacher logits (a teacher cache); only alpha=1 runs without"
        )
    if teacher_logits.shape != student_logits.shape:
        raise MedkdError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}; the cache must come from the same dataset and task"
        )
    # T^2 keeps the soft-target gradients on the hard loss's scale for every T, alpha = 0 included.
    soft = temperature**2 * _kd_term(student_logits, teacher_logits, temperature, multilabel)
    return KDLoss(alpha * hard + (1.0 - alpha) * soft, hard, soft)
