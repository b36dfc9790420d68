"""Frozen timm backbones as teachers: any timm model (the registry's DINOv2/v3, MAE, AIMv2, SAM2, CLIP,
SigLIP, EVA-02, EfficientNet-Lite, ConvNeXt, or `timm:<id>`), from the hub, a weights file or an installed
weights package, and a tiny random ViT.

A backbone teacher returns features only, pooled as its spec says (`registry.POOLS`): the CLS token,
CLS ‖ mean patch token (DINOv2's linear evaluation), or "avg", the model's own global pooling (mean of the
patch tokens; for a CNN or Hiera its head's pooling of the feature map). Stage one trains a head on them.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medkd.data import View
from medkd.errors import MedkdError, first_line
from medkd.files import file_sha256
from medkd.hub import hub_unreachable
from medkd.lite import is_lite_state, lite_weights_file, map_lite_state
from medkd.registry import POOLS, TEACHERS, TeacherSpec, install_hint, teacher_spec
from medkd.teachers import Teacher, TeacherOutput, backbone_provenance

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
    """A frozen timm backbone: features (B, D) of its own view, no logits."""

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
        interpolation: str = "bicubic",
    ):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.backbone_id = backbone_id
        self.pool = pool
        self.img_size = img_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.view = View(img_size, self.mean, self.std, interpolation)
        self.weights_sha256 = weights_sha256
        self.is_random_init = is_random_init
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.feature_dim = backbone.num_features * (2 if pool == "cls+mean" else 1)
        self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) → pooled features (B, D)."""
        return self.pooled(self.backbone.forward_features(x))

    def pooled(self, out: torch.Tensor) -> torch.Tensor:
        """The backbone's `forward_features` output → pooled features (B, D).

        Token models give (B, prefix + patches, D) with the final norm applied; CNNs and Hiera give a
        feature map, which their own head pools (ConvNeXt's head also normalises after pooling).
        """
        if out.ndim == 4:
            return self.backbone.forward_head(out, pre_logits=True)  # (B, D)
        patches = out[:, self.prefix_tokens :]  # register tokens excluded
        if self.pool == "avg":
            return patches.mean(dim=1)
        cls = out[:, 0]  # (B, D)
        return cls if self.pool == "cls" else torch.cat([cls, patches.mean(dim=1)], dim=1)  # (B, 2D)

    def tokens(self, out: torch.Tensor) -> torch.Tensor:
        """The patch tokens (B, T, D) of a `forward_features` output; a feature map's H·W positions."""
        if out.ndim == 3:
            return out[:, self.prefix_tokens :]
        if out.shape[1] == self.backbone.num_features:  # (B, D, H, W), CNNs
            return out.flatten(2).transpose(1, 2)
        return out.flatten(1, 2)  # (B, H, W, D), Hiera

    def forward(
        self, images: torch.Tensor, with_tokens: bool = False, views: torch.Tensor | None = None
    ) -> TeacherOutput:
        out = self.backbone.forward_features(self.prepare(images, self.view, views))
        return TeacherOutput(self.pooled(out), None, self.tokens(out) if with_tokens else None)

    def provenance(self) -> dict[str, Any]:
        return backbone_provenance(
            self.backbone_id, self.weights_sha256, self.view, self.pool, self.is_random_init
        )

    def summary(self) -> str:
        note = " [yellow](random-init teacher: a test, not a real teacher)[/]" if self.is_random_init else ""
        return f"→ {self.img_size} px{note}"


