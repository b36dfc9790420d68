"""The HDF5 teacher cache, format version 1 (the full layout is documented in cache/README.md).

`write_cache` writes a temporary file beside the target and renames it only when complete, so a
killed run never leaves a half cache under the final name. `TeacherCache` opens the file read-only
with HDF5 file locking off, checks it, loads logits, labels and the head into memory and closes it;
`features(split)` reopens it for the (larger, optional) features of one split.

Locking: readers pass `locking=False`, so any number of distill/sweep processes read one cache at once,
even on NFS or Lustre, which often refuse locks (that safety comes from the atomic rename instead: a
cache under its final name is complete and never modified). Writers keep HDF5's default locking; where the
filesystem refuses it, set `HDF5_USE_FILE_LOCKING=FALSE`, which HDF5 applies to every open.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from medkd import __version__
from medkd.data import SPLITS, data_sha256, num_outputs
from medkd.errors import MedkdError
from medkd.files import atomic_path
from medkd.metrics import evaluate, scores_from_logits

FORMAT_VERSION = 1
ROOT_ATTRS = (
    "medkd_format",
    "medkd_version",
    "created_utc",
    "dataset",
    "image_size",
    "task",
    "n_classes",
    "label_names",
    "teacher",
    "backbone",
    "weights_sha256",
    "teacher_input_size",
    "resize",
    "mean",
    "std",
    "torch_version",
)
HEAD_ATTRS = ("epochs", "best_epoch", "val_auc", "val_acc", "test_auc", "test_acc", "lr", "batch_size")
DTYPES = {"logits": np.float32, "labels": np.int64, "features": np.float16}
REBUILD = "medkd cache-teacher ... --force"
MAKE_ONE = "make one with `medkd cache-teacher --dataset FLAG --teacher NAME`"


def _to_attr(key: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"cache attr '{key}' is None; HDF5 attrs cannot hold None")
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str):
        return str(value)  # plain str: h5py refuses numpy's str_ and torch's TorchVersion
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)  # dict-valued attrs (label_names, config) are stored as JSON
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = _to_attr(key, value)


def _write_split(group: h5py.Group, arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        if name not in DTYPES:
            raise ValueError(f"unknown split dataset '{name}'; valid: {', '.join(DTYPES)}")
        group.create_dataset(name, data=np.asarray(array, dtype=DTYPES[name]))


def dataset_attrs(dataset: str, size: int, task: str, label_names: dict[str, str]) -> dict[str, Any]:
    """The root attrs every cache carries whatever its teacher: versions, creation time and the dataset."""
    return {
        "medkd_version": __version__,
        "torch_version": torch.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "image_size": size,
        "task": task,
        "n_classes": num_outputs(task, len(label_names)),
        "label_names": label_names,
    }


def data_split_attrs(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Each split's `n` and `data_sha256`, which tie a cache to its data; one hash per split, reused."""
    return {s: {"n": len(arrays[s][0]), "data_sha256": data_sha256(*arrays[s])} for s in SPLITS}


def split_datasets(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], features: dict[str, np.ndarray] | None
) -> dict[str, dict[str, np.ndarray]]:
    """The `splits` argument of `write_cache`: logits and labels per split, features unless None."""
    splits = {split: {"logits": logits[split], "labels": labels[split]} for split in SPLITS}
    if features is not None:
        for split in SPLITS:
            splits[split]["features"] = features[split]
    return splits


