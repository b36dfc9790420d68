"""Frozen timm backbones as teachers: DINOv2 ViTs (hub weights or a weights file), and a tiny random ViT.

A backbone teacher returns features only: the CLS token, or the CLS token concatenated with the mean
patch token ("cls+mean", DINOv2's linear evaluation); stage one trains a linear head on them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from medkd.data import View
from medkd.errors import MedkdError
from medkd.files import file_sha256
from medkd.registry import POOLS, TEACHERS, TeacherSpec
from medkd.teachers import Teacher, TeacherOutput

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The tiny teacher: DINOv2's architecture (patch 14, LayerScale, no classifier) at toy width and depth.
TINY_ARGS = dict(patch_size=PATCH_SIZE, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0, num_classes=0)
# DINOv2 *initialises* LayerScale at 1e-5, but trained DINOv2 gammas are far larger. A random teacher at
# 1e-5 has a CLS token that differs between images by ~5e-6, below fp16 resolution: every cached feature
# would be the same. Gamma 1 keeps the same modules and weight keys and lets the CLS token see the image.
TINY_LAYER_SCALE = 1.0
TINY_SEED = 0


class BackboneTeacher(Teacher):
    """A frozen timm ViT backbone: features (B, D) of its own view, no logits."""

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        backbone_id: str,
        pool: str,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights_sha256: str,
        is_random_init: bool,
    ):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.backbone_id = backbone_id
        self.pool = pool
        self.img_size = img_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.view = View(img_size, self.mean, self.std)
        self.weights_sha256 = weights_sha256
        self.is_random_init = is_random_init
        self.feature_dim = backbone.num_features * (2 if pool == "cls+mean" else 1)
        self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) → pooled features (B, D)."""
        return self.pooled(self.backbone.forward_features(x))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + patches, D) tokens, final norm applied → pooled features (B, D)."""
        cls = tokens[:, 0]  # (B, D)
        if self.pool == "cls":
            return cls
        patches = tokens[:, self.backbone.num_prefix_tokens :]  # register tokens excluded
        return torch.cat([cls, patches.mean(dim=1)], dim=1)  # (B, 2D)

    def forward(self, images: torch.Tensor, with_tokens: bool = False) -> TeacherOutput:
        tokens = self.backbone.forward_features(self.prepare(images, self.view))
        patches = tokens[:, self.backbone.num_prefix_tokens :] if with_tokens else None
        return TeacherOutput(self.pooled(tokens), None, patches)

    def provenance(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_id,
            "weights_sha256": self.weights_sha256,
            "teacher_input_size": self.img_size,
            "resize": self.view.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "pool": self.pool,
            "random_init": self.is_random_init,
        }

    def summary(self) -> str:
        note = " [yellow](random-init teacher: a test, not a real teacher)[/]" if self.is_random_init else ""
        return f"→ {self.img_size} px{note}"


def build_teacher(
    name: str, weights: str | os.PathLike | None = None, img_size: int | None = 224, pool: str | None = "cls"
) -> BackboneTeacher:
    """The frozen teacher `name` at `img_size` px: hub weights, a weights file, or (tiny) a seeded init."""
    if name not in TEACHERS:
        raise MedkdError(f"unknown teacher '{name}'; valid: {', '.join(TEACHERS)}")
    img_size = img_size or 224
    pool = pool or "cls"
    if img_size <= 0 or img_size % PATCH_SIZE:
        raise MedkdError(
            f"teacher input size must be a multiple of the patch size {PATCH_SIZE} (e.g. 28, 56, 224), "
            f"got {img_size}"
        )
    if pool not in POOLS:
        raise MedkdError(f"unknown pool '{pool}'; valid: {', '.join(POOLS)}")
    spec = TEACHERS[name]
    sha = ""
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG is left alone
            torch.manual_seed(TINY_SEED)
            backbone = VisionTransformer(img_size=img_size, init_values=TINY_LAYER_SCALE, **TINY_ARGS)
    elif weights is None:
        backbone = _download(spec, img_size)
        sha = _hub_file_sha256(spec.model_id)
    else:
        backbone = timm.create_model(spec.model_id, pretrained=False, img_size=img_size)
    if weights is not None:
        load_weights(backbone, Path(weights), f"{name} ({spec.model_id}) at {img_size} px")
        sha = file_sha256(weights)
    cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} if name == "tiny" else backbone.pretrained_cfg
    return BackboneTeacher(
        name,
        backbone,
        spec.model_id,
        pool,
        img_size,
        cfg["mean"],
        cfg["std"],
        sha,
        is_random_init=name == "tiny" and weights is None,
    )


def _download(spec: TeacherSpec, img_size: int) -> nn.Module:
    try:
        return timm.create_model(spec.model_id, pretrained=True, img_size=img_size)
    except Exception as err:  # hub errors come as OSError, HTTP and huggingface_hub types alike
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise MedkdError(
            f"could not download {spec.model_id} weights ({reason}); download {spec.official_file} "
            f"elsewhere and pass --weights FILE"
        ) from err


def _hub_file_sha256(timm_id: str) -> str:
    """sha256 of the hub file timm just loaded, if it sits in the huggingface cache ("" otherwise)."""
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(f"timm/{timm_id}", filename)
        if isinstance(path, str) and Path(path).is_file():
            return file_sha256(path)
    return ""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.pt/.bin (torch.load, weights only) or .safetensors file."""
    if not path.is_file():
        raise MedkdError(
            f"weights file {path} not found (pass an official dinov2_vit*14_pretrain.pth or a "
            f"timm state dict / .safetensors file)"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedkdError(f"cannot read weights file {path}: {first_line}") from err
    for key in ("model", "state_dict"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedkdError(f"weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_weights(backbone: nn.Module, path: Path, what: str) -> None:
    """Load an official DINOv2 or timm state dict into `backbone`, pos_embed resampled to its grid."""
    state = read_state_dict(path)
    try:
        # Converts DINOv2 keys (mask_token, register_tokens, w12/w3) and resamples pos_embed.
        state = checkpoint_filter_fn(state, backbone)
    except (RuntimeError, KeyError, ValueError) as err:
        raise MedkdError(
            f"weights file {path} does not fit {what}: {' '.join(str(err).split())[:200]}"
        ) from err
    problem = _state_mismatch(backbone.state_dict(), state)
    if problem:
        raise MedkdError(f"weights file {path} does not fit {what}: {problem}")
    backbone.load_state_dict(state, strict=True)


def _state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """A one-line summary of missing, unexpected and wrongly shaped keys ("" if none)."""

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = [
        f"{len(missing)} missing keys ({first(missing)})" if missing else "",
        f"{len(unexpected)} unexpected keys ({first(unexpected)})" if unexpected else "",
        f"{len(shapes)} shape mismatches (file vs model: {first(shapes)})" if shapes else "",
    ]
    return "; ".join(p for p in parts if p)
