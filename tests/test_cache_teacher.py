"""Stage one end to end: `cache_teacher` and `medkd cache-teacher` / `medkd inspect` on synthetic data:
the linear and the attention head, kept and removed tokens, a resumed token pass, the teacher quality gate."""

import io
import json
import re

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cache_config
from rich.console import Console

import medkd.cache_teacher
from medkd import __version__
from medkd.cache import ROOT_ATTRS, TeacherCache, chance_metrics, tokens_path
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.cli import main
from medkd.config import to_dict
from medkd.data import SPLITS, data_sha256, load_arrays
from medkd.errors import MedkdError
from medkd.head import AttentionHead
from medkd.partial import partial_path, tokens_partial_path
from medkd.teachers import encode

EXTRA_ATTRS = ("pool", "random_init", "feature_seconds", "head_seconds", "images_per_second", "config")


def quick_config(root, out, **kwargs):
    return tiny_cache_config(root, out, **{"device": "cpu", **kwargs})


@pytest.fixture(scope="module")
def built(synthetic_root, tmp_path_factory):
    cfg = quick_config(synthetic_root, tmp_path_factory.mktemp("cache") / "bm.h5", pool="cls+mean")
    return cfg, cache_teacher(cfg)


def test_every_attr_of_the_format(built, synthetic_root):
    cfg, path = built
    cache = TeacherCache(path)
    attrs = cache.attrs
    assert set(ROOT_ATTRS) | set(EXTRA_ATTRS) <= set(attrs)
    assert attrs["medkd_format"] == 2 and attrs["medkd_version"] == __version__
    assert attrs["dataset"] == "breastmnist" and attrs["image_size"] == 28 and attrs["task"] == "binary-class"
    assert attrs["n_classes"] == 2 and attrs["label_names"] == {"0": "malignant", "1": "normal, benign"}
    assert attrs["teacher"] == "tiny" and attrs["backbone"] == "tiny" and attrs["weights_sha256"] == ""
    assert attrs["teacher_input_size"] == 28 and attrs["resize"] == "bicubic" and attrs["pool"] == "cls+mean"
    assert attrs["mean"] == pytest.approx((0.485, 0.456, 0.406)) and len(attrs["std"]) == 3
    assert attrs["torch_version"] == torch.__version__ and attrs["created_utc"].endswith("+00:00")
    assert attrs["random_init"] is True and attrs["images_per_second"] > 0
    assert attrs["config"] == json.loads(json.dumps(to_dict(cfg)))
    arrays = load_arrays("breastmnist", 28, synthetic_root)
    cache.check_data("breastmnist", 28, arrays)
    for split in SPLITS:
        images, labels = arrays[split]
        assert cache.split_attrs[split] == {"n": len(images), "data_sha256": data_sha256(images, labels)}
        assert cache.logits[split].shape == (len(images), 2)
        np.testing.assert_array_equal(cache.labels[split], labels)
        assert cache.features(split).shape == (len(images), 96)  # CLS + mean patch token, 48 each
    assert cache.head_attrs["epochs"] == 3 and 1 <= cache.head_attrs["best_epoch"] <= 3
    assert cache.head_attrs["val_auc"] == pytest.approx(cache.teacher_metrics("val")["auc"], abs=1e-3)


def test_head_of_features_gives_the_logits(built):
    cache = TeacherCache(built[1])
    head = cache.head()
    for split in SPLITS:
        logits = head(torch.from_numpy(cache.features(split)).float())
        torch.testing.assert_close(logits, cache.logits[split], rtol=0, atol=1e-2)
    facts = inspect_cache(built[1])
    assert facts["head_check"]["status"] == "ok"
    assert facts["splits"]["train"]["n"] == 96 and facts["splits"]["val"]["features_shape"] == (32, 96)
    assert facts["splits"]["test"]["logits_shape"] == (32, 2)


def test_existing_output_is_refused_before_any_loading(built, monkeypatch):
    cfg, path = built
    before = path.read_bytes()

    def never(*_args, **_kwargs):
        raise AssertionError("loaded data or a model before refusing the output")

    monkeypatch.setattr(medkd.cache_teacher, "load_arrays", never)
    monkeypatch.setattr(medkd.cache_teacher, "build_teacher", never)
    with pytest.raises(MedkdError, match=f"{path} already exists; pass --force"):
        cache_teacher(cfg)
    assert path.read_bytes() == before


