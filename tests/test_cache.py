"""The HDF5 cache, format 1: layout, attrs, atomic writes, and every refusal a reader makes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import medkd.cache
from medkd.cache import FORMAT_VERSION, HEAD_ATTRS, ROOT_ATTRS, TeacherCache, write_cache
from medkd.data import SPLITS, data_sha256
from medkd.errors import MedkdError
from medkd.head import AttentionHead, MeanHead, head_record

N = {"train": 12, "val": 6, "test": 6}
C, D = 2, 8


def fake_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, C, (n, 1)).astype(np.int64))
        for s, n in N.items()
    }


def fake_cache_args(arrays, features=True):
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32)
    splits = {}
    for s, (_, labels) in arrays.items():
        feats = rng.normal(size=(N[s], D)).astype(np.float16)
        splits[s] = {"logits": feats.astype(np.float32) @ weight.T + bias, "labels": labels}
        if features:
            splits[s]["features"] = feats
    attrs = {
        "medkd_version": "0.1.0",
        "created_utc": "2026-01-01T00:00:00+00:00",
        "dataset": "breastmnist",
        "image_size": 28,
        "task": "binary-class",
        "n_classes": C,
        "label_names": {"0": "malignant", "1": "benign"},
        "teacher": "tiny",
        "backbone": "tiny",
        "weights_sha256": "",
        "teacher_input_size": 28,
        "resize": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "torch_version": torch.__version__,
        "random_init": True,
        "config": {"seed": 0, "milestones": None},
    }
    split_attrs = {s: {"n": N[s], "data_sha256": data_sha256(*arrays[s])} for s in SPLITS}
    head = {
        "weight": weight,
        "bias": bias,
        "epochs": 3,
        "best_epoch": 2,
        "val_auc": 0.75,
        "val_acc": 0.5,
        "test_auc": float("nan"),
        "test_acc": 0.5,
        "lr": 1e-3,
        "batch_size": 32,
    }
    return {"attrs": attrs, "splits": splits, "split_attrs": split_attrs, "head": head}


@pytest.fixture
def cache_path(tmp_path):
    return write_cache(tmp_path / "c.h5", **fake_cache_args(fake_arrays()))


def test_layout_dtypes_and_attrs_on_disk(cache_path):
    with h5py.File(cache_path, "r") as f:
        assert set(f) == {"train", "val", "test", "head"}
        assert f.attrs["medkd_format"] == FORMAT_VERSION == 2
        assert f.attrs["views"] == 1 and json.loads(f.attrs["augment"]) == {"preset": "none"}
        assert set(ROOT_ATTRS) <= set(f.attrs)
        assert json.loads(f.attrs["label_names"]) == {"0": "malignant", "1": "benign"}
        assert list(f.attrs["mean"]) == pytest.approx([0.485, 0.456, 0.406])
        for s in SPLITS:
            assert f[s]["logits"].dtype == np.float32 and f[s]["logits"].shape == (N[s], C)
            assert f[s]["labels"].dtype == np.int64 and f[s]["labels"].shape == (N[s], 1)
            assert f[s]["features"].dtype == np.float16 and f[s]["features"].shape == (N[s], D)
            assert f[s].attrs["n"] == N[s] and len(f[s].attrs["data_sha256"]) == 64
        assert f["head/weight"].dtype == np.float32 and f["head/weight"].shape == (C, D)
        assert f["head/bias"].shape == (C,) and set(f["head"].attrs) == {*HEAD_ATTRS, "kind"}
        assert f["head"].attrs["kind"] == "linear"  # written for every head; a record without one is linear


def test_reader_loads_into_memory_with_python_types(cache_path):
    cache = TeacherCache(cache_path)
    assert cache.attrs["label_names"] == {"0": "malignant", "1": "benign"}
    assert cache.attrs["mean"] == (0.485, 0.456, 0.406) and cache.attrs["config"]["milestones"] is None
    assert type(cache.attrs["image_size"]) is int and cache.attrs["random_init"] is True
    assert cache.split_attrs["val"]["n"] == 6 and cache.task == "binary-class"
    assert cache.logits["train"].dtype == torch.float32 and cache.logits["train"].shape == (12, C)
    assert cache.labels["test"].dtype == np.int64 and cache.has_features
    assert cache.head_attrs["best_epoch"] == 2 and np.isnan(cache.head_attrs["test_auc"])
    features = cache.features("val")
    assert features.dtype == np.float16 and features.shape == (6, D)
    torch.testing.assert_close(cache.head()(torch.from_numpy(features).float()), cache.logits["val"])
    assert {"auc", "acc", "ece", "brier", "balanced_acc"} <= set(cache.teacher_metrics("test"))
    os.chmod(cache_path, 0o444)  # read-only is enough for a reader
    TeacherCache(cache_path)


def test_no_features(tmp_path):
    cache = TeacherCache(write_cache(tmp_path / "c.h5", **fake_cache_args(fake_arrays(), features=False)))
    assert not cache.has_features
    with pytest.raises(MedkdError, match="stores no features"):
        cache.features("train")


def test_check_data(cache_path):
    arrays = fake_arrays()
    cache = TeacherCache(cache_path)
    cache.check_data("breastmnist", 28, arrays)
    other = fake_arrays(seed=5)
    with pytest.raises(MedkdError) as err:
        cache.check_data("breastmnist", 28, other)
    message = str(err.value)
    assert cache.split_attrs["train"]["data_sha256"][:12] in message
    assert data_sha256(*other["train"])[:12] in message and "medkd cache-teacher" in message
    with pytest.raises(
        MedkdError, match=r"built from breastmnist \(28 px\); the data given is breastmnist \(64 px\)"
    ):
        cache.check_data("breastmnist", 64, arrays)
    with pytest.raises(MedkdError, match="the data given is pneumoniamnist"):
        cache.check_data("pneumoniamnist", 28, arrays)
    fewer = dict(arrays, val=(arrays["val"][0][:5], arrays["val"][1][:5]))
    with pytest.raises(MedkdError, match="val n=6 .* has n=5"):
        cache.check_data("breastmnist", 28, fewer)


def one_line_error(path, match):
    with pytest.raises(MedkdError, match=match) as err:
        TeacherCache(path)
    assert "\n" not in str(err.value)


def test_refusals(tmp_path, cache_path):
    one_line_error(tmp_path / "missing.h5", "not found; make one with `medkd cache-teacher --dataset FLAG")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    one_line_error(text, "is not a readable HDF5 file")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(cache_path.read_bytes()[: cache_path.stat().st_size // 2])
    one_line_error(truncated, "is not a readable HDF5 file")

    def edited(name, edit):
        path = tmp_path / name
        path.write_bytes(cache_path.read_bytes())
        with h5py.File(path, "a") as f:
            edit(f)
        return path

    one_line_error(
        edited("v3.h5", lambda f: f.attrs.__setitem__("medkd_format", 3)),
        "has cache format 3; this medkd reads formats 1, 2",
    )
    one_line_error(edited("nolog.h5", lambda f: f["val"].__delitem__("logits")), "has no /val/logits")
    one_line_error(edited("notest.h5", lambda f: f.__delitem__("test")), "has no /test/logits")
    one_line_error(edited("noattr.h5", lambda f: f.attrs.__delitem__("teacher")), "lacks the attrs teacher")

    def nan(f):
        f["train"]["logits"][0, 0] = np.nan

    one_line_error(edited("nan.h5", nan), "NaN or inf in /train/logits")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    args = fake_cache_args(fake_arrays())
    calls = []

    def broken(group, arrays):
        calls.append(group.name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(group, arrays)

    original = medkd.cache._write_split
    monkeypatch.setattr(medkd.cache, "_write_split", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_cache(tmp_path / "c.h5", **args)
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_final_file(tmp_path):
    """SIGKILL mid-write: no cleanup runs, yet the final name never exists (only the temp file)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import medkd.cache
        from test_cache import fake_arrays, fake_cache_args
        original = medkd.cache._write_split
        def slow(group, arrays):
            original(group, arrays)
            print("writing", flush=True)
            time.sleep(60)
        medkd.cache._write_split = slow
        medkd.cache.write_cache({str(tmp_path / "c.h5")!r}, **fake_cache_args(fake_arrays()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    names = [p.name for p in tmp_path.iterdir()]
    assert "c.h5" not in names and len(names) == 1 and names[0].endswith(".tmp")


@pytest.mark.parametrize(
    "spoil,message",
    [
        (lambda a: a["splits"]["val"].update(logits=np.zeros((N["val"], C + 1), np.float32)), "/val logits"),
        (lambda a: a["splits"]["test"]["logits"].__setitem__((0, 0), np.nan), "NaN or inf in /test/logits"),
        (lambda a: a["attrs"].pop("teacher"), "lacks the attrs teacher"),
        (lambda a: a["split_attrs"]["train"].pop("data_sha256"), "n and data_sha256 of /train"),
        (lambda a: a["splits"].pop("test"), "expected train, val, test"),
        (lambda a: a["head"].update(weight=np.zeros((C, D + 1), np.float32)), "head of weight"),
        (lambda a: a["head"].update(kind="mlp"), "has a /head of kind 'mlp'; known: linear, attention"),
        (lambda a: a["head"].pop("bias"), "has no /head/weight and /head/bias"),
        (
            lambda a: a["splits"]["train"].update(fold=np.zeros(N["train"], np.int64)),
            "/train/fold but no root attr cross_fit",
        ),
    ],
)
def test_write_refuses_what_read_would_refuse_and_writes_nothing(tmp_path, spoil, message):
    args = fake_cache_args(fake_arrays())
    spoil(args)
    with pytest.raises(ValueError, match=message):
        write_cache(tmp_path / "c.h5", **args)
    assert list(tmp_path.iterdir()) == []


def attention_record(seed=0, n_outputs=C, dim=6):
    torch.manual_seed(seed)
    return head_record(AttentionHead(dim, n_outputs, num_heads=2))


def test_a_cache_from_before_head_kinds_and_folds_reads_unchanged(cache_path):
    with h5py.File(cache_path, "a") as f:  # what a cache written before `kind` and `cross_fit` holds
        del f["head"].attrs["kind"]
        if "cross_fit" in f.attrs:
            del f.attrs["cross_fit"]
    cache = TeacherCache(cache_path)
    assert cache.head_kind == "linear" and cache.cross_fit == 1 and cache.folds is None
    assert cache.fold_heads() == [] and cache.fold_head_attrs == [] and cache.kept_tokens() is None
    head = cache.head()
    assert isinstance(head, torch.nn.Linear) and torch.equal(head.weight, cache.head_weight)
    torch.testing.assert_close(head(torch.from_numpy(cache.features("val")).float()), cache.logits["val"])


def test_attention_head_round_trip(tmp_path):
    args = fake_cache_args(fake_arrays())
    record = attention_record()
    args["head"] = {**record, **{k: args["head"][k] for k in HEAD_ATTRS}}
    cache = TeacherCache(write_cache(tmp_path / "c.h5", **args))
    assert cache.head_kind == "attention" and cache.head_attrs["num_heads"] == 2 and cache.head_weight is None
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert set(f["head/state"]) == set(record["state"]) and "weight" not in f["head"]
    head = cache.head()
    assert isinstance(head, AttentionHead) and not any(p.requires_grad for p in head.parameters())
    for key, value in record["state"].items():
        np.testing.assert_array_equal(head.state_dict()[key].numpy(), value)


def crossfit_args(k=2):
    args = fake_cache_args(fake_arrays())
    weights = [np.random.default_rng(i).normal(size=(C, D)).astype(np.float32) for i in range(k)]
    args["attrs"]["cross_fit"] = k
    args["splits"]["train"]["fold"] = np.arange(N["train"]) % k
    args["fold_heads"] = [
        {
            "kind": "linear",
            "weight": w,
            "bias": np.zeros(C, np.float32),
            **{a: args["head"][a] for a in HEAD_ATTRS},
        }
        for w in weights
    ]
    args["head"] = {"kind": "linear", **{a: args["head"][a] for a in HEAD_ATTRS}, "best_epoch": [2] * k}
    return args


def test_cross_fitted_heads_round_trip(tmp_path):
    args = crossfit_args(k=3)
    cache = TeacherCache(write_cache(tmp_path / "c.h5", **args))
    assert cache.cross_fit == 3 and cache.head_attrs["best_epoch"] == (2, 2, 2) and cache.head_weight is None
    np.testing.assert_array_equal(cache.folds, np.arange(N["train"]) % 3)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert (
            set(f["heads"]) == {"0", "1", "2"}
            and f["train/fold"].dtype == np.int64
            and "weight" not in f["head"]
        )
    heads = cache.fold_heads()
    for head, record in zip(heads, args["fold_heads"], strict=True):
        np.testing.assert_array_equal(head.weight.numpy(), record["weight"])
    mean = cache.head()
    x = torch.from_numpy(cache.features("val")).float()
    assert isinstance(mean, MeanHead)
    torch.testing.assert_close(mean(x), torch.stack([h(x) for h in heads]).mean(0))


@pytest.mark.parametrize(
    "spoil,message",
    [
        (lambda a: a["splits"]["train"].pop("fold"), "has cross_fit 2 but no /train/fold"),
        (
            lambda a: a["splits"]["train"].update(fold=np.zeros(N["train"], np.int64)),
            "other than every fold 0..1",
        ),
        (lambda a: a["fold_heads"].pop(), "has cross_fit 2 but 1 heads under /heads"),
        (lambda a: a["fold_heads"][1].update(kind="attention"), "has an attention /heads/1 with classifier"),
        (
            lambda a: a["fold_heads"].__setitem__(
                1, {**attention_record(n_outputs=C + 1), "kind": "attention"}
            ),
            r"classifier \(3, 6\)",
        ),
    ],
)
def test_write_refuses_bad_folds_and_fold_heads(tmp_path, spoil, message):
    args = crossfit_args()
    spoil(args)
    with pytest.raises(ValueError, match=message):
        write_cache(tmp_path / "c.h5", **args)
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_a_cross_fitted_cache_that_lost_its_folds(tmp_path):
    path = write_cache(tmp_path / "c.h5", **crossfit_args())
    with h5py.File(path, "a") as f:
        del f["train/fold"]
    one_line_error(path, "has cross_fit 2 but no /train/fold of shape")
