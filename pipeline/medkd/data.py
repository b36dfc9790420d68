"""MedMNIST data: the official .npz files, device-resident splits, and synthetic MedMNIST-format data.

Dataset facts (task, labels, split sizes, URLs, MD5s) come from `medmnist.INFO`; nothing is copied here.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Dataset facts live in medkd.datasets (torch-free); these names stay importable from here.
from medkd.datasets import (  # noqa: F401
    MEMBERS,
    MULTILABEL,
    SPLITS,
    TASKS,
    check_members,
    check_size,
    data_root,
    dataset_info,
    dataset_name,
    dataset_sha256,
    facts_path,
    flags_2d,
    is_custom,
    local_status,
    locate_dataset,
    missing_dataset,
    npz_name,
    sizes_offered,
)
from medkd.errors import MedkdError
from medkd.mapped import mapped_copy, member_shapes, memory_budget, release, sha256_rows
from medkd.views import apply_views

MAPPED_RELEASE_BATCHES = 256  # batches between letting a mapped split's read pages go
RESIZE_ROWS = 512  # images resized at a time by `DeviceSplit.at_size`: ~100 MB of float32 at 224 px
HASH_ROWS = 4096  # images a mapped split is hashed (and its pages let go) by: a few hundred MB at 224 px
# MedMNIST's own training scripts normalise with mean 0.5, std 0.5 on every channel.
MEDMNIST_MEAN = (0.5, 0.5, 0.5)
MEDMNIST_STD = (0.5, 0.5, 0.5)


def is_multilabel(task: str) -> bool:
    return task == MULTILABEL


def num_outputs(task: str, n_labels: int) -> int:
    """Logits a model needs: one per label (multi-label), else one per class (binary gets two)."""
    if task not in TASKS:
        raise MedkdError(f"unknown task '{task}'; valid: {', '.join(TASKS)}")
    return max(n_labels, 2)


def download_npz(flag: str, size: int = 28, root: str | os.PathLike | None = None) -> Path:
    """Fetch the official file with medmnist's own downloader (URL and MD5 from INFO)."""
    import medmnist

    check_size(flag, size)
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


