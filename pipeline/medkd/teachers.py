"""The teacher interface: what stage one needs of a teacher, whatever it is built from.

A teacher takes images as the data stores them (uint8 (B, H, W) or (B, H, W, 3), on the device), makes
its own input view (size, resize, mean/std) and returns features (B, D) and, when it has a classifier of
its own, logits (B, C). A backbone (`medkd.backbones`) returns features only, and stage one trains a
linear head on them; a finished run or an ensemble of runs (`medkd.run_teacher`) brings its classifier.
Stage one (`medkd.cache_teacher`) is the same for every kind: it only talks to this interface.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from medkd.data import View, prepare_images


class TeacherOutput(NamedTuple):
    features: torch.Tensor  # (B, D)
    logits: torch.Tensor | None  # (B, C), or None for a teacher without a classifier
    # (B, T, D_tok) patch tokens (a CNN's feature map as H·W tokens), only when asked for with
    # `with_tokens=True`: what an attention head is trained on.
    tokens: torch.Tensor | None = None


class Teacher(nn.Module):
    """A frozen teacher: always in eval mode, no gradients. Subclasses set `name` and `feature_dim`,
    build their modules, then call `freeze()`, and implement `forward` and `provenance`."""

    name: str  # the cache's `teacher` attr
    feature_dim: int

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: dropout and friends stay off whatever the caller asks

    def forward(
        self, images: torch.Tensor, with_tokens: bool = False, views: torch.Tensor | None = None
    ) -> TeacherOutput:
        """uint8 images (B, H, W[, 3]) on the teacher's device → features (B, D), logits (B, C) or None,
        and with `with_tokens` the patch tokens (B, T, D_tok); a teacher without tokens raises MedkdError.
        With `views` (B, P) (`medkd.views`), of each image's augmented view instead of the plain one."""
        raise NotImplementedError

    def prepare(self, images: torch.Tensor, view: View, views: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised (B, 3, S, S) input of `view` (of each image's augmented view, given `views`),
        channels_last on CUDA (as the modules are)."""
        if images.device.type == "cuda" and not view.channels_last:
            view = View(view.size, view.mean, view.std, view.interpolation, channels_last=True)
        return prepare_images(images, view, views)

    def to_device(self, device: torch.device) -> Teacher:
        """Move to `device`; on CUDA also to channels_last, the faster layout for convolutions and ViTs."""
        teacher = self.to(device)
        return teacher.to(memory_format=torch.channels_last) if device.type == "cuda" else teacher

    def provenance(self) -> dict[str, Any]:
        """The cache's root attrs about this teacher: backbone, weights_sha256, teacher_input_size,
        resize, mean, std, pool, random_init (and what else its kind records, e.g. `ensemble`)."""
        raise NotImplementedError

    def head_record(self, metrics: dict[str, dict[str, float]]) -> dict[str, Any] | None:
        """The teacher's own classifier as a linear head on its features (weight, bias, HEAD_ATTRS), given
        the val/test metrics of its logits; None when medkd must train a head (a backbone)."""
        return None

    def check_data(self, dataset: str, size: int, n_outputs: int, data_sha256: dict[str, str]) -> None:
        """Refuse data this teacher cannot describe (a run trained on other data); nothing by default."""

    def summary(self) -> str:
        """A few words for the closing line of `medkd cache-teacher`."""
        return ""


def backbone_provenance(
    backbone_id: str, weights_sha256: str, view: View, pool: str, random_init: bool
) -> dict[str, Any]:
    """The provenance attrs of a backbone teacher (one with a head to train), whatever its library."""
    return {
        "backbone": backbone_id,
        "weights_sha256": weights_sha256,
        "teacher_input_size": view.size,
        "resize": view.interpolation,
        "mean": list(view.mean),
        "std": list(view.std),
        "pool": pool,
        "random_init": random_init,
    }


@torch.inference_mode()
def encode(
    teacher: Teacher,
    images: torch.Tensor,
    batch_size: int,
    with_tokens: bool = False,
    views: torch.Tensor | None = None,
) -> TeacherOutput:
    """`teacher` over every image of `images` (uint8, on the teacher's device) in order, `batch_size` at
    a time: features (N, D) and logits (N, C) or None, float32 on the CPU; with `with_tokens` also the
    tokens (N, T, D_tok) in float16 (what they are stored as); with `views` (N, P), of those views."""
    on_cuda = images.device.type == "cuda"
    features, logits, tokens = [], [], []
    for start in range(0, len(images), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            rows = views[start : start + batch_size] if views is not None else None
            out = teacher(images[start : start + batch_size], with_tokens=with_tokens, views=rows)
        features.append(out.features.float().cpu())
        if out.logits is not None:
            logits.append(out.logits.float().cpu())
        if with_tokens:
            tokens.append(out.tokens.half().cpu())
    return TeacherOutput(
        torch.cat(features), torch.cat(logits) if logits else None, torch.cat(tokens) if tokens else None
    )