def test_force_overwrites_and_no_features(synthetic_root, tmp_path):
    out = tmp_path / "pm.h5"
    with h5py.File(out, "w") as f:  # an old medkd cache (a damaged one will do): --force replaces only those
        f.attrs["medkd_format"] = 1
    cfg = quick_config(synthetic_root, out, dataset="pathmnist", epochs=2, features=False, force=True)
    cache = TeacherCache(cache_teacher(cfg))
    assert cache.attrs["n_classes"] == 9 and cache.logits["test"].shape == (32, 9) and not cache.has_features
    assert inspect_cache(out)["head_check"]["status"] == "no features"
    assert [p.name for p in tmp_path.iterdir()] == ["pm.h5"]  # no temp file left behind


def test_unwritable_output_folder(synthetic_root, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(MedkdError, match="cannot create the output folder"):
        cache_teacher(quick_config(synthetic_root, tmp_path / "file" / "c.h5"))


def run_cli(*args):
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "nosuchmnist"], "unknown dataset flag 'nosuchmnist'; valid: "),
        (
            ["--dataset", "breastmnist", "--teacher", "dinov3"],
            "unknown teacher 'dinov3'; valid:",
        ),
        (["--dataset", "breastmnist", "--weights", "missing.pth"], "weights file missing.pth not found"),
        (
            ["--dataset", "breastmnist", "--teacher-size", "30"],
            "must be a multiple of the patch size",
        ),
    ],
)
def test_cli_bad_input_one_line_and_no_file(synthetic_root, tmp_path, args, message):
    out = tmp_path / "c.h5"
    common = [
        "--teacher",
        "tiny",
        "--teacher-size",
        "28",
        "--data-dir",
        str(synthetic_root),
        "--out",
        str(out),
    ]
    result = run_cli("cache-teacher", *common, *args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output(built):
    cfg, path = built
    before = path.read_bytes()
    result = run_cli("cache-teacher", "--dataset", "breastmnist", "--teacher", "tiny", "--out", str(path))
    assert result.exit_code == 1 and f"Error: {path} already exists; pass --force" in result.output
    assert path.read_bytes() == before


def test_cli_inspect(built):
    result = run_cli("inspect", str(built[1]))
    assert result.exit_code == 0, result.output
    assert "head(features) = logits: ok" in result.output and "breastmnist" in result.output
    result = run_cli("inspect", str(built[1].parent / "none.h5"))
    assert result.exit_code == 1 and "not found; make one with `medkd cache-teacher" in result.output


def test_cli_cache_teacher_prints_the_path(synthetic_root, tmp_path):
    out = tmp_path / "ret.h5"
    result = run_cli(
        "cache-teacher",
        "--dataset",
        "retinamnist",
        "--teacher",
        "tiny",
        "--teacher-size",
        "28",
        "--epochs",
        "2",
        "--data-dir",
        str(synthetic_root),
        "--out",
        str(out),
        "--quiet",
        "--min-teacher-auc",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    with h5py.File(out, "r", locking=False) as f:
        assert f.attrs["task"] == "ordinal-regression" and f["train/logits"].shape == (96, 5)


def count_teacher_chunks(monkeypatch, fail_at=None):
    """Count the teacher's chunks of images; with `fail_at`, die (like a kill) in that chunk."""
    original, calls = medkd.cache_teacher.encode, []

    def counted(teacher, images, *args, **kwargs):
        calls.append(len(images))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(teacher, images, *args, **kwargs)

    monkeypatch.setattr(medkd.cache_teacher, "encode", counted)
    return calls


def read_tokens(path):
    with h5py.File(path, "r") as f:
        return {split: f[split][()] for split in SPLITS}


@pytest.fixture(scope="module")
def attention(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "bm.h5"
    cfg = quick_config(
        synthetic_root, out, head="attention", keep_tokens=True, epochs=2, feature_batch_size=16
    )
    return cfg, cache_teacher(cfg)


def test_attention_head_is_stored_and_reproduces_the_logits_on_the_kept_tokens(attention, synthetic_root):
    cfg, path = attention
    assert sorted(p.name for p in path.parent.iterdir()) == ["bm.h5", "bm.tokens.h5"]  # no partial files
    cache = TeacherCache(path)
    assert cache.head_kind == "attention" and cache.head_attrs["num_heads"] == 1 and cache.head_weight is None
    with h5py.File(path, "r") as f:
        assert f["head"].attrs["kind"] == "attention" and "weight" not in f["head"]
        assert f["head/state/classifier.weight"].shape == (2, 48) and f["head/state/query"].shape == (
            1,
            1,
            48,
        )
        assert f.attrs["cross_fit"] == 1 and "fold" not in f["train"] and "heads" not in f
    assert cache.kept_tokens() == path.parent / "bm.tokens.h5"
    tokens = read_tokens(cache.kept_tokens())
    head = cache.head()
    assert isinstance(head, AttentionHead)
    for split in SPLITS:
        assert tokens[split].dtype == np.float16 and tokens[split].shape == (
            cache.split_attrs[split]["n"],
            4,
            48,
        )
        logits = head(torch.from_numpy(tokens[split]))  # the stored state, on the stored tokens
        torch.testing.assert_close(logits, cache.logits[split], rtol=0, atol=1e-5)
    # The kept tokens are the teacher's own patch tokens (2x2 patches of 14 px, 48 wide), in order.
    teacher = medkd.cache_teacher.load_teacher(cfg)
    images = torch.from_numpy(load_arrays("breastmnist", 28, synthetic_root)["val"][0])
    expected = encode(teacher, images, cfg.feature_batch_size, with_tokens=True).tokens
    np.testing.assert_array_equal(tokens["val"], expected.numpy())
    facts = inspect_cache(path)
    assert facts["head_check"]["status"] == "ok" and facts["head_check"]["max_abs_diff"] <= 1e-5
    assert facts["head_check"]["note"] == "attention head: checked on kept tokens"
    result = run_cli("inspect", str(path))
    assert "head(tokens) = logits: ok (attention head: checked on kept tokens" in result.output


def test_attention_cache_without_its_tokens_says_so(attention, tmp_path):
    copy = tmp_path / "bm.h5"
    copy.write_bytes(attention[1].read_bytes())  # the cache alone, without its tokens file
    cache = TeacherCache(copy)
    assert cache.kept_tokens() is None and isinstance(cache.head(), AttentionHead)
    facts = inspect_cache(copy)
    assert facts["head_check"]["status"] == "tokens not kept"
    assert "head(tokens) = logits: attention head (tokens not kept)" in run_cli("inspect", str(copy)).output
    (tmp_path / "bm.tokens.h5").write_bytes(attention[1].with_name("bm.tokens.h5").read_bytes())
    assert TeacherCache(copy).kept_tokens() is not None  # a copy of the pair still matches
    with h5py.File(tmp_path / "bm.tokens.h5", "a") as f:
        f.attrs["cache_fingerprint"] = "another cache"
    assert TeacherCache(copy).kept_tokens() is None  # tokens of another cache are not its own


def test_tokens_are_removed_unless_kept(synthetic_root, tmp_path):
    out = tmp_path / "c.h5"
    cache_teacher(quick_config(synthetic_root, out, head="attention", keep_tokens=True, epochs=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.tokens.h5"]
    cache_teacher(quick_config(synthetic_root, out, head="attention", epochs=1, force=True))
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]  # the replaced cache's tokens went with it
    assert inspect_cache(out)["head_check"]["status"] == "tokens not kept"


def test_killed_token_pass_resumes_after_the_last_complete_chunk(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(medkd.cache_teacher, "FEATURE_CHUNK_BATCHES", 2)  # chunks of 32 images
    args = dict(head="attention", keep_tokens=True, epochs=2, feature_batch_size=16)
    reference = cache_teacher(quick_config(synthetic_root, tmp_path / "ref" / "c.h5", **args))
    out = tmp_path / "c.h5"
    with monkeypatch.context() as m:
        count_teacher_chunks(m, fail_at=3)  # train (96 images) is chunks 1-3: killed in the third
        with pytest.raises(KeyboardInterrupt):
            cache_teacher(quick_config(synthetic_root, out, **args))
    partial, tokens = partial_path(out), tokens_partial_path(out)
    assert not out.exists() and partial.exists() and tokens.exists()
    with h5py.File(tokens, "r") as f:
        assert f["train"].attrs["done"] == 64 and f["train"].dtype == np.float16 and "val" not in f
        assert f["train"].chunks[1:] == (4, 48)  # chunks of whole token rows

    calls = count_teacher_chunks(monkeypatch)
    cache_teacher(quick_config(synthetic_root, out, **args))
    assert calls == [32, 32, 32]  # the last train chunk, then val and test: the first two are not redone
    assert not partial.exists() and not tokens.exists()
    expected, got = read_tokens(tokens_path(reference)), read_tokens(tokens_path(out))
    for split in SPLITS:
        np.testing.assert_array_equal(got[split], expected[split], err_msg=split)
        torch.testing.assert_close(TeacherCache(out).logits[split], TeacherCache(reference).logits[split])


def test_a_teacher_near_chance_is_refused_and_a_rerun_resumes(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    stream = io.StringIO()
    console = Console(file=stream, width=400)
    with pytest.raises(MedkdError) as err:
        cache_teacher(quick_config(synthetic_root, out, min_teacher_auc=0.99), console=console)
    message = str(err.value)
    auc = float(
        re.search(r"teacher val AUC (\d\.\d{3}) is below --min-teacher-auc 0.99 \(chance: 0.5\)", message)[1]
    )
    assert (
        f"{out} not written; pass --min-teacher-auc 0 to write it anyway" in message and "\n" not in message
    )
    assert str(partial_path(out)) in message and "so that rerun only retrains the head" in message
    assert [p.name for p in tmp_path.iterdir()] == [partial_path(out).name]  # no cache, no temporary file
    val = load_arrays("breastmnist", 28, synthetic_root)["val"][1][:, 0]
    majority = np.bincount(val).max() / len(val)
    assert f"val AUC {auc:.3f}" in stream.getvalue()
    assert f"(chance: AUC 0.5, ACC {majority:.3f} val /" in stream.getvalue()

    calls = count_teacher_chunks(monkeypatch)
    cache = TeacherCache(cache_teacher(quick_config(synthetic_root, out, min_teacher_auc=0)))
    assert calls == []  # the teacher's outputs were kept: only the head was trained again
    assert cache.teacher_metrics("val")["auc"] == pytest.approx(auc, abs=5e-4)
    assert inspect_cache(out)["splits"]["val"]["chance_acc"] == pytest.approx(majority)
    out.unlink()
    args = ["--dataset", "breastmnist", "--teacher", "tiny", "--teacher-size", "28", "--epochs", "3"]
    result = run_cli(
        "cache-teacher",
        *args,
        "--data-dir",
        str(synthetic_root),
        "--out",
        str(out),
        "--min-teacher-auc",
        "0.99",
    )
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "pass --min-teacher-auc 0" in errors[0], (
        result.output
    )
    assert not out.exists()


def test_chance_levels():
    assert chance_metrics("binary-class", np.array([[0], [1], [1], [1]])) == {"auc": 0.5, "acc": 0.75}
    assert chance_metrics("multi-class", np.array([[2], [0], [2], [1], [2]]))["acc"] == pytest.approx(0.6)
    labels = np.array([[1, 0], [1, 0], [0, 0], [1, 1]])  # label 0: 3/4 positive, label 1: 3/4 negative
    assert chance_metrics("multi-label, binary-class", labels)["acc"] == pytest.approx(0.75)


@pytest.mark.realdata
def test_genuine_breastmnist(real_data, tmp_path):
    cfg = quick_config(real_data, tmp_path / "bm.h5", epochs=2)
    cache = TeacherCache(cache_teacher(cfg))
    assert {s: cache.split_attrs[s]["n"] for s in SPLITS} == {"train": 546, "val": 78, "test": 156}
    cache.check_data("breastmnist", 28, load_arrays("breastmnist", 28, real_data))
    assert inspect_cache(cfg.out)["head_check"]["status"] == "ok"
