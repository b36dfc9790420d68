"""Several teacher caches in one run: the mixture loss, the three weightings against hand computations, the
set semantics of the caches (order, hash, result, report), the learned gate, and the mismatches refused."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import kill_after_steps, tiny_cache_config

import medkd.train
from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import DistillConfig, SweepConfig, to_dict
from medkd.distill import distill, load_inputs, training_sources
from medkd.errors import MedkdError
from medkd.launch import absolute
from medkd.losses import kd_loss, mixture_kd_loss
from medkd.report import _display, summarise
from medkd.runs import EPOCH_CHECKPOINT, config_hash, load_checkpoint, read_result
from medkd.students import FeatureTap, build_student
from medkd.sweep import expand
from medkd.train import FeatureDistillation
from medkd.trials import run_trials, trial_env
from medkd.weighting import Gate, TeacherWeighting, confidence_weights

SIZE = 8


def student_config(root, out, **kwargs):
    values = dict(
        student="resnet18", student_size=SIZE, epochs=2, data_dir=str(root), out=str(out), device="cpu",
        quiet=True,
    )  # fmt: skip
    return DistillConfig(**{**values, **kwargs})


@pytest.fixture(scope="module")
def caches(synthetic_root, tmp_path_factory):
    """Teacher A (tiny, CLS token, 28 px), a byte copy of A, and teacher B (tiny, CLS + mean tokens at
    14 px: another input size and twice the feature width, so other logits too)."""
    folder = tmp_path_factory.mktemp("teachers")
    a = cache_teacher(tiny_cache_config(synthetic_root, folder / "a.h5"))
    copy = folder / "a_copy.h5"
    shutil.copyfile(a, copy)
    b = cache_teacher(tiny_cache_config(synthetic_root, folder / "b.h5", pool="cls+mean", teacher_size=14))
    return {"a": str(a), "copy": str(copy), "b": str(b)}


# ---------------------------------------------------------------- the loss and the weights


@pytest.mark.parametrize("multilabel", [False, True])
def test_a_mixture_of_identical_teachers_is_the_one_teacher_loss(multilabel):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g) * 3
    target = (
        (torch.rand(6, 4, generator=g) > 0.5).float() if multilabel else torch.randint(4, (6,), generator=g)
    )
    one = kd_loss(student, teacher, target, 0.2, 2.0, multilabel)
    weights = torch.softmax(torch.randn(6, 3, generator=g), dim=1)  # any weights: the teachers agree
    many = mixture_kd_loss(student, teacher[:, None].expand(6, 3, 4), weights, target, 0.2, 2.0, multilabel)
    torch.testing.assert_close(many.kd, one.kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-5, atol=1e-6)
    assert mixture_kd_loss(student, None, weights, target, 1.0, 2.0, multilabel).kd is None


def test_the_mixture_kd_term_matches_a_hand_computation():
    # One image, two classes, two teachers at T = 2, weights 0.25 / 0.75.
    student, teachers, weights = (
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[[2.0, 0.0], [0.0, 4.0]]]),
        [0.25, 0.75],
    )

    def soft(z):  # softmax of z / 2
        e = [math.exp(v / 2) for v in z]
        return [v / sum(e) for v in e]

    p = [0.25 * x + 0.75 * y for x, y in zip(soft([2, 0]), soft([0, 4]), strict=True)]
    q = soft([1, 0])
    expected = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))  # T^2 * KL(p || q)
    terms = mixture_kd_loss(student, teachers, torch.tensor([weights]), torch.tensor([0]), 0.0, 2.0)
    assert terms.kd.item() == pytest.approx(expected, rel=1e-5)
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)  # alpha 0: the KD term alone


def test_confidence_weights_are_a_softmax_of_minus_the_teachers_cross_entropy():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [[1.0, 3.0], [3.0, 1.0], [0.0, 0.0]]])
    target = torch.tensor([0, 1])
    weights = confidence_weights(logits, target, multilabel=False)
    # softmax over teachers of -CE = each teacher's probability of the label, normalised over teachers
    for i, row in enumerate(logits.tolist()):
        p = [math.exp(z[target[i]]) / sum(math.exp(v) for v in z) for z in row]
        assert weights[i].tolist() == pytest.approx([v / sum(p) for v in p], rel=1e-6)
    # multi-label: the mean binary cross-entropy over the labels
    logits = torch.tensor([[[3.0, -1.0], [0.0, 0.0]]])
    target = torch.tensor([[1.0, 0.0]])

    def bce(z, y):
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    ce = [(bce(3, 1) + bce(-1, 0)) / 2, (bce(0, 1) + bce(0, 0)) / 2]
    expected = [math.exp(-c) / sum(math.exp(-d) for d in ce) for c in ce]
    assert confidence_weights(logits, target, multilabel=True)[0].tolist() == pytest.approx(
        expected, rel=1e-6
    )


def test_the_learned_gate_sums_to_one_starts_even_and_learns():
    gate = Gate(6, 3)
    features = torch.randn(5, 6)
    weights = gate(features)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    torch.testing.assert_close(weights, torch.full((5, 3), 1 / 3))  # zero last layer: the mean at first
    weighting = TeacherWeighting("learned", 3, gate, entropy=0.1)
    assert weighting.bonus(weights).item() == pytest.approx(0.1 * math.log(3), rel=1e-6)
    teachers = torch.randn(5, 3, 2) * 3
    loss = mixture_kd_loss(torch.randn(5, 2), teachers, weights, torch.randint(2, (5,)), 0.2, 2.0).loss
    loss.backward()
    last = gate.net[-1]
    assert (
        last.weight.grad is not None and last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    )
    torch.optim.SGD(gate.parameters(), lr=1.0).step()
    moved = gate(features)
    torch.testing.assert_close(moved.sum(1), torch.ones(5))
    assert (moved - 1 / 3).abs().max() > 1e-4


def test_each_teacher_has_its_own_projector_and_the_weights_mix_their_terms():
    student = build_student("resnet18", 2, SIZE)
    tap = FeatureTap(student)
    widths = (7, 3)
    teachers = [torch.randn(10, d) for d in widths]
    projectors = torch.nn.ModuleList(torch.nn.Linear(tap.dim, d) for d in widths)
    fkd = FeatureDistillation(1.0, projectors, tap, teachers)
    student(torch.randn(4, 3, SIZE, SIZE))
    index, weights = (
        torch.tensor([1, 2, 5, 9]),
        torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]]),
    )
    with torch.no_grad():
        f = tap.features
        cos = [F.cosine_similarity(p(f), t[index], dim=1) for p, t in zip(projectors, teachers, strict=True)]
        expected = (weights[:, 0] * (1 - cos[0]) + weights[:, 1] * (1 - cos[1])).mean()
        torch.testing.assert_close(fkd.term(index, None, weights), expected)


# ---------------------------------------------------------------- runs


def test_two_identical_caches_under_mean_train_the_student_of_one(
    caches, synthetic_root, tmp_path, monkeypatch
):
    steps = {"kd_loss": [], "mixture_kd_loss": []}
    for name in steps:
        real = getattr(medkd.train, name)

        def recording(*args, real=real, name=name):
            terms = real(*args)
            steps[name].append(terms.kd.item())
            return terms

        monkeypatch.setattr(medkd.train, name, recording)
    one = distill(student_config(synthetic_root, tmp_path / "one", cache=caches["a"], epochs=3))
    pair = (caches["a"], caches["copy"])
    two = distill(student_config(synthetic_root, tmp_path / "two", cache=pair, epochs=3))
    # the same KD term at the first step (same weights, same batch); later steps drift apart only by
    # rounding, which Adam's normalised steps amplify on near-zero gradients
    assert len(steps["kd_loss"]) == len(steps["mixture_kd_loss"]) == 9
    assert steps["mixture_kd_loss"][0] == pytest.approx(steps["kd_loss"][0], rel=1e-6)
    for h1, h2 in zip(one.history, two.history, strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=2e-2) and h2["kd"] == pytest.approx(
            h1["kd"], rel=5e-2
        )
        assert h2["teacher_weights"] == pytest.approx([0.5, 0.5]) and h1["teacher_weights"] is None
    assert two.teacher is None and [t["cache"] for t in two.teachers] == sorted(pair)


def test_the_caches_count_as_a_set_and_the_result_lists_each_teacher(caches, synthetic_root, tmp_path):
    ab = student_config(
        synthetic_root, tmp_path / "ab", cache=(caches["a"], caches["b"]), teacher_weighting="confidence"
    )
    ba = student_config(
        synthetic_root, tmp_path / "ba", cache=(caches["b"], caches["a"]), teacher_weighting="confidence"
    )
    first, second = distill(ab), distill(ba)
    assert first.config_hash == second.config_hash
    keep = ("loss", "ce", "kd", "val_auc", "teacher_weights")
    assert [{k: h[k] for k in keep} for h in first.history] == [
        {k: h[k] for k in keep} for h in second.history
    ]
    stored = json.loads((tmp_path / "ab" / "result.json").read_text())
    by_cache = {t["cache"]: t for t in stored["teachers"]}
    assert set(by_cache) == {caches["a"], caches["b"]} and stored["teacher_weighting"] == "confidence"
    for path, summary in by_cache.items():
        cache = TeacherCache(path)
        assert summary["fingerprint"] == cache.fingerprint and summary["teacher"] == "tiny"
        assert summary["test_auc"] == pytest.approx(cache.teacher_metrics("test")["auc"])
    assert [t["fingerprint"] for t in stored["teachers"]] == sorted(
        by_cache[p]["fingerprint"] for p in by_cache
    )
    for h in first.history:
        assert sum(h["teacher_weights"]) == pytest.approx(1.0)
    # the hash is of the set of caches: neither cache alone, nor another weighting, is the same run
    assert (
        len(
            {
                first.config_hash,
                hash_of(ab, cache=caches["a"], teacher_weighting="mean"),
                hash_of(ab, teacher_weighting="mean"),
            }
        )
        == 3
    )
    # the report names both teachers and the weighting, and lists each teacher's own row
    rows = summarise([read_result(tmp_path / "ab"), read_result(tmp_path / "ba")])
    kd = [r for r in rows if r["kind"] == "kd"]
    assert len(kd) == 1 and kd[0]["n_seeds"] == 2 and _display(kd[0])[2] == "tiny + tiny (confidence)"
    assert len([r for r in rows if r["kind"] == "teacher"]) == 2


def hash_of(cfg: DistillConfig, **changes) -> str:
    other = dataclasses.replace(cfg, **changes)
    return config_hash(to_dict(other), load_inputs(other).fingerprint())


def test_a_learned_run_with_feature_terms_records_its_weights_and_resumes_exactly(
    caches, synthetic_root, tmp_path, monkeypatch
):
    args = dict(cache=(caches["a"], caches["b"]), teacher_weighting="learned", feature_weight=1.0, epochs=3)
    whole = distill(student_config(synthetic_root, tmp_path / "whole", **args))
    weights = [h["teacher_weights"] for h in whole.history]
    assert all(sum(w) == pytest.approx(1.0) for w in weights) and weights[-1] != pytest.approx(
        [0.5, 0.5], abs=1e-6
    )
    assert whole.baseline is False and all(h["feature"] is not None for h in whole.history)
    cut = student_config(synthetic_root, tmp_path / "cut", **args)
    kill_after_steps(monkeypatch, "mixture_kd_loss", 2 * 3, lambda: distill(cut))  # 3 steps an epoch
    saved = load_checkpoint(tmp_path / "cut" / EPOCH_CHECKPOINT, "a checkpoint")
    assert {"projectors", "gate"} <= set(saved) and len({k.split(".")[0] for k in saved["projectors"]}) == 2
    resumed = distill(student_config(synthetic_root, tmp_path / "cut", resume=True, **args))
    keep = ("loss", "ce", "kd", "feature", "val_auc", "teacher_weights")
    assert [{k: h[k] for k in keep} for h in resumed.history] == [
        {k: h[k] for k in keep} for h in whole.history
    ]


# ---------------------------------------------------------------- what is refused


def one_line(*args):
    result = CliRunner().invoke(main, list(args))
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    return lines[0]


def test_caches_of_other_data_or_other_views_are_refused_naming_both(caches, synthetic_root, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copyfile(caches["a"], other)
    with h5py.File(other, "r+") as f:
        f["val"].attrs["data_sha256"] = "0" * 64
    base = ["distill", "--student", "resnet18", "--student-size", "8", "--epochs", "1", "--device", "cpu",
            "--data-dir", str(synthetic_root), "--out", str(tmp_path / "run")]  # fmt: skip
    line = one_line(*base, "--cache", caches["a"], "--cache", str(other))
    assert (
        caches["a"] in line and str(other) in line and "val data sha256" in line and "different data" in line
    )
    views = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "v.h5", views=2, augment="flip"))
    line = one_line(*base, "--cache", caches["a"], "--cache", str(views))
    assert "plain view only" in line and str(views) in line and "--views 0" in line
    redrawn = cache_teacher(
        tiny_cache_config(synthetic_root, tmp_path / "w.h5", views=2, augment="flip", seed=1)
    )
    line = one_line(*base, "--cache", str(views), "--cache", str(redrawn))
    assert "hold different views" in line and str(views) in line and str(redrawn) in line
    line = one_line(*base, "--cache", caches["a"], "--teacher-weighting", "learned")
    assert "two or more --cache" in line
    line = one_line(*base, "--cache", caches["a"], "--cache", caches["a"])
    assert "given twice" in line
    assert not (tmp_path / "run").exists()


def test_caches_with_the_same_views_train_on_them_together(synthetic_root, tmp_path):
    v = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "v.h5", views=2, augment="flip"))
    u = cache_teacher(
        tiny_cache_config(synthetic_root, tmp_path / "u.h5", views=2, augment="flip", pool="cls+mean")
    )
    cfg = student_config(synthetic_root, tmp_path / "run", cache=(str(v), str(u)))
    inputs = load_inputs(cfg)
    sources = training_sources(cfg, inputs.caches, inputs.given)
    assert sources.logits.shape == (96, 2, 2, 2) and sources.views == 2  # (N, K, M, C)
    for m, cache in enumerate(inputs.caches):
        torch.testing.assert_close(sources.logits[:, :, m], cache.view_logits)
    plain = student_config(synthetic_root, tmp_path / "run", cache=(str(v), str(u)), views=0)
    assert training_sources(plain, inputs.caches, inputs.given).logits.shape == (96, 2, 2)


def test_the_cli_and_sweep_take_several_caches_and_weightings(caches, synthetic_root, tmp_path):
    result = CliRunner().invoke(main, [
        "distill", "--cache", caches["a"], "--cache", caches["b"], "--teacher-weighting", "confidence",
        "--student", "resnet18", "--student-size", "8", "--epochs", "1", "--device", "cpu", "--quiet",
        "--data-dir", str(synthetic_root), "--out", str(tmp_path / "cli"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_result(tmp_path / "cli").teacher_weighting == "confidence"
    sweep = SweepConfig(
        cache=[caches["a"], caches["b"]], teacher_weighting=["mean", "learned"], seed=[0, 1],
        student="resnet18", out=str(tmp_path / "sweep"),
    )  # fmt: skip
    names = sorted(t["out"].rsplit("/", 1)[1] for t in expand(sweep))
    assert names == ["a0.2_t2_s0_learned", "a0.2_t2_s0_mean", "a0.2_t2_s1_learned", "a0.2_t2_s1_mean"]
    with pytest.raises(MedkdError, match="two or more --cache"):
        SweepConfig(cache=caches["a"], teacher_weighting=["mean", "confidence"])


def test_a_multi_teacher_trial_stages_every_cache_and_a_worker_gets_absolute_paths(
    caches, synthetic_root, tmp_path, monkeypatch
):
    sweep = SweepConfig(
        cache=[caches["a"], caches["b"]], teacher_weighting=["confidence"], data_dir=str(synthetic_root),
        out=str(tmp_path / "s"), student="resnet18", student_size=8, epochs=1, quiet=True,
    )  # fmt: skip
    (trial,) = expand(sweep)
    assert trial["cache"] == [caches["a"], caches["b"]] and trial["out"].endswith("a0.2_t2_s0_confidence")
    env = trial_env(sweep.cache, "test", str(tmp_path / "node"))
    assert env["caches"] == [caches["a"], caches["b"]] and len(env["cache_sha256"]) == 2
    assert run_trials([trial], env) == ["ran"]
    staged = sorted(p.name.split(".")[0] for p in (tmp_path / "node").glob("*.h5"))
    assert staged == ["a", "b"]  # both copies, and the run read them: its teachers are theirs
    result = read_result(trial["out"])
    assert {t["fingerprint"] for t in result.teachers} == {TeacherCache(caches[k]).fingerprint for k in "ab"}
    monkeypatch.chdir(tmp_path)
    relative = absolute({**trial, "cache": ["x.h5", "y.h5"]})["cache"]
    assert relative == [str(tmp_path / "x.h5"), str(tmp_path / "y.h5")]


@pytest.mark.realdata
def test_confidence_weights_over_an_epoch_are_the_mean_over_genuine_breastmnist(real_data, tmp_path):
    a = cache_teacher(tiny_cache_config(real_data, tmp_path / "a.h5"))
    b = cache_teacher(tiny_cache_config(real_data, tmp_path / "b.h5", pool="cls+mean", teacher_size=14))
    cfg = student_config(real_data, tmp_path / "run", cache=(str(a), str(b)), teacher_weighting="confidence")
    result = distill(dataclasses.replace(cfg, epochs=1))
    # Every training image is shown once an epoch: the epoch's mean weights are the mean over the training
    # set of each image's softmax over teachers of log p_teacher(label), here in numpy from the files.
    log_p = []
    for summary in result.teachers:
        with h5py.File(summary["cache"], "r") as f:
            logits, labels = f["train/logits"][()].astype(np.float64), f["train/labels"][()][:, 0]
        log_p.append(logits[np.arange(len(labels)), labels] - np.log(np.exp(logits).sum(1)))
    log_p = np.stack(log_p, axis=1)  # (N, M)
    weights = np.exp(log_p) / np.exp(log_p).sum(1, keepdims=True)
    assert len(labels) == 546
    assert result.history[0]["teacher_weights"] == pytest.approx(weights.mean(0).tolist(), rel=1e-5)
