"""What a cache or its partial file may not get away with: `--force` on a file that is not a cache, labels
other than the data's, NaN features passing `inspect`, a full disk, and attrs, dtypes and shapes a reader must
refuse in one line before it reads any data."""

from __future__ import annotations

import errno
import hashlib
import io
import shutil

import h5py
import numpy as np
import pytest
from conftest import tiny_cache_config
from rich.console import Console
from test_cache import N, fake_arrays, fake_cache_args

import medkd.cache
import medkd.cache_teacher
from medkd.cache import (
    TeacherCache,
    cache_fingerprint,
    data_difference,
    run_fingerprint,
    tokens_path,
    write_cache,
)
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.data import SPLITS
from medkd.errors import MedkdError
from medkd.partial import PartialOutputs, partial_path


@pytest.fixture
def cache_path(tmp_path):
    return write_cache(tmp_path / "c.h5", **fake_cache_args(fake_arrays()))


def damaged(path, name, edit):
    """A copy of the cache at `path` named `name`, edited in place with h5py by `edit(f)`."""
    copy = path.with_name(name)
    shutil.copyfile(path, copy)
    with h5py.File(copy, "a") as f:
        edit(f)
    return copy


def replace(f, where, data=None, **kwargs):
    """Put a new dataset at `where` (HDF5 path) instead of the one there."""
    del f[where]
    f.create_dataset(where, data=data, **kwargs)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


# ------------------------------------------------------------------ 3: --force replaces only a cache


@pytest.mark.parametrize("force", [True, False])
def test_force_refuses_to_replace_a_file_that_is_not_a_medkd_cache(
    synthetic_root, tmp_path, monkeypatch, force
):
    data = tmp_path / "breastmnist.npz"  # `cache-teacher --out data/breastmnist.npz --force`
    shutil.copyfile(synthetic_root / "breastmnist.npz", data)
    features = tmp_path / "features.h5"  # an HDF5 file, but somebody else's
    with h5py.File(features, "w") as f:
        f["x"] = np.zeros(3)
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    before = {p: p.read_bytes() for p in (data, features)}

    def never(*_args, **_kwargs):
        raise AssertionError("loaded data or a model before refusing the output")

    monkeypatch.setattr(medkd.cache_teacher, "load_arrays", never)
    monkeypatch.setattr(medkd.cache_teacher, "build_teacher", never)
    for out in (data, features, folder):
        with pytest.raises(MedkdError, match="is not a medkd cache|is a folder") as err:
            cache_teacher(tiny_cache_config(synthetic_root, out, device="cpu", force=force))
        assert "replaces only its own caches, even with --force" in one_line(err)
    assert {p: p.read_bytes() for p in (data, features)} == before and folder.is_dir()


def test_force_leaves_a_tokens_file_that_is_not_kept_tokens(synthetic_root, tmp_path):
    out = tmp_path / "c.h5"
    mine = tokens_path(out)  # c.tokens.h5: a name kept tokens would have, holding something else
    mine.write_text("my notes")
    cache_teacher(tiny_cache_config(synthetic_root, out, device="cpu", epochs=1))
    assert mine.read_text() == "my notes"


# ------------------------------------------------------------------ 7: labels, fingerprint, NaN features


def flip_test_labels(f):
    f["test/labels"][...] = 1 - f["test/labels"][()]


def old_formula(path) -> str:
    """The fingerprint before it counted labels, computed here from the file: each split's data_sha256 and
    float32 logits bytes."""
    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for split in SPLITS:
            digest.update(f[split].attrs["data_sha256"].encode())
            digest.update(np.ascontiguousarray(f[split]["logits"][()], dtype=np.float32).tobytes())
    return digest.hexdigest()


def test_check_data_refuses_cache_labels_other_than_the_data(cache_path):
    flipped = damaged(cache_path, "flipped.h5", flip_test_labels)
    arrays = fake_arrays()
    TeacherCache(cache_path).check_data("breastmnist", 28, arrays)
    with pytest.raises(MedkdError, match="holds test labels other than the data's") as err:
        TeacherCache(flipped).check_data("breastmnist", 28, arrays)
    assert f"{N['test']} of {N['test']} images differ" in one_line(err) and "medkd cache-teacher" in str(
        err.value
    )
    assert "test labels" in data_difference(TeacherCache(cache_path), TeacherCache(flipped))