def dataset_file(
    dataset: str, size: int | None = None, root: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """The .npz a dataset is read from: the official file of a flag in `root` (fetched with `download`), or
    the custom file itself (`size`, when given, must be its images' size)."""
    if is_custom(dataset):
        path = Path(locate_dataset(dataset, root))
        if not path.is_file():
            raise missing_dataset(path)
        return path
    size = 28 if size is None else size
    dataset_info(dataset)
    check_size(dataset, size)
    path = data_root(root) / npz_name(dataset, size)
    if not path.is_file():
        if not download:
            raise MedkdError(
                f"{path.name} not found in {path.parent}; pass --data-dir DIR (or set $MEDKD_DATA) "
                f"to the folder that holds it, or --download to fetch it"
            )
        download_npz(dataset, size, root)
    return path


def load_arrays(
    dataset: str,
    size: int | None = None,
    root: str | os.PathLike | None = None,
    download: bool = False,
    max_memory_gb: float | None = None,
    device: str = "cpu",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All three splits of one file as `{split: (images uint8, labels int64 [N, L])}`, checked.

    A split's images larger than the memory budget (`mapped.memory_budget`) come back as a read-only
    `np.memmap` of an uncompressed copy beside the file (made on first use) instead of in RAM.
    """
    path = dataset_file(dataset, size, root, download)
    info = dataset_info(str(path) if is_custom(dataset) else dataset)
    shapes = member_shapes(path)
    if is_custom(dataset):  # a custom file has one size, its own
        own = int(shapes["train_images"][0][1]) if len(shapes.get("train_images", ((),))[0]) >= 3 else None
        if size is not None and own is not None and size != own:
            raise MedkdError(
                f"{path} holds {own} px images, not {size} px: drop --size (or pass --size {own})"
            )
        size = own if size is None else size
    size = 28 if size is None else size
    _check_members(path, shapes, info)
    budget = memory_budget(max_memory_gb, device)
    try:
        with np.load(path) as npz:
            arrays = {}
            for key in MEMBERS:  # only these are decompressed: a file may carry other arrays
                shape, dtype = shapes[key]
                big = key.endswith("_images") and int(np.prod(shape)) * dtype.itemsize > budget
                arrays[key] = mapped_copy(path, key) if big else npz[key]
    except MedkdError:
        raise
    except Exception as err:
        raise MedkdError(f"{path} is not a readable .npz file ({err})") from err
    return {split: _check_split(path, arrays, split, size, info) for split in SPLITS}


def _check_members(path: Path, shapes: dict, info: dict) -> None:
    """The six arrays are there, and the facts name as many labels as the task needs; nothing is read."""
    check_members(path, shapes)
    task, n_labels = info["task"], len(info["label"])
    if n_labels < 2 or (task == "binary-class" and n_labels != 2):
        need = "exactly 2" if task == "binary-class" else "at least 2"
        raise MedkdError(
            f"{path}: a {task} dataset needs {need} labels, its facts name {n_labels}; fix 'task' or 'label' "
            f"in {facts_path(path).name} (or delete it to infer the facts from the arrays)"
        )


def _check_split(
    path: Path, arrays: dict, split: str, size: int, info: dict
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    expected = (size, size) if info["n_channels"] == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise MedkdError(
            f"{path}: {split}_images is {images.dtype} {tuple(images.shape)}; expected uint8 (N, "
            f"{', '.join(map(str, expected))}) for {info['n_channels']}-channel {_name(path, info)}"
        )
    if len(images) == 0:
        raise MedkdError(
            f"{path}: the {split} split is empty (0 images); every split needs at least one image: "
            f"move some images into it, or re-import the data (`medkd import`)"
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
    if not isinstance(images, np.memmap):
        images = np.ascontiguousarray(images)
    return images, labels.astype(np.int64)


def _name(path: Path, info: dict) -> str:
    return path.stem.split("_")[0] if info.get("python_class") else f"{path.name} ({info['task']})"


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
    if isinstance(images, np.memmap):  # a big split: hashed chunk by chunk, its pages let go as it goes
        sha256_rows(digest, images, HASH_ROWS)
    else:
        # hashlib reads a C-contiguous array's buffer as it is: `.tobytes()` would copy every image first,
        # and that copy set distill's peak memory (two bytes of RSS per image byte instead of one).
        digest.update(np.ascontiguousarray(images, dtype=np.uint8))
    digest.update(np.ascontiguousarray(labels, dtype=np.int64))
    return digest.hexdigest()


# ---------------------------------------------------------------- device-resident splits


@dataclass(frozen=True)
class View:
    """How a model sees images: square size, per-channel mean/std, resize mode, memory format.

    `gray`: a grayscale image stays one channel, (B, 1, S, S), when mean and std are the same on every
    channel (the model's first convolution sums its weights over the three input channels instead,
    `medkd.students.accept_one_channel`): a third of the bytes, the same numbers. `rounded`: a resized
    image is rounded to 8 bits, as a stored image at the model's size would be, so a split resized once
    (`DeviceSplit.at_size`) and one resized batch by batch give the model the same input.
    """

    size: int
    mean: tuple[float, float, float] = MEDMNIST_MEAN
    std: tuple[float, float, float] = MEDMNIST_STD
    interpolation: str = "bicubic"
    channels_last: bool = False
    gray: bool = False
    rounded: bool = False

    def channels(self, source_channels: int) -> int:
        """Channels of the model input made from images of `source_channels`."""
        same = len(set(self.mean)) == 1 and len(set(self.std)) == 1
        return 1 if source_channels == 1 and self.gray and same else 3


class Batch(NamedTuple):
    index: torch.Tensor  # (B,) int64 dataset indices: stage two looks teacher logits up by them
    images: torch.Tensor  # (B, 3, S, S) float, normalised ((B, 1, S, S) for grayscale with `View.gray`)
    targets: torch.Tensor  # (B,) int64 class, or (B, L) float for multi-label


def resize_images(x: torch.Tensor, view: View) -> torch.Tensor:
    """Float images (B, C, H, W) in [0, 1] at `view.size`: antialiased (bilinear, bicubic) and clamped
    (bicubic overshoots; PIL clamps too)."""
    antialias = view.interpolation in ("bilinear", "bicubic")
    x = F.interpolate(x, size=(view.size, view.size), mode=view.interpolation, antialias=antialias)
    return x.clamp_(0, 1)


def prepare_images(x: torch.Tensor, view: View, params: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, 3) on the device → normalised float (B, 3, S, S) on the same device
    ((B, 1, S, S) for grayscale with `view.gray`).

    With `params` (B, P), each image is first turned into its augmented view (`medkd.views`) at its own
    size, so a view's row gives the same view at every model size.
    """
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    channels = view.channels(x.shape[-1])
    layout = torch.channels_last if view.channels_last else torch.contiguous_format
    out = torch.empty((len(x), channels, view.size, view.size), device=x.device, memory_format=layout)
    x = x.permute(0, 3, 1, 2)  # (B, C, H, W), a view of the uint8 batch
    if params is None and x.shape[-1] == view.size:
        # Already at the model's size (or resized once, `DeviceSplit.at_size`): the uint8 batch goes to
        # its normalised float output in one pass, with no [0, 1] copy between.
        return normalise(x, view, channels, 255, out)
    x = x.float().div_(255)
    if params is not None:
        # Warped at the source's size (a few hundred pixels), then resized: the plain view stays the
        # image itself, bit for bit, which one bicubic grid_sample at the model's size would not be (its
        # kernel is a = −0.75, PIL's and the antialiased resize's a = −0.5).
        x = apply_views(x, params)
    if x.shape[-1] != view.size:
        x = resize_images(x, view)
        if view.rounded:  # grey levels 0…255, normalised as the uint8 path above does: the same bits
            return normalise(x.mul_(255).round_(), view, channels, 255, out)
    return normalise(x, view, channels, 1, out)


def normalise(x: torch.Tensor, view: View, channels: int, top: float, out: torch.Tensor) -> torch.Tensor:
    """(x / top − mean) / std of images x (B, C, H, W) with values in [0, top], written into `out` (B,
    channels, S, S) of the layout asked for: the broadcast turns grayscale into RGB after any resize (a
    third of the resize work), and no temporary or re-layout copy of the output (600 KB an image at
    224 px) is made. With one std on every channel (MedMNIST's 0.5) it is one pass, shift + x · scale
    (`torch.add`'s alpha), ~2x a multiply then an add at 224 px; else those two passes."""
    scales = [1 / (top * s) for s in view.std[:channels]]
    shifts = [-m / s for m, s in zip(view.mean, view.std, strict=True)][:channels]
    shift = torch.tensor(shifts, device=x.device).view(1, channels, 1, 1)
    if len(set(scales)) == 1:
        return torch.add(shift, x, alpha=scales[0], out=out)
    scale = torch.tensor(scales, device=x.device).view(1, channels, 1, 1)
    return torch.mul(x, scale, out=out).add_(shift)


def batch_bounds(n: int, batch_size: int, merge_single: bool = False) -> list[tuple[int, int]]:
    """The (start, end) rows of each batch over `n` images; `merge_single` joins a last batch of one image
    to the batch before it (training: BatchNorm cannot normalise a single image whose feature map is 1×1)."""
    starts = list(range(0, n, batch_size))
    if merge_single and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], n], strict=True))


