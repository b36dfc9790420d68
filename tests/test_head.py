"""The linear head: learns every task type, keeps the best-val-AUC epoch, repeats with a seed."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TASK_FLAGS

from medkd.config import lr_milestones
from medkd.data import SPLITS, DeviceSplit, dataset_info, load_arrays, num_outputs
from medkd.head import train_head
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
