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

from medkd.cache import cache_fingerprint, tokens_path
from medkd.errors import MedkdError

TOKEN_CHUNK_BYTES = 1 << 18  # HDF5 chunks of whole token rows, about this size: a minibatch reads few


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
    with h5py.File(partial, "a") as f:
        f.attrs["cache_fingerprint"] = cache_fingerprint(cache)
    kept = tokens_path(cache)
    os.replace(partial, kept)
    return kept


def open_tokens(path: str | os.PathLike) -> h5py.File:
    """A tokens file (partial or kept) read-only: `/<split>` (N, T, D_tok) float16."""
    return h5py.File(path, "r", locking=False)


class PartialOutputs:
    """Stage one's resumable teacher pass: `/<split>` features (N, D) float32 and, for a teacher with a
    classifier, `/logits_<split>` (N, C), each with a `done` attr counting the rows written; with a
    `tokens` path, also the patch tokens `/<split>` (N, T, D_tok) float16 in that second file.

    The root attr `key` names everything the outputs depend on: a file with another key, or one that
    cannot be opened, is started anew (`note` says why). Rows are written first, then `done`, then the
    file is flushed, tokens before features: a kill at any point leaves `done` at most the rows written.
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
            try:
                f = h5py.File(path, "a")
            except OSError as err:
                if "lock" in str(err):
                    raise MedkdError(
                        f"{path} is locked: another cache-teacher with the same --out is running; "
                        f"wait for it or pass another --out"
                    ) from err
                self.notes.append(f"{path} is damaged ({type(err).__name__}); computing {what} anew")
            else:
                if f.attrs.get("key") == key:
                    return f
                f.close()
                self.notes.append(f"{path} was made with other arguments; computing {what} anew")
            path.unlink()
        f = h5py.File(path, "w")
        f.attrs["key"] = key
        return f

    def __enter__(self) -> PartialOutputs:
        return self

    def __exit__(self, *_: Any) -> None:
        self.file.close()
        if self.tokens is not None:
            self.tokens.close()

    def done(self, split: str) -> int:
        """Rows of `split` already written (0 for a split not started), in every file."""
        files = [self.file] if self.tokens is None else [self.file, self.tokens]
        return min(int(f[split].attrs["done"]) if split in f else 0 for f in files)

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
        if self.tokens is not None:
            _write_rows(self.tokens, split, n, start, np.asarray(tokens, dtype=np.float16))
        for name, block in ((split, features), (f"logits_{split}", logits)):
            if block is not None:
                _write_rows(self.file, name, n, start, np.asarray(block, dtype=np.float32))

    def read(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(features, logits or None)` of a finished split, float32."""
        logits = f"logits_{split}"
        return (
            torch.from_numpy(self.file[split][()]),
            torch.from_numpy(self.file[logits][()]) if logits in self.file else None,
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
