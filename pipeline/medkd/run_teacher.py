"""Finished medkd runs as teachers: `medkd cache-teacher --teacher run:runs/NAME [--teacher run:...]`.

A run folder (its `best.pt` and the config recorded in `result.json`) is rebuilt as the student network
it trained, and its own classifier gives the logits: no head is trained. Several runs make an ensemble
whose cached logits are the mean of the members' logits. `RunTeacher` is a `medkd.teachers.Teacher`,
so stage one caches it like any backbone, in format 1, and `distill`, `sweep` and `report` read it
like any other cache.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from medkd.config import run_teacher_paths
from medkd.data import SPLITS
from medkd.datasets import same_dataset
from medkd.errors import MedkdError
from medkd.registry import RUN_PREFIX
from medkd.students import student_classifier, student_features
from medkd.teachers import Teacher, TeacherOutput
from medkd.trained import TrainedRun, load_trained_run

# How the members' logits are combined, recorded in the cache (see `ensemble_logits`).
COMBINE = "mean_logits"


class _LogitsAndFeatures(nn.Module):
    """A student that returns `(logits, penultimate features)`: one pass gives both, logits unchanged.

    `fc` is the student's linear classifier (a ResNet's `.fc`, a timm model's `get_classifier()`); the
    features are its input: a ResNet's pooled, flattened output, timm's `forward_head(pre_logits=True)`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.fc = student_classifier(model)
        self.body = copy.deepcopy(model)
        self.timm = not isinstance(model, torchvision.models.ResNet)
        if not self.timm:
            self.body.fc = nn.Identity()  # the body now ends in the pooled, flattened features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = student_features(self.body, x) if self.timm else self.body(x)  # (B, D)
        return self.fc(features), features  # (B, C), (B, D)


def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """The members' logits averaged: one member is returned unchanged (bit for bit)."""
    if len(logits) == 1:
        return logits[0]
    # Mean of logits, not of probabilities: the cache stores raw logits that serve every temperature,
    # and a mean of logits is still a logit (softmax of it is the normalised geometric mean of the
    # members' probabilities; sigmoid of it the same per label for multi-label tasks).
    return torch.stack(logits).mean(dim=0)


