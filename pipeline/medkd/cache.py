"""The HDF5 teacher cache, format version 2 (the full layout is documented in cache/README.md).

Version 2 adds augmented views of the training images (`/train/view_logits`, `view_params`,
`view_features`; root attrs `views`, `augment`); a version-1 file reads as a cache of the plain view only.

`write_cache` writes a temporary file beside the target and renames it only when complete, so a
killed run never leaves a half cache under the final name. `TeacherCache` opens the file read-only
with HDF5 file locking off, checks it, loads logits and labels into memory and closes it; `features(split)`
reopens it for the (larger, optional) features of one split, `head()` for the head.

Locking: readers pass `locking=False`, so any number of distill/sweep processes read one cache at once,
even on NFS or Lustre, which often refuse locks (that safety comes from the atomic rename instead: a
cache under its final name is complete and never modified). Writers keep HDF5's default locking; where the
filesystem refuses it, set `HDF5_USE_FILE_LOCKING=FALSE`, which HDF5 applies to every open.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from medkd import __version__
from medkd.config import cache_paths
from medkd.data import SPLITS, data_sha256, is_multilabel, num_outputs
from medkd.datasets import dataset_sha256, is_custom, same_dataset
from medkd.errors import MedkdError
from medkd.files import atomic_path
from medkd.head import MeanHead, head_from_record
from medkd.metrics import evaluate, scores_from_logits
from medkd.registry import HEADS
from medkd.views import VIEW_COLUMNS, augment_attr

FORMAT_VERSION = 2
READS = (1, 2)  # a version-1 cache is a version-2 cache without views
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
HEAD_ARRAYS = ("weight", "bias", "state")  # datasets of a head group; every other record key is an attr
DTYPES = {
    "logits": np.float32,
    "labels": np.int64,
    "features": np.float16,
    "fold": np.int64,
    "view_params": np.float32,
    "view_logits": np.float32,
    "view_features": np.float16,
}
VIEW_DATASETS = ("view_params", "view_logits", "view_features")  # /train only
INTEGER_DATASETS = ("labels", "fold")  # every other split dataset holds floats
# The type each root attr must have once read (`_from_attr`): a cache with `image_size = "twentyeight"` is
# refused when it is opened, not where the value is first used. Numbers are ints or floats, never bools.
ATTR_TYPES: dict[str, type] = {
    "medkd_format": int,
    "image_size": int,
    "n_classes": int,
    "teacher_input_size": int,
    "views": int,
    "cross_fit": int,
    "dataset": str,
    "task": str,
    "teacher": str,
    "backbone": str,
    "weights_sha256": str,
    "resize": str,
    "medkd_version": str,
    "created_utc": str,
    "torch_version": str,
    "label_names": dict,
    "augment": dict,
    "mean": tuple,
    "std": tuple,
}
TYPE_NAMES = {int: "an integer", str: "a string", dict: "a JSON object", tuple: "an array of numbers"}
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
    """The root attrs every cache carries whatever its teacher: versions, creation time and the dataset
    (a custom file's absolute path, with its `dataset_sha256`)."""
    custom = {"dataset_sha256": dataset_sha256(dataset)} if is_custom(dataset) else {}
    return {
        **custom,
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
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    features: dict[str, np.ndarray] | None,
    folds: np.ndarray | None = None,
    views: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """The `splits` argument of `write_cache`: logits and labels per split, features unless None, the
    train images' cross-fit folds unless None, and their views (`view_params`, `view_logits` and
    optionally `view_features`, each (N, K, ·)) unless None."""
    splits = {split: {"logits": logits[split], "labels": labels[split]} for split in SPLITS}
    if features is not None:
        for split in SPLITS:
            splits[split]["features"] = features[split]
    if folds is not None:
        splits["train"]["fold"] = folds
    if views is not None:
        splits["train"].update(views)
    return splits


def write_cache(
    path: str | os.PathLike,
    *,
    attrs: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]],
    split_attrs: dict[str, dict[str, Any]],
    head: dict[str, Any] | None,
    fold_heads: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a format-2 cache to `path` through a temporary file in the same folder, renamed at the end.

    `splits[split]` holds logits (N, C), labels (N, L) and optionally features (N, D); `split_attrs[split]`
    its n and data_sha256; `head` a `medkd.head.head_record` (kind; weight (C, D) and bias (C,), or
    num_heads and state) with the HEAD_ATTRS scalars. With the root attr `cross_fit` K >= 2, `head` holds
    attrs only, `fold_heads` the K fold heads' records and `splits["train"]["fold"]` each image's fold.
    With the root attr `views` K and `augment` a preset's `augment_attr` (default: 1 and none, the plain
    view only), `splits["train"]` also holds `view_params` (N, K, P), `view_logits` (N, K, C) and
    optionally `view_features` (N, K, D).
    The schema is checked before anything is written, by the same rules `TeacherCache` reads with.
    """
    path = Path(path)
    attrs = {"views": 1, "augment": augment_attr("none"), **attrs}
    problem = _write_problem(attrs, splits, split_attrs, head, fold_heads or [])
    if problem:
        raise ValueError(f"refusing to write cache {path}: it {problem}")
    needed = sum(
        np.asarray(a).size * np.dtype(DTYPES[k]).itemsize for s in splits.values() for k, a in s.items()
    )
    fix = (
        "free space (or pass --out on another disk) and rerun; cache-teacher keeps the teacher's outputs in "
        "its partial file, so the rerun does not repeat the teacher pass"
    )
    # Outermost, so atomic_path has removed the temporary file before the error becomes one line.
    with disk_full_is_one_line(path, fix, needed), atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_attrs(f, {"medkd_format": FORMAT_VERSION, **attrs})
        for split in SPLITS:
            group = f.create_group(split)
            _write_split(group, splits[split])
            _write_attrs(group, split_attrs[split])
        if head is not None:
            _write_head(f.create_group("head"), head)
        for k, record in enumerate(fold_heads or []):
            _write_head(f.create_group(f"heads/{k}"), record)
    return path


def is_disk_full(err: BaseException) -> bool:
    """An OSError of a full disk: ENOSPC (h5py passes HDF5's errno on, and names it in the message)."""
    text = str(err)
    return isinstance(err, OSError) and (
        err.errno == errno.ENOSPC or f"errno = {errno.ENOSPC}," in text or "No space left on device" in text
    )


def disk_full_error(path: str | os.PathLike, needed: int | None, fix: str) -> MedkdError:
    """The one line for a full disk while writing `path`: what the write needed (if known), what is free."""
    folder = Path(path).resolve().parent
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes are free"
    except OSError:
        free = "the free space is unknown"
    need = f"it needed about {needed:,} bytes and " if needed else ""
    return MedkdError(f"no space left on the device writing {path}: {need}{free} in {folder}; {fix}")


@contextmanager
def disk_full_is_one_line(path: str | os.PathLike, fix: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into `disk_full_error` (`needed`: the bytes the write takes,
    else what HDF5's message says); any other error passes as it is."""
    try:
        yield
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(path, needed if needed is not None else write_size(err), fix) from err


def write_size(err: OSError) -> int | None:
    """The bytes of the write that failed, when HDF5's message says (`total write size = N`)."""
    found = re.search(r"total write size = (\d+)", str(err))
    return int(found.group(1)) if found else None


def is_medkd_cache(path: str | os.PathLike) -> bool:
    """Whether `path` is an HDF5 file whose root attrs include medkd_format: a medkd cache (perhaps one that
    fails its checks), the only kind of file `cache-teacher --force` replaces."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r", locking=False) as f:
            return "medkd_format" in f.attrs
    except OSError:  # not HDF5, truncated, unreadable: not ours to replace
        return False


def _write_head(group: h5py.Group, record: dict[str, Any]) -> None:
    for name in ("weight", "bias"):
        if name in record:
            group.create_dataset(name, data=np.asarray(record[name], dtype=np.float32))
    for name, array in record.get("state", {}).items():
        group.create_dataset(f"state/{name}", data=np.asarray(array, dtype=np.float32))
    _write_attrs(group, {"kind": "linear", **{k: v for k, v in record.items() if k not in HEAD_ARRAYS}})


def _read_head(group: h5py.Group, load: bool) -> dict[str, Any]:
    """A head group as its record; with `load` False its arrays stay h5py datasets (shapes, no data)."""
    record = {k: _from_attr(v) for k, v in group.attrs.items()}
    for name in ("weight", "bias"):
        if name in group:
            record[name] = group[name][()] if load else group[name]
    if "state" in group:
        record["state"] = {k: d[()] if load else d for k, d in group["state"].items()}
    return record


def _is_number(value: Any, kind: type = int) -> bool:
    """`value` is an int (or, with `kind` float, an int or a float), and not a bool (an int to Python)."""
    allowed = (int,) if kind is int else (int, float)
    return isinstance(value, allowed) and not isinstance(value, bool)


def _attrs_problem(attrs: dict[str, Any]) -> str:
    """What is wrong with the types of the root attrs ("" if nothing); `attrs` as `_from_attr` reads them."""
    for key, kind in ATTR_TYPES.items():
        if key not in attrs:
            continue
        value = attrs[key]
        if kind is int:
            ok = _is_number(value)
        elif kind is tuple:
            ok = isinstance(value, tuple) and len(value) > 0 and all(_is_number(v, float) for v in value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            found = f"{value!r} of the wrong type ({type(value).__name__})"
            return f"has the root attr {key} {found}; expected {TYPE_NAMES[kind]}"
        if kind is int and key != "medkd_format" and value < 1:
            return f"has the root attr {key} {value}; expected a number >= 1"
    return ""


def _split_attrs_problem(split: str, attrs: dict[str, Any]) -> str:
    """What is wrong with one split's attrs ("" if nothing): an integer n >= 1 and a data_sha256 string."""
    if not {"n", "data_sha256"} <= set(attrs):
        return f"lacks the attrs n and data_sha256 of /{split}"
    n, sha = attrs["n"], attrs["data_sha256"]
    if not _is_number(n) or not isinstance(sha, str):
        return (
            f"has the /{split} attrs n {n!r} ({type(n).__name__}) and data_sha256 {sha!r} "
            f"({type(sha).__name__}); expected an integer and a sha256 hex string"
        )
    if n < 1:
        return f"has an empty /{split} (n = {n}); every split needs at least one image"
    return ""


def _dtype_problem(where: str, name: str, data: Any) -> str:
    """What is wrong with the dtype of a split dataset ("" if nothing): integer labels and folds, float
    everything else (float16, 32 or 64; not strings, ints, bools or complex numbers)."""
    dtype = getattr(data, "dtype", None)
    integer = name in INTEGER_DATASETS
    if dtype is None or dtype.kind not in ("iu" if integer else "f"):
        found = f"dtype {dtype}" if dtype is not None else "no dtype (not a dataset)"
        return f"has {where} of {found}; expected {'integers' if integer else 'floats'}"
    return ""


def _storage_problem(where: str, data: h5py.Dataset) -> str:
    """A dataset whose file holds fewer bytes than its shape declares ("" if none): a tiny file claiming
    (10^12, 2) logits is refused before they are read. Compressed (filtered) datasets are not judged."""
    if data.nbytes == 0 or data.id.get_create_plist().get_nfilters():
        return ""
    stored = data.id.get_storage_size()
    if stored < data.nbytes:
        return (
            f"has {where} of shape {data.shape} with {stored:,} of its {data.nbytes:,} bytes stored "
            f"(truncated or never written)"
        )
    return ""


def _finite_problem(where: str, array: np.ndarray) -> str:
    return "" if np.isfinite(array).all() else f"has NaN or inf in {where}"


def _split_problem(split: str, arrays: dict[str, Any], n: int, n_classes: int) -> str:
    """What is wrong with one split's datasets ("" if nothing) from their dtypes and shapes alone (arrays or
    h5py datasets: nothing is read), the rule for writing and reading alike."""
    for name, data in arrays.items():
        problem = _dtype_problem(f"/{split}/{name}", name, data) if name in DTYPES else ""
        if problem:
            return problem
    logits, labels = arrays["logits"], arrays["labels"]
    if (
        tuple(logits.shape) != (n, n_classes)
        or labels.ndim != 2
        or labels.shape[0] != n
        or labels.shape[1] < 1
    ):
        return (
            f"has /{split} logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; expected "
            f"({n}, {n_classes}) and ({n}, L)"
        )
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[0] != n):
        return f"has /{split} features {tuple(features.shape)}; expected ({n}, D)"
    return ""


def _views_problem(attrs: dict[str, Any], train: dict[str, Any], n: int) -> str:
    """What is wrong with the views of a cache ("" if nothing): none stored for the plain view only, else
    (N, K, ·) float view datasets matching the root attrs `views` and `augment`; `train` maps names to arrays
    or h5py datasets (only their dtypes and shapes are read)."""
    k, preset = attrs.get("views", 1), attrs.get("augment", {}).get("preset", "none")
    stored = [name for name in VIEW_DATASETS if name in train]
    if preset == "none" and k == 1:
        return f"has /train/{stored[0]} but root attrs views 1, augment none (no views)" if stored else ""
    if not isinstance(k, int) or k < 1:
        return f"has the root attr views {k!r}; expected a number of views >= 1"
    c, width = attrs["n_classes"], np.shape(train["features"])[1] if "features" in train else None
    expected = {"view_params": (n, k, len(VIEW_COLUMNS)), "view_logits": (n, k, c)}
    if "view_features" in train:
        expected["view_features"] = (n, k, width or np.shape(train["view_features"])[-1])
    for name, shape in expected.items():
        if name not in train or tuple(np.shape(train[name])) != shape:
            found = tuple(np.shape(train[name])) if name in train else "none"
            return f"has /train/{name} {found} for {k} {preset} views; expected {shape}"
        problem = _dtype_problem(f"/train/{name}", name, train[name])
        if problem:
            return problem
    return ""


def _head_problem(record: dict[str, Any], where: str, n_classes: int, width: int | None) -> str:
    """What is wrong with one head record ("" if nothing); `width` is the features' D, if stored."""
    kind = record.get("kind", "linear")  # caches before head kinds hold linear heads
    if kind not in HEADS:
        return f"has a /{where} of kind '{kind}'; known: {', '.join(HEADS)}"
    if kind == "linear":
        if "weight" not in record or "bias" not in record:
            return f"has no /{where}/weight and /{where}/bias"
        weight = np.shape(record["weight"])
        expected = (n_classes, width or weight[-1])
        if weight != expected or np.shape(record["bias"]) != (n_classes,):
            return f"has a /{where} of weight {weight}; expected {expected}"
        return ""
    state = record.get("state", {})
    classifier, query = np.shape(state.get("classifier.weight", ())), np.shape(state.get("query", ()))
    heads = record.get("num_heads")
    if (
        len(classifier) != 2
        or classifier[0] != n_classes
        or query != (1, 1, classifier[1])
        or not isinstance(heads, int)
        or heads < 1
        or classifier[1] % heads
    ):
        return (
            f"has an attention /{where} with classifier {classifier}, query {query} and {heads} heads; "
            f"expected ({n_classes}, D), (1, 1, D) and heads dividing D"
        )
    return ""


def _heads_problem(
    attrs: dict[str, Any],
    head: dict[str, Any] | None,
    fold_heads: list[dict[str, Any]],
    folds: Any,
    n_train: int,
    width: int | None,
) -> str:
    """What is wrong with the heads and folds of a cache ("" if nothing): one head, or K cross-fitted."""
    k, n_classes = attrs.get("cross_fit", 1), attrs["n_classes"]
    if k < 2:
        if fold_heads or folds is not None:
            return "has /heads or /train/fold but no root attr cross_fit >= 2"
        return _head_problem(head, "head", n_classes, width) if head is not None else ""
    if head is None or len(fold_heads) != k:
        return f"has cross_fit {k} but {len(fold_heads)} heads under /heads (and /head {head is not None})"
    if folds is None or np.shape(folds) != (n_train,):
        return f"has cross_fit {k} but no /train/fold of shape ({n_train},)"
    if set(np.unique(np.asarray(folds)).tolist()) != set(range(k)):
        return f"has /train/fold values other than every fold 0..{k - 1}"
    for i, record in enumerate(fold_heads):
        problem = _head_problem(record, f"heads/{i}", n_classes, width)
        if problem:
            return problem
        if record.get("kind", "linear") != head.get("kind", "linear"):
            return (
                f"has a /heads/{i} of kind '{record.get('kind')}' under a /head of kind '{head.get('kind')}'"
            )
    return ""


def _write_problem(
    attrs: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]],
    split_attrs: dict[str, dict[str, Any]],
    head: dict[str, Any] | None,
    fold_heads: list[dict[str, Any]],
) -> str:
    missing = [k for k in ROOT_ATTRS if k != "medkd_format" and k not in attrs]
    if missing:
        return f"lacks the attrs {', '.join(missing)}"
    # The attrs as a reader will see them: lists come back as tuples, dicts from JSON.
    problem = _attrs_problem({k: None if v is None else _from_attr(_to_attr(k, v)) for k, v in attrs.items()})
    if problem:
        return problem
    if set(splits) != set(SPLITS) or set(split_attrs) != set(SPLITS):
        return f"has splits {sorted(splits)}; expected {', '.join(SPLITS)}"
    for split in SPLITS:
        given = {k: _from_attr(v) for k, v in split_attrs[split].items()}
        arrays = {k: np.asarray(v) for k, v in splits[split].items()}
        problem = _split_attrs_problem(split, given) or _split_problem(
            split, arrays, given["n"], attrs["n_classes"]
        )
        if problem:
            return problem
        problem = _finite_problem(f"/{split}/logits", arrays["logits"])
        if problem:
            return problem
    train = splits["train"]
    problem = _views_problem(attrs, train, split_attrs["train"]["n"])
    if not problem and "view_logits" in train:
        problem = _finite_problem("/train/view_logits", np.asarray(train["view_logits"]))
    if problem:
        return problem
    width = np.shape(train["features"])[1] if "features" in train else None
    return _heads_problem(attrs, head, fold_heads, train.get("fold"), split_attrs["train"]["n"], width)


