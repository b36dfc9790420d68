"""Splits too big for RAM: uncompressed copies of .npz members, memory-mapped and walked in chunks.

A split larger than the memory budget is decompressed once, streamed block by block, into
`<stem>.<key>.<crc32>.npy` beside its .npz and memory-mapped read-only from then on. Consumers walk it
with `chunks` and `sha256_rows`, which drop each block's pages from the process once they are done, so
streaming a 5 GB split neither holds nor looks (in RSS) like holding 5 GB.

numpy and the standard library only; torch is imported lazily, for the GPU's memory size.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import math
import mmap
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medkd.errors import MedkdError, first_line
from medkd.files import atomic_path

# A quarter of the memory: a split is held next to the models, the teacher's activations, a second
# split and torch's own allocations, so a split that needs more than this is better mapped than held.
DEFAULT_MEMORY_FRACTION = 0.25
GB = 2**30  # --max-memory-gb counts in GiB, as `free -g` and nvidia-smi do
# Decompression goes through a buffer of this size: big enough for zlib and the disk to run at full
# speed, small enough that making a 5 GB copy costs no memory to speak of.
COPY_BLOCK_BYTES = 4 * 2**20
# Rows per block when a caller does not choose: about this many bytes in RAM at a time.
ROW_BLOCK_BYTES = 64 * 2**20

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class StreamedArray(NamedTuple):
    """An array `write_npz_streamed` writes without holding it: its shape, dtype and a block maker.

    `block(start, stop)` returns rows `start:stop` of the array, shape `(stop - start, *shape[1:])` (for
    a 0-d array, `block(0, 1)` returns its one value).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    block: Callable[[int, int], np.ndarray]


# ---------------------------------------------------------------- reading .npz members


