"""One training loop for the supervised baseline and for distillation from cached teacher logits.

`train_epochs` yields after every epoch; the caller keeps the best checkpoint and decides when to stop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medkd.config import lr_milestones
from medkd.data import DeviceSplit, View, is_multilabel
from medkd.errors import MedkdError
from medkd.losses import kd_loss
from medkd.metrics import evaluate, scores_from_logits


def resolve_device(name: str) -> torch.device:
    """`auto` → the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedkdError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


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


@dataclass
class EpochStats:
    epoch: int  # 1-based
    loss: float
    lr: float
    val_auc: float
    val_acc: float
    seconds: float
    images_per_second: float


class NonFiniteLossError(MedkdError):
    """The training loss became NaN or inf; `epoch` and `step` (1-based) say where it first happened."""

    def __init__(self, value: float, epoch: int, step: int, steps: int):
        super().__init__(
            f"training loss became {value} at epoch {epoch}, step {step} of {steps}; lower --lr or check "
            f"the cache logits"
        )
        self.value, self.epoch, self.step, self.steps = value, epoch, step, steps


@dataclass
class LoopState:
    """What the loop carries from one epoch to the next; its `state_dict` lets `--resume` continue exactly."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    generator: torch.Generator  # CPU generator of the shuffling order: the same order on every device
    epoch: int = 0  # epochs finished

    @classmethod
    def create(
        cls, model: nn.Module, lr: float, epochs: int, milestones: tuple[int, ...] | None, seed: int
    ) -> LoopState:
        """Adam at `lr`, ×0.1 at the milestones, a generator seeded with `seed`, no epoch done."""
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, lr_milestones(epochs, milestones), gamma=0.1
        )
        return cls(optimizer, scheduler, torch.Generator().manual_seed(seed))

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
    *,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    temperature: float,
    epochs: int,
    batch_size: int,
    lr: float,
    milestones: tuple[int, ...] | None = None,
    seed: int = 0,
    state: LoopState | None = None,
    on_step=None,
) -> Iterator[EpochStats]:
    """Adam + MultiStepLR (×0.1) on `alpha·hard + (1−alpha)·T²·KL`, yielding stats after each epoch.

    `teacher_logits` (N_train, C) are looked up by each batch's dataset index, never by position.
    `state` (from `LoopState.create`, possibly loaded from a checkpoint) continues after `state.epoch`;
    it is updated before each yield, so the caller can checkpoint it there. A NaN or inf loss raises
    `NonFiniteLossError` at the end of its epoch, before anything of that epoch is yielded.
    """
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise MedkdError(f"{len(teacher_logits)} teacher logits for {len(train)} training images")
    multilabel = is_multilabel(train.task)
    if state is None:
        state = LoopState.create(model, lr, epochs, milestones, seed)
    optimizer, scheduler = state.optimizer, state.scheduler
    for epoch in range(state.epoch + 1, epochs + 1):
        model.train()
        start, step_losses = time.perf_counter(), []
        current_lr = optimizer.param_groups[0]["lr"]
        for step, batch in enumerate(
            train.batches(batch_size, view, shuffle=True, generator=state.generator)
        ):
            teacher = teacher_logits[batch.index] if teacher_logits is not None else None  # (B, C)
            with autocast(train.device):
                logits = model(batch.images)  # (B, C)
            loss = kd_loss(logits.float(), teacher, batch.targets, alpha, temperature, multilabel)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Kept on the device: a .item() per step would sync the GPU every step.
            step_losses.append(loss.detach() * len(batch.index))
            if on_step is not None:
                on_step(epoch, step, len(batch.index))
        losses = torch.stack(step_losses)  # (steps,) summed loss of each batch
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = int(bad[0, 0])
            raise NonFiniteLossError(losses[first].item(), epoch, first + 1, len(losses))
        scheduler.step()
        seen = len(train)
        mean_loss = losses.sum().item() / seen
        seconds = time.perf_counter() - start
        metrics, _ = evaluate_model(model, val, view)
        state.epoch = epoch
        yield EpochStats(
            epoch, mean_loss, current_lr, metrics["auc"], metrics["acc"], seconds, seen / seconds
        )
