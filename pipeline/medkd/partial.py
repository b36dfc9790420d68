"""Stage one's files in progress: the resumable teacher pass (features, logits, patch tokens), written chunk
by chunk beside the cache it is for, and the patch tokens an attention head keeps (`--keep-tokens`).

The cache itself (`medkd.cache`) is written once, complete; these files are what a killed run resumes from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from medkd.cache import (
    cache_fingerprint,
    disk_full_error,
    disk_full_is_one_line,
    is_disk_full,
    tokens_path,
    write_size,
)
from medkd.errors import MedkdError

TOKEN_CHUNK_BYTES = 1 << 18  # HDF5 chunks of whole token rows, about this size: a minibatch reads few
RESUME = (
    "free space and rerun the same command: it resumes after the last complete chunk (or pass --out on "
    "another disk to start there)"
)


def partial_path(out: str | os.PathLike) -> Path:
    """The temporary file stage one writes chunk by chunk, beside the cache it is for."""
    out = Path(out)
    return out.parent / f".{out.name}.features.partial"


def tokens_partial_path(out: str | os.PathLike) -> Path:
    """The temporary file of the patch tokens an attention head trains on, beside the cache it is for."""
    out = Path(out)
    return out.parent / f".{out.name}.tokens.partial"


def views_partial_path(out: str | os.PathLike) -> Path:
    """The temporary file of the multi-view pass (`--views K`), beside the cache it is for."""
    out = Path(out)
    return out.parent / f".{out.name}.views.partial"


def keep_tokens(partial: str | os.PathLike, cache: str | os.PathLike) -> Path:
    """Make the finished tokens partial file the kept tokens of `cache`, marked with its fingerprint."""
    with disk_full_is_one_line(partial, RESUME), h5py.File(partial, "a") as f:
        f.attrs["cache_fingerprint"] = cache_fingerprint(cache)
    kept = tokens_path(cache)
    os.replace(partial, kept)
    return kept


def remove_kept_tokens(cache: str | os.PathLike) -> None:
    """Delete the tokens kept beside `cache` (`tokens_path`), if that file is kept tokens (an HDF5 file with
    the root attr `cache_fingerprint`): a file of another origin under that name is left alone."""
    path = tokens_path(cache)
    try:
        with h5py.File(path, "r", locking=False) as f:
            ours = "cache_fingerprint" in f.attrs
    except OSError:  # absent, or not HDF5
        return
    if ours:
        path.unlink(missing_ok=True)


def open_tokens(path: str | os.PathLike) -> h5py.File:
    """A tokens file (partial or kept) read-only: `/<split>` (N, T, D_tok) float16."""
    return h5py.File(path, "r", locking=False)


class PartialOutputs:
    """Stage one's resumable teacher pass: `/<split>` features (N, D) float32 and, for a teacher with a
    classifier, `/logits_<split>` (N, C), each with a `done` attr counting the rows written; with a
    `tokens` path, also the patch tokens `/<split>` (N, T, D_tok) float16 in that second file.

    The root attr `key` names everything the outputs depend on: a file with another key, or one that
    cannot be opened, is started anew (`note` says why), and so is a split whose row count `done` is missing
    or wrong (a write cut short, e.g. by a full disk, between creating its dataset and counting its rows).
    Rows are written first, then `done`, then the file is flushed, tokens before logits before features: a
    kill at any point leaves `done` at most the rows written. A full disk is one `MedkdError` line.
    """

    def __init__(self, path: str | os.PathLike, key: str, tokens: str | os.PathLike | None = None):
        self.path, self.notes = Path(path), []
        self.file = self._open(self.path, key, "features")
        self.tokens = self._open(Path(tokens), key, "tokens") if tokens is not None else None

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    def _open(self, path: Path, key: str, what: str) -> h5py.File:
        if path.exists():
            f = self._resume(path, key, what)
            if f is not None:
                return f
            path.unlink()
        f = None
        try:
            f = h5py.File(path, "w")
            f.attrs["key"] = key
        except OSError as err:
            if f is not None:
                f.close()
            path.unlink(missing_ok=True)  # an empty or half-made header: nothing to resume
            if is_disk_full(err):
                raise disk_full_error(path, write_size(err), RESUME) from err
            raise
        return f

    def _resume(self, path: Path, key: str, what: str) -> h5py.File | None:
        """The file at `path`, open to resume, or None (with a note) when it is to be started anew."""
        try:
            f = h5py.File(path, "a")
        except OSError as err:
            if is_disk_full(err):  # not damaged: keep what is done for the rerun
                raise disk_full_error(path, write_size(err), RESUME) from err
            if "lock" in str(err):
                raise MedkdError(
                    f"{path} is locked: another cache-teacher with the same --out is running; "
                    f"wait for it or pass another --out"
                ) from err
            self.notes.append(f"{path} is damaged ({type(err).__name__}); computing {what} anew")
            return None
        try:
            if f.attrs.get("key") == key:
                _drop_unfinished(f, path, what, self.notes)
                return f
            self.notes.append(f"{path} was made with other arguments; computing {what} anew")
        except (OSError, KeyError, ValueError, TypeError) as err:  # opens, but its contents are damaged
            f.close()
            if is_disk_full(err):
                raise disk_full_error(path, write_size(err), RESUME) from err
            self.notes.append(f"{path} is damaged ({type(err).__name__}); computing {what} anew")
            return None
        f.close()
        return None

    def __enter__(self) -> PartialOutputs:
        return self

    def __exit__(self, *_: Any) -> None:
        self.file.close()
        if self.tokens is not None:
            self.tokens.close()

    def done(self, split: str) -> int:
        """Rows of `split` already written (0 for a split not started), in every dataset of it."""
        counts = [_done(self.file, split)]
        if f"logits_{split}" in self.file:
            counts.append(_done(self.file, f"logits_{split}"))
        if self.tokens is not None:
            counts.append(_done(self.tokens, split))
        return min(counts)

    def write(
        self,
        split: str,
        n: int,
        start: int,
        features: np.ndarray,
        logits: np.ndarray | None,
        tokens: np.ndarray | None = None,
    ) -> None:
        """Rows `start:start + len(features)` of `split` (n rows in all)."""
        blocks = (
            [(self.tokens, split, np.asarray(tokens, dtype=np.float16))] if self.tokens is not None else []
        )
        if logits is not None:
            blocks.append((self.file, f"logits_{split}", np.asarray(logits, dtype=np.float32)))
        blocks.append((self.file, split, np.asarray(features, dtype=np.float32)))  # last: it marks the rows
        for f, name, block in blocks:
            with disk_full_is_one_line(f.filename, RESUME, block.nbytes):
                _write_rows(f, name, n, start, block)

    def read(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(features, logits or None)` of a finished split, float32."""
        logits = f"logits_{split}"
        try:
            return (
                torch.from_numpy(self.file[split][()]),
                torch.from_numpy(self.file[logits][()]) if logits in self.file else None,
            )
        except OSError as err:  # the rows were counted but cannot be read back: a damaged file
            raise MedkdError(
                f"{self.path} cannot be read back ({' '.join(str(err).split())[:120]}); delete it and rerun: "
                f"the teacher pass starts anew"
            ) from err


