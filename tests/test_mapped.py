"""medkd.mapped: .npz headers, mapped copies (made once, never stale, never half-written), page release,
chunked passes and hashes, and the streamed .npz writer."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import medkd.files
import medkd.mapped as mapped
from medkd.errors import MedkdError
from medkd.mapped import (
    StreamedArray,
    chunks,
    copy_path,
    mapped_copies,
    mapped_copy,
    member_shapes,
    memory_budget,
    release,
    sha256_rows,
    write_npz_streamed,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
MB = 2**20


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(20, 8, 8), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, size=(20, 1)),
        "val_images": rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8),
        "scores": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        "empty": np.zeros((0, 8, 8), np.uint8),
        "scalar": np.array(3.5),
    }


def _save(path: Path, arrays: dict[str, np.ndarray], compressed: bool = True) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _big_npz(path: Path, nbytes: int = 48 * MB) -> tuple[Path, np.ndarray]:
    """A stored (uncompressed, quick) npz with one uint8 array of `nbytes` (rows of 64 KiB)."""
    images = (np.arange(nbytes, dtype=np.int64) % 251).astype(np.uint8).reshape(-1, 256, 256)
    return _save(path, {"train_images": images}, compressed=False), images


def _rss_file() -> int:
    """Bytes of file-backed pages resident in this process (mapped files count here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line in /proc/self/status")


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize("compressed", [True, False])
def test_member_shapes_equal_np_load(tmp_path: Path, compressed: bool) -> None:
    path = _save(tmp_path / "x.npz", _arrays(), compressed)
    with np.load(path) as npz:
        expected = {k: (npz[k].shape, npz[k].dtype) for k in npz.files}
    assert member_shapes(path) == expected


def test_bad_zip_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip file at all")
    for call in (member_shapes, lambda p: mapped_copy(p, "train_images")):
        with pytest.raises(MedkdError, match=r"broken\.npz is not a readable \.npz file \(") as err:
            call(path)
        _one_line(err)


def test_missing_key_lists_the_keys(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", _arrays())
    with pytest.raises(MedkdError, match="has no array 'test_images'; it has empty, scalar, scores") as err:
        mapped_copy(path, "test_images")
    _one_line(err)


# ---------------------------------------------------------------- mapped copies


@pytest.mark.parametrize("key", ["train_images", "train_labels", "val_images", "scores", "empty", "scalar"])
def test_mapped_copy_equals_np_load_bit_for_bit(tmp_path: Path, key: str) -> None:
    path = _save(tmp_path / "x.npz", _arrays())
    array = mapped_copy(path, key)
    with np.load(path) as npz:
        expected = npz[key]
    assert isinstance(array, np.memmap) and array.mode == "r" and not array.flags.writeable
    assert array.dtype == expected.dtype and array.shape == expected.shape
    assert np.ascontiguousarray(array).tobytes() == np.ascontiguousarray(expected).tobytes()


def test_mapped_copy_is_made_once_and_reused(tmp_path: Path) -> None:
    path = _save(tmp_path / "pathmnist_64.npz", _arrays())
    crc = zipfile.ZipFile(path).getinfo("train_images.npy").CRC
    first = mapped_copy(path, "train_images")
    copy = Path(first.filename)
    assert copy == tmp_path / f"pathmnist_64.train_images.{crc:08x}.npy" == copy_path(path, "train_images")
    assert np.load(copy).tobytes() == first.tobytes()  # a plain .npy, readable without medkd
    mtime = copy.stat().st_mtime_ns
    second = mapped_copy(path, "train_images")
    assert Path(second.filename) == copy and copy.stat().st_mtime_ns == mtime
    assert sorted(tmp_path.iterdir()) == sorted([path, copy])  # nothing else beside the npz
    assert mapped_copies(path) == [copy] and mapped_copies(path, stale=True) == []


def test_changed_npz_gets_a_new_copy_never_the_stale_one(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", _arrays(seed=0))
    old = Path(mapped_copy(path, "train_images").filename)
    path.unlink()
    _save(path, _arrays(seed=1))
    array = mapped_copy(path, "train_images")
    new = Path(array.filename)
    assert new != old and old.exists()  # the old copy is left alone, not reused and not deleted
    assert np.array_equal(array, _arrays(seed=1)["train_images"])
    assert mapped_copies(path) == sorted([old, new])
    assert mapped_copies(path, stale=True) == [old]
    path.unlink()
    assert mapped_copies(path, stale=True) == sorted([old, new])


def test_copies_of_another_npz_are_not_listed(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.npz", _arrays())
    ab = _save(tmp_path / "a.b.npz", _arrays())
    mapped_copy(a, "train_images")
    mapped_copy(ab, "train_images")
    assert [p.name.split(".")[0] for p in mapped_copies(a)] == ["a"]
    assert len(mapped_copies(ab)) == 1


def test_copy_has_the_npz_read_permissions(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", _arrays())
    path.chmod(0o644)
    assert Path(mapped_copy(path, "train_images").filename).stat().st_mode & 0o777 == 0o644


def test_failure_mid_stream_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _big_npz(tmp_path / "x.npz", nbytes=MB)
    monkeypatch.setattr(mapped, "COPY_BLOCK_BYTES", 4096)
    real_read, calls = zipfile.ZipExtFile.read, {"n": 0}

    def read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        calls["n"] += 1
        if calls["n"] > 20:  # past the header check, a few blocks into the copy
            raise OSError(errno.EIO, "simulated read error")
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    with pytest.raises(OSError, match="simulated read error"):
        mapped_copy(path, "train_images")
    assert calls["n"] > 20
    assert list(tmp_path.iterdir()) == [path]
    monkeypatch.setattr(zipfile.ZipExtFile, "read", real_read)
    assert mapped_copy(path, "train_images").shape == (16, 256, 256)  # the next call makes it whole


def test_corrupt_member_is_caught_by_its_crc_and_leaves_nothing(tmp_path: Path) -> None:
    path, images = _big_npz(tmp_path / "x.npz", nbytes=MB)
    data = bytearray(path.read_bytes())
    at = data.find(images[3].tobytes()[:4096])  # stored: the pixels are in the file as they are
    data[at + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MedkdError, match="is not a readable .npz file .*CRC") as err:
        mapped_copy(path, "train_images")
    _one_line(err)
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write a 0o500 folder")
def test_unwritable_folder_says_how_to_fix(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    path = _save(folder / "x.npz", _arrays())
    folder.chmod(0o500)
    try:
        with pytest.raises(MedkdError, match="into .*readonly .*writable folder.*--max-memory-gb") as err:
            mapped_copy(path, "train_images")
    finally:
        folder.chmod(0o700)
    _one_line(err)
    assert list(folder.iterdir()) == [path]


def test_refused_temporary_file_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same failure as an unwritable folder, as the OS reports it (this also runs as root).
    path = _save(tmp_path / "x.npz", _arrays())

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(medkd.files, "_new_file_beside", refuse)
    with pytest.raises(MedkdError, match=f"into {tmp_path} .*writable folder.*--max-memory-gb") as err:
        mapped_copy(path, "train_images")
    _one_line(err)


def test_a_foreign_file_under_the_copy_name_is_not_used_or_touched(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", _arrays())
    copy = copy_path(path, "train_images")
    copy.write_bytes(b"something else")
    with pytest.raises(MedkdError, match="delete it and medkd will make it again") as err:
        mapped_copy(path, "train_images")
    _one_line(err)
    assert copy.read_bytes() == b"something else"


# ---------------------------------------------------------------- memory budget


def test_memory_budget() -> None:
    assert memory_budget(2.5) == int(2.5 * 2**30)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory_budget(None) == int(mapped.DEFAULT_MEMORY_FRACTION * ram)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        assert memory_budget(None, "cuda") == memory_budget(None)  # no GPU: the RAM bound alone
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(MedkdError, match="--max-memory-gb must be a positive number of GiB") as err:
            memory_budget(bad)
        _one_line(err)


# ---------------------------------------------------------------- release, chunks, hashes


@linux_only
def test_release_drops_the_mappings_resident_pages(tmp_path: Path) -> None:
    path, images = _big_npz(tmp_path / "x.npz")
    array = mapped_copy(path, "train_images")
    before = _rss_file()
    assert int(array.sum(dtype=np.uint64)) == int(images.sum(dtype=np.uint64))  # touches every page
    touched = _rss_file()
    release(array[5:])  # a view releases the mapping it views
    released = _rss_file()
    assert touched - before > 0.8 * images.nbytes
    assert released - before < 4 * MB
    assert np.array_equal(array[-1], images[-1])  # the data is still there: it is mapped again on use


def test_release_is_a_no_op_for_arrays_in_ram() -> None:
    values = np.arange(10)
    release(values)
    release(values[2:])
    assert np.array_equal(values, np.arange(10))


def test_release_keeps_copy_on_write_changes(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(1 << 16, np.uint8))
    array = np.load(tmp_path / "x.npy", mmap_mode="c")
    array[:] = 7
    release(array)
    assert (array == 7).all()


@linux_only
def test_chunks_cover_every_row_once_and_hold_one_block(tmp_path: Path) -> None:
    path, images = _big_npz(tmp_path / "x.npz")
    array = mapped_copy(path, "train_images")
    rows = 50  # 3.2 MB blocks, not a divisor of the 768 rows
    before, peak, starts, blocks = _rss_file(), 0, [], []
    for start, block in chunks(array, rows):
        assert type(block) is np.ndarray and block.flags.c_contiguous and block.base is None
        starts.append(start)
        blocks.append(hashlib.sha256(block).hexdigest())
        peak = max(peak, _rss_file() - before)
    assert starts == list(range(0, len(images), rows))
    assert blocks == [hashlib.sha256(images[s : s + rows]).hexdigest() for s in starts]
    assert peak < 3 * rows * images[0].nbytes  # about one block of the mapping resident, not the split


def test_chunks_of_arrays_in_ram() -> None:
    values = np.arange(7 * 6).reshape(7, 6)[:, ::2]  # strided: blocks are contiguous copies all the same
    got = list(chunks(values, 3))
    assert [s for s, _ in got] == [0, 3, 6]
    assert all(b.flags.c_contiguous for _, b in got)
    assert np.array_equal(np.concatenate([b for _, b in got]), values)
    got[0][1][:] = -1  # a copy: changing it leaves the array alone
    assert values.min() == 0
    assert list(chunks(values[:0], 3)) == []
    with pytest.raises(MedkdError, match="chunk size must be at least 1 row"):
        list(chunks(values, 0))


def test_sha256_rows_equals_hashlib_on_the_whole_array(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.npz", _arrays())
    arrays = {
        **_arrays(),
        "strided": np.arange(200).reshape(20, 10)[:, ::3],
        "mapped": mapped_copy(path, "val_images"),
    }
    for name, array in arrays.items():
        expected = hashlib.sha256(b"prefix")  # it updates the digest it is given, after what came before
        expected.update(np.ascontiguousarray(array))
        for rows in (1, 3, None):
            digest = hashlib.sha256(b"prefix")
            sha256_rows(digest, array, rows)
            assert digest.hexdigest() == expected.hexdigest(), (name, rows)


# ---------------------------------------------------------------- streamed writer


@pytest.mark.parametrize("compress", [True, False])
def test_write_npz_streamed_round_trips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: bool
) -> None:
    monkeypatch.setattr(mapped, "ROW_BLOCK_BYTES", 1000)  # many blocks per member
    arrays = _arrays()
    asked = []

    def block(start: int, stop: int) -> np.ndarray:
        asked.append((start, stop))
        return arrays["train_images"][start:stop]

    members = {**arrays, "train_images": StreamedArray((20, 8, 8), np.dtype(np.uint8), block)}
    path = write_npz_streamed(tmp_path / "x.npz", members, compress=compress)
    assert asked == [(s, min(20, s + 15)) for s in range(0, 20, 15)]  # 1000 B // 64 B = 15 rows a block
    expected_method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    assert {i.compress_type for i in zipfile.ZipFile(path).infolist()} == {expected_method}
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(arrays)
        for key, value in arrays.items():
            assert npz[key].dtype == value.dtype and np.array_equal(npz[key], value), key
    assert member_shapes(path) == {k: (v.shape, v.dtype) for k, v in arrays.items()}
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_write_npz_streamed_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"mine")
    with pytest.raises(MedkdError, match="already exists; medkd does not overwrite it") as err:
        write_npz_streamed(existing, {"a": np.zeros(3)})
    _one_line(err)
    assert existing.read_bytes() == b"mine"
    wrong = StreamedArray((4, 2), np.dtype(np.uint8), lambda a, b: np.zeros((b - a, 3), np.uint8))
    with pytest.raises(MedkdError, match=r"'a' rows 0:4 came as uint8 \(4, 3\); expected uint8 \(4, 2\)"):
        write_npz_streamed(tmp_path / "new.npz", {"a": wrong})
    assert [p.name for p in tmp_path.iterdir()] == ["existing.npz"]
