"""The heads: the linear one learns every task type, keeps the best-val-AUC epoch and repeats with a seed;
the attention head learns from patch tokens, in memory or read from HDF5, and both rebuild from records."""

import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TASK_FLAGS

import medkd.head
from medkd.config import lr_milestones
from medkd.data import SPLITS, DeviceSplit, dataset_info, load_arrays, num_outputs
from medkd.head import (
    AttentionHead,
    Rows,
    attention_heads,
    head_from_record,
    head_record,
    predict,
    train_head,
)
from medkd.metrics import BestEpoch


def pixel_features(root, flag):
    """Synthetic features: each image average-pooled to 7x7 per channel, standardised."""
    task = dataset_info(flag)["task"]
    features, targets, labels = {}, {}, {}
    for split, (images, split_labels) in load_arrays(flag, 28, root).items():
        x = torch.from_numpy(images).float()
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, 28, 28)
        features[split] = F.avg_pool2d(x, 4).flatten(1)  # (N, C·49)
        targets[split] = DeviceSplit(images, split_labels, task, "cpu").targets
        labels[split] = split_labels
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    return {s: (f - mean) / std for s, f in features.items()}, targets, labels, task


@pytest.mark.parametrize("task", list(TASK_FLAGS))
def test_learns_every_task_type_well_above_chance(synthetic_root, task):
    flag = TASK_FLAGS[task]
    features, targets, labels, task = pixel_features(synthetic_root, flag)
    head, info = train_head(
        features, targets, labels, task, epochs=15, lr=1e-2, n_labels=len(dataset_info(flag)["label"])
    )
    assert head.out_features == num_outputs(task, len(dataset_info(flag)["label"]))
    assert info["val_auc"] > 0.8 and info["test_auc"] > 0.75, info
    assert set(info) >= {
        "epochs",
        "best_epoch",
        "val_auc",
        "val_acc",
        "test_auc",
        "test_acc",
        "lr",
        "batch_size",
        "history",
    }
    assert len(info["history"]) == 15 and 1 <= info["best_epoch"] <= 15
    best = info["history"][info["best_epoch"] - 1]
    assert best["val_auc"] == max(h["val_auc"] for h in info["history"]) == info["val_auc"]
    assert not head.weight.requires_grad


def test_float16_features_seeded_and_repeatable(synthetic_root):
    features, targets, labels, task = pixel_features(synthetic_root, "breastmnist")
    half = {s: f.half() for s, f in features.items()}
    threads = torch.get_num_threads()
    a, info_a = train_head(half, targets, labels, task, epochs=4, seed=3)
    b, info_b = train_head(half, targets, labels, task, epochs=4, seed=3)
    c, _ = train_head(half, targets, labels, task, epochs=4, seed=4)
    assert torch.equal(a.weight, b.weight) and info_a["history"] == info_b["history"]
    assert not torch.equal(a.weight, c.weight)
    assert a.weight.dtype == torch.float32
    assert torch.get_num_threads() == threads  # the single-thread loop restores the caller's setting


def test_lr_drops_at_milestones(synthetic_root, monkeypatch):
    features, targets, labels, task = pixel_features(synthetic_root, "breastmnist")
    seen = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    train_head(features, targets, labels, task, epochs=4, batch_size=96, lr=1.0, milestones=(2, 3))
    assert np.allclose(seen, [1.0, 1.0, 0.1, 0.01])  # 96 train images: one step an epoch


def test_best_epoch_nan_is_worse_than_any_number_and_ties_keep_the_earlier_epoch():
    best = BestEpoch()
    updates = [best.update(epoch, auc) for epoch, auc in enumerate([math.nan, 0.5, math.nan, 0.5, 0.51], 1)]
    assert updates == [True, True, False, False, True]  # the first epoch counts, even with a NaN AUC
    assert (best.epoch, best.auc, best.stale) == (5, 0.51, 0)
    best.update(6, 0.2)
    best.update(7, math.nan)
    assert (best.epoch, best.stale) == (5, 2)


@pytest.mark.parametrize("epochs,expected", [(1, ()), (2, (1,)), (3, (1, 2)), (4, (2, 3)), (100, (50, 75))])
def test_default_milestones_drop_once_each_and_never_at_epoch_zero(epochs, expected):
    assert lr_milestones(epochs, None) == expected
    assert lr_milestones(epochs, (7,)) == (7,)


def test_single_class_val_split_keeps_first_epoch(synthetic_root):
    features, targets, labels, task = pixel_features(synthetic_root, "breastmnist")
    labels = dict(labels, val=np.zeros_like(labels["val"]))  # one class: AUC undefined (NaN) every epoch
    _, info = train_head(features, targets, labels, task, epochs=3)
    assert info["best_epoch"] == 1 and math.isnan(info["val_auc"])
    assert set(SPLITS) <= set(features)


