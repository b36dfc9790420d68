"""Stage one end to end: `cache_teacher` and `medkd cache-teacher` / `medkd inspect` on synthetic data."""

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cache_config

import medkd.cache_teacher
from medkd import __version__
from medkd.cache import ROOT_ATTRS, TeacherCache
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.cli import main
from medkd.config import to_dict
from medkd.data import SPLITS, data_sha256, load_arrays
from medkd.errors import MedkdError

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
    assert attrs["medkd_format"] == 1 and attrs["medkd_version"] == __version__
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
    out.write_text("old")
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
            "'--teacher': 'dinov3' is not one of",
        ),
        (["--dataset", "breastmnist", "--weights", "missing.pth"], "weights file missing.pth not found"),
        (
            ["--dataset", "breastmnist", "--teacher-size", "30"],
            "--teacher-size must be a multiple of",
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
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    with h5py.File(out, "r", locking=False) as f:
        assert f.attrs["task"] == "ordinal-regression" and f["train/logits"].shape == (96, 5)


@pytest.mark.realdata
def test_genuine_breastmnist(real_data, tmp_path):
    cfg = quick_config(real_data, tmp_path / "bm.h5", epochs=2)
    cache = TeacherCache(cache_teacher(cfg))
    assert {s: cache.split_attrs[s]["n"] for s in SPLITS} == {"train": 546, "val": 78, "test": 156}
    cache.check_data("breastmnist", 28, load_arrays("breastmnist", 28, real_data))
    assert inspect_cache(cfg.out)["head_check"]["status"] == "ok"
