"""`medkd gradcam` (the paper's Figure 6): where a trained CNN student looks, by pytorch-grad-cam's Grad-CAM.

The CAM is taken on the student's last conv block, through the deployed module (`medkd.deploy`): its input
is the image at the data's size, so the map comes back at that size, aligned with the image shown,
whatever size the student saw. With a second run (`--teacher-run`, e.g. a fine-tuned CNN teacher) on the
same dataset and size, its maps form a third row over the same images.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure
from torch import nn

from medkd.deploy import DeployedStudent, deployed_student, label_names, model_input
from medkd.embeddings import check_png_out, label_groups, short_name, write_png
from medkd.errors import MedkdError
from medkd.trained import TrainedRun, load_trained_run

MAX_IMAGES = 32  # columns; past this the figure is too wide to read
CAM_BATCH = 64
NAME_CHARS = 22  # class names are cut to this in titles (bloodmnist's run past 60 characters)


def _grad_cam() -> tuple[Any, Any]:
    # Imported here: pytorch-grad-cam brings opencv and ttach, which `import medkd.saliency` should not pay.
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise MedkdError("Grad-CAM needs pytorch-grad-cam; pip install 'medkd[explain]'") from None
    return GradCAM, ClassifierOutputTarget


def last_conv_block(model: nn.Module) -> nn.Module:
    """The block whose output Grad-CAM explains: a torchvision ResNet's `layer4[-1]`, or a timm model's last
    feature stage (`feature_info[-1]["module"]`); refused unless it holds a convolution."""
    if isinstance(model, DeployedStudent):
        model = model.model
    if isinstance(model, torchvision.models.ResNet):
        block = model.layer4[-1]
    else:
        info = getattr(model, "feature_info", None)  # timm: a list of {"module", "num_chs", "reduction"}
        last = info[-1] if isinstance(info, list) and info else None
        name = last.get("module") if isinstance(last, dict) else None
        if name is None:
            raise MedkdError(
                f"no last conv block is known for a {type(model).__name__}; Grad-CAM supports torchvision "
                f"ResNet and timm CNN students"
            )
        block = model.get_submodule(name)
    if not any(isinstance(m, nn.Conv2d) for m in block.modules()):
        raise MedkdError(
            f"the last block of the {type(model).__name__} has no convolution (a transformer?), so Grad-CAM "
            f"has no spatial map to explain; use a CNN student"
        )
    return block


def pick_images(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` image indices drawn with a seeded RNG, round-robin over the true classes (multi-label: the first
    positive label, or none), so every class shows; sorted by class, then by draw."""
    labels = np.asarray(labels)
    if not 1 <= n <= len(labels):
        raise MedkdError(f"--images must be between 1 and {len(labels)} (the split's size), got {n}")
    groups, _ = label_groups(labels, [str(k) for k in range(labels.shape[1])])
    rng = np.random.default_rng(seed)
    queues = [rng.permutation(np.flatnonzero(groups == g)) for g in np.unique(groups)]
    picked: list[tuple[int, int, int]] = []  # (class rank, draw, index)
    for draw in range(max(len(q) for q in queues)):
        for rank, queue in enumerate(queues):
            if draw < len(queue) and len(picked) < n:
                picked.append((rank, draw, int(queue[draw])))
    return np.array([index for _, _, index in sorted(picked)], dtype=np.int64)


def predictions(run: TrainedRun, images: np.ndarray) -> np.ndarray:
    """The run's top-scoring output (N,) for uint8 images: its class, or for multi-label its top label."""
    with torch.inference_mode():
        logits = deployed_student(run)(torch.from_numpy(model_input(images)))
    return logits.argmax(dim=1).numpy()


def grad_cams(module: nn.Module, layer: nn.Module, x: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of `module` at `layer` for output `targets[i]` of image `x[i]`
    (float (N, C, H, W)), each scaled by pytorch-grad-cam to its own min and max. `module` needs gradients."""
    GradCAM, ClassifierOutputTarget = _grad_cam()
    if len(targets) != len(x):
        raise MedkdError(f"{len(targets)} Grad-CAM targets for {len(x)} images")
    cam = GradCAM(model=module, target_layers=[layer])
    maps = []
    try:
        # Grad-CAM differentiates the target logit; callers may sit in inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, len(x), CAM_BATCH):
                chosen = [ClassifierOutputTarget(int(t)) for t in targets[start : start + CAM_BATCH]]
                maps.append(cam(input_tensor=x[start : start + CAM_BATCH].clone(), targets=chosen))
    finally:
        cam.activations_and_grads.release()  # its forward hooks; `with GradCAM` would swallow IndexErrors
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *x.shape[2:]), np.float32)


def cams(run: TrainedRun, images: np.ndarray, targets: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at the data's size of the run's student on uint8 images, for
    `targets` (default: each image's top-scoring output; multi-label: its top label).

    Runs on a deep copy with gradients on, so `run.model` stays frozen and hook-free.
    """
    if targets is None:
        targets = predictions(run, images)
    module = copy.deepcopy(deployed_student(run)).requires_grad_(True)
    return grad_cams(module, last_conv_block(module), torch.from_numpy(model_input(images)), targets)


def _short(name: str) -> str:
    return short_name(name, NAME_CHARS)


def cam_grid(run: TrainedRun) -> tuple[int, int]:
    """The (h, w) of the last conv block's output, the grid a CAM is upsampled from (1×1: no detail)."""
    module, seen = deployed_student(run), []
    size, channels = int(run.result.size), int(module.channels)
    handle = last_conv_block(module).register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-2:]))
    try:
        with torch.inference_mode():
            module(torch.zeros(1, channels, size, size))
    finally:
        handle.remove()
    return int(seen[0][0]), int(seen[0][1])


