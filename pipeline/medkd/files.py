"""How medkd writes and fingerprints files: atomic writes (temporary name, fsync, rename), JSON, hashes.

Torch-free and numpy-free, so the cache, the run folder, the plots and the launchers share one writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block finishes.

    The temporary file is fsynced before the rename, so a crash cannot leave a renamed but empty file;
    on any exception (KeyboardInterrupt too) it is removed.
    """
    path = Path(path)
    tmp = _new_file_beside(path)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on one filesystem: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _new_file_beside(path: Path) -> Path:
    """A new empty `.{name}.XXXXXXXX.tmp` beside `path`, made with mode 0o666 as any new file is, so the
    umask (and a default ACL) sets its permissions. mkstemp's 0o600 would make every run file private."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # another writer's name: draw again
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def temporary_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """The leftovers of killed `atomic_path` writers of `folder/name` (never renamed, safe to delete)."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON through a temporary file renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _file_digest(path: str | os.PathLike, algorithm: str) -> str:
    # hashlib.file_digest does this from Python 3.11; we support 3.10.
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    """MD5 of a file's bytes (MedMNIST publishes MD5s for its .npz files)."""
    return _file_digest(path, "md5")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: the identity medkd records for weights, checkpoints and staged caches."""
    return _file_digest(path, "sha256")
