"""The distillation loss: alpha * hard-label loss + (1 - alpha) * T^2 * KL(teacher_T || student_T), from one
teacher or from a weighted mixture of several."""

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
    hard = _hard_or_check(student_logits, teacher_logits, target, alpha, temperature, multilabel)
    if alpha == 1.0:
        return KDLoss(hard, hard, None)
    if teacher_logits.shape != student_logits.shape:
        raise MedkdError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
            f"{tuple(student_logits.shape)}; the cache must come from the same dataset and task"
        )
    # T^2 keeps the soft-target gradients on the hard loss's scale for every T, alpha = 0 included.
    soft = temperature**2 * _kd_term(student_logits, teacher_logits, temperature, multilabel)
    return KDLoss(alpha * hard + (1.0 - alpha) * soft, hard, soft)


def _hard_or_check(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    target: torch.Tensor,
    alpha: float,
    temperature: float,
    multilabel: bool,
) -> torch.Tensor:
    """The hard-label loss, after checking alpha, T and that alpha < 1 has a teacher."""
    if not 0.0 <= alpha <= 1.0:
        raise MedkdError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 < temperature < math.inf:
        raise MedkdError(f"temperature must be a finite number > 0, got {temperature}")
    if alpha < 1.0 and teacher_logits is None:
        raise MedkdError(
            f"alpha={alpha} < 1 needs teacher logits (a teacher cache); only alpha=1 runs without"
        )
    return hard_loss(student_logits, target, multilabel)


def mixture_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    weights: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    temperature: float,
    multilabel: bool = False,
) -> KDLoss:
    """`kd_loss` against several teachers: their logits (B, M, C) softened at T, each image's
    distributions mixed with its weights (B, M) (rows summing to 1), and the student's KL to the mixture.

    The mixture is of probabilities, not logits: teachers trained apart have logits on their own scales,
    and a mean of logits lets the most confident one decide. For multi-label tasks each label's Bernoulli
    probabilities are mixed. The student's gradient equals that of the weighted sum of its KLs to each
    teacher; the gate of `learned` weighting gets the mixture's.
    """
    hard = _hard_or_check(student_logits, teacher_logits, target, alpha, temperature, multilabel)
    if alpha == 1.0:
        return KDLoss(hard, hard, None)
    if teacher_logits.dim() != 3 or teacher_logits[:, 0].shape != student_logits.shape:
        raise MedkdError(
            f"teacher logits {tuple(teacher_logits.shape)} are not (batch, teachers, outputs) for student "
            f"logits {tuple(student_logits.shape)}; every cache must come from the same dataset and task"
        )
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature  # (B, M, C)
    w = weights.float().unsqueeze(-1)  # (B, M, 1)
    if not multilabel:
        p = (w * F.softmax(t, dim=-1)).sum(1)  # (B, C)
        kl = (torch.xlogy(p, p) - p * F.log_softmax(s, dim=1)).sum(1).mean()
    else:
        p = (w * torch.sigmoid(t)).sum(1)  # (B, L)
        q = 1 - p
        kl = (torch.xlogy(p, p) + torch.xlogy(q, q) - p * F.logsigmoid(s) - q * F.logsigmoid(-s)).mean()
    soft = temperature**2 * kl
    return KDLoss(alpha * hard + (1.0 - alpha) * soft, hard, soft)