def build_teacher(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    pool: str | None = None,
    pretrained: bool = True,
    **model_args: Any,
) -> BackboneTeacher:
    """The frozen timm teacher `name` (a registry name or `timm:<id>`) at `img_size` px (None: its spec's,
    else timm's pretrained size), pooled by `pool` (None: its spec's). Weights: `weights` (a file), else the
    spec's weights package, else the hub; `pretrained=False` keeps timm's random init (a smoke test, like
    `tiny`, which is always a seeded init). `model_args` go to timm (tests shrink depth with them)."""
    spec = teacher_spec(name)
    if spec is None or spec.source not in ("timm", "tiny"):
        timm_names = [n for n, s in TEACHERS.items() if s.source in ("timm", "tiny")]
        raise MedkdError(f"unknown teacher '{name}'; valid: {', '.join(timm_names)} or timm:<id>")
    if pool is not None and pool not in POOLS:
        raise MedkdError(f"unknown pool '{pool}'; valid: {', '.join(POOLS)}")
    if spec.source == "tiny":
        return _build_tiny(weights, img_size or 224, pool or "cls")
    pretrained_cfg = _pretrained_cfg(spec.model_id)
    img_size = img_size or spec.input_size or int(pretrained_cfg.input_size[-1])
    if img_size <= 0:
        raise MedkdError(f"teacher input size must be positive, got {img_size}")
    if pretrained_cfg.fixed_input_size:  # ViTs: position embeddings for this grid (resampled on load)
        model_args = {"img_size": img_size, **model_args}
    what = f"{name} ({spec.model_id}) at {img_size} px"
    architecture = _architecture(spec.model_id, model_args, what)  # no weights: checks before a download
    pool = pool or spec.pool or _own_pool(architecture)
    _check_input(architecture, img_size, pool, name)
    if weights is None and spec.weights_package and pretrained:
        weights = lite_weights_file(spec.weights_package)
    if weights is None and not pretrained:
        backbone, sha = _create(spec.model_id, False, model_args, what), ""
    elif weights is None:
        backbone, sha = _download(spec, model_args, what)
    else:
        backbone = _create(spec.model_id, False, model_args, what)
        load_weights(backbone, Path(weights), what)
        sha = file_sha256(weights)
    cfg = backbone.pretrained_cfg
    return BackboneTeacher(
        name, backbone, spec.model_id, pool, img_size, cfg["mean"], cfg["std"], sha,
        is_random_init=weights is None and not pretrained,
        interpolation=cfg.get("interpolation") or "bicubic",
    )  # fmt: skip


def _build_tiny(weights: str | os.PathLike | None, img_size: int, pool: str) -> BackboneTeacher:
    if img_size % PATCH_SIZE:
        raise MedkdError(
            f"teacher input size must be a multiple of the patch size {PATCH_SIZE} (e.g. 28, 56, 224), "
            f"got {img_size}"
        )
    with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG is left alone
        torch.manual_seed(TINY_SEED)
        backbone = VisionTransformer(img_size=img_size, init_values=TINY_LAYER_SCALE, **TINY_ARGS)
    sha = ""
    if weights is not None:
        load_weights(backbone, Path(weights), f"tiny (tiny) at {img_size} px")
        sha = file_sha256(weights)
    return BackboneTeacher(
        "tiny",
        backbone,
        "tiny",
        pool,
        img_size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        sha,
        is_random_init=weights is None,
    )


def _pretrained_cfg(model_id: str) -> Any:
    try:
        return timm.models.get_pretrained_cfg(model_id, allow_unregistered=False)
    except (RuntimeError, ValueError):
        cfg = None
    if cfg is None:  # not a known architecture.tag
        raise MedkdError(
            f"timm has no model '{model_id}' (timm {timm.__version__}); list ids with "
            f"python -c \"import timm; print(timm.list_models('*name*', pretrained=True))\""
        )
    return cfg


def _architecture(model_id: str, model_args: dict[str, Any], what: str) -> nn.Module:
    """The model without weights, on the meta device: its shape facts in a fraction of a second."""
    with torch.device("meta"):
        return _create(model_id, False, model_args, what)


def describe_teachers() -> list[dict[str, Any]]:
    """One row per registry teacher for `medkd teachers`: source id, parameters, default input size,
    feature dim and pooling (timm models are built on the meta device; open_clip/hf ones show "?")."""
    rows = []
    for name, spec in TEACHERS.items():
        row = {"name": name, "source": f"{spec.source}:{spec.model_id}", "extra": spec.extra or "-"}
        row.update(params="?", input_size="?", feature_dim="?", pool=spec.pool or "own")
        if spec.source == "tiny":
            row.update(source="medkd (random init, for tests)", input_size=224, pool="cls")
            model = VisionTransformer(img_size=224, init_values=TINY_LAYER_SCALE, **TINY_ARGS)
        elif spec.source == "timm":
            cfg = _pretrained_cfg(spec.model_id)
            size = spec.input_size or int(cfg.input_size[-1])
            row["input_size"] = size
            model = _architecture(spec.model_id, {"img_size": size} if cfg.fixed_input_size else {}, name)
        else:
            rows.append(row)
            continue
        width = model.num_features * (2 if row["pool"] == "cls+mean" else 1)
        row.update(params=sum(p.numel() for p in model.parameters()), feature_dim=width)
        if row["pool"] == "avg":  # token models average their patch tokens, CNNs and Hiera their map
            row["pool"] = "avg (patch tokens)" if hasattr(model, "num_prefix_tokens") else "avg (feature map)"
        rows.append(row)
    return rows