class RunTeacher(Teacher):
    """One finished run, or a mean-logit ensemble of several, as a teacher: each member sees its own
    view (the size and resize it trained with); features are the members' penultimate features, joined."""

    def __init__(self, teacher: str, members: list[TrainedRun]):
        super().__init__()
        self.members = members
        self.nets = nn.ModuleList(_LogitsAndFeatures(m.model) for m in members)
        self.name = teacher_label(teacher)
        self.feature_dim = sum(net.fc.in_features for net in self.nets)
        self.freeze()

    def forward(
        self, images: torch.Tensor, with_tokens: bool = False, views: torch.Tensor | None = None
    ) -> TeacherOutput:
        if with_tokens:
            raise MedkdError("a run: teacher has no patch tokens; --head attention is for backbone teachers")
        nets = zip(self.members, self.nets, strict=True)
        outputs = [net(self.prepare(images, m.view, views)) for m, net in nets]
        logits = ensemble_logits([lg.float() for lg, _ in outputs])  # (B, C)
        return TeacherOutput(torch.cat([f for _, f in outputs], dim=1), logits)  # (B, D1 + D2 + ...)

    def provenance(self) -> dict[str, Any]:
        runs = [m.result for m in self.members]
        return {
            "backbone": _joined([r.student for r in runs]),
            "weights_sha256": _ensemble_sha([m.checkpoint_sha256 for m in self.members]),
            "teacher_input_size": max(int(r.student_size) for r in runs),
            "resize": _joined([m.view.interpolation for m in self.members]),
            "mean": list(self.members[0].view.mean),
            "std": list(self.members[0].view.std),
            "pool": "avgpool",  # the ResNet's global average pool, the input of its classifier
            "random_init": False,
            "ensemble": {"combine": COMBINE, "members": [_member_provenance(m) for m in self.members]},
        }

    def head_record(self, metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
        return _head(self.members, metrics)

    def check_data(self, dataset: str, size: int, n_outputs: int, data_sha256: dict[str, str]) -> None:
        for m in self.members:
            r = m.result
            if not same_dataset(r.dataset, dataset) or int(r.size) != int(size):
                raise MedkdError(
                    f"teacher run {m.path} was trained on {r.dataset} ({r.size} px); the cache is for "
                    f"{dataset} ({size} px): pass --dataset {r.dataset} --size {r.size}, "
                    f"or a run of {dataset}"
                )
            for split in SPLITS:
                recorded = r.data_sha256.get(split)
                if recorded is not None and recorded != data_sha256[split]:
                    raise MedkdError(
                        f"teacher run {m.path} was trained on other {dataset} data ({split} sha256 "
                        f"{recorded[:12]}…) than --data-dir holds ({data_sha256[split][:12]}…); point "
                        f"--data-dir at its data"
                    )
        outputs = {m.result.n_outputs for m in self.members}
        if len(outputs) > 1:
            raise MedkdError(f"teacher runs disagree on the number of outputs ({sorted(outputs)})")
        if outputs != {n_outputs}:
            raise MedkdError(f"teacher runs have {outputs.pop()} outputs; {dataset} needs {n_outputs}")

    def summary(self) -> str:
        return f"— {len(self.members)} run(s), {COMBINE}"


def load_run_teacher(teacher: str) -> RunTeacher:
    """The teacher `run:A[,run:B…]`: every member loaded and checked before any data is read."""
    return RunTeacher(teacher, [load_trained_run(p, "teacher run") for p in run_teacher_paths(teacher)])


def _joined(values: list[Any]) -> str:
    """`resnet18` when every member agrees, else `resnet18+resnet50`."""
    values = [str(v) for v in values]
    return values[0] if len(set(values)) == 1 else "+".join(values)


def teacher_label(teacher: str) -> str:
    """The cache's `teacher` attr: `run:NAME` per member (folder names), joined with `+`."""
    return "+".join(f"{RUN_PREFIX}{Path(p).name}" for p in run_teacher_paths(teacher))


def _ensemble_sha(shas: list[str]) -> str:
    # One member: its best.pt's sha256, like a backbone's weights file; several: a hash of theirs, in order.
    return shas[0] if len(shas) == 1 else hashlib.sha256("+".join(shas).encode()).hexdigest()


def _head(members: list[TrainedRun], metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The classifier as a linear head on the cached features: logits = features @ weight.T + bias.

    For k members on concatenated features, weight = [W1 … Wk] / k and bias = mean(b): exactly the
    mean of the members' logits. Attrs: the run's epochs, best_epoch, lr, batch_size (one value per
    member for an ensemble) and the val/test AUC/ACC of the cached logits.
    """
    k = len(members)
    fcs = [student_classifier(m.model) for m in members]  # a ResNet's .fc, a timm student's classifier
    weight = torch.cat([fc.weight.detach() for fc in fcs], dim=1) / k  # (C, D1 + … + Dk)
    bias = torch.stack([fc.bias.detach() for fc in fcs]).mean(dim=0)  # (C,)
    per_member = {
        "epochs": [int(m.result.epochs_run) for m in members],
        "best_epoch": [int(m.result.best_epoch or m.checkpoint_epoch) for m in members],
        "lr": [m.result.lr for m in members],
        "batch_size": [int(m.result.config["batch_size"]) for m in members],
    }
    record: dict[str, Any] = {"weight": weight.numpy(), "bias": bias.numpy()}
    record.update({key: values[0] if k == 1 else values for key, values in per_member.items()})
    record.update(
        val_auc=metrics["val"]["auc"],
        val_acc=metrics["val"]["acc"],
        test_auc=metrics["test"]["auc"],
        test_acc=metrics["test"]["acc"],
        members=k,
        combine=COMBINE,
    )
    return record


def _member_provenance(member: TrainedRun) -> dict[str, Any]:
    """What the cache records about one member run."""
    r = member.result
    return {
        "run_dir": str(member.path),
        "student": r.student,
        "student_size": r.student_size,
        "interpolation": r.config.get("interpolation"),
        "alpha": r.alpha,
        "temperature": r.temperature,
        "seed": r.seed,
        "teacher": (r.teacher or {}).get("teacher"),
        "config_hash": r.config_hash,
        "best_sha256": member.checkpoint_sha256,
        "best_epoch": r.best_epoch,
        "epochs_run": r.epochs_run,
        "val_auc": r.val["auc"],
        "val_acc": r.val["acc"],
        "test_auc": r.test["auc"],
        "test_acc": r.test["acc"],
    }
