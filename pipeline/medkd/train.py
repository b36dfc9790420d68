"""One training loop for the supervised baseline and for distillation from cached teacher logits.

`train_epochs` yields after every epoch; the caller keeps the best checkpoint and decides when to stop.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medkd.config import lr_milestones
from medkd.data import DeviceSplit, View, is_multilabel
from medkd.errors import MedkdError
from medkd.losses import kd_loss, mixture_kd_loss
from medkd.metrics import evaluate, scores_from_logits
from medkd.registry import OPTIMIZERS, SCHEDULES
from medkd.students import FeatureTap
from medkd.views import sample_views
from medkd.weighting import TeacherWeighting


def resolve_device(name: str) -> torch.device:
    """`auto` → the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedkdError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def place_student(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """Move the student to `device` in channels_last, medkd's training layout (the faster one for
    convolutions on CUDA, and on the CPU too: ResNet-18 at 28 px trains ~1.3x faster than in NCHW,
    docs/performance.md); return the module to call: the student, or with `compile` its torch.compile
    wrapper, whose parameters are the student's own (the student's state_dict keeps its keys)."""
    model.to(device, memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads set to `threads` (0 or None: as they are) while inside, restored after;
    yields the count in use."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the student and teacher both tolerate it); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def predict(model: nn.Module, split: DeviceSplit, view: View, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, C) float32 of every image of `split`, in dataset order, on the split's device."""
    was_training = model.training
    model.eval()
    outputs = []
    for batch in split.batches(batch_size, view):
        with autocast(split.device):
            outputs.append(model(batch.images).float())
    model.train(was_training)
    return torch.cat(outputs)


def evaluate_model(
    model: nn.Module, split: DeviceSplit, view: View, batch_size: int = 256
) -> tuple[dict[str, float], np.ndarray]:
    """`({"auc", "acc"}, y_score)` of `model` on `split`, with MedMNIST's metric conventions."""
    scores = scores_from_logits(split.task, predict(model, split, view, batch_size)).cpu().numpy()
    return evaluate(split.task, split.labels.cpu().numpy(), scores), scores


NOT_VALIDATED = {"auc": None, "acc": None}  # the val metrics of an epoch that --eval-every skips


@dataclass
class EpochStats:
    epoch: int  # 1-based
    loss: float  # mean over the epoch's training images of alpha * ce + (1 - alpha) * kd
    ce: float  # the hard-label term
    kd: float | None  # the T^2 * KL term; None for the supervised baseline (alpha = 1)
    lr: float
    val_auc: float | None  # None: an epoch not validated (--eval-every)
    val_acc: float | None
    seconds: float
    images_per_second: float
    feature: float | None = None  # the 1 - cos feature term (before its weight); None without one
    teacher_weights: list[float] | None = None  # mean weight of each teacher over the epoch (several caches)


@dataclass
class Augmentation:
    """How a step varies the training images: each image shown as one of its K stored views, chosen
    afresh every epoch (`params` (N, K, P) of a multi-view cache, on the training device), or as a view
    of `preset` drawn afresh for every batch (`params` None)."""

    preset: str
    params: torch.Tensor | None = None

    def choose(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Each image's view for one epoch (N,), on the params' device; None for views drawn per batch."""
        if self.params is None:
            return None
        return torch.randint(self.params.shape[1], (n,), generator=generator).to(self.params.device)

    def params_of(
        self, index: torch.Tensor, chosen: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """The view parameters (B, P) of the images `index` of a batch."""
        if self.params is None:
            return sample_views(self.preset, len(index), generator).to(index.device)
        return self.params[index, chosen[index]]


def per_view(values: torch.Tensor, index: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    """Rows `index` of per-image values (N, ·), or of per-view values (N, K, ·) at each image's view."""
    return values[index] if chosen is None else values[index, chosen[index]]


@dataclass
class FeatureDistillation:
    """`weight · (1 − cos(P·f_s, f_t))`: the student's penultimate features f_s (caught by `tap`) through
    a learned linear projector P (trained with the student, not part of it), against the cached
    teacher features f_t of the same view: `teachers[m]` (N, D_m), or (N, K, D_m) for stored views.

    Several teachers each have their own projector, and their terms are weighed per image with the
    teacher weights of the step."""

    weight: float
    projectors: nn.ModuleList
    tap: FeatureTap
    teachers: list[torch.Tensor]

    def term(
        self, index: torch.Tensor, chosen: torch.Tensor | None, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The term of a batch; `weights` (B, M) for several teachers (None: the one teacher)."""
        features = self.tap.features.float()
        if weights is None:
            target = per_view(self.teachers[0], index, chosen).float()  # (B, D_t)
            return 1 - F.cosine_similarity(self.projectors[0](features), target, dim=1).mean()
        terms = [
            1 - F.cosine_similarity(projector(features), per_view(teacher, index, chosen).float(), dim=1)
            for projector, teacher in zip(self.projectors, self.teachers, strict=True)
        ]
        return (weights * torch.stack(terms, dim=1)).sum(1).mean()


class NonFiniteLossError(MedkdError):
    """The training loss became NaN or inf; `epoch` and `step` (1-based) say where it first happened."""

    def __init__(self, value: float, epoch: int, step: int, steps: int):
        super().__init__(
            f"training loss became {value} at epoch {epoch}, step {step} of {steps}; lower --lr or check "
            f"the cache logits"
        )
        self.value, self.epoch, self.step, self.steps = value, epoch, step, steps


def lr_factor(
    epoch: int, epochs: int, schedule: str, milestones: tuple[int, ...], warmup_epochs: int
) -> float:
    """The lr of epoch `epoch + 1` (0-based `epoch`, the scheduler's step count) as a fraction of --lr.

    Warm-up ramps linearly from 1/100 over the first `warmup_epochs` epochs (epoch e <= W trains at
    0.01 + 0.99 * (e - 1) / W); then `multistep` is ×0.1 at each milestone (absolute epochs, as without
    warm-up) and `cosine` falls from 1 to 0 over the remaining epochs, reaching 0 after the last one.
    """
    if epoch < warmup_epochs:
        return 0.01 + 0.99 * epoch / warmup_epochs
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
    return 0.1 ** sum(m <= epoch for m in milestones)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (weight decay as an L2 term in the gradient), AdamW (decoupled decay) or SGD (Nesterov, 0.9)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    raise MedkdError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


@dataclass
class LoopState:
    """What the loop carries from one epoch to the next; its `state_dict` lets `--resume` continue exactly."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per epoch
    generator: torch.Generator  # CPU generator of the shuffling order: the same order on every device
    epochs: int  # epochs the run trains in all
    epoch: int = 0  # epochs finished

    @classmethod
    def create(
        cls,
        model: nn.Module,
        lr: float,
        epochs: int,
        milestones: tuple[int, ...] | None,
        seed: int,
        *,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        schedule: str = "multistep",
        warmup_epochs: int = 0,
    ) -> LoopState:
        """`optimizer` at `lr`, the lr of each epoch from `lr_factor`, a generator seeded with `seed`."""
        if schedule not in SCHEDULES:
            raise MedkdError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        opt = build_optimizer(model, optimizer, lr, weight_decay)
        steps = lr_milestones(epochs, milestones)
        if schedule == "multistep" and warmup_epochs == 0:
            # The original schedule, kept as MultiStepLR: older runs reproduce bit for bit and their
            # epoch checkpoints (a MultiStepLR state) still resume.
            scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, steps, gamma=0.1)
        else:
            # One closed form of the epoch: nothing accumulates, and the state is just the step count (a
            # closure is not saved by state_dict; `create` rebuilds it from the same config on --resume).
            def factor(epoch: int) -> float:
                return lr_factor(epoch, epochs, schedule, steps, warmup_epochs)

            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return cls(opt, scheduler, torch.Generator().manual_seed(seed), epochs)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]


def train_epochs(
    model: nn.Module,
    train: DeviceSplit,
    val: DeviceSplit,
    view: View,
    loop: LoopState,
    *,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    temperature: float,
    batch_size: int,
    on_step: Callable[[], None] | None = None,
    augmentation: Augmentation | None = None,
    feature_kd: FeatureDistillation | None = None,
    weighting: TeacherWeighting | None = None,
    eval_every: int = 1,
) -> Iterator[EpochStats]:
    """Train epochs `loop.epoch + 1 … loop.epochs` on `alpha·hard + (1−alpha)·T²·KL`, yielding after each.

    `loop` comes from `LoopState.create` (or a checkpoint); it is updated before each yield, so the
    caller can checkpoint it there. `teacher_logits` (N_train, C) are looked up by each batch's dataset
    index, never by position; with an `augmentation` of stored views they are (N_train, K, C), looked up
    at the view each image is shown as. Several teachers' logits have a teacher axis before the last,
    (N_train, M, C) or (N_train, K, M, C), and `weighting` weighs them per image. `feature_kd` adds its
    term to the loss. The val split is evaluated after every `eval_every`-th epoch and the last (the
    others yield None for it). A last batch of one image is trained with the batch before it (BatchNorm cannot
    train on one image at small sizes); the epoch's loss is still the mean over all its images. A NaN or
    inf loss raises `NonFiniteLossError` at the end of its epoch, before anything of it is yielded.
    """
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise MedkdError(f"{len(teacher_logits)} teacher logits for {len(train)} training images")
    multilabel = is_multilabel(train.task)
    for epoch in range(loop.epoch + 1, loop.epochs + 1):
        model.train()
        start, sums = time.perf_counter(), []
        current_lr = loop.optimizer.param_groups[0]["lr"]
        # Drawn before the shuffle, only with augmentation: a run without draws as it always has.
        chosen = augmentation.choose(len(train), loop.generator) if augmentation is not None else None
        views = None
        if augmentation is not None:
            views = functools.partial(augmentation.params_of, chosen=chosen, generator=loop.generator)
        weight_sums = []
        batches = train.batches(
            batch_size, view, shuffle=True, generator=loop.generator, views=views, merge_single=True
        )
        for batch in batches:
            teacher = per_view(teacher_logits, batch.index, chosen) if teacher_logits is not None else None
            with autocast(train.device):
                logits = model(batch.images)  # (B, C)
            weights = None
            if weighting is None:
                terms = kd_loss(logits.float(), teacher, batch.targets, alpha, temperature, multilabel)
            else:
                weights = weighting.weights(teacher, batch.targets, multilabel)  # (B, M)
                weight_sums.append(weights.detach().sum(0))
                terms = mixture_kd_loss(
                    logits.float(), teacher, weights, batch.targets, alpha, temperature, multilabel
                )
            loss, feature = terms.loss, torch.zeros_like(terms.ce)
            if feature_kd is not None:
                feature = feature_kd.term(batch.index, chosen, weights)
                loss = loss + feature_kd.weight * feature
            if weighting is not None:
                loss = loss - weighting.bonus(weights)
            loop.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loop.optimizer.step()
            # Kept on the device: a .item() per step would sync the GPU every step.
            kd = terms.kd if terms.kd is not None else torch.zeros_like(terms.ce)
            parts = [loss.detach(), terms.ce.detach(), kd.detach(), feature.detach()]
            sums.append(torch.stack(parts) * len(batch.index))
            if on_step is not None:
                on_step()
        sums = torch.stack(sums)  # (steps, 4): summed loss, ce, kd and feature term of each batch
        bad = (~torch.isfinite(sums[:, 0])).nonzero()
        if len(bad):
            first = int(bad[0, 0])
            raise NonFiniteLossError(sums[first, 0].item(), epoch, first + 1, len(sums))
        loop.scheduler.step()
        # Each column summed on its own, as a 1-D tensor: the same reduction order as a loss-only loop.
        loss, ce, kd, feature = (sums[:, i].contiguous().sum().item() / len(train) for i in range(4))
        seconds = time.perf_counter() - start
        mean_weights = (torch.stack(weight_sums).sum(0) / len(train)).tolist() if weight_sums else None
        validate = epoch % eval_every == 0 or epoch == loop.epochs
        metrics = evaluate_model(model, val, view)[0] if validate else NOT_VALIDATED
        loop.epoch = epoch
        yield EpochStats(
            epoch, loss, ce, kd if alpha < 1 else None, current_lr, metrics["auc"], metrics["acc"],
            seconds, len(train) / seconds, feature if feature_kd is not None else None, mean_weights,
        )  # fmt: skip
