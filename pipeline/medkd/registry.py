"""The registries, as dict literals free of torch: their keys are the CLI choices, so `--help` lists them
without importing a model library. The builders (`medkd.backbones`, `medkd.students`) read them too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherSpec:
    """One named backbone teacher: its timm model id ("tiny": built by medkd) and the official file a user
    can download by hand when the hub is unreachable."""

    timm_id: str
    official_file: str = ""
    patch_size: int = 14


TEACHERS: dict[str, TeacherSpec] = {
    "dinov2_vits14": TeacherSpec("vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": TeacherSpec("vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth"),
    "dinov2_vitl14": TeacherSpec("vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain.pth"),
    "dinov2_vitg14": TeacherSpec("vit_giant_patch14_dinov2.lvd142m", "dinov2_vitg14_pretrain.pth"),
    "dinov2_vits14_reg": TeacherSpec(
        "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2_vits14_reg4_pretrain.pth"
    ),
    "dinov2_vitb14_reg": TeacherSpec(
        "vit_base_patch14_reg4_dinov2.lvd142m", "dinov2_vitb14_reg4_pretrain.pth"
    ),
    "dinov2_vitl14_reg": TeacherSpec(
        "vit_large_patch14_reg4_dinov2.lvd142m", "dinov2_vitl14_reg4_pretrain.pth"
    ),
    "dinov2_vitg14_reg": TeacherSpec(
        "vit_giant_patch14_reg4_dinov2.lvd142m", "dinov2_vitg14_reg4_pretrain.pth"
    ),
    # DINOv2's architecture (patch 14, LayerScale) at toy width and depth, seeded: for tests and the demo.
    "tiny": TeacherSpec("tiny"),
}

# A finished medkd run as teacher: `run:runs/NAME`; several (comma list) make a mean-logit ensemble.
RUN_PREFIX = "run:"

# Student name → the torchvision builder (`torchvision.models.<name>`).
STUDENTS: dict[str, str] = {"resnet18": "resnet18", "resnet50": "resnet50"}

# How a ViT teacher's tokens become one feature vector: the CLS token, or CLS ‖ mean patch token
# (DINOv2's linear evaluation).
POOLS = ("cls", "cls+mean")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
LAUNCHERS = ("local", "ray", "slurm")
SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit executors; "local" runs the array as local processes


def is_run_teacher(teacher: str) -> bool:
    """True for `run:PATH` teachers (one run or a comma list), False for backbone names like `tiny`."""
    return teacher.startswith(RUN_PREFIX)