def write_cache(
    path: str | os.PathLike,
    *,
    attrs: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]],
    split_attrs: dict[str, dict[str, Any]],
    head: dict[str, Any] | None,
) -> Path:
    """Write a format-1 cache to `path` through a temporary file in the same folder, renamed at the end.

    `splits[split]` holds logits (N, C), labels (N, L) and optionally features (N, D); `split_attrs[split]`
    its n and data_sha256; `head` the weight (C, D), bias (C,) and the HEAD_ATTRS scalars. The schema is
    checked before anything is written, by the same rules `TeacherCache` reads with.
    """
    path = Path(path)
    problem = _write_problem(attrs, splits, split_attrs, head)
    if problem:
        raise ValueError(f"refusing to write cache {path}: it {problem}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_attrs(f, {"medkd_format": FORMAT_VERSION, **attrs})
        for split in SPLITS:
            group = f.create_group(split)
            _write_split(group, splits[split])
            _write_attrs(group, split_attrs[split])
        if head is not None:
            group = f.create_group("head")
            group.create_dataset("weight", data=np.asarray(head["weight"], dtype=np.float32))
            group.create_dataset("bias", data=np.asarray(head["bias"], dtype=np.float32))
            _write_attrs(group, {k: v for k, v in head.items() if k not in ("weight", "bias")})
    return path


def _split_problem(split: str, arrays: dict[str, np.ndarray], n: int, n_classes: int) -> str:
    """What is wrong with one split's arrays ("" if nothing): the rule for writing and reading alike."""
    logits, labels = arrays["logits"], arrays["labels"]
    if logits.shape != (n, n_classes) or labels.ndim != 2 or len(labels) != n:
        return (
            f"has /{split} logits {logits.shape} and labels {labels.shape}; expected "
            f"({n}, {n_classes}) and ({n}, L)"
        )
    if not np.isfinite(logits).all():
        return f"has NaN or inf in /{split}/logits"
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or len(features) != n):
        return f"has /{split} features {features.shape}; expected ({n}, D)"
    return ""


def _write_problem(
    attrs: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]],
    split_attrs: dict[str, dict[str, Any]],
    head: dict[str, Any] | None,
) -> str:
    missing = [k for k in ROOT_ATTRS if k != "medkd_format" and k not in attrs]
    if missing:
        return f"lacks the attrs {', '.join(missing)}"
    if set(splits) != set(SPLITS) or set(split_attrs) != set(SPLITS):
        return f"has splits {sorted(splits)}; expected {', '.join(SPLITS)}"
    for split in SPLITS:
        if not {"n", "data_sha256"} <= set(split_attrs[split]):
            return f"lacks the attrs n and data_sha256 of /{split}"
        arrays = {k: np.asarray(v) for k, v in splits[split].items()}
        problem = _split_problem(split, arrays, split_attrs[split]["n"], attrs["n_classes"])
        if problem:
            return problem
    if head is not None:
        weight = np.asarray(head["weight"])
        features = splits["train"].get("features")
        width = np.asarray(features).shape[1] if features is not None else weight.shape[-1]
        if weight.shape != (attrs["n_classes"], width) or np.asarray(head["bias"]).shape != weight.shape[:1]:
            return f"has a head of weight {weight.shape}; expected ({attrs['n_classes']}, {width})"
    return ""


