"""`medkd import`: the user's own images as a MedMNIST-format `.npz`, with its facts in `NAME.json` beside it.

SOURCE is a folder in torchvision's ImageFolder layout (`SOURCE/<class>/<image>`, optionally under
`SOURCE/train|val|test/`), or a CSV/TSV with a path column, labels (one `label` column, `a|b` for several;
or one 0/1 column per label) and an optional `split` column. Splits that are not given are drawn out of
train with `numpy.random.default_rng(seed)`, stratified: each class gives each split its share, rounded,
and at least one image (multi-label images are stratified by their rarest label). Everything is read and
checked before the first byte is written; both files are written under temporary names and renamed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import medkd
from medkd.datasets import CUSTOM_FORMAT, MULTILABEL, SPLITS, TASKS, facts_path
from medkd.errors import MedkdError
from medkd.files import atomic_path, write_json
from medkd.image_files import decode_image, is_colour, resize_square, to_channels
from medkd.image_sources import Label, Source, collect_source


@dataclass(frozen=True)
class Imported:
    """What `import_dataset` wrote: the `.npz`, its facts file and the facts themselves."""

    path: Path
    facts: Path
    info: dict[str, Any]

    def summary(self) -> str:
        """One line for the CLI: counts per split, the classes, the task."""
        info, n = self.info, self.info["n_samples"]
        names = ", ".join(info["label"].values())
        return (
            f"{self.path}: {n['train']}/{n['val']}/{n['test']} train/val/test images, {info['task']}, "
            f"{len(info['label'])} {'labels' if info['task'] == MULTILABEL else 'classes'} ({names}), "
            f"{info['n_channels']} channel(s), {info['size']} px"
        )


def import_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 28,
    split: tuple[float, float, float] | str = (0.7, 0.1, 0.2),
    seed: int = 0,
    task: str | None = None,
    channels: int | str = "auto",
    force: bool = False,
) -> Imported:
    """Read SOURCE's images and labels, split them, and write `out` (.npz) and `out.json`."""
    source, out = Path(source).expanduser().resolve(), Path(out).expanduser()
    ratios, n_channels = _check_ratios(split), _check_channels(channels)
    if int(size) != size or size < 1:
        raise MedkdError(f"--size must be a positive whole number of pixels, not {size}")
    if task is not None and task not in TASKS:
        raise MedkdError(f"unknown task '{task}'; valid: {', '.join(TASKS)}")
    _check_out(out, force)
    found = collect_source(source)
    task, names, labels = _resolve_labels(found, task)
    splits, split_rule = _assign_splits(found, labels, names, ratios, seed)
    images, facts = _read_splits(found, splits, int(size), n_channels)
    arrays = {}
    for name in SPLITS:
        arrays[f"{name}_images"] = images[name]
        arrays[f"{name}_labels"] = _label_array([labels[i] for i in splits[name]], names, task)
    info = {
        "medkd_dataset": CUSTOM_FORMAT,
        "python_class": None,
        "description": f"{len(found.items)} images of {source.name} ({found.kind}), imported by medkd",
        "task": task,
        "label": {str(i): name for i, name in enumerate(names)},
        "n_channels": facts["channels"],
        "n_samples": {name: len(splits[name]) for name in SPLITS},
        "size": int(size),
        "source": str(source),
        "source_kind": found.kind,
        "split_rule": split_rule,
        "resize": f"PIL bicubic to {size}x{size} ({facts['resized']} resized)",
        "bit_depth": facts["bit_depth"],
        "medkd_version": medkd.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # a file object: given a name, numpy would append ".npz"
    write_json(facts_path(out), info)
    return Imported(out, facts_path(out), info)


# ---------------------------------------------------------------- arguments


def _check_ratios(split: tuple[float, float, float] | str) -> tuple[float, float, float]:
    text = split if isinstance(split, str) else ",".join(map(str, split))
    problem = (
        f"--split takes three positive ratios train,val,test that sum to 1, like 0.7,0.1,0.2; got '{text}'"
    )
    try:
        ratios = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise MedkdError(problem) from None
    if len(ratios) != 3 or not all(math.isfinite(r) and r > 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise MedkdError(problem)
    return ratios


def _check_channels(channels: int | str) -> int | None:
    value = str(channels).strip().lower()
    if value not in ("auto", "1", "3"):
        raise MedkdError(f"--channels must be auto, 1 or 3, not '{channels}'")
    return None if value == "auto" else int(value)


def _check_out(out: Path, force: bool) -> None:
    if out.suffix.lower() != ".npz":
        raise MedkdError(f"--out {out} must end in .npz (its facts go to {out.stem}.json beside it)")
    if not out.parent.is_dir():
        raise MedkdError(f"--out {out}: folder {out.parent} does not exist; create it or --out elsewhere")
    for path in (out, facts_path(out)):
        if path.is_dir():
            raise MedkdError(f"{path} is a folder; give --out a .npz file name")
        if path.exists() and not force:
            raise MedkdError(f"{path} already exists; pass --force to replace it, or --out elsewhere")


# ---------------------------------------------------------------- labels and task


def _resolve_labels(found: Source, task: str | None) -> tuple[str, list[str], list[Label]]:
    """The task, the class (or label) names in index order, and each item's label in its final form."""
    raw = [item.label for item in found.items]
    as_sets = task == MULTILABEL or any(isinstance(r, frozenset) or "|" in r for r in raw)
    if as_sets:
        if task not in (None, MULTILABEL):
            raise MedkdError(
                f"--task {task} takes one label per image, but these labels are sets (a|b or 0/1 columns); "
                f"use --task '{MULTILABEL}', or omit --task"
            )
        labels: list[Label] = [
            r if isinstance(r, frozenset) else frozenset(p.strip() for p in r.split("|") if p.strip())
            for r in raw
        ]
        names = found.label_names or sorted(set().union(*labels))
        if not names:
            raise MedkdError("no image has a label; a multi-label image lists its labels as a|b")
        return MULTILABEL, names, labels
    for item in found.items:
        if not item.label:
            raise MedkdError(
                f"{item.path} has an empty label; give every image a class (or a|b labels, empty for none, "
                f"with --task '{MULTILABEL}')"
            )
    names = sorted(set(raw))
    if task == "ordinal-regression" and all(_is_number(n) for n in names):
        names.sort(key=float)  # grades 0 … 10 in their order, not "10" before "2"
    if len(names) < 2:
        raise MedkdError(f"only one class ('{names[0]}') found; a classifier needs at least 2")
    if task == "binary-class" and len(names) != 2:
        raise MedkdError(
            f"--task binary-class needs exactly 2 classes; found {len(names)} ({', '.join(names)})"
        )
    return task or ("binary-class" if len(names) == 2 else "multi-class"), names, raw


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _label_array(labels: list[Label], names: list[str], task: str) -> np.ndarray:
    # uint8 as MedMNIST stores labels; medkd's loader casts to int64.
    dtype = np.uint8 if len(names) <= 256 else np.int64
    if task == MULTILABEL:
        array = np.zeros((len(labels), len(names)), dtype)
        for row, label in zip(array, labels, strict=True):
            row[[names.index(n) for n in label]] = 1
        return array
    index = {name: i for i, name in enumerate(names)}
    return np.array([[index[label]] for label in labels], dtype).reshape(-1, 1)


# ---------------------------------------------------------------- splits


def _strata(labels: list[Label], names: list[str]) -> list[str]:
    """Each image's stratum: its class, or for multi-label its rarest label ("" for none)."""
    if not labels or not isinstance(labels[0], frozenset):
        return [str(label) for label in labels]
    counts = {name: sum(name in label for label in labels) for name in names}
    return [min(label, key=lambda n: (counts[n], names.index(n))) if label else "" for label in labels]


def _assign_splits(
    found: Source, labels: list[Label], names: list[str], ratios: tuple[float, float, float], seed: int
) -> tuple[dict[str, list[int]], str]:
    """Item indices per split (in path order) and the sidecar's `split_rule`."""
    given = [s for s in SPLITS if any(item.split == s for item in found.items)]
    if given and "train" not in given:
        raise MedkdError(
            f"{'/'.join(given)} given but no train split; give train images too (the missing splits are "
            f"carved out of train)"
        )
    multilabel = bool(labels) and isinstance(labels[0], frozenset)
    if not multilabel and len(given) > 1:
        _check_presence(found, labels, given)
    if len(given) == len(SPLITS):
        rule = "train/val/test folders" if found.kind == "folder" else "csv split column"
        return {s: [i for i, item in enumerate(found.items) if item.split == s] for s in SPLITS}, rule
    missing = [s for s in SPLITS[1:] if s not in given]  # drawn out of the train pool
    share = dict(zip(SPLITS, ratios, strict=True))
    pool = [i for i, item in enumerate(found.items) if item.split in (None, "train")]
    base = share["train"] + sum(share[s] for s in missing)  # the share of the whole that the pool is
    strata = _strata(labels, names)
    if not multilabel:
        _check_stratifiable(pool, strata, missing, given)
    carved = _carve(pool, strata, {s: share[s] / base for s in missing}, seed, pool_small=multilabel)
    splits = {s: [i for i, item in enumerate(found.items) if item.split == s] for s in given}
    splits.update(carved)
    splits = {s: sorted(splits[s]) for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            raise MedkdError(f"the {s} split would be empty ({len(pool)} images to split); add images")
    if given:
        rule = f"given {'/'.join(given)}; {'/'.join(missing)} carved from train, stratified, seed {seed}"
    else:
        rule = f"stratified {'/'.join(f'{r:g}' for r in ratios)}, seed {seed}"
    return splits, rule


def _carve(
    pool: list[int], strata: list[str], fractions: dict[str, float], seed: int, pool_small: bool
) -> dict[str, list[int]]:
    """Split `pool` by stratum: each stratum gives round(n · fraction) images to each split, at least one,
    and keeps the rest (at least one) as train. Strata too small for that are drawn together when
    `pool_small` (multi-label: a label's rarest-label stratum may be tiny), else `_carve` is not called."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], **{s: [] for s in fractions}}
    by_stratum: dict[str, list[int]] = {}
    for i in pool:
        by_stratum.setdefault(strata[i], []).append(i)
    leftovers: list[int] = []
    for key in sorted(by_stratum):
        members = by_stratum[key]
        if pool_small and len(members) < len(fractions) + 1:
            leftovers += members
            continue
        _deal(rng.permutation(members).tolist(), fractions, out, at_least_one=True)
    if leftovers:
        _deal(rng.permutation(leftovers).tolist(), fractions, out, at_least_one=False)
    return out


def _deal(
    members: list[int], fractions: dict[str, float], out: dict[str, list[int]], at_least_one: bool
) -> None:
    n = len(members)
    counts = {s: math.floor(n * f + 0.5) for s, f in fractions.items()}
    if at_least_one:
        counts = {s: max(1, c) for s, c in counts.items()}
    while sum(counts.values()) > n - at_least_one:  # train keeps at least one
        largest = max(counts, key=lambda s: counts[s])
        counts[largest] -= 1
    start = 0
    for s, c in counts.items():
        out[s] += members[start : start + c]
        start += c
    out["train"] += members[start:]


def _check_stratifiable(pool: list[int], strata: list[str], missing: list[str], given: list[str]) -> None:
    needed = len(missing) + 1
    counts: dict[str, int] = {}
    for i in pool:
        counts[strata[i]] = counts.get(strata[i], 0) + 1
    for name, n in sorted(counts.items()):
        if n < needed:
            where, what = (
                (" in train", f"carving {'/'.join(missing)} from train") if given else ("", "a split")
            )
            raise MedkdError(
                f"class '{name}' has {n} image(s){where}; {what}, stratified, needs at least {needed} of "
                f"each class (add images of '{name}', or give the splits yourself)"
            )


def _check_presence(found: Source, labels: list[Label], given: list[str]) -> None:
    """Each class of the given splits has train images and appears in more than one of them."""
    present: dict[str, list[str]] = {}
    for s in given:
        for name in dict.fromkeys(
            str(label) for item, label in zip(found.items, labels, strict=True) if item.split == s
        ):
            present.setdefault(name, []).append(s)
    for name, where in sorted(present.items()):
        others = "/".join(s for s in given if s not in where)
        if len(where) == 1:
            raise MedkdError(
                f"class '{name}' has images only in {where[0]} (none in {others}); move some of them there"
            )
        if "train" not in where:
            raise MedkdError(
                f"class '{name}' has no train images (only {'/'.join(where)}); move some to train"
            )


# ---------------------------------------------------------------- reading the images


def _read_splits(
    found: Source, splits: dict[str, list[int]], size: int, channels: int | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """uint8 images per split at `size` px, and the facts for the sidecar (channels, resized, bit depth).

    With channels auto, each image is resized in its own channels and converted once the dataset's are
    known (3 if any is colour): resizing commutes with both conversions for images that are not colour.
    """
    decoded: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    resized, depths, colour = 0, set(), False
    for s in SPLITS:
        for i in splits[s]:
            image = decode_image(found.items[i].path)
            resized += image.array.shape[:2] != (size, size)
            depths.add(image.depth)
            array = resize_square(to_channels(image.array, channels), size)
            colour = colour or (channels is None and is_colour(image.array))
            decoded[s].append(array)
    final = channels or (3 if colour else 1)
    images = {s: np.stack([to_channels(a, final) for a in decoded[s]]) for s in SPLITS}
    return images, {"channels": final, "resized": resized, "bit_depth": _bit_depth(depths)}


def _bit_depth(depths: set[str]) -> str:
    notes = {
        "16-bit": "16-bit scaled to 8 by round(v/257)",
        "float": "float scaled to 8-bit (clipped to [0, 1], or divided by the maximum above 1)",
        "dicom": "DICOM rescaled, then windowed (first WindowCenter/WindowWidth, else min-max) to 8-bit",
    }
    return "; ".join(notes[d] for d in notes if d in depths) or "8-bit"
