"""The teacher's linear head, trained on frozen features held in memory (seconds, no backbone pass)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from medkd.config import lr_milestones
from medkd.data import is_multilabel, num_outputs
from medkd.metrics import BestEpoch, evaluate, scores_from_logits


@contextmanager
def _single_thread(enabled: bool) -> Iterator[None]:
    # A (D, C) linear layer on 32-row batches is microseconds of work: CPU threads cost more in start-up
    # and spin-waiting than they save (5x slower with two threads on a busy 2-core machine).
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _metrics(head: nn.Linear, features: torch.Tensor, labels: np.ndarray, task: str) -> dict[str, float]:
    logits = head(features.float())  # (N, C)
    return evaluate(task, labels, scores_from_logits(task, logits).cpu().numpy())


def train_head(
    features: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    labels: dict[str, np.ndarray],
    task: str,
    *,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    milestones: tuple[int, ...] | None = None,
    seed: int = 0,
    n_labels: int | None = None,
) -> tuple[nn.Linear, dict]:
    """Train nn.Linear(D, C) on `features["train"]`, keep the best-val-AUC epoch; return it and its history.

    `targets` are `DeviceSplit.targets` ((N,) int64 classes, or (N, L) floats for multi-label);
    `labels` the (N, L) int64 labels the metrics compare against. `n_labels` (classes, or labels for
    multi-label; `len(dataset_info(flag)["label"])`) sets C = `num_outputs(task, n_labels)`; by default
    it is read off the labels.
    """
    x_train = features["train"].float()  # (N, D); cached features may be float16
    y_train = targets["train"].to(x_train.device)
    if n_labels is None:
        n_labels = _n_labels(task, labels)
    with torch.random.fork_rng(devices=[]):  # the head's init depends on `seed` only
        torch.manual_seed(seed)
        head = nn.Linear(x_train.shape[1], num_outputs(task, n_labels)).to(x_train.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(lr_milestones(epochs, milestones)), 0.1)
    loss_fn = nn.BCEWithLogitsLoss() if is_multilabel(task) else nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    best, best_state, history = BestEpoch(), None, []
    with _single_thread(x_train.device.type == "cpu"):
        for epoch in range(1, epochs + 1):
            head.train()
            total, n = 0.0, len(x_train)
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                idx = idx.to(x_train.device)
                loss = loss_fn(head(x_train[idx]), y_train[idx])  # logits (B, C)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            scheduler.step()
            head.eval()
            val = _metrics(head, features["val"], labels["val"], task)
            history.append({"epoch": epoch, "loss": total / n, "val_auc": val["auc"], "val_acc": val["acc"]})
            if best.update(epoch, val["auc"]):
                best_state = copy.deepcopy(head.state_dict())

    head.load_state_dict(best_state)
    head.eval().requires_grad_(False)
    val = history[best.epoch - 1]
    test = _metrics(head, features["test"], labels["test"], task)
    info = {
        "epochs": epochs,
        "best_epoch": best.epoch,
        "val_auc": val["val_auc"],
        "val_acc": val["val_acc"],
        "test_auc": test["auc"],
        "test_acc": test["acc"],
        "lr": lr,
        "batch_size": batch_size,
        "history": history,
    }
    return head, info


def _n_labels(task: str, labels: dict[str, np.ndarray]) -> int:
    """Labels (multi-label) or classes seen in any split; pass `n_labels` when a class may be absent."""
    if is_multilabel(task):
        return labels["train"].shape[1]
    return max(int(y.max()) + 1 for y in labels.values())