def pixel_tokens(root, flag):
    """Synthetic patch tokens: each image cut into 4x4 patches of 7x7 pixels per channel, standardised."""
    task = dataset_info(flag)["task"]
    tokens, targets, labels = {}, {}, {}
    for split, (images, split_labels) in load_arrays(flag, 28, root).items():
        x = torch.from_numpy(images).float()
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, 28, 28)
        tokens[split] = F.unfold(x, 7, stride=7).transpose(1, 2)  # (N, 16, C·49)
        targets[split] = DeviceSplit(images, split_labels, task, "cpu").targets
        labels[split] = split_labels
    mean, std = tokens["train"].mean((0, 1)), tokens["train"].std((0, 1)) + 1e-6
    return {s: ((t - mean) / std).half() for s, t in tokens.items()}, targets, labels, task


@pytest.mark.parametrize("flag", ["breastmnist", "pathmnist"])
def test_attention_head_learns_from_tokens(synthetic_root, flag):
    tokens, targets, labels, task = pixel_tokens(synthetic_root, flag)
    n_labels = len(dataset_info(flag)["label"])
    head, info = train_head(
        tokens, targets, labels, task, kind="attention", epochs=4, lr=1e-2, n_labels=n_labels
    )
    assert isinstance(head, AttentionHead) and info["kind"] == "attention"
    assert info["val_auc"] > 0.8 and info["test_auc"] > 0.75, info
    best = info["history"][info["best_epoch"] - 1]
    assert best["val_auc"] == max(h["val_auc"] for h in info["history"]) == info["val_auc"]
    logits = predict(head, Rows(tokens["test"]))
    assert logits.shape == (len(tokens["test"]), num_outputs(task, n_labels))
    # Its record, as a cache stores it, rebuilds the same function.
    record = head_record(head)
    dim = tokens["test"].shape[-1]  # 49 pixels a patch per channel
    assert (
        record["kind"] == "attention" and record["num_heads"] == attention_heads(dim) == head.attn.num_heads
    )
    assert record["state"]["classifier.weight"].shape == (logits.shape[1], dim)
    torch.testing.assert_close(
        predict(head_from_record(record), Rows(tokens["test"])), logits, rtol=0, atol=0
    )


def test_tokens_read_from_hdf5_a_minibatch_at_a_time_train_the_same_head(
    synthetic_root, tmp_path, monkeypatch
):
    tokens, targets, labels, task = pixel_tokens(synthetic_root, "breastmnist")
    with h5py.File(tmp_path / "tokens.h5", "w") as f:
        for split, t in tokens.items():
            f.create_dataset(split, data=t.numpy(), chunks=(3, *t.shape[1:]))
    in_memory, info = train_head(tokens, targets, labels, task, kind="attention", epochs=2)
    monkeypatch.setattr(medkd.head, "TOKENS_IN_MEMORY_BYTES", 0)  # too big for memory: read from the file
    monkeypatch.setattr(medkd.head, "EVAL_BATCH_BYTES", 5 * 16 * 49 * 4)  # and evaluated 5 rows at a time
    with h5py.File(tmp_path / "tokens.h5", "r") as f:
        rows = {split: Rows.of(f[split]) for split in SPLITS}
        assert all(isinstance(r.data, h5py.Dataset) for r in rows.values())
        batch = rows["train"].subset(np.array([7, 2, 40])).take(torch.tensor([2, 0, 1]))  # any order
        torch.testing.assert_close(batch, tokens["train"][[40, 7, 2]].float(), rtol=0, atol=0)
        from_file, info_file = train_head(rows, targets, labels, task, kind="attention", epochs=2)
    assert info_file["history"] == info["history"]
    for key, value in in_memory.state_dict().items():
        torch.testing.assert_close(from_file.state_dict()[key], value, rtol=0, atol=0)


def test_linear_record_and_records_without_kind(synthetic_root):
    features, targets, labels, task = pixel_features(synthetic_root, "breastmnist")
    head, _ = train_head(features, targets, labels, task, epochs=2)
    record = head_record(head)
    assert record["kind"] == "linear" and record["weight"].shape == (2, features["val"].shape[1])
    old = {"weight": record["weight"], "bias": record["bias"]}  # a cache from before head kinds
    rebuilt = head_from_record(old)
    assert isinstance(rebuilt, torch.nn.Linear) and not rebuilt.weight.requires_grad
    torch.testing.assert_close(rebuilt(features["val"]), head(features["val"]))


@pytest.mark.parametrize("dim,heads", [(48, 1), (49, 1), (384, 6), (768, 12), (1024, 16), (1280, 20)])
def test_attention_heads_are_64_wide_where_the_width_allows(dim, heads):
    assert attention_heads(dim) == heads and dim % heads == 0
