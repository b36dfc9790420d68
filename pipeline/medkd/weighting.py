"""How a multi-teacher run weighs its teachers, per image: `mean`, `confidence` (CA-MKD) or a `learned` gate.

Each returns weights (B, M) whose rows sum to 1; `medkd.losses.mixture_kd_loss` mixes the teachers'
softened distributions with them, and the feature term (with `--feature-weight`) weighs each teacher's
cosine term with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medkd.errors import MedkdError
from medkd.registry import TEACHER_WEIGHTINGS

GATE_HIDDEN = 64  # width of the gate's hidden layer: small next to any student's features


def confidence_weights(teacher_logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """CA-MKD's per-image weights: softmax over the M teachers of −CE(teacher, label).

    `teacher_logits` (B, M, C); `target` int64 (B,), or float (B, L) for multi-label tasks, where the CE is
    the mean binary cross-entropy over the labels. The logits are taken at T = 1: how well each teacher
    itself predicts the label.
    """
    logits = teacher_logits.detach().float()
    if multilabel:
        labels = target.float().unsqueeze(1).expand_as(logits)
        ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)  # (B, M)
    else:
        ce = -F.log_softmax(logits, dim=-1).gather(-1, target.view(-1, 1, 1).expand(-1, logits.shape[1], 1))
        ce = ce.squeeze(-1)  # (B, M)
    return F.softmax(-ce, dim=1)


class Gate(nn.Module):
    """A small MLP from the student's penultimate features (D,) to weights over M teachers.

    Its last layer starts at zero, so a run starts from the mean of the teachers and learns away from it.
    """

    def __init__(self, dim: int, teachers: int, hidden: int = GATE_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, teachers))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(features.float()), dim=1)


@dataclass
class TeacherWeighting:
    """One of `TEACHER_WEIGHTINGS` for M teachers; `learned` holds its gate, the entropy bonus weight and
    the tap (`medkd.students.FeatureTap`) that holds the student's penultimate features of the step.

    The gate trains with the student (one optimizer, the student's loss) on the student's features,
    detached: it routes between teachers, and must not reshape the student's features to make its
    choice easy. The student's loss alone favours the teachers the student already agrees with, so the
    gate gets `entropy · H(weights)` as a bonus (subtracted from the loss), against collapsing onto one.
    """

    name: str
    teachers: int
    gate: Gate | None = None
    entropy: float = 0.0
    tap: Any = None

    @classmethod
    def create(cls, name: str, teachers: int, tap: Any = None, entropy: float = 0.0) -> TeacherWeighting:
        """`name` for `teachers` teachers; `learned` needs the student's `tap` (its width sizes the gate)."""
        if name not in TEACHER_WEIGHTINGS:
            raise MedkdError(f"unknown teacher weighting '{name}'; valid: {', '.join(TEACHER_WEIGHTINGS)}")
        if name != "learned":
            return cls(name, teachers)
        return cls(name, teachers, Gate(tap.dim, teachers), entropy, tap)

    def weights(self, teacher_logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
        """Each image's weights (B, M) over the teachers, from their logits (B, M, C), the labels and (for
        `learned`) the student's penultimate features of this step."""
        if self.name == "confidence":
            return confidence_weights(teacher_logits, target, multilabel)
        if self.name == "learned":
            return self.gate(self.tap.features.detach())
        return teacher_logits.new_full((teacher_logits.shape[0], self.teachers), 1.0 / self.teachers)

    def bonus(self, weights: torch.Tensor) -> torch.Tensor:
        """What is subtracted from the loss: `entropy` times the mean entropy of the weights (0 unless
        learned)."""
        if self.gate is None or self.entropy == 0:
            return weights.new_zeros(())
        return self.entropy * -torch.xlogy(weights, weights).sum(1).mean()
