"""Cross-fitted heads: stratified, seeded folds; each train image's logits from the one head that never saw
it; val/test logits the mean of the K heads; and the same end to end through a cache."""

import numpy as np
import pytest
import torch
from conftest import tiny_cache_config
from test_head import pixel_features

import medkd.head
from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.data import dataset_info
from medkd.errors import MedkdError
from medkd.head import Rows, fit_heads, predict, stratified_folds


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_keep_each_class_share(k):
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=(203, 1), p=[0.55, 0.25, 0.15, 0.05])
    folds = stratified_folds(labels, "multi-class", k, seed=0)
    assert folds.shape == (203,) and set(folds.tolist()) == set(range(k))
    for fold in range(k):
        counts = np.bincount(labels[folds == fold, 0], minlength=4)
        expected = np.bincount(labels[:, 0], minlength=4) / k
        assert np.all(np.abs(counts - expected) <= 1), (fold, counts, expected)  # within one image per class
    np.testing.assert_array_equal(folds, stratified_folds(labels, "multi-class", k, seed=0))
    assert not np.array_equal(folds, stratified_folds(labels, "multi-class", k, seed=1))


def test_multilabel_folds_spread_the_rarest_labels():
    rng = np.random.default_rng(1)
    labels = (rng.random((300, 5)) < [0.4, 0.2, 0.1, 0.04, 0.02]).astype(np.int64)
    folds = stratified_folds(labels, "multi-label, binary-class", 3, seed=0)
    rarest = labels[:, 4] > 0
    assert np.ptp(np.bincount(folds[rarest], minlength=3)) <= 1  # the rarest label's few positives spread


def test_too_many_folds_is_one_clear_error():
    with pytest.raises(MedkdError, match="--cross-fit 5 needs at least 5 training images; the split has 3"):
        stratified_folds(np.zeros((3, 1), dtype=np.int64), "binary-class", 5, seed=0)


def test_each_train_image_gets_the_logits_of_the_head_that_did_not_see_it(synthetic_root, monkeypatch):
    features, targets, labels, task = pixel_features(synthetic_root, "pathmnist")
    seen = []
    original = medkd.head.train_head

    def recording(*args, train_rows=None, **kwargs):
        seen.append(train_rows)
        return original(*args, train_rows=train_rows, **kwargs)

    monkeypatch.setattr(medkd.head, "train_head", recording)
    n_labels = len(dataset_info("pathmnist")["label"])
    fitted = fit_heads(features, targets, labels, task, cross_fit=3, epochs=3, lr=1e-2, n_labels=n_labels)
    folds = fitted.folds
    assert len(fitted.heads) == 3 and len(seen) == 3
    for k, (head, info) in enumerate(fitted.heads):
        np.testing.assert_array_equal(seen[k], np.flatnonzero(folds != k))  # trained on every fold but k
        held_out = folds == k
        mine = predict(head, Rows(features["train"][held_out])).numpy()
        # Equal up to float rounding: the held-out rows went through the head in another batch shape, and
        # BLAS blocks a matmul by its shape (bit-equal on some CPUs, 2e-7 apart on AMD EPYC).
        np.testing.assert_allclose(fitted.logits["train"][held_out], mine, rtol=1e-5, atol=1e-6)
        other = fitted.heads[(k + 1) % 3][0]  # a head that trained on fold k gives other logits
        assert not np.allclose(predict(other, Rows(features["train"][held_out])).numpy(), mine)
        assert 1 <= info["best_epoch"] <= 3 and "train_auc" in info
    for split in ("val", "test"):
        mean = torch.stack([predict(head, Rows(features[split])) for head, _ in fitted.heads]).mean(0)
        torch.testing.assert_close(torch.from_numpy(fitted.logits[split]), mean)
    summary = fitted.summary
    assert summary["best_epoch"] == [info["best_epoch"] for _, info in fitted.heads]
    assert summary["in_fold_train_auc"] == pytest.approx(np.mean([i["train_auc"] for _, i in fitted.heads]))


@pytest.fixture(scope="module")
def crossfit_cache(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("crossfit") / "pm.h5"
    cfg = tiny_cache_config(synthetic_root, out, dataset="pathmnist", cross_fit=3, epochs=2, device="cpu")
    return cache_teacher(cfg)


def test_cache_stores_folds_and_heads_that_reproduce_the_logits(crossfit_cache):
    cache = TeacherCache(crossfit_cache)
    assert cache.attrs["cross_fit"] == 3 and cache.head_kind == "linear" and cache.head_weight is None
    folds = cache.folds
    assert folds.shape == (96,) and set(folds.tolist()) == {0, 1, 2}
    labels = cache.labels["train"][:, 0]
    for k in range(3):  # stratified: each class's images split evenly over the folds
        assert np.all(
            np.abs(np.bincount(labels[folds == k], minlength=9) - np.bincount(labels, minlength=9) / 3) <= 1
        )
    heads = cache.fold_heads()
    assert len(heads) == 3 and [a["best_epoch"] for a in cache.fold_head_attrs] == list(
        cache.head_attrs["best_epoch"]
    )
    features = {s: torch.from_numpy(cache.features(s)).float() for s in ("train", "val", "test")}
    for k, head in enumerate(heads):
        rows = folds == k
        torch.testing.assert_close(
            head(features["train"][rows]), cache.logits["train"][rows], rtol=0, atol=1e-2
        )
    for split in ("val", "test"):
        mean = torch.stack([head(features[split]) for head in heads]).mean(0)
        torch.testing.assert_close(cache.head()(features[split]), mean)
        torch.testing.assert_close(mean, cache.logits[split], rtol=0, atol=1e-2)


def test_inspect_shows_the_out_of_fold_train_auc(crossfit_cache, capsys):
    facts = inspect_cache(crossfit_cache)
    assert facts["head_check"]["status"] == "ok"
    out = " ".join(capsys.readouterr().out.split())
    oof = TeacherCache(crossfit_cache).teacher_metrics("train")["auc"]
    assert f"3-fold cross-fit: train AUC {oof:.4f} out-of-fold" in out
    assert f"{facts['head']['in_fold_train_auc']:.4f} in-fold" in out