def test_fingerprint_counts_the_labels_and_the_legacy_one_is_the_old_formula(cache_path):
    flipped = damaged(cache_path, "flipped.h5", flip_test_labels)
    original, other = TeacherCache(cache_path), TeacherCache(flipped)
    assert original.fingerprint != other.fingerprint
    assert cache_fingerprint(cache_path) == original.fingerprint != cache_fingerprint(flipped)
    assert run_fingerprint(str(cache_path)) == original.fingerprint
    # The legacy fingerprint ignores labels: what runs made before hashed into their config_hash.
    assert original.legacy_fingerprint == other.legacy_fingerprint == old_formula(cache_path)
    assert cache_fingerprint(cache_path, legacy=True) == run_fingerprint(str(cache_path), legacy=True)
    assert cache_fingerprint(flipped, legacy=True) == old_formula(cache_path) != original.fingerprint


def test_inspect_reports_nan_features_as_a_mismatch(cache_path):
    assert inspect_cache(cache_path, quiet_console())["head_check"]["status"] == "ok"

    def nan(f):
        f["val/features"][0, 0] = np.nan

    console = quiet_console()
    check = inspect_cache(damaged(cache_path, "nan.h5", nan), console)["head_check"]
    assert check["status"] == "MISMATCH" and check["note"] == "NaN or inf in features (val)"
    assert "MISMATCH (NaN or inf in features (val)" in console.file.getvalue()


# ------------------------------------------------------------------ 8: a full disk


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_in_the_teacher_pass_is_one_line_and_the_rerun_redoes_the_cut_split(
    synthetic_root, tmp_path, monkeypatch
):
    out = tmp_path / "c.h5"
    cfg = tiny_cache_config(synthetic_root, out, device="cpu", epochs=1)
    write = h5py.Dataset.__setitem__

    def full_at_val(self, key, value):  # the disk fills as the val rows are written: /val exists, no `done`
        if self.file.filename.endswith(".features.partial") and self.name == "/val":
            disk_full()
        write(self, key, value)

    with monkeypatch.context() as m:
        m.setattr(h5py.Dataset, "__setitem__", full_at_val)
        with pytest.raises(
            MedkdError, match=r"no space left on the device writing .*\.c\.h5\.features\.partial"
        ) as err:
            cache_teacher(cfg)
    message = one_line(err)
    assert "it needed about 6,144 bytes" in message and "bytes are free in" in message and "rerun" in message
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as f:  # what the full disk left: train done, val without `done`
        assert f["train"].attrs["done"] == 96 and "done" not in f["val"].attrs

    console = quiet_console()
    cache_teacher(cfg, console)  # space freed: the rerun resumes train and redoes val
    printed = console.file.getvalue()
    assert "/val without a row count" in printed and "computing the features of val anew" in printed
    clean = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "clean.h5", device="cpu", epochs=1))
    for split in SPLITS:
        np.testing.assert_array_equal(TeacherCache(out).features(split), TeacherCache(clean).features(split))
    assert not partial_path(out).exists()


def test_disk_full_writing_the_cache_is_one_line_and_keeps_the_teacher_pass(
    synthetic_root, tmp_path, monkeypatch
):
    out = tmp_path / "c.h5"
    monkeypatch.setattr(medkd.cache, "_write_split", disk_full)
    with pytest.raises(
        MedkdError, match=rf"no space left on the device writing {out}: it needed about"
    ) as err:
        cache_teacher(tiny_cache_config(synthetic_root, out, device="cpu", epochs=1))
    assert "does not repeat the teacher pass" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.h5.features.partial"]  # no cache, no temp file


def test_a_partial_split_without_done_is_redone_with_a_note(tmp_path):
    path = tmp_path / ".c.h5.features.partial"
    with PartialOutputs(path, "k") as f:
        f.write("train", 4, 0, np.ones((4, 3)), np.zeros((4, 2)))
    with h5py.File(path, "a") as f:
        f.create_dataset("val", shape=(2, 3), dtype=np.float32)  # cut short before `done`
        f.create_dataset("logits_test", shape=(2, 2), dtype=np.float32)
        f["logits_test"].attrs["done"] = "two"  # not a row count
    with PartialOutputs(path, "k") as f:
        assert [f.done(s) for s in SPLITS] == [4, 0, 0]
        assert "/val without a row count" in f.note and "/logits_test without a row count" in f.note
        assert "val" not in f.file and "logits_test" not in f.file


# ------------------------------------------------------------------ 10, 11: attrs, dtypes, shapes, sizes


def huge(f):  # a tiny file declaring 10^12 rows of logits: refused on its shape, never read
    replace(f, "train/logits", shape=(10**12, 2), dtype=np.float32, chunks=(1024, 2))