class TeacherCache:
    """A teacher cache read into memory: attrs, per-split logits (float32 tensors) and labels, the head."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MedkdError(f"teacher cache {self.path} not found; {MAKE_ONE}")
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                self._read(f)
        except OSError as err:
            reason = " ".join(str(err).split())
            raise MedkdError(
                f"{self.path} is not a readable HDF5 file ({reason}); it may be truncated or not a cache: "
                f"{MAKE_ONE}"
            ) from err

    def _fail(self, problem: str) -> MedkdError:
        return MedkdError(f"teacher cache {self.path} {problem}; rebuild it with `{REBUILD}`")

    def _read(self, f: h5py.File) -> None:
        self.attrs = {k: _from_attr(v) for k, v in f.attrs.items()}
        version = self.attrs.get("medkd_format")
        if version != FORMAT_VERSION:
            raise MedkdError(
                f"{self.path} has cache format {version}; this medkd reads format {FORMAT_VERSION}: "
                f"rebuild it with `{REBUILD}`"
            )
        missing = [k for k in ROOT_ATTRS if k not in self.attrs]
        if missing:
            raise self._fail(f"lacks the attrs {', '.join(missing)}")
        self.split_attrs: dict[str, dict[str, Any]] = {}
        self.logits: dict[str, torch.Tensor] = {}
        self.labels: dict[str, np.ndarray] = {}
        self.has_features = True
        for split in SPLITS:
            if split not in f or not {"logits", "labels"} <= set(f[split]):
                raise self._fail(f"has no /{split}/logits or /{split}/labels")
            group = f[split]
            self.split_attrs[split] = {
                k: _from_attr(group.attrs[k]) for k in ("n", "data_sha256") if k in group.attrs
            }
            if len(self.split_attrs[split]) < 2:
                raise self._fail(f"lacks the attrs n and data_sha256 of /{split}")
            logits, labels = group["logits"][()], group["labels"][()]
            n, c = self.split_attrs[split]["n"], self.attrs["n_classes"]
            problem = _split_problem(split, {"logits": logits, "labels": labels}, n, c)
            if problem:
                raise self._fail(problem)
            self.logits[split] = torch.from_numpy(logits.astype(np.float32))
            self.labels[split] = labels.astype(np.int64)
            self.has_features &= "features" in group
        self.fingerprint = _fingerprint(self.split_attrs, {s: t.numpy() for s, t in self.logits.items()})
        self.head_attrs = {k: _from_attr(v) for k, v in f["head"].attrs.items()} if "head" in f else None
        self.head_weight = torch.from_numpy(f["head/weight"][()]) if "head/weight" in f else None
        self.head_bias = torch.from_numpy(f["head/bias"][()]) if "head/bias" in f else None

    @property
    def task(self) -> str:
        return self.attrs["task"]

    def features(self, split: str) -> np.ndarray:
        """The stored float16 features (N, D) of one split, read from disk now."""
        if split not in SPLITS:
            raise MedkdError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        with h5py.File(self.path, "r", locking=False) as f:
            if "features" not in f[split]:
                raise MedkdError(f"teacher cache {self.path} stores no features (made with --no-features)")
            return f[split]["features"][()]

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each split's stored features, without reading them ({} without features)."""
        if not self.has_features:
            return {}
        with h5py.File(self.path, "r", locking=False) as f:
            return {split: tuple(f[split]["features"].shape) for split in SPLITS}

    def summary(self, given_path: str | None = None) -> dict[str, Any]:
        """What a student run records about the cache it learned from (result.json's `teacher`); the path
        is the one the run was given (`given_path`), not a staged copy's."""
        test = self.teacher_metrics("test")
        return {
            "cache": str(given_path or self.path),
            "teacher": self.attrs["teacher"],
            "backbone": self.attrs.get("backbone"),
            "medkd_format": self.attrs["medkd_format"],
            "teacher_input_size": self.attrs.get("teacher_input_size"),
            "weights_sha256": self.attrs.get("weights_sha256"),
            "data_sha256": {s: self.split_attrs[s]["data_sha256"] for s in SPLITS},
            "fingerprint": self.fingerprint,
            "test_auc": test["auc"],
            "test_acc": test["acc"],
        }

    def head(self) -> torch.nn.Linear | None:
        """The stored linear head as a module, or None if the cache has none."""
        if self.head_weight is None or self.head_bias is None:
            return None
        head = torch.nn.Linear(self.head_weight.shape[1], self.head_weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.head_weight)
            head.bias.copy_(self.head_bias)
        return head.eval().requires_grad_(False)

    def teacher_metrics(self, split: str) -> dict[str, float]:
        """`{"auc", "acc"}` of the stored logits against the stored labels."""
        scores = scores_from_logits(self.task, self.logits[split]).numpy()
        return evaluate(self.task, self.labels[split], scores)

    def check_data(self, flag: str, size: int, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Refuse data other than the cache was built from: flag, size, each split's n and data_sha256."""
        built = f"{self.attrs['dataset']} ({self.attrs['image_size']} px)"
        rebuild = (
            f"rebuild it with `medkd cache-teacher --dataset {flag} --size {size} "
            f"--teacher {self.attrs['teacher']} --force`"
        )
        if self.attrs["dataset"] != flag or int(self.attrs["image_size"]) != int(size):
            raise MedkdError(
                f"cache {self.path} was built from {built}; the data given is {flag} ({size} px): "
                f"{rebuild}, or pass the matching --dataset/--size"
            )
        for split in SPLITS:
            images, labels = arrays[split]
            stored = self.split_attrs[split]
            sha = data_sha256(images, labels)
            if stored["n"] != len(images) or stored["data_sha256"] != sha:
                raise MedkdError(
                    f"cache {self.path} was built from {built} {split} n={stored['n']} sha256 "
                    f"{stored['data_sha256'][:12]}…; the data given has n={len(images)} sha256 {sha[:12]}…: "
                    f"{rebuild}"
                )


def _fingerprint(split_attrs: dict[str, dict[str, Any]], logits: dict[str, Any]) -> str:
    # What a student run reads from a cache: the data it was built from and the logits; not its path,
    # name or creation time, so a copy (or an identical rebuild) is the same cache.
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split_attrs[split]["data_sha256"].encode())
        digest.update(np.ascontiguousarray(logits[split], dtype=np.float32).tobytes())
    return digest.hexdigest()


