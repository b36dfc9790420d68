"""Multi-view caches (format 2) and students on them: the view a student trains on is the view the teacher
saw, the plain path is unchanged, feature distillation, and the bad inputs around views."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import kill_after_steps, tiny_cache_config
from rich.console import Console

import medkd.distill
import medkd.train
from medkd.cache import TeacherCache, split_datasets, write_cache
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.cli import main
from medkd.config import CacheTeacherConfig, DistillConfig
from medkd.data import SPLITS, View, load_arrays, prepare_images
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.partial import views_partial_path
from medkd.report import _display, summarise
from medkd.runs import CHECKPOINT, EPOCH_CHECKPOINT, load_checkpoint
from medkd.students import FeatureTap, build_student
from medkd.train import FeatureDistillation
from medkd.views import VIEW_COLUMNS, draw_views

SIZE = 8  # the students and the run teacher see 8 px (resized from the 28 px data): seconds on a CPU


def student_config(root, out, **kwargs):
    values = dict(
        student="resnet18",
        student_size=SIZE,
        epochs=2,
        data_dir=str(root),
        out=str(out),
        device="cpu",
        quiet=True,
    )
    return DistillConfig(**{**values, **kwargs})


@pytest.fixture(scope="module")
def run_teacher(synthetic_root, tmp_path_factory):
    """A finished resnet18 run on the synthetic breastmnist: a teacher whose every view is checkable."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    distill(student_config(synthetic_root, out, dataset="breastmnist", alpha=1.0, epochs=1))
    return out