def _truth(labels: np.ndarray, names: list[str]) -> str:
    if len(labels) == 1:
        return _short(names[int(labels[0])])
    positive = [names[k] for k in np.flatnonzero(labels)]  # multi-label: every positive label
    if not positive:
        return "none"
    return _short(positive[0]) + (f" +{len(positive) - 1}" if len(positive) > 1 else "")


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) → float32 RGB (H, W, 3) in [0, 1], as show_cam_on_image wants."""
    x = np.asarray(image, dtype=np.float32) / 255
    return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 2 else x


def _row_name(run: TrainedRun, role: str) -> str:
    r, (h, w) = run.result, cam_grid(run)
    detail = " (no detail)" if h * w == 1 else ""
    return f"{role}\n{r.student.removeprefix('timm:')}\n{r.student_size or r.size} px, CAM {h}×{w}{detail}"


def gradcam_figure(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    images: int = 8,
    split: str = "test",
    teacher_run: str | os.PathLike | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Write a grid, one column per image: the image, the student's Grad-CAM overlay titled with its
    predicted and true class, and with `teacher_run` that run's overlay; as a PNG to `out`."""
    _grad_cam()  # a missing extra is one line before any model loads
    from pytorch_grad_cam.utils.image import show_cam_on_image

    path = check_png_out(out, force)
    if not 1 <= images <= MAX_IMAGES:
        raise MedkdError(f"--images must be between 1 and {MAX_IMAGES}, got {images}")
    run = load_trained_run(run_dir)
    rows = [(run, "student")]
    if teacher_run is not None:
        other = load_trained_run(teacher_run, role="teacher run")
        mine, theirs = run.result, other.result
        if (theirs.dataset, int(theirs.size)) != (mine.dataset, int(mine.size)):
            raise MedkdError(
                f"teacher run {other.path} was trained on {theirs.dataset} at {theirs.size} px, run "
                f"{run.path} on {mine.dataset} at {mine.size} px; --teacher-run must see the same images"
            )
        rows.append((other, "teacher run"))
    for r, _ in rows:
        last_conv_block(r.model)  # a non-CNN is refused before any Grad-CAM is computed
    data, labels = run.split(split, data_dir)
    if teacher_run is not None:
        rows[1][0].check_data(split, data, labels)  # a teacher run trained on other data of that name
    names = label_names(run.result.dataset)
    index = pick_images(labels, images, seed)
    chosen, truth = data[index], labels[index]

    fig = Figure(figsize=(1.0 + 1.75 * len(index), 0.7 + 2.05 * (1 + len(rows))), layout="constrained")
    axes = fig.subplots(1 + len(rows), len(index), squeeze=False)
    for j, i in enumerate(index):
        ax = axes[0, j]
        ax.imshow(chosen[j], cmap="gray" if chosen.ndim == 3 else None, vmin=0, vmax=255)
        ax.set_title(f"{split} #{i}\n{_truth(truth[j], names)}", fontsize=9)
    for row, (r, _) in enumerate(rows, start=1):
        predicted = predictions(r, chosen)
        maps = cams(r, chosen, predicted)  # (n, H, W)
        for j in range(len(index)):
            ax = axes[row, j]
            ax.imshow(show_cam_on_image(_rgb(chosen[j]), maps[j], use_rgb=True))
            right = (
                truth[j, predicted[j]] > 0 if truth.shape[1] > 1 else int(truth[j, 0]) == int(predicted[j])
            )
            ax.set_title(
                f"pred {_short(names[predicted[j]])}\ntrue {_truth(truth[j], names)}",
                fontsize=9,
                color="black" if right else "tab:red",
            )
    for row, ax_row in enumerate(axes):
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel("image" if row == 0 else _row_name(*rows[row - 1]), fontsize=10)
    fig.suptitle(
        f"Grad-CAM of the top-scoring output on the last conv block — {run.result.dataset} "
        f"{run.result.size} px, {split}, {len(index)} images (seed {seed}); red: wrong prediction",
        fontsize=11,
    )
    return write_png(fig, path)