def huge_and_n(f):  # ... and a split attr n to match: refused on the bytes stored
    f["train"].attrs["n"] = 10**12
    replace(f, "train/logits", shape=(10**12, 2), dtype=np.float32, chunks=(1024, 2))
    replace(f, "train/labels", shape=(10**12, 1), dtype=np.int64, chunks=(1024, 1))
    replace(f, "train/features", shape=(10**12, 8), dtype=np.float16, chunks=(1024, 8))


def empty_val(f):
    f["val"].attrs["n"] = 0
    for name, width in (("logits", 2), ("labels", 1), ("features", 8)):
        replace(f, f"val/{name}", np.zeros((0, width), f[f"val/{name}"].dtype))


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda f: f.attrs.__setitem__("image_size", "twentyeight"),
            "root attr image_size 'twentyeight' of the wrong type \\(str\\); expected an integer",
        ),
        (
            lambda f: f.attrs.__setitem__("n_classes", 2.0),
            "root attr n_classes 2.0 of the wrong type \\(float\\)",
        ),
        (lambda f: f.attrs.__setitem__("cross_fit", "2"), "root attr cross_fit '2' of the wrong type"),
        (
            lambda f: f.attrs.__setitem__("augment", "flip"),
            "root attr augment 'flip' of the wrong type \\(str\\); expected a JSON",
        ),
        (lambda f: f.attrs.__setitem__("mean", "0.5"), "root attr mean '0.5' of the wrong type"),
        (
            lambda f: f.attrs.__setitem__("medkd_format", "1"),
            "medkd_format '1' of the wrong type \\(str\\); a cache stores its format as an integer",
        ),
        (
            lambda f: f.attrs.__delitem__("medkd_format"),
            "has no root attr medkd_format: it is not a medkd teacher cache",
        ),
        (
            lambda f: replace(f, "val/logits", np.full((6, 2), b"1.0")),
            "/val/logits of dtype \\|S3; expected floats",
        ),
        (
            lambda f: replace(f, "val/logits", np.zeros((6, 2), np.int8)),
            "/val/logits of dtype int8; expected floats",
        ),
        (
            lambda f: replace(f, "val/logits", np.zeros((6, 2), np.complex64)),
            "/val/logits of dtype complex64",
        ),
        (
            lambda f: replace(f, "test/labels", np.zeros((6, 1), np.float32)),
            "/test/labels of dtype float32; expected integers",
        ),
        (lambda f: replace(f, "test/features", np.zeros((6, 8), np.int16)), "/test/features of dtype int16"),
        (lambda f: f["val"].attrs.__setitem__("n", "6"), "/val attrs n '6' \\(str\\)"),
        (huge, "/train logits \\(1000000000000, 2\\) and labels \\(12, 1\\); expected \\(12, 2\\)"),
        (
            huge_and_n,
            "/train/logits of shape \\(1000000000000, 2\\) with 0 of its 8,000,000,000,000 bytes stored",
        ),
        (
            lambda f: replace(f, "val/features", shape=(10**12, 8), dtype=np.float16, chunks=(1024, 8)),
            "/val features \\(1000000000000, 8\\); expected \\(6, D\\)",
        ),
        (empty_val, "has an empty /val \\(n = 0\\); every split needs at least one image"),
    ],
)
def test_reader_refuses_in_one_line_before_reading(cache_path, edit, message):
    path = damaged(cache_path, "bad.h5", edit)
    assert path.stat().st_size < 1 << 20  # every damaged file is small, whatever it declares
    with pytest.raises(MedkdError, match=message) as err:
        TeacherCache(path)
    assert "rebuild it with" in one_line(err) or "make one with" in str(err.value)
    with pytest.raises(MedkdError, match=message):
        cache_fingerprint(path)  # a sweep's fingerprint goes through the same checks


def empty_val_split(args):
    args["splits"]["val"].update(logits=np.zeros((0, 2), np.float32), labels=np.zeros((0, 1), np.int64))
    args["splits"]["val"].pop("features")
    args["split_attrs"]["val"]["n"] = 0


@pytest.mark.parametrize(
    "spoil,message",
    [
        (
            lambda a: a["attrs"].update(image_size="twentyeight"),
            "root attr image_size 'twentyeight' of the wrong type",
        ),
        (lambda a: a["splits"]["val"].update(logits=np.zeros((6, 2), np.int8)), "/val/logits of dtype int8"),
        (empty_val_split, "has an empty /val \\(n = 0\\)"),
    ],
)
def test_the_writer_refuses_them_too_and_writes_nothing(tmp_path, spoil, message):
    args = fake_cache_args(fake_arrays())
    spoil(args)
    with pytest.raises(ValueError, match=message):
        write_cache(tmp_path / "c.h5", **args)
    assert list(tmp_path.iterdir()) == []
