"""Dataset facts: the official MedMNIST flags (from `medmnist.INFO`) and the user's own `.npz` files.

A dataset is named by a string: one of the 2D flags (`breastmnist`), or a path to a MedMNIST-format
`.npz` (`medkd import` writes one with `NAME.json` beside it). Either way `dataset_info` answers with the
keys of `medmnist.INFO` that medkd reads (`task`, `label`, `n_channels`, `n_samples`), so everything
after loading treats both alike. Torch- and numpy-free at import (the CLI and the configs use it; numpy
comes in only to read a file).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from medkd.errors import MedkdError
from medkd.files import file_md5, file_sha256

MULTILABEL = "multi-label, binary-class"
TASKS = ("multi-class", "binary-class", "ordinal-regression", MULTILABEL)
SPLITS = ("train", "val", "test")
MEMBERS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))  # what is read
CUSTOM_FORMAT = 1  # `medkd_dataset` of the NAME.json that `medkd import` writes
MAKE_CUSTOM = "make one with `medkd import SOURCE --out NAME.npz`"


def _info() -> dict:
    # medmnist's import creates ~/.medmnist; import it only when dataset facts are needed.
    from medmnist import INFO

    return INFO


def flags_2d() -> list[str]:
    """The 2D MedMNIST flags (the 3D volumes are out of scope)."""
    return [flag for flag in _info() if not flag.endswith("3d")]


def is_custom(dataset: str) -> bool:
    """Whether `dataset` names a file of the user's (a path ending in .npz), not an official flag."""
    return str(dataset).lower().endswith(".npz")


def dataset_name(dataset: str) -> str:
    """The short name for file names and tables: the flag, or a custom file's stem."""
    return Path(dataset).stem if is_custom(dataset) else dataset


def locate_dataset(dataset: str, root: str | os.PathLike | None = None) -> str:
    """A flag as it is; a custom path made absolute: as given (relative to the working folder), else
    inside `root` (`--data-dir`, where `medkd datasets` lists it). Caches and runs record this path."""
    if not is_custom(dataset):
        return dataset
    path = Path(dataset).expanduser()
    if not path.is_absolute() and not path.exists():
        inside = data_root(root) / path
        if inside.exists():
            path = inside
    return str(path.resolve())


def dataset_info(dataset: str) -> dict:
    """`medmnist.INFO[flag]`, or a custom file's facts (`custom_info`); else a one-line error."""
    if is_custom(dataset):
        return custom_info(locate_dataset(dataset))
    if dataset not in flags_2d():
        raise MedkdError(
            f"unknown dataset flag '{dataset}'; valid: {', '.join(flags_2d())}, or a path to a "
            f"MedMNIST-format .npz ({MAKE_CUSTOM})"
        )
    return _info()[dataset]


def check_members(path: str | os.PathLike, shapes: dict) -> None:
    """Refuse an .npz (`shapes`: `mapped.member_shapes`) without one of MedMNIST's six arrays."""
    missing = [key for key in MEMBERS if key not in shapes]
    if missing:
        raise MedkdError(
            f"{path}: missing key '{missing[0]}' (a MedMNIST file has train/val/test _images and _labels; "
            f"found {', '.join(sorted(shapes))})"
        )


def missing_dataset(path: Path) -> MedkdError:
    """The one line for a custom dataset file that is not there."""
    return MedkdError(
        f"dataset {path} not found; make one with `medkd import SOURCE --out {path.name}`, or give the path "
        f"to an existing MedMNIST-format .npz"
    )


def facts_path(path: str | os.PathLike) -> Path:
    """Where a custom dataset's facts live: `NAME.json` beside `NAME.npz`."""
    return Path(path).with_suffix(".json")


def custom_info(path: str | os.PathLike) -> dict:
    """The facts of a custom `.npz`: its `NAME.json`, else inferred from the file with a printed note."""
    path = Path(path)
    facts = facts_path(path)
    if facts.is_file():
        return dict(_read_facts(str(facts), facts.stat().st_mtime_ns))
    if not path.is_file():
        raise missing_dataset(path)
    info, note = _inferred_info(str(path), path.stat().st_mtime_ns)
    _note_once(note)
    return dict(info)


