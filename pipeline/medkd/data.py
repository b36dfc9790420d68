"""MedMNIST data: the official .npz files, device-resident splits, and synthetic MedMNIST-format data.

Dataset facts (task, labels, split sizes, URLs, MD5s) come from `medmnist.INFO`; nothing is copied here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from medkd.errors import MedkdError
from medkd.files import file_md5
from medkd.views import apply_views

SPLITS = ("train", "val", "test")
MULTILABEL = "multi-label, binary-class"
TASKS = ("multi-class", "binary-class", "ordinal-regression", MULTILABEL)
# MedMNIST's own training scripts normalise with mean 0.5, std 0.5 on every channel.
MEDMNIST_MEAN = (0.5, 0.5, 0.5)
MEDMNIST_STD = (0.5, 0.5, 0.5)


def _info() -> dict:
    # medmnist's import creates ~/.medmnist; import it only when dataset facts are needed.
    from medmnist import INFO

    return INFO


def flags_2d() -> list[str]:
    """The 2D MedMNIST flags (the 3D volumes are out of scope)."""
    return [flag for flag in _info() if not flag.endswith("3d")]


def dataset_info(flag: str) -> dict:
    """`medmnist.INFO[flag]`, or a one-line error listing the valid 2D flags."""
    if flag not in flags_2d():
        raise MedkdError(f"unknown dataset flag '{flag}'; valid: {', '.join(flags_2d())}")
    return _info()[flag]


def sizes_offered(flag: str) -> list[int]:
    """Image sizes MedMNIST(+) publishes for `flag`: 28 and every `url_<size>` in INFO."""
    info = dataset_info(flag)
    return [28] + sorted(int(k.split("_")[1]) for k in info if k.startswith("url_"))


def is_multilabel(task: str) -> bool:
    return task == MULTILABEL


def num_outputs(task: str, n_labels: int) -> int:
    """Logits a model needs: one per label (multi-label), else one per class (binary gets two)."""
    if task not in TASKS:
        raise MedkdError(f"unknown task '{task}'; valid: {', '.join(TASKS)}")
    return max(n_labels, 2)


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


def _check_size(flag: str, size: int) -> None:
    offered = sizes_offered(flag)
    if size not in offered:
        raise MedkdError(f"size {size} is not offered for '{flag}'; valid: {', '.join(map(str, offered))}")


def download_npz(flag: str, size: int = 28, root: str | os.PathLike | None = None) -> Path:
    """Fetch the official file with medmnist's own downloader (URL and MD5 from INFO)."""
    import medmnist

    _check_size(flag, size)
    folder = data_root(root)
    folder.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, dataset_info(flag)["python_class"])
    try:
        cls(split="train", download=True, root=str(folder), size=size)
    except Exception as err:  # medmnist wraps every failure in a bare RuntimeError
        raise MedkdError(
            f"could not download {npz_name(flag, size)} into {folder} ({type(err).__name__}); "
            f"put the file there by hand or pass --data-dir DIR"
        ) from err
    return folder / npz_name(flag, size)


