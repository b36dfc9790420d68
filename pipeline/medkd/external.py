"""Teachers from other libraries: the image tower of an open_clip model (BiomedCLIP, any `open_clip:` id)
and a Hugging Face transformers vision model (RAD-DINO, any `hf:` id or save_pretrained folder), behind the
optional extras `medkd[open-clip]` and `medkd[hf]`.

Like a timm backbone, such a teacher returns features only, pooled from its final (normalised) tokens as
`registry.POOLS` says: the CLS token, CLS ‖ mean patch token, or "avg", the mean of the patch tokens; and
with `with_tokens` the patch tokens themselves. Weights come from the Hugging Face hub (checked to be
reachable in seconds first) or from `--weights FILE`, a state dict loaded into the architecture.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from medkd.backbones import read_state_dict
from medkd.data import View
from medkd.errors import MedkdError, first_line
from medkd.files import file_sha256
from medkd.hub import hub_unreachable
from medkd.registry import INTERPOLATIONS, POOLS, install_hint
from medkd.teachers import Teacher, TeacherOutput, backbone_provenance

# The files of an open_clip hub repo (open_clip.constants), weights in order of preference.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# PIL resample codes (what image processors store) → medkd's interpolations; others (lanczos, box,
# hamming) fall back to bicubic, the nearest medkd has.
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ExternalTeacher(Teacher):
    """A frozen image tower of another library: features (B, D) pooled from its final tokens, no logits."""

    def __init__(
        self,
        name: str,
        tower: nn.Module,
        backbone_id: str,
        pool: str | None,
        view: View,
        weights_sha256: str,
        patch_size: int | None = None,
    ):
        super().__init__()
        self.tower = tower  # normalised (B, 3, S, S) → (prefix tokens (B, P, D) or None, patches (B, T, D))
        self.name = name
        self.backbone_id = backbone_id
        self.view = view
        self.img_size = view.size
        self.mean, self.std = view.mean, view.std
        self.weights_sha256 = weights_sha256
        self.freeze()
        if patch_size and view.size % patch_size:
            raise MedkdError(
                f"{backbone_id} needs an input size that is a multiple of its patch size {patch_size}, "
                f"got {view.size} (pass --teacher-size)"
            )
        # One blank image through the tower now: the feature width whatever the tower is, and a size the
        # model refuses fails here, in one line, rather than after the data are loaded.
        try:
            with torch.inference_mode():
                prefix, patches = self.tower(torch.zeros(1, 3, view.size, view.size))
        except (RuntimeError, ValueError, AssertionError) as err:
            raise MedkdError(f"{backbone_id} cannot take {view.size} px input: {first_line(err)}") from err
        self.pool = pool or ("cls" if prefix is not None else "avg")  # the model's own: CLS when it has one
        if self.pool != "avg" and prefix is None:
            raise MedkdError(f"{backbone_id} has no CLS token, so pool '{self.pool}' is impossible; use avg")
        self.feature_dim = patches.shape[-1] * (2 if self.pool == "cls+mean" else 1)

    def pooled(self, prefix: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
        """Final tokens → pooled features (B, D): CLS, CLS ‖ mean patch token, or mean patch token."""
        if self.pool == "avg":
            return patches.mean(dim=1)
        cls = prefix[:, 0]  # (B, D); register tokens, if any, follow it and are left out
        return cls if self.pool == "cls" else torch.cat([cls, patches.mean(dim=1)], dim=1)  # (B, 2D)

    def forward(
        self, images: torch.Tensor, with_tokens: bool = False, views: torch.Tensor | None = None
    ) -> TeacherOutput:
        prefix, patches = self.tower(self.prepare(images, self.view, views))
        return TeacherOutput(self.pooled(prefix, patches), None, patches if with_tokens else None)

    def provenance(self) -> dict[str, Any]:
        return backbone_provenance(self.backbone_id, self.weights_sha256, self.view, self.pool, False)

    def summary(self) -> str:
        return f"→ {self.img_size} px"


class OpenClipTower(nn.Module):
    """An open_clip image tower (`model.visual`: its ViT, or a timm trunk) as final tokens."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel wraps a timm model
        self.has_prefix = hasattr(visual, "class_embedding") or getattr(trunk, "num_prefix_tokens", 0) > 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        # The last block's tokens under the tower's final norm (ln_post, or the timm trunk's norm): what its
        # projection reads. Features are taken *before* that projection to the joint image-text space:
        # CLIP's own linear probes used these ("features before the linear projection", CLIP paper, A.3), a
        # linear head can learn the projection but not undo it (768 → 512 for ViT-B), and they are what
        # medkd's timm CLIP teachers (clip_vitb16) give, so one CLIP gives one cache through either library.
        out = self.visual.forward_intermediates(
            x,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NCHW",  # every tower can; a ViT's tokens come back as a (B, D, H, W) grid
            output_extra_tokens=self.has_prefix,
        )
        patches = out["image_intermediates"][-1].flatten(2).transpose(1, 2)  # (B, T, D), row-major
        prefix = out.get("image_intermediates_prefix")
        return (prefix[-1] if prefix else None), patches