def _open_zip(npz_path: str | os.PathLike) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(npz_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise MedkdError(f"{npz_path} is not a readable .npz file ({first_line(err)})") from err


def _read_header(f: Any, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            raise MedkdError(
                f"{where} is a .npy version {version[0]}.{version[1]}; medkd reads versions 1.0 and 2.0 "
                f"(np.save writes those unless field names are non-ASCII); re-save it with np.savez"
            )
        shape, _, dtype = _HEADER_READERS[version](f)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise MedkdError(
            f"{where} has no valid .npy header ({first_line(err)}); re-save it with np.savez"
        ) from err
    return tuple(shape), np.dtype(dtype)


def member_shapes(npz_path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{key: (shape, dtype)}` of every array in an .npz, read from the .npy headers alone (no data is
    decompressed beyond the first block of each member)."""
    shapes = {}
    with _open_zip(npz_path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue  # np.load's `files` lists only .npy members as arrays
            try:
                with zf.open(name) as f:
                    shapes[name[: -len(".npy")]] = _read_header(f, f"{npz_path}:{name}")
            except (zipfile.BadZipFile, OSError) as err:
                raise MedkdError(f"{npz_path} is not a readable .npz file ({first_line(err)})") from err
    return shapes


def _member(zf: zipfile.ZipFile, npz_path: str | os.PathLike, key: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(f"{key}.npy")
    except KeyError:
        keys = sorted(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))
        raise MedkdError(
            f"{npz_path} has no array '{key}'; it has {', '.join(keys) or 'none'}; pass one of those"
        ) from None


# ---------------------------------------------------------------- memory budget


def memory_budget(max_memory_gb: float | None, device: str = "cpu") -> int:
    """Bytes a split may take in memory: `max_memory_gb` GiB, else DEFAULT_MEMORY_FRACTION of the RAM
    (and of the GPU's memory too when `device` is a CUDA device, since splits are moved there)."""
    if max_memory_gb is not None:
        if not (math.isfinite(max_memory_gb) and max_memory_gb > 0):
            raise MedkdError(
                f"--max-memory-gb must be a positive number of GiB, got {max_memory_gb}; pass e.g. 8, "
                f"or leave it out for {DEFAULT_MEMORY_FRACTION:.0%} of the memory"
            )
        return int(max_memory_gb * GB)
    budget = int(DEFAULT_MEMORY_FRACTION * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index
            total = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
            budget = min(budget, int(DEFAULT_MEMORY_FRACTION * total.total_memory))
    return budget


# ---------------------------------------------------------------- mapped copies


def copy_path(npz_path: str | os.PathLike, key: str) -> Path:
    """Where `mapped_copy` keeps member `key`: `<stem>.<key>.<crc32 of the member, 8 hex>.npy` beside the
    npz. The CRC (from the zip directory, no data read) names the content, so a changed npz gets a new
    copy instead of a stale one."""
    npz_path = Path(npz_path)
    with _open_zip(npz_path) as zf:
        info = _member(zf, npz_path, key)
    return npz_path.with_name(f"{npz_path.stem}.{key}.{info.CRC:08x}.npy")


def mapped_copy(npz_path: str | os.PathLike, key: str) -> np.memmap:
    """Member `key` of an .npz, memory-mapped read-only from its uncompressed copy (made on first use)."""
    npz_path = Path(npz_path)
    with _open_zip(npz_path) as zf:
        info = _member(zf, npz_path, key)
        path = npz_path.with_name(f"{npz_path.stem}.{key}.{info.CRC:08x}.npy")
        if not path.exists():
            _make_copy(zf, info, npz_path, path)
    if path.stat().st_size != info.file_size:
        # Copies are renamed into place only when whole, so this one was made or changed by someone else.
        raise MedkdError(
            f"{path} has {path.stat().st_size} bytes, not the {info.file_size} of {key} in {npz_path.name}; "
            f"delete it and medkd will make it again"
        )
    return np.load(path, mmap_mode="r")


def _make_copy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, npz_path: Path, path: Path) -> None:
    """Stream the member, decompressed, into a temporary file beside the npz and rename it to `path`."""
    folder = path.parent
    hint = "copy the .npz to a writable folder (and point --data-dir at it), or raise --max-memory-gb"
    if not os.access(folder, os.W_OK):
        raise MedkdError(
            f"cannot write the uncompressed copy of {info.filename} into {folder} (not writable); {hint}"
        )
    free = shutil.disk_usage(folder).free
    if free < info.file_size:
        raise MedkdError(
            f"{folder} has {free / GB:.1f} GiB free; the uncompressed copy of {info.filename} needs "
            f"{info.file_size / GB:.1f} GiB; free space there, {hint}"
        )
    with zf.open(info) as src:  # fail before writing anything if the member cannot be mapped
        _, dtype = _read_header(src, f"{npz_path}:{info.filename}")
    if dtype.hasobject:
        raise MedkdError(
            f"{info.filename} in {npz_path} holds Python objects ({dtype}); only plain arrays map"
        )
    try:
        with atomic_path(path) as tmp, zf.open(info) as src, open(tmp, "wb") as dst:
            # The copy gets the npz's read permissions (not the umask's), for whoever shares the npz.
            os.chmod(tmp, npz_path.stat().st_mode & 0o666)
            # The member is a whole .npy file (header and data), so copying its bytes makes the copy;
            # ZipExtFile checks the CRC when the last block is read.
            while block := src.read(COPY_BLOCK_BYTES):
                dst.write(block)
    except PermissionError as err:
        raise MedkdError(
            f"cannot write the uncompressed copy of {info.filename} into {folder} ({first_line(err)}); {hint}"
        ) from err
    except zipfile.BadZipFile as err:
        raise MedkdError(f"{npz_path} is not a readable .npz file ({first_line(err)})") from err
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise MedkdError(
            f"{folder} filled up while writing the {info.file_size / GB:.1f} GiB copy of {info.filename}; "
            f"free space there, {hint}"
        ) from err


_COPY_NAME = re.compile(r"(?P<key>[^.]+)\.(?P<crc>[0-9a-f]{8})\.npy")


def mapped_copies(npz_path: str | os.PathLike, stale: bool = False) -> list[Path]:
    """The uncompressed copies `mapped_copy` made beside `npz_path` (medkd never deletes them).

    With `stale`, only those that no longer match the npz's content (all of them if it is gone): safe
    to delete.
    """
    npz_path = Path(npz_path)
    copies = sorted(
        p
        for p in npz_path.parent.glob(f"{glob.escape(npz_path.stem)}.*.npy")
        if _COPY_NAME.fullmatch(p.name[len(npz_path.stem) + 1 :])
    )
    if not stale:
        return copies
    current = set()
    if npz_path.is_file():
        with _open_zip(npz_path) as zf:
            current = {
                f"{npz_path.stem}.{i.filename[: -len('.npy')]}.{i.CRC:08x}.npy"
                for i in zf.infolist()
                if i.filename.endswith(".npy")
            }
    return [p for p in copies if p.name not in current]


# ---------------------------------------------------------------- walking mapped arrays


def release(array: np.ndarray) -> None:
    """Drop the resident pages of the mapping behind `array` from this process (a no-op for arrays in RAM).

    Mapped pages count in RSS until the kernel reclaims them, so a pass over a mapped split would show
    (and, under memory limits such as cgroups, be charged) the whole split. The data stays in the file
    and in the page cache; touching it again just maps it again.
    """
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    # A copy-on-write mapping ("c") keeps its changes only in those pages: dropping them would lose them.
    if mm is None or base.mode == "c" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    with contextlib.suppress(ValueError, OSError):  # a closed mapping, or a kernel that refuses the advice
        mm.madvise(mmap.MADV_DONTNEED)


def default_rows(array: np.ndarray) -> int:
    """Rows of `array` in a block of about ROW_BLOCK_BYTES (at least one)."""
    return _rows_per_block(array.itemsize * math.prod(array.shape[1:]))


def _rows_per_block(row_bytes: int) -> int:
    return max(1, ROW_BLOCK_BYTES // max(1, row_bytes))


def chunks(array: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, block)` over the first axis, `rows` at a time; each block is a C-contiguous copy in RAM,
    and a mapped array's pages are released after each block is copied."""
    if rows < 1:
        raise MedkdError(f"chunk size must be at least 1 row, got {rows}; pass a positive number")
    for start in range(0, len(array), rows):
        block = np.array(array[start : start + rows], order="C")  # a copy: the caller may keep or change it
        release(array)
        yield start, block


def sha256_rows(digest: Any, array: np.ndarray, rows: int | None = None) -> None:
    """`digest.update(np.ascontiguousarray(array))`, done `rows` rows at a time (default about 64 MiB)
    and releasing a mapped array's pages as it goes."""
    if array.ndim == 0:
        digest.update(np.ascontiguousarray(array))
        return
    rows = default_rows(array) if rows is None else rows
    if rows < 1:
        raise MedkdError(f"chunk size must be at least 1 row, got {rows}; pass a positive number")
    for start in range(0, len(array), rows):
        # A contiguous slice is hashed in place (no copy); a strided one is copied block by block.
        digest.update(np.ascontiguousarray(array[start : start + rows]))
        release(array)


# ---------------------------------------------------------------- writing big .npz files


def write_npz_streamed(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray | StreamedArray],
    compress: bool = True,
    compresslevel: int | None = None,
) -> Path:
    """Write a new .npz member by member, rows block by block, so no member is ever whole in RAM.

    `arrays` maps keys to arrays or `StreamedArray`s; `compress` chooses ZIP_DEFLATED (as
    np.savez_compressed, at zlib's `compresslevel`) or ZIP_STORED (as np.savez). np.load reads it back.
    """
    path = Path(path)
    if path.exists():
        raise MedkdError(f"{path} already exists; medkd does not overwrite it: pass a new path or delete it")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=method, compresslevel=compresslevel, allowZip64=True) as zf,
    ):
        for key, value in arrays.items():
            if isinstance(value, StreamedArray):
                streamed = StreamedArray(tuple(value.shape), np.dtype(value.dtype), value.block)
            else:
                array = np.asanyarray(value)
                streamed = StreamedArray(
                    array.shape, array.dtype, lambda a, b, x=array: x[a:b] if x.ndim else x
                )
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                _write_member(f, key, streamed)
    return path


def _write_member(f: Any, key: str, array: StreamedArray) -> None:
    if array.dtype.hasobject:
        raise MedkdError(f"'{key}' has dtype {array.dtype}; only plain numeric arrays can be streamed")
    header = {
        "descr": np.lib.format.dtype_to_descr(array.dtype),
        "fortran_order": False,
        "shape": array.shape,
    }
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header over 64 KiB (huge structured dtypes) needs version 2.0
        np.lib.format.write_array_header_2_0(f, header)
    if not array.shape:  # 0-d: one value, no rows
        f.write(np.asarray(array.block(0, 1), dtype=array.dtype).reshape(()).tobytes())
        return
    n, row_shape = array.shape[0], array.shape[1:]
    rows = _rows_per_block(array.dtype.itemsize * math.prod(row_shape))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = np.ascontiguousarray(array.block(start, stop))
        if block.shape != (stop - start, *row_shape) or block.dtype != array.dtype:
            raise MedkdError(
                f"'{key}' rows {start}:{stop} came as {block.dtype} {block.shape}; expected {array.dtype} "
                f"{(stop - start, *row_shape)}; make block(start, stop) return exactly those rows"
            )
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
        del block  # before the next one is made: one block in RAM at a time, not two