def _done(f: h5py.File, name: str) -> int:
    return int(f[name].attrs.get("done", 0)) if name in f else 0


def _drop_unfinished(f: h5py.File, path: Path, what: str, notes: list[str]) -> None:
    """Delete each split of `f` with a dataset whose `done` is missing or not a row count, so that split is
    computed anew (a write cut short between creating the dataset and counting its rows: a full disk)."""
    for name in list(f):
        if name not in f:  # deleted with its split
            continue
        data = f[name]
        done = data.attrs.get("done") if isinstance(data, h5py.Dataset) else None
        rows = data.shape[0] if isinstance(data, h5py.Dataset) and data.ndim else 0
        if isinstance(done, (int, np.integer)) and not isinstance(done, bool) and 0 <= done <= rows:
            continue
        split = name.removeprefix("logits_")
        for other in (split, f"logits_{split}"):
            if other in f:
                del f[other]
        notes.append(
            f"{path} has /{name} without a row count (a write cut short, e.g. by a full disk); computing the "
            f"{what} of {split} anew"
        )


def _write_rows(f: h5py.File, name: str, n: int, start: int, block: np.ndarray) -> None:
    if name not in f:
        # Token rows get chunks of whole rows, so a minibatch of random rows reads little beyond itself.
        rows = max(1, min(n, TOKEN_CHUNK_BYTES // max(1, block[:1].nbytes)))
        chunks = (rows, *block.shape[1:]) if block.ndim > 2 else None
        f.create_dataset(name, shape=(n, *block.shape[1:]), dtype=block.dtype, chunks=chunks)
    f[name][start : start + len(block)] = block
    f[name].attrs["done"] = start + len(block)
    f.flush()
