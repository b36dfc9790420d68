"""The teacher's heads on frozen inputs: a linear head on the features, or an attentive probe on the patch
tokens; one head, or K cross-fitted heads whose train logits are out-of-fold. Seconds, no backbone pass.

A head trains on a `Rows` of each split: an in-memory tensor, or an HDF5 dataset read a minibatch at a
time (patch tokens can outgrow memory). `head_record` / `head_from_record` turn a head into the arrays
and attrs a cache stores and back (`medkd.cache` writes and checks them).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from medkd.config import lr_milestones
from medkd.data import SPLITS, is_multilabel, num_outputs
from medkd.errors import MedkdError
from medkd.metrics import BestEpoch, evaluate, scores_from_logits
from medkd.train import intra_op_threads

HEAD_INPUTS = {"linear": "features", "attention": "tokens"}  # what each head kind reads
# A split of tokens up to this size is read into memory once (fast); a larger one is read a minibatch
# at a time from its HDF5 file.
TOKENS_IN_MEMORY_BYTES = 1 << 30
EVAL_BATCH_BYTES = 1 << 26  # float32 inputs per evaluation batch: bounded memory for big token rows


class AttentionHead(nn.Module):
    """An attentive probe (the DINOv2 / V-JEPA frozen evaluations): one learned query attends over the
    LayerNormed patch tokens with one multi-head attention; a linear layer classifies what it attended to."""

    def __init__(self, dim: int, n_outputs: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.classifier = nn.Linear(dim, n_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens.float())  # (B, T, D)
        attended, _ = self.attn(self.query.expand(len(x), -1, -1), x, x, need_weights=False)  # (B, 1, D)
        return self.classifier(attended[:, 0])  # (B, C)


class MeanHead(nn.Module):
    """The mean of K heads' logits: what cross-fitted heads predict for an image none of them trained on."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads]).mean(dim=0)  # (B, C)


def attention_heads(dim: int) -> int:
    """Heads of 64 dims where the width allows (ViT-B's 768 → 12), else the nearest divisor below."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


def build_head(kind: str, input_shape: tuple[int, ...], n_outputs: int, seed: int) -> nn.Module:
    """A fresh head of `kind` for inputs of one row's shape ((D,) features or (T, D_tok) tokens)."""
    with torch.random.fork_rng(devices=[]):  # the head's init depends on `seed` only
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Linear(input_shape[-1], n_outputs)
        return AttentionHead(input_shape[-1], n_outputs, attention_heads(input_shape[-1]))


class Rows:
    """One split's head inputs, features (N, D) or tokens (N, T, D_tok): a tensor, or an HDF5 dataset that
    is read a minibatch at a time; `subset` restricts them to some rows (a cross-fit fold's complement)."""

    def __init__(self, data: Any, rows: np.ndarray | None = None):
        self.data, self.rows = data, rows

    @classmethod
    def of(cls, data: Any) -> Rows:
        """`data` as rows: a tensor as it is, an HDF5 dataset into memory if it is small enough."""
        if isinstance(data, Rows):
            return data
        if not isinstance(data, torch.Tensor) and data.size * data.dtype.itemsize <= TOKENS_IN_MEMORY_BYTES:
            data = torch.from_numpy(data[()])
        return cls(data)

    def __len__(self) -> int:
        return len(self.data) if self.rows is None else len(self.rows)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def subset(self, rows: np.ndarray) -> Rows:
        return Rows(self.data, rows if self.rows is None else self.rows[rows])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (positions in this view, any order) as float32."""
        if isinstance(self.data, torch.Tensor):
            if self.rows is not None:
                idx = torch.from_numpy(self.rows)[idx]
            return self.data[idx.to(self.data.device)].float()
        idx = idx.numpy() if self.rows is None else self.rows[idx.numpy()]
        order = np.argsort(idx)  # HDF5 reads increasing indices only
        block = np.empty((len(idx), *self.row_shape), dtype=self.data.dtype)
        block[order] = self.data[idx[order]]
        return torch.from_numpy(block).float()

    def batches(self) -> Iterator[torch.Tensor]:
        """Every row in order, float32, in batches of at most EVAL_BATCH_BYTES."""
        size = max(1, EVAL_BATCH_BYTES // (4 * int(np.prod(self.row_shape))))
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            if self.rows is not None:
                yield self.take(torch.arange(start, stop))
            else:  # one contiguous read
                block = self.data[start:stop]
                yield (block if isinstance(block, torch.Tensor) else torch.from_numpy(block)).float()


@torch.no_grad()
def predict(head: nn.Module, inputs: Rows) -> torch.Tensor:
    """The head's logits (N, C) for every row, float32 on the CPU."""
    device = next(head.parameters()).device
    return torch.cat([head(x.to(device)).float().cpu() for x in inputs.batches()])


