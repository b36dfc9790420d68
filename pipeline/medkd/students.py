"""Student CNNs: torchvision ResNets with a small-image stem for 28/64 px, as MedMNIST's own ResNets."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from medkd.errors import MedkdError
from medkd.registry import STUDENTS

SMALL_STEM_BELOW = 128  # px; below this the 7x7/2 conv + max-pool would discard most of a 28 px image


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def build_student(
    name: str, num_outputs: int, image_size: int, weights: str | os.PathLike | None = None
) -> nn.Module:
    """A randomly initialised ResNet `name` with `num_outputs` logits, or loaded from a state-dict file."""
    if name not in STUDENTS:
        raise MedkdError(f"unknown student {name!r}; valid students: {', '.join(STUDENTS)}")
    if num_outputs < 1:
        raise MedkdError(f"num_outputs must be >= 1, got {num_outputs}")
    if image_size < 8:
        raise MedkdError(f"image_size must be >= 8 px, got {image_size}")
    model = getattr(torchvision.models, STUDENTS[name])(weights=None, num_classes=num_outputs)
    if image_size < SMALL_STEM_BELOW:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        model.maxpool = nn.Identity()
    if weights is not None:
        _load_weights(model, Path(weights), f"{name} with {num_outputs} outputs at {image_size} px")
    return model


def _load_weights(model: nn.Module, path: Path, what: str) -> None:
    if not path.is_file():
        raise MedkdError(
            f"student weights file {path} not found (a run folder's best.pt or a saved state dict)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedkdError(f"cannot read student weights {path}: {first_line}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise MedkdError(f"student weights {path} hold a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("_orig_mod.") for k in state):  # saved from a torch.compile'd model
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    expected = model.state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [
        f"{k!r} has shape {tuple(getattr(state[k], 'shape', ()))}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MedkdError(f"student weights {path} do not fit {what}: {problems[0]}{more}")
    model.load_state_dict(state, strict=True)