def _own_pool(backbone: nn.Module) -> str:
    """A `timm:` model's own pooling: its CLS token when its head reads one, else the average."""
    has_cls = getattr(backbone, "num_prefix_tokens", 0) and getattr(backbone, "global_pool", "") == "token"
    return "cls" if has_cls else "avg"


def _check_input(backbone: nn.Module, img_size: int, pool: str, name: str) -> None:
    patch_embed = getattr(backbone, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(patch, int) and img_size % patch:
        raise MedkdError(
            f"teacher input size must be a multiple of {name}'s patch size {patch} "
            f"(e.g. {patch * 8}, {patch * 16}), got {img_size}"
        )
    if pool in ("cls", "cls+mean") and not getattr(backbone, "num_prefix_tokens", 0):
        raise MedkdError(f"{name} has no CLS token to pool with --pool {pool}; use --pool avg")


def _create(
    model_id: str, pretrained: bool, model_args: dict[str, Any], what: str, **kwargs: Any
) -> nn.Module:
    try:
        return timm.create_model(model_id, pretrained=pretrained, num_classes=0, **model_args, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        raise MedkdError(f"cannot build {what}: {first_line(err)}") from err


def _download(spec: TeacherSpec, model_args: dict[str, Any], what: str) -> tuple[nn.Module, str]:
    """The model with timm's pretrained weights: from the local hub cache, else the hub; and their sha256."""
    cached = _hub_cached_file(spec.model_id)
    if cached:
        overlay = {"file": cached}  # no network round trip for weights already on disk
        return _create(spec.model_id, True, model_args, what, pretrained_cfg_overlay=overlay), file_sha256(
            cached
        )
    hint = f"download {spec.official_file or 'its weights'} elsewhere and pass --weights FILE"
    if spec.weights_package:
        hint = f"{install_hint(spec.extra)}, or pass --weights FILE"
    problem = hub_unreachable()
    if problem:
        raise MedkdError(f"could not download {spec.model_id} weights ({problem}); {hint}")
    try:
        backbone = timm.create_model(spec.model_id, pretrained=True, num_classes=0, **model_args)
    except Exception as err:  # hub errors come as OSError, HTTP and huggingface_hub types alike
        raise MedkdError(f"could not download {spec.model_id} weights ({first_line(err)}); {hint}") from err
    cached = _hub_cached_file(spec.model_id)
    return backbone, file_sha256(cached) if cached else ""


def _hub_cached_file(model_id: str) -> str:
    """The weights file of timm's hub id for `model_id` in the local huggingface cache ("" if absent)."""
    hub_id = getattr(_pretrained_cfg(model_id), "hf_hub_id", None) or f"timm/{model_id}"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str) and Path(path).is_file():
            return path
    return ""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.pt/.bin (torch.load, weights only) or .safetensors file."""
    if not path.is_file():
        raise MedkdError(
            f"weights file {path} not found (pass a timm state dict / .safetensors file, an official "
            f"dinov2_vit*14_pretrain.pth or an EfficientNet-Lite .pth)"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise MedkdError(f"cannot read weights file {path}: {first_line(err)}") from err
    for key in ("model", "state_dict"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedkdError(f"weights file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_weights(backbone: nn.Module, path: Path, what: str) -> None:
    """Load a state dict file into `backbone`: timm's own layout, an official DINOv2 file, or an
    EfficientNet-Lite package file; pos_embed resampled to its grid, a classifier it lacks dropped."""
    state = read_state_dict(path)
    if is_lite_state(state):
        state = map_lite_state(state, backbone.state_dict())
    else:
        try:
            # The model family's own converter: DINOv2 keys (mask_token, register_tokens, w12/w3) and
            # pos_embed resampling for ViTs, original-repo layouts for others.
            state = _checkpoint_filter(backbone)(state, backbone)
        except (RuntimeError, KeyError, ValueError, AttributeError) as err:
            raise MedkdError(
                f"weights file {path} does not fit {what}: {' '.join(str(err).split())[:200]}"
            ) from err
    expected = backbone.state_dict()
    # A backbone is built without a classifier (num_classes=0): a file's ImageNet head is not ours.
    classifier = str((getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "head")
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(classifier + ".")}
    problem = _state_mismatch(expected, state)
    if problem:
        raise MedkdError(f"weights file {path} does not fit {what}: {problem}")
    backbone.load_state_dict(state, strict=True)


def _checkpoint_filter(backbone: nn.Module) -> Any:
    """timm's `checkpoint_filter_fn` of the backbone's model family (the identity if it has none)."""
    module = sys.modules[type(backbone).__module__]
    return getattr(module, "checkpoint_filter_fn", lambda state, _model: state)


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
