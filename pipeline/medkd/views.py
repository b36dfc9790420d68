"""Augmented views as numbers: each view of an image is one row of parameters, drawn once from a seeded
generator, stored in a multi-view cache (`/train/view_params`) and applied to a whole batch on its device.

A view is defined at the image's own resolution and in fractions of its side, so the same row gives the
same view to a 112 px teacher and a 28 px student: `apply_views` warps the [0, 1] float image at its
source size, then `medkd.data.prepare_images` resizes it to the model's size as for the plain view.

Why not torchvision.transforms.v2: its functional ops take one set of parameters per call, so a batch of
per-image views would be a Python loop per image. Here crop, flip and rotation are one 2x3 affine matrix
per image and one `grid_sample` for the batch (one resampling, not three); brightness and contrast are
torchvision's own formulas (`adjust_brightness`, `adjust_contrast`), per image. The tests check each op
against torchvision's function on single images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from medkd.errors import MedkdError
from medkd.registry import AUGMENTS

# The columns of one view's parameter row, as `/train/view_params` stores them (float32):
#   flip        1.0: mirrored left-right, 0.0: not
#   top, left   the crop box's top-left corner, as fractions of the image height and width
#   height, width  the crop box's size, as fractions (the box is stretched to the whole output)
#   angle       rotation in degrees, counter-clockwise, about the output's centre (torchvision's sign)
#   brightness  factor: x·b, clamped to [0, 1]
#   contrast    factor: c·x + (1 − c)·mean(grayscale x), clamped to [0, 1]
VIEW_COLUMNS = ("flip", "top", "left", "height", "width", "angle", "brightness", "contrast")
IDENTITY = (0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0)  # the plain view

# Each preset's parameters, stored as the cache's `augment` attr (JSON, with "preset": its name).
# `scale` and `ratio` are RandomResizedCrop's (area fraction, width/height), `flip` the chance of a
# mirror, `degrees` the rotation range ±, `brightness`/`contrast` ColorJitter's (factor in 1 ± value).
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "flip": {"flip": 0.5},
    "crop": {"scale": [0.6, 1.0], "ratio": [3 / 4, 4 / 3]},
    "medmnist": {
        "scale": [0.6, 1.0],
        "ratio": [3 / 4, 4 / 3],
        "flip": 0.5,
        "degrees": 15.0,
        "brightness": 0.1,
        "contrast": 0.1,
    },
}
CROP_TRIES = 10  # as torchvision's RandomResizedCrop: the first box of 10 that fits, else the whole image
UNIFORMS_PER_VIEW = 2 * CROP_TRIES + 6  # every preset draws the same count: one stream layout for all


def augment_attr(preset: str) -> dict[str, Any]:
    """The `augment` attr of a cache of `preset` views: its name and parameters."""
    check_preset(preset)
    return {"preset": preset, **PRESETS[preset]}


def check_preset(preset: str) -> None:
    if preset not in AUGMENTS:
        raise MedkdError(f"unknown augmentation preset '{preset}'; valid: {', '.join(AUGMENTS)}")


def sample_views(preset: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` views of `preset` as parameter rows (n, len(VIEW_COLUMNS)) float32 on the CPU.

    Every preset draws `UNIFORMS_PER_VIEW` uniforms a view from `generator` (a CPU generator), so the
    draws repeat on every device and one stream serves every preset.
    """
    check_preset(preset)
    p = PRESETS[preset]
    u = torch.rand((n, UNIFORMS_PER_VIEW), generator=generator, dtype=torch.float64)
    rows = torch.tensor(IDENTITY, dtype=torch.float64).repeat(n, 1)
    if "scale" in p:
        (lo, hi), (r0, r1) = p["scale"], p["ratio"]
        area = lo + (hi - lo) * u[:, :CROP_TRIES]  # (n, tries) fraction of the image's area
        ratio = torch.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * u[:, CROP_TRIES : 2 * CROP_TRIES])
        width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (width <= 1) & (height <= 1)
        first = fits.to(torch.int64).argmax(dim=1, keepdim=True)  # the first try that fits
        found = fits.any(dim=1)
        width = torch.where(found, width.gather(1, first)[:, 0], 1.0)
        height = torch.where(found, height.gather(1, first)[:, 0], 1.0)
        rows[:, 1] = (1 - height) * u[:, 2 * CROP_TRIES]
        rows[:, 2] = (1 - width) * u[:, 2 * CROP_TRIES + 1]
        rows[:, 3], rows[:, 4] = height, width
    rest = u[:, 2 * CROP_TRIES + 2 :]  # (n, 4): flip, angle, brightness, contrast
    if "flip" in p:
        rows[:, 0] = (rest[:, 0] < p["flip"]).double()
    if "degrees" in p:
        rows[:, 5] = p["degrees"] * (2 * rest[:, 1] - 1)
    for column, key, draw in ((6, "brightness", rest[:, 2]), (7, "contrast", rest[:, 3])):
        if key in p:
            rows[:, column] = 1 + p[key] * (2 * draw - 1)
    return rows.float()


def draw_views(preset: str, n: int, views: int, seed: int) -> torch.Tensor:
    """The (n, views, len(VIEW_COLUMNS)) parameters of a multi-view cache: image-major, seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return sample_views(preset, n * views, generator).view(n, views, len(VIEW_COLUMNS))


def view_matrices(params: torch.Tensor) -> torch.Tensor:
    """The (B, 2, 3) `affine_grid` matrices of parameter rows (B, P): output coordinates → input ones.

    In normalised coordinates (x right, y down, [-1, 1]) an output point u samples the input at
    c + S·M·R(θ)·u, with c the crop box's centre, S = diag(width, height), M the mirror, and R rotating by
    θ clockwise on screen, which turns the content counter-clockwise (torchvision's sign).
    """
    flip, top, left, height, width, angle = params[:, :6].double().unbind(dim=1)
    theta = torch.deg2rad(angle)
    cos, sin = torch.cos(theta), torch.sin(theta)
    mirror = 1 - 2 * flip  # -1 mirrors x
    a = torch.zeros((len(params), 2, 3), dtype=torch.float64, device=params.device)
    a[:, 0, 0], a[:, 0, 1] = width * mirror * cos, -width * mirror * sin
    a[:, 1, 0], a[:, 1, 1] = height * sin, height * cos
    a[:, 0, 2] = 2 * (left + width / 2) - 1
    a[:, 1, 2] = 2 * (top + height / 2) - 1
    return a


def apply_views(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Float images (B, C, H, W) in [0, 1] → their views (B, C, H, W): each image warped by its row of
    `params` (B, P) at its own size (bilinear, zeros outside), then brightness and contrast."""
    params = params.to(x.device)
    plain = torch.tensor(IDENTITY[:6], device=x.device)
    if not (params[:, :6] == plain).all():
        grid = F.affine_grid(view_matrices(params).to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness, contrast = params[:, 6].to(x.dtype), params[:, 7].to(x.dtype)
    if not (brightness == 1).all():
        x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    if not (contrast == 1).all():
        # torchvision's rgb_to_grayscale weights; a grayscale image is its own
        gray = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1) if x.shape[1] == 3 else x
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        c = contrast.view(-1, 1, 1, 1)
        x = (c * x + (1 - c) * mean).clamp_(0, 1)
    return x