class TeacherCache:
    """A teacher cache read into memory: attrs, per-split logits (float32 tensors) and labels, head attrs
    (and a linear head's weight and bias), the cross-fit folds; `head()` reads the head as a module."""

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
        if version is None:
            raise MedkdError(
                f"{self.path} has no root attr medkd_format: it is not a medkd teacher cache; {MAKE_ONE}"
            )
        if not _is_number(version):
            raise MedkdError(
                f"{self.path} has the root attr medkd_format {version!r} of the wrong type "
                f"({type(version).__name__}); a cache stores its format as an integer (this medkd reads "
                f"{', '.join(map(str, READS))}): rebuild it with `{REBUILD}`"
            )
        if version not in READS:
            raise MedkdError(
                f"{self.path} has cache format {version}; this medkd reads formats "
                f"{', '.join(map(str, READS))}: rebuild it with `{REBUILD}`"
            )
        missing = [k for k in ROOT_ATTRS if k not in self.attrs]
        problem = f"lacks the attrs {', '.join(missing)}" if missing else _attrs_problem(self.attrs)
        if problem:
            raise self._fail(problem)
        self.split_attrs: dict[str, dict[str, Any]] = {}
        self.logits: dict[str, torch.Tensor] = {}
        self.labels: dict[str, np.ndarray] = {}
        self.has_features = True
        for split in SPLITS:
            self._read_split(f, split)
        self._read_views(f)
        logits = {s: t.numpy() for s, t in self.logits.items()}
        self.fingerprint = _fingerprint(self.split_attrs, logits, self._view_arrays(), self.labels)
        # The fingerprint before it counted the labels: the config hashes of runs made before medkd 0.2.
        self.legacy_fingerprint = _fingerprint(self.split_attrs, logits, self._view_arrays())
        self._read_heads(f)

    def _read_split(self, f: h5py.File, split: str) -> None:
        """One split's attrs, logits and labels, checked (dtypes, shapes, stored bytes) before any is read."""
        if split not in f or not {"logits", "labels"} <= set(f[split]):
            raise self._fail(f"has no /{split}/logits or /{split}/labels")
        group = f[split]
        attrs = {k: _from_attr(group.attrs[k]) for k in ("n", "data_sha256") if k in group.attrs}
        datasets = {name: group[name] for name in group if name in DTYPES}
        problem = _split_attrs_problem(split, attrs) or _split_problem(
            split, datasets, attrs.get("n"), self.attrs["n_classes"]
        )
        for name in ("logits", "labels", "fold", "view_params", "view_logits"):  # what is read now
            problem = problem or (_storage_problem(f"/{split}/{name}", group[name]) if name in group else "")
        if problem:
            raise self._fail(problem)
        logits = group["logits"][()].astype(np.float32)
        problem = _finite_problem(f"/{split}/logits", logits)
        if problem:
            raise self._fail(problem)
        self.split_attrs[split] = attrs
        self.logits[split] = torch.from_numpy(logits)
        self.labels[split] = group["labels"][()].astype(np.int64)
        self.has_features &= "features" in group

    def _read_views(self, f: h5py.File) -> None:
        self.attrs.setdefault("views", 1)  # a version-1 cache: the plain view only
        self.attrs.setdefault("augment", augment_attr("none"))
        # Shapes and dtypes from the file first; then the views' params and logits into memory once (the
        # features stay on disk until `view_features()`).
        train = {name: f["train"][name] for name in f["train"]}
        problem = _views_problem(self.attrs, train, self.split_attrs["train"]["n"])
        if problem:
            raise self._fail(problem)
        stored = "view_logits" in train
        self.view_params = self.view_logits = None
        if stored:
            self.view_params = torch.from_numpy(train["view_params"][()].astype(np.float32))  # (N, K, P)
            self.view_logits = torch.from_numpy(train["view_logits"][()].astype(np.float32))  # (N, K, C)
            problem = _finite_problem("/train/view_logits", self.view_logits.numpy())
            if problem:
                raise self._fail(problem)
        self.has_view_features = "view_features" in train

    def _view_arrays(self) -> dict[str, np.ndarray] | None:
        if self.view_logits is None:
            return None
        return {"view_params": self.view_params.numpy(), "view_logits": self.view_logits.numpy()}

    @property
    def views(self) -> int:
        """K, the augmented views stored per training image (0: the plain view only)."""
        return 0 if self.view_logits is None else self.view_logits.shape[1]

    @property
    def augment(self) -> str:
        """The preset of the stored views (`none` for the plain view only)."""
        return self.attrs["augment"].get("preset", "none")

    def view_features(self) -> np.ndarray:
        """The stored float16 features (N, K, D) of every training image's views, read from disk now."""
        with h5py.File(self.path, "r", locking=False) as f:
            if "view_features" not in f["train"]:
                stored = "no views" if self.view_logits is None else "no view features (--no-features)"
                raise MedkdError(f"teacher cache {self.path} stores {stored}")
            return f["train/view_features"][()]

    def view_metrics(self) -> list[dict[str, float]]:
        """`{"auc", "acc"}` of each stored view's logits against the train labels ([] without views)."""
        if self.view_logits is None:
            return []
        return [
            evaluate(self.task, self.labels["train"], scores_from_logits(self.task, view).numpy())
            for view in self.view_logits.unbind(dim=1)
        ]

    def _read_heads(self, f: h5py.File) -> None:
        self.cross_fit = int(self.attrs.get("cross_fit", 1))
        head = _read_head(f["head"], load=False) if "head" in f else None
        names = sorted(f["heads"]) if "heads" in f else []
        if names != sorted(str(k) for k in range(len(names))):
            raise self._fail(f"has /heads {', '.join(names)}; expected 0..{len(names) - 1}")
        fold_heads = [_read_head(f[f"heads/{k}"], load=False) for k in range(len(names))]
        folds = f["train/fold"] if "fold" in f["train"] else None
        width = f["train/features"].shape[1] if "features" in f["train"] else None
        problem = _heads_problem(self.attrs, head, fold_heads, folds, self.split_attrs["train"]["n"], width)
        if problem:
            raise self._fail(problem)
        self.folds = folds[()].astype(np.int64) if folds is not None else None  # (N_train,) or None
        self.head_attrs = {k: v for k, v in head.items() if k not in HEAD_ARRAYS} if head else None
        self.fold_head_attrs = [{k: v for k, v in r.items() if k not in HEAD_ARRAYS} for r in fold_heads]
        linear = head is not None and "weight" in head
        self.head_weight = torch.from_numpy(head["weight"][()]) if linear else None  # (C, D)
        self.head_bias = torch.from_numpy(head["bias"][()]) if linear else None  # (C,)

    @property
    def task(self) -> str:
        return self.attrs["task"]

    @property
    def head_kind(self) -> str | None:
        """`linear` (also for caches from before head kinds), `attention`, or None without a head."""
        return None if self.head_attrs is None else self.head_attrs.get("kind", "linear")

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
            "head": self.head_kind,
            "cross_fit": self.cross_fit,
            "views": self.views,
            "augment": self.augment,
            "test_auc": test["auc"],
            "test_acc": test["acc"],
            # The teacher's calibration on the images the student is tested on (from the cached logits).
            "test_ece": test["ece"],
            "test_brier": test["brier"],
        }

    def head(self) -> torch.nn.Module | None:
        """The stored head as a frozen module, or None if the cache has none: an nn.Linear on the features,
        a `medkd.head.AttentionHead` on the patch tokens; with cross-fitting the mean of the K fold heads,
        which gives the val/test logits (a train image's come from its fold's head, `fold_heads()`)."""
        if self.head_attrs is None:
            return None
        if self.cross_fit >= 2:
            return MeanHead(self.fold_heads())
        if self.head_weight is not None:
            return head_from_record({"weight": self.head_weight, "bias": self.head_bias})
        with h5py.File(self.path, "r", locking=False) as f:
            return head_from_record(_read_head(f["head"], load=True))

    def fold_heads(self) -> list[torch.nn.Module]:
        """The K cross-fitted heads (`/heads/k`, trained without fold k), read now; [] without folds."""
        if not self.fold_head_attrs:
            return []
        with h5py.File(self.path, "r", locking=False) as f:
            return [
                head_from_record(_read_head(f[f"heads/{k}"], load=True))
                for k in range(len(self.fold_head_attrs))
            ]

    def kept_tokens(self) -> Path | None:
        """The patch tokens kept beside this cache (`--keep-tokens`, `tokens_path`), if they are its own."""
        path = tokens_path(self.path)
        try:
            with h5py.File(path, "r", locking=False) as f:
                # Tokens kept before the fingerprint counted the labels carry the legacy one.
                ours = _from_attr(f.attrs.get("cache_fingerprint", "")) in (
                    self.fingerprint,
                    self.legacy_fingerprint,
                )
        except OSError:  # absent, or not HDF5
            return None
        return path if ours else None

    def teacher_metrics(self, split: str) -> dict[str, float]:
        """`{"auc", "acc"}` of the stored logits against the stored labels (train: out-of-fold when
        cross-fitted)."""
        scores = scores_from_logits(self.task, self.logits[split]).numpy()
        return evaluate(self.task, self.labels[split], scores)

    def chance_metrics(self, split: str) -> dict[str, float]:
        """`chance_metrics` of the split's labels: what a teacher that learnt nothing scores."""
        return chance_metrics(self.task, self.labels[split])

    def check_data(self, flag: str, size: int, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Refuse data other than the cache was built from: flag, size, each split's n and data_sha256; and
        labels stored in the cache other than the data's (the sha256 hashes the data's labels, not the
        cache's)."""
        built = f"{self.attrs['dataset']} ({self.attrs['image_size']} px)"
        rebuild = (
            f"rebuild it with `medkd cache-teacher --dataset {flag} --size {size} "
            f"--teacher {self.attrs['teacher']} --force`"
        )
        if not same_dataset(self.attrs["dataset"], flag) or int(self.attrs["image_size"]) != int(size):
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
            differ = _labels_differ(self.labels[split], labels)
            if differ:
                raise MedkdError(
                    f"cache {self.path} holds {split} labels other than the data's ({differ}), so its "
                    f"{split} metrics and targets would be wrong: {rebuild}"
                )


def data_difference(a: TeacherCache, b: TeacherCache) -> str:
    """What differs between the data two caches were built from ("" when they describe the same data):
    dataset, size, task, classes, or a split's size or data sha256."""
    if not same_dataset(a.attrs["dataset"], b.attrs["dataset"]):  # two custom paths: the hashes decide
        return f"dataset {a.attrs['dataset']} vs {b.attrs['dataset']}"
    for key in ("image_size", "task", "n_classes"):
        if a.attrs.get(key) != b.attrs.get(key):
            return f"{key} {a.attrs.get(key)} vs {b.attrs.get(key)}"
    for split in SPLITS:
        mine, theirs = a.split_attrs[split], b.split_attrs[split]
        if mine["n"] != theirs["n"]:
            return f"{split} n={mine['n']} vs n={theirs['n']}"
        if mine["data_sha256"] != theirs["data_sha256"]:
            return f"{split} data sha256 {mine['data_sha256'][:12]}… vs {theirs['data_sha256'][:12]}…"
        differ = _labels_differ(a.labels[split], b.labels[split])
        if differ:
            return f"{split} labels ({differ})"
    return ""


def _labels_differ(stored: np.ndarray, given: np.ndarray) -> str:
    """How two (N, L) label arrays differ ("" if they are equal): `k of N images differ`, or their shapes."""
    stored, given = np.asarray(stored), np.asarray(given)
    if stored.size != given.size or len(stored) != len(given):
        return f"shape {stored.shape} vs {given.shape}"
    rows = (stored.reshape(len(stored), -1) != given.reshape(len(given), -1)).any(axis=1)  # (N,)
    return f"{int(rows.sum())} of {len(rows)} images differ" if rows.any() else ""


def chance_metrics(task: str, labels: np.ndarray) -> dict[str, float]:
    """What a teacher that learnt nothing scores on (N, L) labels: AUC 0.5, and the ACC of always predicting
    the split's majority class (multi-label: the mean over labels of each label's majority rate)."""
    labels = np.asarray(labels)
    if is_multilabel(task):
        rate = labels.mean(axis=0)  # (L,) positives per label
        return {"auc": 0.5, "acc": float(np.mean(np.maximum(rate, 1 - rate)))}
    return {"auc": 0.5, "acc": float(np.bincount(labels.reshape(-1)).max() / labels.size)}


def _fingerprint(
    split_attrs: dict[str, dict[str, Any]],
    logits: dict[str, Any],
    views: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
) -> str:
    # What a student run reads from a cache: the data it was built from, the logits, the labels and the
    # views; not its path, name or creation time, so a copy (or an identical rebuild) is the same cache.
    # Without `labels` it is the legacy fingerprint (medkd before 0.2 ignored the labels); without views both
    # hash as a format-1 cache did.
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split_attrs[split]["data_sha256"].encode())
        digest.update(np.ascontiguousarray(logits[split], dtype=np.float32).tobytes())
        if labels is not None:
            digest.update(np.ascontiguousarray(labels[split], dtype=np.int64).tobytes())
    for name in ("view_params", "view_logits") if views is not None else ():
        digest.update(np.ascontiguousarray(views[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def cache_fingerprint(path: str | os.PathLike, legacy: bool = False) -> str:
    """`TeacherCache(path).fingerprint` (`legacy`: its `legacy_fingerprint`), remembered per file version
    (a sweep asks per trial); a file that is not a readable cache gets TeacherCache's one-line error."""
    path = Path(path)
    if not path.is_file():
        raise MedkdError(f"teacher cache {path} not found; {MAKE_ONE}")
    stat = path.stat()
    current, old = _cached_fingerprints(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return old if legacy else current


@functools.lru_cache(maxsize=16)
def _cached_fingerprints(path: str, _mtime_ns: int, _size: int) -> tuple[str, str]:
    # Through the reader, so a fingerprint is only ever taken of a cache that passes its checks.
    cache = TeacherCache(path)
    return cache.fingerprint, cache.legacy_fingerprint


def joint_fingerprint(prints: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """What a run's config hash counts of its caches' fingerprints: the one, a tuple of several (the hash
    sorts them), None without a cache."""
    if not prints:
        return None
    return prints[0] if len(prints) == 1 else prints


def run_fingerprint(
    cache: str | tuple[str, ...] | None, legacy: bool = False
) -> str | tuple[str, ...] | None:
    """`joint_fingerprint` of the caches a `cache` config value names, read from their files (`legacy`:
    of their legacy fingerprints, what runs made before the fingerprint counted the labels hashed)."""
    return joint_fingerprint(tuple(cache_fingerprint(path, legacy) for path in cache_paths(cache)))


def tokens_path(out: str | os.PathLike) -> Path:
    """Where `--keep-tokens` keeps the patch tokens: `<cache stem>.tokens.h5` beside the cache."""
    out = Path(out)
    return out.with_name(f"{out.stem}.tokens.h5")