class HfTower(nn.Module):
    """A transformers vision model as final tokens: its `last_hidden_state`, split into prefix and patches."""

    def __init__(self, model: nn.Module, patch_size: int | None):
        super().__init__()
        self.model = model
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        hidden = self.model(pixel_values=x).last_hidden_state  # after the final layernorm (ViT, DINOv2)
        if hidden.dim() == 4:  # a CNN's (B, C, H, W) feature map: no CLS token
            return None, hidden.flatten(2).transpose(1, 2)
        # Prefix tokens (CLS, registers, DeiT's distillation token) come first; count them from the grid,
        # so no per-model list is needed. A model whose tokens are coarser than its patches (Swin) has none.
        p = self.patch_size
        n_patches = (x.shape[-2] // p) * (x.shape[-1] // p) if p else hidden.shape[1]
        n_prefix = hidden.shape[1] - n_patches if 0 < n_patches <= hidden.shape[1] else 0
        return (hidden[:, :n_prefix] if n_prefix else None), hidden[:, n_prefix:]


def build_open_clip_teacher(
    name: str,
    model_id: str,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    pool: str | None = None,
) -> ExternalTeacher:
    """The frozen image tower of the open_clip model `model_id`: `hf-hub:ORG/NAME`, `ARCH` (open_clip's
    default weights of that architecture: `openai` where it has them) or `ARCH:TAG`. Weights: `weights` (a
    state dict file: a whole CLIP or its image tower), else the hub. Preprocessing (mean, std, resize, size)
    is the model's open_clip preprocess config; `img_size` overrides the size (position embeddings are
    resampled). Only the image tower is built: no text model, no tokenizer."""
    open_clip = _import_extra("open-clip", "open_clip")
    from open_clip.model import _build_vision_tower, resize_pos_embed  # the tower without the text model
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pool = _check_pool(pool)
    weights_path = _weights_path(weights)
    model_cfg, preprocess, checkpoint, backbone_id = _resolve_open_clip(open_clip, model_id, weights_path)
    vision_cfg = dict(model_cfg["vision_cfg"])
    native = _square(vision_cfg.get("image_size", 224), model_id)
    size = img_size or native
    vision_cfg["image_size"] = size  # open_clip's ViT sizes its position grid from this
    what = f"{name} ({backbone_id}) at {size} px"
    try:
        visual = _build_vision_tower(
            model_cfg["embed_dim"], vision_cfg, quick_gelu=bool(model_cfg.get("quick_gelu", False))
        )
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as err:
        raise MedkdError(f"cannot build the image tower of {what}: {first_line(err)}") from err
    holder = nn.Module()  # open_clip's helpers address the tower as `model.visual`
    holder.visual = visual
    state = _open_clip_tower_state(read_state_dict(_weights_path(checkpoint)))
    resize_pos_embed(state, holder)  # a checkpoint at another size: position grid resampled to `size`
    _load_strict(holder, state, checkpoint, what)
    if size != native and hasattr(visual, "set_input_size"):
        visual.set_input_size(size)  # a timm trunk resamples its own position embeddings
    cfg = merge_preprocess_dict(PreprocessCfg(), preprocess)  # open_clip's defaults under the model's own
    view = View(size, _triple(cfg["mean"]), _triple(cfg["std"]), _interpolation(cfg["interpolation"]))
    trunk = getattr(visual, "trunk", visual)  # a timm trunk's patch size is its patch_embed's
    patch = getattr(getattr(trunk, "patch_embed", None), "patch_size", None) or getattr(
        visual, "patch_size", None
    )
    return ExternalTeacher(
        name,
        OpenClipTower(visual),
        backbone_id,
        pool,
        view,
        file_sha256(checkpoint),
        patch_size=_square(patch, model_id) if patch else None,
    )


def _resolve_open_clip(
    open_clip: ModuleType, model_id: str, weights: Path | None
) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """The model config, preprocess overrides, weights file and provenance id of an open_clip id."""
    if model_id.startswith("hf-hub:"):
        repo = model_id[len("hf-hub:") :]
        hint = (
            f"download {OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS[1]} from the hub repo {repo} into one "
            f"folder and pass --weights FOLDER/{OPEN_CLIP_WEIGHTS[1]}"
        )
        beside = weights.parent / OPEN_CLIP_CONFIG if weights else None
        if beside is not None and beside.is_file():  # the whole repo downloaded by hand: no hub at all
            config_file, checkpoint = str(beside), str(weights)
        else:
            wanted = [(OPEN_CLIP_CONFIG,)] + ([] if weights else [OPEN_CLIP_WEIGHTS])
            config_file, *downloaded = _hub_files(repo, wanted, model_id, hint)
            checkpoint = str(weights) if weights else downloaded[0]
        config = _read_json(config_file)
        if "model_cfg" not in config:
            raise MedkdError(f"{config_file} has no model_cfg: not an open_clip config")
        return config["model_cfg"], config.get("preprocess_cfg", {}), checkpoint, f"open_clip:{model_id}"
    arch, _, tag = model_id.partition(":")
    model_cfg = open_clip.get_model_config(arch)  # a copy: the built-in configs are left alone
    if model_cfg is None:
        raise MedkdError(
            f"unknown open_clip model '{arch}' (open_clip.list_models() lists them; hf-hub:ORG/NAME for a "
            f"hub repo)"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = tag or ("openai" if "openai" in tags else tags[0] if tags else "")
    if tag and tag not in tags:
        raise MedkdError(f"open_clip has no weights '{tag}' for {arch}; valid: {', '.join(tags) or 'none'}")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    # The weights a tag was trained with need its activation (OpenAI's: QuickGELU), which the plain
    # architecture config does not say; open_clip itself only warns about the mismatch.
    model_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
    backbone_id = f"open_clip:{arch}" + (f":{tag}" if tag else "")
    if weights is not None:
        return model_cfg, tag_cfg, str(weights), backbone_id
    if not tag:
        raise MedkdError(f"open_clip has no pretrained weights for {arch}; pass --weights FILE")
    repo, filename = os.path.split(tag_cfg["hf_hub"])  # 'org/name/FILE', or 'org/name/': its default file
    hint = f"download {OPEN_CLIP_WEIGHTS[1]} from the hub repo {repo} and pass --weights FILE"
    (checkpoint,) = _hub_files(repo, [(filename,) if filename else OPEN_CLIP_WEIGHTS], backbone_id, hint)
    return model_cfg, tag_cfg, checkpoint, backbone_id


def _open_clip_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole CLIP's state dict (or its image tower's own) as the tower's, keyed `visual.*`."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # open_clip's DDP training checkpoints
    if any(k.startswith("visual.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("visual.")}  # the text model is not ours
    return {f"visual.{k}": v for k, v in state.items()}


def build_hf_teacher(
    name: str,
    model_id: str,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    pool: str | None = None,
) -> ExternalTeacher:
    """The frozen transformers vision model `model_id` (a hub id or a save_pretrained folder), through
    AutoModel. Weights: `weights` (a state dict file, loaded into the architecture of the config.json beside
    it, else of `model_id`), else the model's own. Mean, std, resize and size are its image processor's
    (preprocessor_config.json); `img_size` overrides the size."""
    _import_extra("hf", "transformers")
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    pool = _check_pool(pool)
    weights_path = _weights_path(weights)
    beside = weights_path is not None and (weights_path.parent / "config.json").is_file()
    source = str(weights_path.parent) if beside else model_id  # a hand-downloaded repo: no hub at all
    local = Path(source).is_dir()
    hint = (
        f"download config.json, preprocessor_config.json and {HF_WEIGHTS[0]} from the hub repo {model_id} "
        f"into one folder and pass hf:FOLDER, or --weights FOLDER/{HF_WEIGHTS[0]}"
    )
    if local:
        hint = (
            f"{source} must hold config.json and preprocessor_config.json (what save_pretrained of the model "
            f"and of its image processor write)"
        )
    with _loading(None if local else model_id, model_id, hint) as offline:
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline)
        if weights_path is None:
            model = AutoModel.from_pretrained(source, local_files_only=offline)
        else:
            config = AutoConfig.from_pretrained(source, local_files_only=offline)
    if weights_path is None:
        found = _hf_weights_file(source, local)
        sha = file_sha256(found) if found else ""  # a sharded checkpoint has no one file to hash
    else:
        model, sha = _hf_with_weights(config, weights_path, f"{name} ({model_id})"), file_sha256(weights_path)
    model = model.float()  # fp32 whatever the checkpoint's dtype; stage one autocasts on CUDA
    patch = getattr(model.config, "patch_size", None)
    patch = patch if isinstance(patch, int) else None
    view = _hf_view(processor, model.config, img_size)
    backbone_id = f"hf:{model_id}"
    return ExternalTeacher(name, HfTower(model, patch), backbone_id, pool, view, sha, patch_size=patch)


def _hf_with_weights(config: Any, path: Path, what: str) -> nn.Module:
    """The base model of `config` with the weights of the state dict file `path`, every one of them there.
    transformers itself loads them: its renames of older checkpoint keys (hub files keep the names of the
    version that saved them) and a task model's prefix (`dinov2.*`); the task's own head is left out."""
    from transformers import MODEL_MAPPING
    from transformers.utils import logging as hf_logging

    state = read_state_dict(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat, in a table, what medkd says in a line
    try:
        model, info = MODEL_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (KeyError, RuntimeError, ValueError) as err:
        raise MedkdError(f"weights file {path} does not fit {what}: {first_line(err)}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    missing, mismatched = sorted(info["missing_keys"]), sorted(info["mismatched_keys"])
    problems = [f"{len(missing)} missing keys (first {missing[0]})"] if missing else []
    if mismatched:
        key, got, want = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches (first {key}: file {tuple(got)}, model {tuple(want)})"
        )
    if problems:
        raise MedkdError(f"weights file {path} does not fit {what}: {'; '.join(problems)}")
    return model


def _hf_view(processor: Any, config: Any, img_size: int | None) -> View:
    """The input view an image processor describes. MedMNIST images are square and centred, so they are
    resized to the processor's crop size (else its resize size) whole: no resize-then-crop that cuts edges."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    native = _size_value(crop) or _size_value(getattr(processor, "size", None))
    size = img_size or native or getattr(config, "image_size", None) or 224
    if getattr(processor, "do_normalize", True):
        mean, std = _triple(processor.image_mean), _triple(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", 3)
    return View(int(size), mean, std, PIL_RESAMPLE.get(int(resample), "bicubic"))


def _hf_weights_file(source: str, local: bool) -> str:
    """The one weights file of a folder or a cached hub repo ("" when sharded or not found)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_WEIGHTS:
        path = Path(source) / filename if local else try_to_load_from_cache(source, filename)
        if isinstance(path, (str, Path)) and Path(path).is_file():
            return str(path)
    return ""


@contextmanager
def _loading(repo: str | None, what: str, hint: str) -> Iterator[bool]:
    """Around a library's loading calls: yields whether they must keep to the local cache (the hub is out of
    reach; `repo` None: a local folder, no hub involved), and turns what they raise into one line."""
    problem = hub_unreachable() if repo else ""
    try:
        yield bool(problem)
    except MedkdError:
        raise
    except Exception as err:  # the libraries raise OSError, ValueError, HTTP and hub error types alike
        if problem:
            message = f"cannot reach the Hugging Face hub ({problem}) and {what} is not in the local cache"
        elif repo:
            message = f"could not load {what} from the Hugging Face hub ({first_line(err)})"
        else:
            message = f"could not load {what}: {first_line(err)}"
        raise MedkdError(f"{message}; {hint}") from err


def _hub_files(repo: str, wanted: list[tuple[str, ...]], what: str, hint: str) -> list[str]:
    """For each group of alternative file names, the local path of the first one the hub repo has."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    paths = []
    with _loading(repo, what, hint) as offline:
        for names in wanted:
            for i, filename in enumerate(names):
                try:
                    paths.append(hf_hub_download(repo, filename, local_files_only=offline))
                    break
                except EntryNotFoundError:  # not in the repo (or the cache): try the next alternative
                    if i == len(names) - 1:
                        raise
    return paths


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    """Load `state` into `module` with every key and shape matching, else one line naming the first miss."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} shape mismatches (first {k}: file {tuple(state[k].shape)}, model "
            f"{tuple(expected[k].shape)})"
        )
    if problems:
        raise MedkdError(f"weights file {path} does not fit {what}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def _import_extra(extra: str, module: str) -> ModuleType:
    """The library of an optional extra, or one line naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MedkdError(f"{extra} teachers need the {module} library: {install_hint(extra)}") from err


def _check_pool(pool: str | None) -> str | None:
    if pool and pool not in POOLS:
        raise MedkdError(f"unknown pool '{pool}'; valid: {', '.join(POOLS)}")
    return pool or None  # "" (a prefixed id's spec) and None: the model's own


def _weights_path(weights: str | os.PathLike | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise MedkdError(f"weights file {path} not found")
    return path


def _read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MedkdError(f"cannot read {path}: {first_line(err)}") from err


def _square(size: Any, model_id: str) -> int:
    """An int or (h, w) size as one int; medkd's inputs are square."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise MedkdError(f"{model_id} takes {h}x{w} inputs; medkd teachers take square images")
    return int(h)


def _size_value(size: Any) -> int | None:
    """A processor's size: an int, or a dict / SizeDict with height or shortest_edge."""
    if size is None or isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def _triple(values: Any) -> tuple[float, float, float]:
    """Per-channel statistics for RGB; one value (a grayscale model's) is repeated."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return tuple(values * 3) if len(values) == 1 else tuple(values[:3])


def _interpolation(name: str) -> str:
    return name if name in INTERPOLATIONS else "bicubic"