def fold_logits(heads: list[nn.Module], folds: np.ndarray, inputs: Rows) -> torch.Tensor:
    """Logits (N, C) float32 on the CPU, each row from the head of its fold (`folds` (N,), 0..K-1): a
    cross-fitted cache's out-of-fold train logits."""
    logits = None
    for k, head in enumerate(heads):
        rows = np.flatnonzero(folds == k)
        if len(rows):
            part = predict(head, inputs.subset(rows))  # (N_k, C)
            logits = torch.empty((len(inputs), part.shape[1])) if logits is None else logits
            logits[torch.from_numpy(rows)] = part
    return logits


def _metrics(task: str, labels: np.ndarray, logits: torch.Tensor) -> dict[str, float]:
    return evaluate(task, labels, scores_from_logits(task, logits).numpy())


def train_head(
    inputs: dict[str, torch.Tensor | Rows],
    targets: dict[str, torch.Tensor],
    labels: dict[str, np.ndarray],
    task: str,
    *,
    kind: str = "linear",
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    milestones: tuple[int, ...] | None = None,
    seed: int = 0,
    n_labels: int | None = None,
    train_rows: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, dict]:
    """Train a `kind` head on `inputs["train"]` (only `train_rows` of it, if given), keep the best-val-AUC
    epoch; return it and its history.

    `inputs` are features (N, D) for a linear head, tokens (N, T, D_tok) for an attention head (tensors,
    maybe float16, or `Rows`); `targets` are `DeviceSplit.targets` ((N,) int64 classes, or (N, L) floats
    for multi-label); `labels` the (N, L) int64 labels the metrics compare against. `n_labels` (classes,
    or labels for multi-label) sets C = `num_outputs(task, n_labels)`; by default it is read off the
    labels. `device`: where to train (default: where in-memory inputs are, else the CPU).
    """
    rows = {split: Rows.of(inputs[split]) for split in SPLITS}
    train, y_train = rows["train"], targets["train"]
    if train_rows is not None:
        train, y_train = train.subset(train_rows), y_train[torch.from_numpy(train_rows)]
    data = train.data
    device = torch.device(device or (data.device if isinstance(data, torch.Tensor) else "cpu"))
    y_train = y_train.to(device)
    n_labels = n_labels or _n_labels(task, labels)
    head = build_head(kind, train.row_shape, num_outputs(task, n_labels), seed).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(lr_milestones(epochs, milestones)), 0.1)
    loss_fn = nn.BCEWithLogitsLoss() if is_multilabel(task) else nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    best, best_state, history = BestEpoch(), None, []
    # A (D, C) linear layer on 32-row batches is microseconds of work: CPU threads cost more in start-up
    # and spin-waiting than they save (5x slower with two threads on a busy 2-core machine).
    with intra_op_threads(1 if device.type == "cpu" and kind == "linear" else None):
        for epoch in range(1, epochs + 1):
            head.train()
            total, n = 0.0, len(train)
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                loss = loss_fn(head(train.take(idx).to(device)), y_train[idx.to(device)])  # logits (B, C)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            scheduler.step()
            head.eval()
            val = _metrics(task, labels["val"], predict(head, rows["val"]))
            history.append({"epoch": epoch, "loss": total / n, "val_auc": val["auc"], "val_acc": val["acc"]})
            if best.update(epoch, val["auc"]):
                best_state = copy.deepcopy(head.state_dict())

    head.load_state_dict(best_state)
    head.eval().requires_grad_(False)
    val = history[best.epoch - 1]
    test = _metrics(task, labels["test"], predict(head, rows["test"]))
    info = {
        "kind": kind,
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


def stratified_folds(labels: np.ndarray, task: str, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each of the (N, L) labels' images, stratified by class, seeded.

    Multi-label images are stratified by their rarest positive label (or "none"), so every label's few
    positives are spread over the folds.
    """
    if k > len(labels):
        raise MedkdError(f"--cross-fit {k} needs at least {k} training images; the split has {len(labels)}")
    if is_multilabel(task):
        positives = np.where(labels > 0, labels.sum(axis=0), np.inf)  # (N, L): each label's train count
        key = np.where(np.isfinite(positives.min(axis=1)), positives.argmin(axis=1), -1)  # -1: no label
    else:
        key = labels[:, 0]
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class rarer than k images simply misses some folds
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        try:
            for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(key)), key)):
                folds[held_out] = fold
        except ValueError as err:
            raise MedkdError(f"--cross-fit {k}: {err} (use fewer folds)") from err
    return folds


@dataclass
class FittedHeads:
    """What stage one caches of its heads: logits (N, C) per split, the heads with their histories, and
    for cross-fitting the train fold of each image (None for one head)."""

    logits: dict[str, np.ndarray]
    heads: list[tuple[nn.Module, dict]]
    folds: np.ndarray | None
    summary: dict[str, Any]  # the head attrs of the cached logits (and the in-fold train metrics)


def fit_heads(
    inputs: dict[str, torch.Tensor | Rows],
    targets: dict[str, torch.Tensor],
    labels: dict[str, np.ndarray],
    task: str,
    *,
    cross_fit: int = 1,
    **train_args: Any,
) -> FittedHeads:
    """One head (`cross_fit` 1), or K cross-fitted heads: head k trains on every train fold but k (best
    epoch on val, as one head does), gives fold k its train logits, and val/test get the mean of the K."""
    rows = {split: Rows.of(inputs[split]) for split in SPLITS}
    if cross_fit < 2:
        head, info = train_head(rows, targets, labels, task, **train_args)
        logits = {split: predict(head, rows[split]).numpy() for split in SPLITS}
        return FittedHeads(logits, [(head, info)], None, {k: v for k, v in info.items() if k != "history"})

    folds = stratified_folds(labels["train"], task, cross_fit, train_args.get("seed", 0))
    heads, train_logits, mean = [], None, {"val": 0.0, "test": 0.0}
    for fold in range(cross_fit):
        seen = np.flatnonzero(folds != fold)
        head, info = train_head(rows, targets, labels, task, train_rows=seen, **train_args)
        train = predict(head, rows["train"]).numpy()  # (N, C): out-of-fold on fold k, in-fold elsewhere
        if train_logits is None:
            train_logits = np.empty_like(train)
        train_logits[folds == fold] = train[folds == fold]
        in_fold = _metrics(task, labels["train"][seen], torch.from_numpy(train[seen]))
        info.update(train_auc=in_fold["auc"], train_acc=in_fold["acc"])
        for split in mean:
            mean[split] = mean[split] + predict(head, rows[split]).numpy() / cross_fit
        heads.append((head, info))
    logits = {"train": train_logits, **{s: m.astype(np.float32) for s, m in mean.items()}}
    val, test = (_metrics(task, labels[s], torch.from_numpy(logits[s])) for s in ("val", "test"))
    first = heads[0][1]
    summary = {
        "epochs": first["epochs"],
        "best_epoch": [info["best_epoch"] for _, info in heads],
        "val_auc": val["auc"],
        "val_acc": val["acc"],
        "test_auc": test["auc"],
        "test_acc": test["acc"],
        "lr": first["lr"],
        "batch_size": first["batch_size"],
        # The in-fold train metrics, mean over the heads: next to the out-of-fold ones they show the gap.
        "in_fold_train_auc": float(np.mean([info["train_auc"] for _, info in heads])),
        "in_fold_train_acc": float(np.mean([info["train_acc"] for _, info in heads])),
    }
    return FittedHeads(logits, heads, folds, summary)


def head_record(head: nn.Module) -> dict[str, Any]:
    """A head as the cache stores it: `kind` and, for a linear head, `weight` (C, D) and `bias` (C,); for
    an attention head `num_heads` and `state`, its state dict as float32 arrays."""
    if isinstance(head, nn.Linear):
        return {
            "kind": "linear",
            "weight": head.weight.detach().cpu().numpy(),
            "bias": head.bias.detach().cpu().numpy(),
        }
    state = {key: value.detach().float().cpu().numpy() for key, value in head.state_dict().items()}
    return {"kind": "attention", "num_heads": head.num_heads, "state": state}


def head_from_record(record: dict[str, Any]) -> nn.Module:
    """The frozen module of a `head_record` (a record without `kind` is linear: caches before kinds)."""
    if record.get("kind", "linear") == "linear":
        weight, bias = (
            torch.as_tensor(np.asarray(record[k]), dtype=torch.float32) for k in ("weight", "bias")
        )
        head = nn.Linear(weight.shape[1], weight.shape[0])
        state = {"weight": weight, "bias": bias}
    else:
        state = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in record["state"].items()}
        n_outputs, dim = state["classifier.weight"].shape
        head = AttentionHead(dim, n_outputs, int(record["num_heads"]))
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)