def load_arrays(
    flag: str, size: int = 28, root: str | os.PathLike | None = None, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All three splits of one file as `{split: (images uint8, labels int64 [N, L])}`, checked."""
    dataset_info(flag)
    _check_size(flag, size)
    path = data_root(root) / npz_name(flag, size)
    if not path.is_file():
        if not download:
            raise MedkdError(
                f"{path.name} not found in {path.parent}; pass --data-dir DIR (or set $MEDKD_DATA) "
                f"to the folder that holds it, or --download to fetch it"
            )
        download_npz(flag, size, root)
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise MedkdError(f"{path} is not a readable .npz file ({err})") from err
    info = dataset_info(flag)
    return {split: _check_split(path, arrays, split, size, info) for split in SPLITS}


def _check_split(
    path: Path, arrays: dict, split: str, size: int, info: dict
) -> tuple[np.ndarray, np.ndarray]:
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in arrays:
            raise MedkdError(
                f"{path}: missing key '{key}' (a MedMNIST file has train/val/test _images and _labels; "
                f"found {', '.join(sorted(arrays))})"
            )
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    expected = (size, size) if info["n_channels"] == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise MedkdError(
            f"{path}: {split}_images is {images.dtype} {tuple(images.shape)}; expected uint8 (N, "
            f"{', '.join(map(str, expected))}) for {info['n_channels']}-channel {path.stem.split('_')[0]}"
        )
    n_classes = len(info["label"])
    columns, top = (n_classes, 1) if is_multilabel(info["task"]) else (1, n_classes - 1)
    if labels.shape != (len(images), columns):
        raise MedkdError(
            f"{path}: {split}_labels has shape {tuple(labels.shape)}; expected ({len(images)}, {columns})"
        )
    if (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min(initial=0) < 0
        or labels.max(initial=0) > top
    ):
        raise MedkdError(
            f"{path}: {split}_labels must be integers in [0, {top}]; found {labels.dtype} values "
            f"in [{labels.min()}, {labels.max()}]"
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_medmnist(
    flag: str,
    split: str,
    size: int = 28,
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One split of an official MedMNIST file: `(images uint8 [N,H,W(,3)], labels int64 [N, L])`."""
    if split not in SPLITS:
        raise MedkdError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    return load_arrays(flag, size, root, download)[split]


def data_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Fingerprint of one split: sha256 of the image bytes (uint8) then the labels as int64."""
    digest = hashlib.sha256()
    # hashlib reads a C-contiguous array's buffer as it is: `.tobytes()` would copy every image first,
    # and that copy set distill's peak memory (two bytes of RSS per image byte instead of one).
    digest.update(np.ascontiguousarray(images, dtype=np.uint8))
    digest.update(np.ascontiguousarray(labels, dtype=np.int64))
    return digest.hexdigest()


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


# ---------------------------------------------------------------- device-resident splits


@dataclass(frozen=True)
class View:
    """How a model sees images: square size, per-channel mean/std, resize mode, memory format."""

    size: int
    mean: tuple[float, float, float] = MEDMNIST_MEAN
    std: tuple[float, float, float] = MEDMNIST_STD
    interpolation: str = "bicubic"
    channels_last: bool = False


class Batch(NamedTuple):
    index: torch.Tensor  # (B,) int64 dataset indices: stage two looks teacher logits up by them
    images: torch.Tensor  # (B, 3, S, S) float, normalised
    targets: torch.Tensor  # (B,) int64 class, or (B, L) float for multi-label


def prepare_images(x: torch.Tensor, view: View, params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, 3) on the device → normalised float (B, 3, S, S) on the same device.

    With `params` (B, P), each image is first turned into its augmented view (`medkd.views`) at its own
    size, so a view's row gives the same view at every model size.
    """
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W)
    if params is not None:
        x = apply_views(x, params)
    if x.shape[-1] != view.size:
        antialias = view.interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(view.size, view.size), mode=view.interpolation, antialias=antialias)
        x = x.clamp_(0, 1)  # bicubic overshoots; PIL clamps too
    mean = torch.tensor(view.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(view.std, device=x.device).view(1, 3, 1, 1)
    # x·(1/std) − mean/std, written straight into an output of the layout asked for: the multiply
    # broadcasts grayscale to RGB after the resize (a third of the resize work), and no temporary or
    # re-layout copy of the output (600 KB an image at 224 px) is made. Faster than (x − mean) / std then
    # .contiguous() at every size timed: ~1.3x at 224 px, 2-3x for RGB (permuted, hence channels_last).
    layout = torch.channels_last if view.channels_last else torch.contiguous_format
    out = torch.empty((len(x), 3, view.size, view.size), device=x.device, memory_format=layout)
    return torch.mul(x, 1 / std, out=out).add_(-mean / std)


class DeviceSplit:
    """One split held as a single uint8 tensor on the training device; batches are index gathers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, task: str, device: torch.device | str):
        self.task = task
        self.device = torch.device(device)
        self.images = torch.from_numpy(images).to(self.device)  # (N, H, W[, 3]) uint8
        self.labels = torch.from_numpy(labels).to(self.device)  # (N, L) int64
        # Targets in the shape the loss wants, computed once: (N,) class ids or (N, L) floats.
        self.targets = self.labels.float() if is_multilabel(task) else self.labels[:, 0]

    def __len__(self) -> int:
        return len(self.images)

    def batches(
        self,
        batch_size: int,
        view: View,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        views: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> Iterator[Batch]:
        """Yield batches in order, or shuffled with `generator` (a CPU generator, so runs repeat); with
        `views`, each batch's images are the views (`medkd.views`) whose parameters `views(index)` gives."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            params = views(idx) if views is not None else None  # (B, P) or None
            yield Batch(idx, prepare_images(self.images[idx], view, params), self.targets[idx])


# ---------------------------------------------------------------- synthetic MedMNIST-format data


def make_synthetic(
    path: str | os.PathLike,
    task: str,
    n_classes: int,
    *,
    size: int = 28,
    channels: int = 1,
    n_train: int = 200,
    n_val: int = 60,
    n_test: int = 60,
    seed: int = 0,
) -> Path:
    """Write a MedMNIST-format .npz whose classes (or labels) are bright blobs at class-specific places.

    Single-label tasks draw one blob at the class's position; multi-label draws one per active label.
    Noise, jitter and a random background level keep it from being trivial.
    """
    if task not in TASKS:
        raise MedkdError(f"unknown task '{task}'; valid: {', '.join(TASKS)}")
    if channels not in (1, 3):
        raise MedkdError(f"channels must be 1 or 3, not {channels}")
    rng = np.random.default_rng(seed)
    grid = int(np.ceil(np.sqrt(n_classes)))
    # Class k's blob centre on a grid, in pixels; its colour (RGB data) is class-specific too.
    centres = [((k // grid + 0.5) * size / grid, (k % grid + 0.5) * size / grid) for k in range(n_classes)]
    colours = rng.uniform(0.4, 1.0, size=(n_classes, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sigma = size / (2.5 * grid)
    arrays = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        if is_multilabel(task):
            labels = (rng.random((n, n_classes)) < 0.3).astype(np.uint8)
        else:
            labels = rng.integers(0, n_classes, size=(n, 1)).astype(np.uint8)
        images = rng.normal(0, 18, size=(n, size, size, channels)) + rng.uniform(40, 90, size=(n, 1, 1, 1))
        for i in range(n):
            active = np.flatnonzero(labels[i]) if is_multilabel(task) else labels[i]
            for k in active:
                cy, cx = np.array(centres[k]) + rng.normal(0, sigma / 3, size=2)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
                images[i] += 120 * blob[..., None] * (colours[k, :channels] if channels == 3 else 1.0)
        images = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = images[..., 0] if channels == 1 else images
        arrays[f"{split}_labels"] = labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def make_synthetic_like(root: str | os.PathLike, flag: str, size: int = 28, **kwargs) -> Path:
    """Synthetic data under the official file name of `flag`, with its task, label count and channels."""
    info = dataset_info(flag)
    return make_synthetic(
        Path(root) / npz_name(flag, size),
        info["task"],
        len(info["label"]),
        size=size,
        channels=info["n_channels"],
        **kwargs,
    )
