"""Run folders: `result.json`, `best.pt`, `predictions.npz`, each written to a temporary name and renamed.

A folder without `result.json` is a run that did not finish; `report` lists it as such. While a run
trains, `last.pt` holds its latest epoch (model, optimizer, scheduler, shuffling RNG, best-so-far), so
`distill --resume` continues it; it is removed when the run finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medkd.errors import MedkdError

RESULT = "result.json"
CHECKPOINT = "best.pt"
PREDICTIONS = "predictions.npz"
EPOCH_CHECKPOINT = "last.pt"
# Keys that steer where and how a run reports, not what it computes.
OUTPUT_KEYS = ("out", "force", "quiet", "data_dir", "device", "resume")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block finishes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash cannot leave a renamed stub
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def config_hash(config: dict[str, Any], cache_fingerprint: str | None = None) -> str:
    """A short fingerprint of what a run computes: its config without the keys that only steer output.

    With a cache, pass its content fingerprint (`TeacherCache.fingerprint`): the cache then counts by what
    it holds, not by its path, so a copy of the same cache elsewhere is the same config.
    """
    relevant = {k: v for k, v in config.items() if k not in OUTPUT_KEYS}
    if config.get("cache") is not None and cache_fingerprint is not None:
        relevant["cache"] = {"fingerprint": cache_fingerprint}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def read_result(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The `result.json` of a finished run, or a one-line error saying what is wrong with it."""
    path = Path(run_dir) / RESULT
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MedkdError(f"{path} not found: the run did not finish") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedkdError(f"{path} is not valid JSON ({err})") from err


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Create `run_dir`; refuse a finished run there unless `force` (unfinished leftovers are replaced)."""
    if (run_dir / RESULT).exists() and not force:
        raise MedkdError(
            f"{run_dir} already holds a finished run; pass --force to overwrite or --out elsewhere"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedkdError(f"cannot create run folder {run_dir}: {err.strerror}") from err
    if not os.access(run_dir, os.W_OK):
        raise MedkdError(f"run folder {run_dir} is not writable")
    # Temporary files of a killed writer (atomic_path's `.<name>.*.tmp`) are never renamed: drop them.
    for name in (RESULT, CHECKPOINT, PREDICTIONS, EPOCH_CHECKPOINT):
        for leftover in run_dir.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    from medkd import __version__

    return {
        "medkd": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