class DeviceSplit:
    """One split held as a single uint8 tensor on the training device; batches are index gathers.

    A memory-mapped split (bigger than the memory budget, `load_arrays`) stays on disk instead: each batch
    is gathered from the mapping on the host and sent to the device, and the pages read are let go every
    `MAPPED_RELEASE_BATCHES` batches, so the split never sits in RAM or device memory whole.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, task: str, device: torch.device | str):
        self.task = task
        self.device = torch.device(device)
        self.mapped = images if isinstance(images, np.memmap) else None
        if self.mapped is not None:
            with warnings.catch_warnings():  # read-only by design: batches are gathered (copied) from it
                warnings.simplefilter("ignore", UserWarning)
                self.images = torch.from_numpy(images)  # (N, H, W[, 3]) uint8, on disk
        else:
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
        merge_single: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches in order, or shuffled with `generator` (a CPU generator, so runs repeat); with
        `views`, each batch's images are the views (`medkd.views`) whose parameters `views(index)` gives.

        `merge_single`: see `batch_bounds`."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        for step, (start, end) in enumerate(batch_bounds(n, batch_size, merge_single)):
            idx = order[start:end]
            params = views(idx) if views is not None else None  # (B, P) or None
            yield Batch(idx, prepare_images(self.gather(idx), view, params), self.targets[idx])
            if self.mapped is not None and step % MAPPED_RELEASE_BATCHES == MAPPED_RELEASE_BATCHES - 1:
                release(self.mapped)
        if self.mapped is not None:
            release(self.mapped)

    def image_bytes(self, size: int) -> int:
        """Bytes of this split's uint8 images at `size` × `size`."""
        channels = self.images.shape[3] if self.images.dim() == 4 else 1
        return len(self) * size * size * channels

    def at_size(self, view: View, budget: int) -> DeviceSplit:
        """This split resized once to `view.size`, as uint8 on its device: an epoch's batches are then
        gathers with no resampling, and the model gets what a batch resized as it is drawn (`view` rounded)
        would give it. Itself when already at that size, or when the resized images would take more than
        `budget` bytes (every batch is then resized as it is drawn)."""
        if self.images.shape[1] == view.size or self.image_bytes(view.size) > budget:
            return self
        shape = (len(self), view.size, view.size, *self.images.shape[3:])
        images = torch.empty(shape, dtype=torch.uint8, device=self.device)
        for start, end in batch_bounds(len(self), RESIZE_ROWS):
            x = self.gather(torch.arange(start, end, device=self.device))
            x = (x.unsqueeze(-1) if x.dim() == 3 else x).permute(0, 3, 1, 2).float().div_(255)
            x = resize_images(x, view).mul_(255).round_().to(torch.uint8)  # (B, C, S, S), exact
            images[start:end] = x.permute(0, 2, 3, 1).reshape(end - start, *shape[1:])
        if self.mapped is not None:
            release(self.mapped)
        resized = copy.copy(self)
        resized.images, resized.mapped = images, None
        return resized

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at `idx`, on the device."""
        # index_select copies whole rows; `images[idx]` goes element by element: 20x slower on the CPU
        # for 224 px rows (1.5 vs 30 µs an image), the whole data path's cost.
        if self.mapped is None:
            return torch.index_select(self.images, 0, idx)
        return torch.index_select(self.images, 0, idx.cpu()).to(self.device, non_blocking=True)


def device_splits(
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    task: str,
    device: torch.device,
    view: View,
    max_memory_gb: float | None = None,
    augmented: bool = False,
) -> dict[str, DeviceSplit]:
    """The three splits on `device`, each resized once to the model's size (`DeviceSplit.at_size`) while
    they fit the memory budget (`mapped.memory_budget`) together; an `augmented` train split stays at its
    own size, since each batch's views are sampled from the source images."""
    splits = {s: DeviceSplit(*arrays[s], task, device) for s in SPLITS}
    budget = memory_budget(max_memory_gb, str(device))
    resized = [s for s in SPLITS if not (augmented and s == "train")]
    if sum(splits[s].image_bytes(view.size) for s in resized) > budget:
        return splits
    return {s: split.at_size(view, budget) if s in resized else split for s, split in splits.items()}


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
