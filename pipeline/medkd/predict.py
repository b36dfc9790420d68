"""`medkd predict`: class probabilities for new images, from a run folder or from an exported ONNX model.

Both take what a deployed model takes (`medkd.deploy`): images at the data's size, [0, 1], gray or RGB as
the dataset is; the preprocessing is inside the model, so a run folder and its export agree to 1e-6.
Images come from a MedMNIST-format `.npz` (one split), a folder of image files (PNG, JPEG, TIFF, BMP,
DICOM; searched recursively, sorted), or one image file, read by `medkd.image_files`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from medkd.data import SPLITS, is_multilabel
from medkd.deploy import (
    batched_logits,
    deployed_student,
    label_names,
    model_input,
    onnx_caller,
    onnx_session,
    sidecar_path,
    torch_caller,
)
from medkd.errors import MedkdError
from medkd.files import atomic_path
from medkd.image_files import IMAGE_SUFFIXES, decode_image, resize_square, to_channels
from medkd.metrics import scores_from_logits
from medkd.runs import RESULT
from medkd.trained import load_trained_run

MULTILABEL_THRESHOLD = 0.5  # a label is predicted when its sigmoid score reaches this


@dataclass(frozen=True)
class Predictor:
    """A model that maps float32 (B, C, H, W) images in [0, 1] at `size` px to logits, and what it means."""

    call: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    task: str
    channels: int  # 1 gray, 3 RGB
    size: int  # the data's size: the model's input
    batch: int | None  # a fixed batch size of an exported model, None for any
    source: str

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (N, K): softmax, or a sigmoid per label for multi-label tasks."""
        logits = torch.from_numpy(batched_logits(self.call, x, self.batch))
        return scores_from_logits(self.task, logits).numpy()


def load_predictor(source: str | os.PathLike, threads: int | None = None) -> Predictor:
    """A run folder (its `best.pt`) or an exported `.onnx` file with its medkd sidecar JSON."""
    path = Path(source)
    if path.is_dir():
        run = load_trained_run(path)
        module = deployed_student(run)
        channels, r = module.channels, run.result
        if threads:
            torch.set_num_threads(threads)
        return Predictor(
            torch_caller(module), label_names(r.dataset), r.task, channels, int(r.size), None, str(path)
        )
    if path.is_file() and path.suffix == ".onnx":
        meta = _sidecar(path)
        shape = meta["input"]["shape"]
        batch = shape[0] if isinstance(shape[0], int) else None
        call = onnx_caller(onnx_session(path, threads))
        return Predictor(
            call, list(meta["classes"]), meta["task"], int(shape[1]), int(shape[2]), batch, str(path)
        )
    raise MedkdError(
        f"{source} is neither a run folder (with {RESULT}) nor an exported .onnx model; give a run folder "
        f"or the file `medkd export` wrote"
    )


def _sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
        _ = meta["medkd_export"], meta["classes"], meta["task"], meta["input"]["shape"]
    except FileNotFoundError:
        raise MedkdError(
            f"{path} has no sidecar {side.name} beside it (classes, task, input size); export it with "
            f"`medkd export RUN` or put the sidecar back"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise MedkdError(
            f"{side} is not a medkd export sidecar (missing {err}); re-export the model"
        ) from err
    return meta


# ---------------------------------------------------------------- reading images


@dataclass(frozen=True)
class Images:
    names: list[str]  # file paths, or npz indices as strings
    images: np.ndarray  # uint8 (N, H, W) or (N, H, W, 3) at the model's size
    key: str  # the CSV's first column: "path" or "index"
    resized: int  # how many files had another size and were resized to the model's


def read_images(source: str | os.PathLike, channels: int, size: int, split: str = "test") -> Images:
    """The images of an `.npz` split, a folder of image files (recursive, sorted) or one image file."""
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        return _read_npz(path, channels, size, split)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            suffixes = "/".join(IMAGE_SUFFIXES)
            raise MedkdError(f"{path} holds no image files ({suffixes}; searched recursively)")
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        files = [path]
    else:
        raise MedkdError(
            f"{source}: not found, or not a .npz, an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of "
            f"images"
        )
    loaded = [_read_file(f, channels, size) for f in files]
    images = np.stack([image for image, _ in loaded])
    return Images([str(f) for f in files], images, "path", sum(resized for _, resized in loaded))


def _read_npz(path: Path, channels: int, size: int, split: str) -> Images:
    if split not in SPLITS:
        raise MedkdError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in (f"{split}_images", "images") if k in npz.files), None)
            if key is None:
                raise MedkdError(
                    f"{path} has no '{split}_images' (a MedMNIST file, --split) or 'images' array; "
                    f"found {', '.join(npz.files)}"
                )
            images = npz[key]
    except MedkdError:
        raise
    except Exception as err:  # a damaged zip raises several types
        raise MedkdError(f"{path} is not a readable .npz file ({err})") from err
    expected = (size, size) if channels == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise MedkdError(
            f"{path}: {key} is {images.dtype} {tuple(images.shape)}; the model takes uint8 "
            f"(N, {', '.join(map(str, expected))}) images"
        )
    return Images([str(i) for i in range(len(images))], images, "index", 0)


def _read_file(path: Path, channels: int, size: int) -> tuple[np.ndarray, int]:
    # The rules of medkd.image_files (16-bit PNGs: round(v / 257); MedMNIST's PIL bicubic resizing).
    image = to_channels(decode_image(path).array, channels)
    return resize_square(image, size), int(image.shape[:2] != (size, size))


# ---------------------------------------------------------------- the CSV


def predict_rows(predictor: Predictor, images: Images) -> list[dict[str, Any]]:
    """One row per image: name, predicted label index, its name, then one probability per class."""
    scores = predictor.scores(model_input(images.images))
    rows = []
    for name, row in zip(images.names, scores, strict=True):
        if is_multilabel(predictor.task):
            chosen = [i for i, s in enumerate(row) if s >= MULTILABEL_THRESHOLD]
            label, label_name = "|".join(map(str, chosen)), "|".join(predictor.classes[i] for i in chosen)
        else:
            label = int(np.argmax(row))
            label_name = predictor.classes[label]
        values = {images.key: name, "label": label, "name": label_name}
        values.update({c: f"{s:.6g}" for c, s in zip(predictor.classes, row, strict=True)})
        rows.append(values)
    return rows


def write_csv(rows: list[dict[str, Any]], stream: IO[str]) -> None:
    if rows:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def predict(
    source: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike | None = None,
    split: str = "test",
    threads: int | None = None,
    force: bool = False,
) -> tuple[list[dict[str, Any]], Images]:
    """Predict `images` with `source`; the CSV goes to `out`, else stdout."""
    target = Path(out) if out is not None else None
    if target is not None:
        _check_out(target, force)
    predictor = load_predictor(source, threads)
    read = read_images(images, predictor.channels, predictor.size, split)
    rows = predict_rows(predictor, read)
    if target is None:
        write_csv(rows, sys.stdout)
    else:
        with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
            write_csv(rows, f)
    return rows, read


def _check_out(path: Path, force: bool) -> None:
    if path.suffix.lower() != ".csv":
        raise MedkdError(f"--out {path} must end in .csv")
    if not path.parent.is_dir():
        raise MedkdError(f"--out {path}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise MedkdError(f"{path} already exists; pass --force to replace it, or --out elsewhere")
    if path.is_dir():
        raise MedkdError(f"--out {path} is a folder; give a .csv file name")