@functools.lru_cache(maxsize=64)
def _read_facts(facts: str, _mtime_ns: int) -> dict:
    try:
        info = json.loads(Path(facts).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MedkdError(
            f"{facts} is not readable JSON ({err}); fix it, or delete it to infer the facts"
        ) from err
    if not isinstance(info, dict):
        raise MedkdError(f"{facts} holds no JSON object; {MAKE_CUSTOM}")
    problems = [
        info.get("task") not in TASKS and f"task {info.get('task')!r} is not one of {', '.join(TASKS)}",
        not (isinstance(info.get("label"), dict) and info["label"]) and "label must map '0', '1', … to names",
        info.get("n_channels") not in (1, 3) and f"n_channels {info.get('n_channels')!r} is not 1 or 3",
    ]
    problem = next((p for p in problems if p), None)
    if problem:
        raise MedkdError(f"{facts}: {problem}; {MAKE_CUSTOM}, or fix the file")
    if sorted(info["label"], key=int) != [str(i) for i in range(len(info["label"]))]:
        raise MedkdError(f"{facts}: label keys must be '0' … '{len(info['label']) - 1}'")
    return info


@functools.lru_cache(maxsize=64)
def _inferred_info(path: str, _mtime_ns: int) -> tuple[dict, str]:
    """Task, labels and channels from the arrays themselves: several label columns are multi-label, one
    column with two values binary-class, more multi-class (ordinal regression cannot be told apart)."""
    import numpy as np

    from medkd.mapped import member_shapes

    shapes = member_shapes(path)
    check_members(path, shapes)
    image_shape = shapes["train_images"][0]
    with np.load(path) as npz:  # only the label members are decompressed
        labels = [npz[f"{s}_labels"] for s in SPLITS]
    columns = labels[0].shape[1] if labels[0].ndim == 2 else 1
    if columns > 1:
        task, n = MULTILABEL, columns
    else:
        n = int(max(int(lab.max(initial=0)) for lab in labels)) + 1
        task = "binary-class" if n <= 2 else "multi-class"
        n = max(n, 2)
    info = {
        "task": task,
        "label": {str(i): str(i) for i in range(n)},
        "n_channels": 3 if len(image_shape) == 4 else 1,
        "n_samples": {s: int(shapes[f"{s}_images"][0][0]) for s in SPLITS},
        "size": int(image_shape[1]),
        "description": f"custom dataset {Path(path).name} (facts inferred)",
    }
    note = (
        f"note: {facts_path(path).name} not found beside {path}; inferred {task} with {n} "
        f"{'labels' if task == MULTILABEL else 'classes'} and {info['n_channels']} channel(s) from the "
        f"arrays (labels are named by their index); `medkd import` writes it with names"
    )
    return info, note


@functools.lru_cache(maxsize=64)
def _note_once(note: str) -> None:
    print(note, file=sys.stderr)


def dataset_size(dataset: str, root: str | os.PathLike | None = None) -> int:
    """The image size of a custom file (its images are square; the npz header says, nothing decompressed)."""
    path = Path(locate_dataset(dataset, root))
    if not path.is_file():
        raise missing_dataset(path)
    from medkd.mapped import member_shapes

    shapes = member_shapes(path)
    if "train_images" not in shapes or len(shapes["train_images"][0]) < 3:
        raise MedkdError(f"{path} has no train_images array of (N, S, S[, 3]) images; {MAKE_CUSTOM}")
    return int(shapes["train_images"][0][1])


def dataset_sha256(dataset: str) -> str | None:
    """sha256 of a custom file's bytes (recorded by caches and runs; None for a flag, whose files
    MedMNIST fingerprints with its MD5s)."""
    if not is_custom(dataset):
        return None
    path = Path(dataset)
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, _mtime_ns: int, _size: int) -> str:
    # One read per file version and process: distill checks it, then records it in result.json.
    return file_sha256(path)


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset names can describe the same data: equal flags, or two custom files (whose
    contents the split hashes then compare: a copied or moved file is the same data)."""
    if is_custom(a) and is_custom(b):
        return True
    return a == b


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where .npz files live: `root`, else `$MEDKD_DATA`, else medmnist's default root."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("MEDKD_DATA"):
        return Path(os.environ["MEDKD_DATA"]).expanduser()
    from medmnist.info import DEFAULT_ROOT

    return Path(DEFAULT_ROOT)


def npz_name(flag: str, size: int) -> str:
    """The official file name: `breastmnist.npz` at 28 px, `breastmnist_64.npz` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def sizes_offered(flag: str) -> list[int]:
    """Image sizes MedMNIST(+) publishes for `flag`: 28 and every `url_<size>` in INFO."""
    info = dataset_info(flag)
    return [28] + sorted(int(k.split("_")[1]) for k in info if k.startswith("url_"))


def check_size(flag: str, size: int) -> None:
    offered = sizes_offered(flag)
    if size not in offered:
        raise MedkdError(f"size {size} is not offered for '{flag}'; valid: {', '.join(map(str, offered))}")


def local_status(flag: str, root: str | os.PathLike | None = None, verify: bool = False) -> dict[int, str]:
    """For each size offered, whether its file is present in `root` ("present", "md5 ok", "MD5 MISMATCH")."""
    folder, info, status = data_root(root), dataset_info(flag), {}
    for size in sizes_offered(flag):
        path = folder / npz_name(flag, size)
        if not path.is_file():
            continue
        if not verify:
            status[size] = "present"
            continue
        expected = info["MD5"] if size == 28 else info[f"MD5_{size}"]
        status[size] = "md5 ok" if file_md5(path) == expected else "MD5 MISMATCH"
    return status


def custom_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The `.npz` files in `root` that are not official MedMNIST files (`medkd datasets` lists them)."""
    folder = data_root(root)
    if not folder.is_dir():
        return []
    official = {npz_name(flag, size) for flag in flags_2d() for size in sizes_offered(flag)}
    return sorted(p for p in folder.glob("*.npz") if p.name not in official)