@pytest.fixture(scope="module")
def multiview(run_teacher, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "mv.h5"
    cfg = CacheTeacherConfig(
        dataset="breastmnist", teacher=f"run:{run_teacher}", views=3, augment="medmnist",
        data_dir=str(synthetic_root), out=str(out), device="cpu", quiet=True, min_teacher_auc=0,
    )  # fmt: skip
    return TeacherCache(cache_teacher(cfg))


def teacher_model(run_dir):
    model = build_student("resnet18", 2, SIZE)
    model.load_state_dict(load_checkpoint(run_dir / CHECKPOINT, "a checkpoint")["model"])
    return model.eval()


def test_regenerated_views_give_the_cached_view_logits(multiview, run_teacher, synthetic_root):
    images = torch.from_numpy(load_arrays("breastmnist", 28, synthetic_root)["train"][0])
    n = len(images)
    assert multiview.attrs["medkd_format"] == 2 and multiview.views == 3 and multiview.augment == "medmnist"
    assert multiview.attrs["augment"]["degrees"] == 15.0
    assert multiview.view_logits.shape == (n, 3, 2) and multiview.view_params.shape == (
        n,
        3,
        len(VIEW_COLUMNS),
    )
    assert multiview.view_features().shape == (n, 3, 512)
    # the stored parameters are the seeded draw: anyone can redraw them
    assert torch.equal(multiview.view_params, draw_views("medmnist", n, 3, seed=0))
    model = teacher_model(run_teacher)
    with torch.no_grad():
        for i, k in [(0, 0), (5, 1), (17, 2), (n - 1, 2)]:
            # the run teacher's own view: resized images rounded to 8 bits, as it was trained
            view = View(SIZE, rounded=True)
            x = prepare_images(images[i : i + 1], view, multiview.view_params[i : i + 1, k])
            torch.testing.assert_close(model(x)[0], multiview.view_logits[i, k], rtol=0, atol=1e-4)
    # the views are not the plain view, and the plain view's logits are unchanged by them
    assert (multiview.view_logits[:, 0] - multiview.logits["train"]).abs().max() > 1e-3


def test_the_student_trains_on_the_view_whose_logits_are_its_target(
    multiview, run_teacher, synthetic_root, tmp_path, monkeypatch
):
    inputs, targets, real_loss, real_build = [], [], medkd.train.kd_loss, medkd.distill.build_student

    def recording_student(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, x: inputs.append(x[0].detach().clone()) if m.training else None
        )
        return model

    def recording_loss(student_logits, teacher_logits, *args):
        targets.append(teacher_logits.clone())
        return real_loss(student_logits, teacher_logits, *args)

    monkeypatch.setattr(medkd.distill, "build_student", recording_student)
    monkeypatch.setattr(medkd.train, "kd_loss", recording_loss)
    result = distill(
        student_config(synthetic_root, tmp_path / "run", cache=str(multiview.path), epochs=2, batch_size=32)
    )
    assert result.augment == {"preset": "medmnist", "views": 3}
    assert len(inputs) == len(targets) == 2 * 3  # 96 images, batches of 32, 2 epochs
    model = teacher_model(run_teacher)
    with torch.no_grad():
        for x, target in zip(inputs, targets, strict=True):
            torch.testing.assert_close(model(x), target, rtol=0, atol=1e-4)
    # every image was shown as several of its views, not always view 0
    used = torch.cat(targets)
    matches = [
        (used[:, None] - multiview.view_logits[:, k][None]).abs().amax(-1).min(1).values < 1e-6
        for k in range(3)
    ]
    assert all(m.sum() > 10 for m in matches)


def as_format_1(src, dst):
    """A copy of a plain-view cache as medkd 0.3 wrote it: format 1, no views attrs."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "a") as f:
        f.attrs["medkd_format"] = 1
        del f.attrs["views"], f.attrs["augment"]
    return dst


def test_one_plain_view_is_the_cache_and_the_run_of_before(multiview, synthetic_root, tmp_path):
    plain = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "plain.h5", device="cpu"))
    old = TeacherCache(as_format_1(plain, tmp_path / "v1.h5"))
    new = TeacherCache(plain)
    assert new.attrs["medkd_format"] == 2 and new.views == 0 and new.attrs["augment"] == {"preset": "none"}
    with h5py.File(plain, "r") as f:
        assert not {"view_logits", "view_params", "view_features"} & set(f["train"])
    assert old.views == 0 and old.augment == "none" and old.fingerprint == new.fingerprint
    runs = [
        distill(student_config(synthetic_root, tmp_path / name, cache=str(c.path)))
        for name, c in (("a", old), ("b", new))
    ]
    assert runs[0].config_hash == runs[1].config_hash and runs[0].test == runs[1].test
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    assert runs[0].augment is None and all(h["feature"] is None for h in runs[0].history)


def test_views_0_of_a_multiview_cache_is_the_plain_run(multiview, run_teacher, synthetic_root, tmp_path):
    plain = TeacherCache(cache_teacher(CacheTeacherConfig(
        dataset="breastmnist", teacher=f"run:{run_teacher}", data_dir=str(synthetic_root),
        out=str(tmp_path / "p.h5"), device="cpu", quiet=True, min_teacher_auc=0,
    )))  # fmt: skip
    for split in SPLITS:
        assert torch.equal(plain.logits[split], multiview.logits[split])
    a = distill(student_config(synthetic_root, tmp_path / "a", cache=str(plain.path)))
    b = distill(student_config(synthetic_root, tmp_path / "b", cache=str(multiview.path), views=0))
    assert a.test == b.test and [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert b.augment is None


def test_fewer_views_and_the_seed_give_other_but_repeatable_runs(multiview, synthetic_root, tmp_path):
    one = distill(student_config(synthetic_root, tmp_path / "one", cache=str(multiview.path), views=1))
    again = distill(student_config(synthetic_root, tmp_path / "again", cache=str(multiview.path), views=1))
    three = distill(student_config(synthetic_root, tmp_path / "three", cache=str(multiview.path)))
    assert one.augment == {"preset": "medmnist", "views": 1}
    assert [h["loss"] for h in one.history] == [h["loss"] for h in again.history]
    assert [h["loss"] for h in one.history] != [h["loss"] for h in three.history]
    assert one.config_hash != three.config_hash


def test_an_augmented_baseline_draws_fresh_views_repeatably(synthetic_root, tmp_path):
    base = dict(dataset="breastmnist", alpha=1.0)
    plain = distill(student_config(synthetic_root, tmp_path / "plain", **base))
    aug = distill(student_config(synthetic_root, tmp_path / "aug", augment="medmnist", **base))
    again = distill(student_config(synthetic_root, tmp_path / "again", augment="medmnist", **base))
    assert aug.augment == {"preset": "medmnist", "views": None} and aug.baseline
    assert [h["loss"] for h in aug.history] == [h["loss"] for h in again.history]
    assert [h["loss"] for h in aug.history] != [h["loss"] for h in plain.history]
    rows = summarise([plain, aug, again])  # the report keeps augmented and plain runs apart
    assert [(r["augment"], r["n_seeds"]) for r in rows] == [("", 1), ("medmnist", 2)]
    assert "(medmnist)" in _display(rows[1])[3]
    assert aug.config_hash != plain.config_hash and "medmnist" in medkd.distill.run_name(
        student_config(synthetic_root, None, augment="medmnist", **base), "breastmnist", 28, None, "medmnist"
    )


def test_the_feature_term_is_one_minus_cosine_of_the_projected_features():
    student = build_student("resnet18", 2, SIZE)
    tap = FeatureTap(student)
    teacher = torch.randn(10, 3, 7)  # (N, K, D_t)
    fkd = FeatureDistillation(0.5, torch.nn.ModuleList([torch.nn.Linear(tap.dim, 7)]), tap, [teacher])
    x = torch.randn(4, 3, SIZE, SIZE)
    student(x)
    index, chosen = torch.tensor([0, 3, 5, 9]), torch.tensor([2, 0, 1, 1, 0, 2, 0, 0, 0, 1])
    body = torch.nn.Sequential(*list(student.children())[:-1])  # the ResNet up to its pooled features
    with torch.no_grad():
        f_s = body(x).flatten(1)
        projected = fkd.projectors[0](f_s)
    f_t = teacher[index, chosen[index]]
    expected = 1 - (projected * f_t).sum(1) / (projected.norm(dim=1) * f_t.norm(dim=1))
    torch.testing.assert_close(fkd.term(index, chosen).detach(), expected.mean(), rtol=1e-5, atol=1e-6)


def test_feature_distillation_trains_a_projector_that_stays_out_of_the_student(
    multiview, synthetic_root, tmp_path
):
    out = tmp_path / "fkd"
    result = distill(
        student_config(synthetic_root, out, cache=str(multiview.path), feature_weight=2.0, epochs=3)
    )
    terms = [h["feature"] for h in result.history]
    assert all(0 < t < 2 for t in terms) and terms[-1] < terms[0]  # 1 - cos is in [0, 2], and it is learnt
    for h in result.history:  # the loss is its three terms
        assert h["loss"] == pytest.approx(0.2 * h["ce"] + 0.8 * h["kd"] + 2.0 * h["feature"], rel=1e-5)
    saved = load_checkpoint(out / CHECKPOINT, "a checkpoint")["model"]
    assert set(saved) == set(build_student("resnet18", 2, SIZE).state_dict())
    assert "_fw2" in medkd.distill.run_name(
        student_config(synthetic_root, None, cache="c", feature_weight=2.0), "b", 28, "t"
    )


def test_a_feature_run_resumes_exactly(multiview, synthetic_root, tmp_path, monkeypatch):
    args = dict(cache=str(multiview.path), feature_weight=1.0, epochs=3)
    whole = distill(student_config(synthetic_root, tmp_path / "whole", **args))
    cut = student_config(synthetic_root, tmp_path / "cut", **args)
    kill_after_steps(monkeypatch, "kd_loss", 2 * 3, lambda: distill(cut))  # 96 images, batch 32: in epoch 3
    assert "projectors" in load_checkpoint(tmp_path / "cut" / EPOCH_CHECKPOINT, "a checkpoint")
    resumed = distill(student_config(synthetic_root, tmp_path / "cut", resume=True, **args))
    assert resumed.history == [
        dict(h, seconds=r["seconds"], images_per_second=r["images_per_second"])
        for h, r in zip(whole.history, resumed.history, strict=True)
    ]
    assert resumed.test == whole.test


def test_cross_fitted_view_logits_come_from_each_images_fold_head(synthetic_root, tmp_path):
    cache = TeacherCache(
        cache_teacher(
            tiny_cache_config(
                synthetic_root, tmp_path / "cf.h5", cross_fit=3, views=2, augment="crop", device="cpu"
            )
        )
    )
    heads, features = cache.fold_heads(), torch.from_numpy(cache.view_features()).float()  # (N, K, D)
    with torch.no_grad():
        for i in (0, 7, 50, 95):
            for k in range(2):
                expected = heads[cache.folds[i]](features[i, k])
                torch.testing.assert_close(expected, cache.view_logits[i, k], rtol=0, atol=2e-2)
                other = heads[(cache.folds[i] + 1) % 3](features[i, k])
                assert (other - cache.view_logits[i, k]).abs().max() > 1e-4


def test_an_attention_head_gives_each_view_its_own_logits(synthetic_root, tmp_path):
    cache = TeacherCache(
        cache_teacher(
            tiny_cache_config(
                synthetic_root,
                tmp_path / "att.h5",
                head="attention",
                epochs=2,
                views=2,
                augment="flip",
                device="cpu",
            )
        )
    )
    from medkd.backbones import build_teacher

    torch.manual_seed(0)
    teacher = build_teacher("tiny", None, 28, None)
    images = torch.from_numpy(load_arrays("breastmnist", 28, synthetic_root)["train"][0][:4])
    head = cache.head()
    with torch.no_grad():
        for k in range(2):
            tokens = teacher(images, with_tokens=True, views=cache.view_params[:4, k]).tokens
            torch.testing.assert_close(
                head(tokens.half().float()), cache.view_logits[:4, k], rtol=0, atol=1e-3
            )
    flipped = cache.view_params[:, :, 0] == 1
    assert flipped.any() and (~flipped).any()


def test_a_killed_view_pass_resumes_after_its_last_complete_chunk(synthetic_root, tmp_path, monkeypatch):
    import medkd.cache_teacher
    import medkd.teacher_views

    monkeypatch.setattr(medkd.cache_teacher, "FEATURE_CHUNK_BATCHES", 2)  # chunks of 2 * 16 view rows
    args = dict(views=2, augment="medmnist", feature_batch_size=16, device="cpu")
    reference = TeacherCache(cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "ref.h5", **args)))
    real, calls = medkd.teacher_views.encode, []

    def counted(teacher, images, *a, **k):
        calls.append(len(images))
        if fail and len(calls) == 4:
            raise KeyboardInterrupt
        return real(teacher, images, *a, **k)

    monkeypatch.setattr(medkd.teacher_views, "encode", counted)
    out, fail = tmp_path / "c.h5", True
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(tiny_cache_config(synthetic_root, out, **args))
    assert not out.exists() and views_partial_path(out).exists()
    calls.clear()
    fail = False
    got = TeacherCache(cache_teacher(tiny_cache_config(synthetic_root, out, **args)))
    assert calls == [32, 32, 32]  # 192 view rows in 6 chunks: the first three are not redone
    assert not views_partial_path(out).exists()
    assert torch.equal(got.view_logits, reference.view_logits)
    np.testing.assert_array_equal(got.view_features(), reference.view_features())


def test_inspect_shows_the_views_and_their_teacher_auc(multiview):
    stream = io.StringIO()
    shown = inspect_cache(multiview.path, console=Console(file=stream, width=300))
    text = stream.getvalue()
    aucs = shown["views"]["train"]
    assert len(aucs) == 3 and shown["views"]["views"] == 3
    for k in range(3):
        from medkd.metrics import evaluate, scores_from_logits

        expected = evaluate(
            "binary-class",
            multiview.labels["train"],
            scores_from_logits("binary-class", multiview.view_logits[:, k]).numpy(),
        )
        assert aucs[k]["auc"] == pytest.approx(expected["auc"])
        assert f"{expected['auc']:.4f}" in text
    assert "3 medmnist views of each training image" in text


def test_inspect_checks_the_view_logits_against_the_view_features(synthetic_root, tmp_path):
    cfg = tiny_cache_config(synthetic_root, tmp_path / "c.h5", views=2, augment="crop", device="cpu")
    out = cache_teacher(cfg)
    good = inspect_cache(out, console=Console(file=io.StringIO()))["head_check"]
    assert good["status"] == "ok" and good["note"] == "checked on the plain view and the 2 views"
    with h5py.File(out, "a") as f:
        f["train/view_logits"][3, 1] += 1.0  # one view's logits no longer the head's on its features
    bad = inspect_cache(out, console=Console(file=io.StringIO()))["head_check"]
    assert bad["status"] == "MISMATCH" and bad["max_abs_diff"] == pytest.approx(1.0, abs=0.05)


def test_write_cache_refuses_views_of_the_wrong_shape(multiview, tmp_path):
    n = multiview.split_attrs["train"]["n"]
    logits = {s: multiview.logits[s].numpy() for s in SPLITS}
    views = {
        "view_params": multiview.view_params.numpy(),
        "view_logits": multiview.view_logits.numpy()[:, :2],
    }
    attrs = {k: v for k, v in multiview.attrs.items() if k != "medkd_format"}
    with pytest.raises(
        ValueError, match=rf"/train/view_logits \({n}, 2, 2\) for 3 medmnist views; expected \({n}, 3, 2\)"
    ):
        write_cache(
            tmp_path / "bad.h5",
            attrs=attrs,
            splits=split_datasets(logits, multiview.labels, None, None, views),
            split_attrs=multiview.split_attrs,
            head=None,
        )
    assert not (tmp_path / "bad.h5").exists()


def test_a_cache_with_damaged_views_is_refused_in_one_line(multiview, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(multiview.path.read_bytes())
    with h5py.File(bad, "a") as f:
        del f["train/view_params"]
    with pytest.raises(
        MedkdError,
        match=r"has /train/view_params none for 3 medmnist views; expected \(96, 3, 8\); rebuild it",
    ):
        TeacherCache(bad)


def one_line(*args):
    result = CliRunner().invoke(main, list(args))
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    return lines[0]


def test_bad_view_options_are_one_line_and_write_nothing(multiview, synthetic_root, tmp_path):
    plain = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "plain.h5", device="cpu"))
    nofeat = cache_teacher(
        tiny_cache_config(
            synthetic_root, tmp_path / "nf.h5", views=2, augment="flip", features=False, device="cpu"
        )
    )
    data = [
        "--data-dir",
        str(synthetic_root),
        "--student",
        "resnet18",
        "--student-size",
        "8",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    out = tmp_path / "run"
    cases = [
        (
            ["--cache", str(plain), "--augment", "medmnist"],
            "--augment medmnist with a teacher needs the teacher's outputs on the same views",
        ),
        (["--cache", str(multiview.path), "--views", "4"], "--views 4: cache"),
        (["--cache", str(multiview.path), "--augment", "flip"], "does not match cache"),
        (["--cache", str(plain), "--views", "2"], "stores the plain view only"),
        (
            ["--dataset", "breastmnist", "--alpha", "1", "--views", "2"],
            "--views 2 picks views of a multi-view cache",
        ),
        (
            ["--dataset", "breastmnist", "--alpha", "1", "--feature-weight", "1"],
            "--feature-weight 1.0 distils the cached teacher features",
        ),
        (["--cache", str(nofeat), "--feature-weight", "1"], "stores no view features (--no-features)"),
        (["--cache", str(plain), "--views", "-1"], "--views must be >= 0"),
    ]
    for args, message in cases:
        assert message in one_line("distill", *data, "--out", str(out), *args), args
        assert not out.exists()
    line = one_line(
        "cache-teacher",
        "--dataset",
        "breastmnist",
        "--teacher",
        "tiny",
        "--views",
        "4",
        "--out",
        str(tmp_path / "x.h5"),
    )
    assert "--views 4 with --augment none would store the plain view 4 times" in line
    usage = CliRunner().invoke(main, ["cache-teacher", "--dataset", "breastmnist", "--augment", "mixup"])
    assert usage.exit_code == 2 and "'mixup' is not one of 'none', 'flip', 'crop', 'medmnist'" in usage.output
    assert not (tmp_path / "x.h5").exists()


def test_the_cli_builds_and_trains_on_a_multiview_cache(synthetic_root, tmp_path):
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(main, [
        "cache-teacher", "--dataset", "breastmnist", "--teacher", "tiny", "--teacher-size", "28",
        "--epochs", "2", "--views", "2", "--augment", "crop", "--min-teacher-auc", "0",
        "--data-dir", str(synthetic_root), "--out", str(out), "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert TeacherCache(out).views == 2
    result = CliRunner().invoke(main, [
        "distill", "--cache", str(out), "--student", "resnet18", "--student-size", "8", "--epochs", "1",
        "--feature-weight", "0.5", "--data-dir", str(synthetic_root), "--out", str(tmp_path / "r"),
        "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert saved["augment"] == {"preset": "crop", "views": 2} and saved["teacher"]["views"] == 2
    assert saved["config"]["feature_weight"] == 0.5 and saved["history"][0]["feature"] > 0


def test_a_multiview_cache_has_its_own_default_name():
    plain = CacheTeacherConfig(dataset="breastmnist", teacher="efficientnet_lite0")
    views = CacheTeacherConfig(
        dataset="breastmnist", teacher="efficientnet_lite0", views=8, augment="medmnist"
    )
    assert str(plain.out_path()) == "cache/breastmnist_28_efficientnet_lite0.h5"
    assert str(views.out_path()) == "cache/breastmnist_28_efficientnet_lite0_medmnist-v8.h5"