def cache_fingerprint(path: str | os.PathLike) -> str:
    """`TeacherCache(path).fingerprint`, from the logits and data sha256s alone (a sweep asks per trial).

    Remembered per file version; a file that is not a readable cache gets TeacherCache's one-line error.
    """
    path = Path(path)
    if not path.is_file():
        raise MedkdError(f"teacher cache {path} not found; {MAKE_ONE}")
    stat = path.stat()
    return _cached_fingerprint(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _cached_fingerprint(path: str, _mtime_ns: int, _size: int) -> str:
    try:
        with h5py.File(path, "r", locking=False) as f:
            split_attrs = {s: {"data_sha256": _from_attr(f[s].attrs["data_sha256"])} for s in SPLITS}
            return _fingerprint(split_attrs, {s: f[s]["logits"][()] for s in SPLITS})
    except (OSError, KeyError):
        TeacherCache(path)  # says what is wrong with the file, in one line
        raise


# ---------------------------------------------------------------- the partial outputs of stage one


def partial_path(out: str | os.PathLike) -> Path:
    """The temporary file stage one writes chunk by chunk, beside the cache it is for."""
    out = Path(out)
    return out.parent / f".{out.name}.features.partial"


class PartialOutputs:
    """Stage one's resumable teacher pass: `/<split>` features (N, D) float32 and, for a teacher with a
    classifier, `/logits_<split>` (N, C), each with a `done` attr counting the rows written.

    The root attr `key` names everything the outputs depend on: a file with another key, or one that
    cannot be opened, is started anew (`note` says why). Rows are written first, then `done`, then the
    file is flushed: a kill at any point leaves `done` at most the rows written.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path, self.note = Path(path), ""
        self.file = self._open(key)

    def _open(self, key: str) -> h5py.File:
        if self.path.exists():
            try:
                f = h5py.File(self.path, "a")
            except OSError as err:
                if "lock" in str(err):
                    raise MedkdError(
                        f"{self.path} is locked: another cache-teacher with the same --out is running; "
                        f"wait for it or pass another --out"
                    ) from err
                self.note = f"{self.path} is damaged ({type(err).__name__}); computing features anew"
            else:
                if f.attrs.get("key") == key:
                    return f
                f.close()
                self.note = f"{self.path} was made with other arguments; computing features anew"
            self.path.unlink()
        f = h5py.File(self.path, "w")
        f.attrs["key"] = key
        return f

    def __enter__(self) -> PartialOutputs:
        return self

    def __exit__(self, *_: Any) -> None:
        self.file.close()

    def done(self, split: str) -> int:
        """Rows of `split` already written (0 for a split not started)."""
        return int(self.file[split].attrs["done"]) if split in self.file else 0

    def write(self, split: str, n: int, start: int, features: np.ndarray, logits: np.ndarray | None) -> None:
        """Rows `start:start + len(features)` of `split` (n rows in all)."""
        stop = start + len(features)
        for name, block in ((split, features), (f"logits_{split}", logits)):
            if block is None:
                continue
            if name not in self.file:
                self.file.create_dataset(name, shape=(n, block.shape[1]), dtype=np.float32)
            self.file[name][start:stop] = block
            self.file[name].attrs["done"] = stop
        self.file.flush()

    def read(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(features, logits or None)` of a finished split, float32."""
        logits = f"logits_{split}"
        return (
            torch.from_numpy(self.file[split][()]),
            torch.from_numpy(self.file[logits][()]) if logits in self.file else None,
        )
