"""open_clip and Hugging Face transformers teachers: tiny random models checked against the libraries' own
forward passes, weights files, the missing extra and the unreachable hub, each in one line."""

import copy
import json
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from medkd import external
from medkd.errors import MedkdError
from medkd.external import build_hf_teacher, build_open_clip_teacher
from medkd.files import file_sha256
from medkd.hub import hub_unreachable
from medkd.registry import TEACHERS, install_hint

TINY_CLIP = "medkd-tiny-clip"  # a random open_clip CLIP: 32 px, patch 8, one block of width 32
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
HF_MEAN, HF_STD = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)  # not ImageNet's: the processor's values must be used
NO_SUCH_REPO = "medkd-test/no-such-model"  # in no cache, on no hub


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, S, S, 3) at the model's own size → its normalised input, written out by hand."""
    x = images.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def one_line_error(call) -> str:
    with pytest.raises(MedkdError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


# --- open_clip ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip(tmp_path_factory: pytest.TempPathFactory):
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder)  # open_clip's own registry of architectures
    return open_clip


@pytest.fixture(scope="module")
def tiny_clip(open_clip, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A random tiny CLIP and its whole state dict saved as open_clip saves one."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return model, path


def clip_reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's own forward of the image tower, projection off: (pre-projection CLS, patch tokens)."""
    visual = copy.deepcopy(model.visual)
    visual.proj, visual.output_tokens = None, True
    with torch.no_grad():
        return visual(x)


def test_open_clip_weights_file_gives_open_clip_s_own_features_and_tokens(open_clip, tiny_clip):
    model, path = tiny_clip
    teacher = build_open_clip_teacher(f"open_clip:{TINY_CLIP}", TINY_CLIP, path)
    images = torch.randint(
        0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    out = teacher(images, with_tokens=True)
    # Mean/std are open_clip's defaults for an architecture without weights tags (OpenAI's).
    cls, tokens = clip_reference(
        model, normalise(images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    )
    torch.testing.assert_close(out.features, cls)
    torch.testing.assert_close(out.tokens, tokens)
    assert out.tokens.shape == (3, 16, 32) and out.logits is None and teacher.feature_dim == 32
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert teacher.provenance() == {
        "backbone": f"open_clip:{TINY_CLIP}",
        "weights_sha256": file_sha256(path),
        "teacher_input_size": 32,
        "resize": "bicubic",
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "pool": "cls",
        "random_init": False,
    }
    # The image tower's own state dict, as .safetensors, loads to the same features.
    tower_file = path.parent / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, tower_file)
    again = build_open_clip_teacher("again", TINY_CLIP, tower_file)
    torch.testing.assert_close(again(images).features, out.features, rtol=0, atol=0)


def test_open_clip_pools_and_another_size_resample_the_position_grid(open_clip, tiny_clip):
    model, path = tiny_clip
    teacher = build_open_clip_teacher("t", TINY_CLIP, path, img_size=48, pool="cls+mean")
    out = teacher(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), with_tokens=True)  # gray, 28 px
    assert out.tokens.shape == (2, 36, 32) and out.features.shape == (2, 64) == (2, teacher.feature_dim)
    torch.testing.assert_close(out.features[:, 32:], out.tokens.mean(dim=1))
    assert teacher.provenance()["teacher_input_size"] == 48
    avg = build_open_clip_teacher("t", TINY_CLIP, path, img_size=48, pool="avg")
    assert avg(torch.zeros(1, 28, 28, dtype=torch.uint8)).features.shape == (1, 32) == (1, avg.feature_dim)
    message = one_line_error(lambda: build_open_clip_teacher("t", TINY_CLIP, path, img_size=36))
    assert "multiple of its patch size 8" in message


def test_open_clip_file_of_another_architecture_is_one_line_naming_the_mismatch(open_clip, tmp_path):
    wider = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "width": 48}}
    (tmp_path / "medkd-wider-clip.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path)
    path = tmp_path / "wider.pt"
    torch.save(open_clip.create_model("medkd-wider-clip", pretrained=None).state_dict(), path)
    message = one_line_error(lambda: build_open_clip_teacher("t", TINY_CLIP, path))
    assert f"weights file {path} does not fit" in message and "shape mismatches (first visual." in message


def test_open_clip_hub_repo_downloaded_by_hand_needs_no_hub_and_builds_only_the_image_tower(
    open_clip, tmp_path
):
    # BiomedCLIP's layout: a timm ViT trunk with a linear projection, and a Hugging Face text model
    # that exists nowhere: building it would need the hub, so this also shows that only the image tower
    # is built. Its preprocess_cfg (not open_clip's default) must give mean and std.
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear"},
            "text_cfg": {"hf_model_name": NO_SUCH_REPO, "hf_proj_type": "mlp", "context_length": 8},
        },
        "preprocess_cfg": {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    visual = open_clip.model._build_vision_tower(16, config["model_cfg"]["vision_cfg"]).eval()
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state["text.proj.weight"] = torch.zeros(16, 16)  # a whole CLIP's text keys are left out
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    teacher = build_open_clip_teacher(
        "biomedclip", f"hf-hub:{NO_SUCH_REPO}", tmp_path / "open_clip_pytorch_model.bin", img_size=32
    )
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    out = teacher(images, with_tokens=True)
    trunk = copy.deepcopy(visual.trunk)
    trunk.set_input_size(img_size=32)
    with torch.no_grad():
        tokens = trunk.forward_features(normalise(images, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)))  # (B, 1+4, 192)
    torch.testing.assert_close(out.features, tokens[:, 0])
    torch.testing.assert_close(out.tokens, tokens[:, 1:])
    assert teacher.provenance()["mean"] == [0.4, 0.5, 0.6] and teacher.feature_dim == 192
    assert teacher.provenance()["backbone"] == f"open_clip:hf-hub:{NO_SUCH_REPO}"


def test_open_clip_names_tags_and_missing_weights_are_one_line(open_clip):
    assert "open_clip.list_models()" in one_line_error(lambda: build_open_clip_teacher("t", "no-such-arch"))
    message = one_line_error(lambda: build_open_clip_teacher("t", "ViT-B-16:no_such_tag"))
    assert "valid: openai, " in message and "laion2b_s34b_b88k" in message
    assert "pass --weights FILE" in one_line_error(lambda: build_open_clip_teacher("t", TINY_CLIP))
    assert "unknown pool 'max'" in one_line_error(lambda: build_open_clip_teacher("t", TINY_CLIP, pool="max"))


def test_open_clip_default_tag_is_openai_with_its_quick_gelu_and_preprocessing(open_clip, tiny_clip):
    _, path = tiny_clip  # any file: only the resolution of the id is looked at
    model_cfg, tag_cfg, checkpoint, backbone_id = external._resolve_open_clip(open_clip, "ViT-B-16", path)
    assert backbone_id == "open_clip:ViT-B-16:openai" and checkpoint == str(path)
    assert model_cfg["quick_gelu"] is True and tuple(tag_cfg["mean"]) == open_clip.OPENAI_DATASET_MEAN
    model_cfg, *_ = external._resolve_open_clip(open_clip, "ViT-B-16:laion2b_s34b_b88k", path)
    assert model_cfg["quick_gelu"] is False


# --- Hugging Face transformers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny_dinov2(transformers, seed: int):
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    )
    return transformers.Dinov2Model(config).eval()


@pytest.fixture(scope="module")
def dinov2_folder(transformers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Dinov2Model and its image processor, as save_pretrained writes them."""
    folder = tmp_path_factory.mktemp("dinov2")
    tiny_dinov2(transformers, seed=0).save_pretrained(folder)
    processor = transformers.BitImageProcessor(  # RAD-DINO's processor class
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=HF_MEAN,
        image_std=HF_STD,
    )
    processor.save_pretrained(folder)
    return folder


def test_hf_folder_gives_the_model_s_own_pooler_output_and_patch_tokens(transformers, dinov2_folder):
    teacher = build_hf_teacher(f"hf:{dinov2_folder}", str(dinov2_folder))
    images = torch.randint(
        0, 256, (3, 28, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    out = teacher(images, with_tokens=True)
    model = transformers.AutoModel.from_pretrained(dinov2_folder).eval()  # independent of medkd's copy
    with torch.no_grad():
        ref = model(pixel_values=normalise(images, HF_MEAN, HF_STD))
    torch.testing.assert_close(out.features, ref.pooler_output)  # DINOv2's CLS after its layernorm
    torch.testing.assert_close(out.tokens, ref.last_hidden_state[:, 1:])
    assert out.tokens.shape == (3, 4, 32) and out.logits is None and teacher.feature_dim == 32
    provenance = teacher.provenance()
    assert provenance["mean"] == list(HF_MEAN) and provenance["std"] == list(HF_STD)
    assert provenance["teacher_input_size"] == 28 and provenance["resize"] == "bicubic"
    assert provenance["weights_sha256"] == file_sha256(dinov2_folder / "model.safetensors")
    assert provenance["backbone"] == f"hf:{dinov2_folder}" and provenance["pool"] == "cls"
    both = build_hf_teacher("t", str(dinov2_folder), img_size=56, pool="cls+mean")  # DINOv2 interpolates
    out = both(images, with_tokens=True)
    assert out.tokens.shape == (3, 16, 32) and out.features.shape == (3, 64)
    torch.testing.assert_close(out.features[:, 32:], out.tokens.mean(dim=1))
    assert "multiple of its patch size 14" in one_line_error(
        lambda: build_hf_teacher("t", str(dinov2_folder), img_size=30)
    )


def test_hf_weights_file_replaces_the_model_s_weights(transformers, dinov2_folder, tmp_path):
    other = tiny_dinov2(transformers, seed=1)  # same architecture, other weights
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), path)
    teacher = build_hf_teacher("t", str(dinov2_folder), path)
    images = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = other(pixel_values=normalise(images, HF_MEAN, HF_STD)).pooler_output
    torch.testing.assert_close(teacher(images).features, expected)
    assert teacher.provenance()["weights_sha256"] == file_sha256(path)
    # A task model's checkpoint (`dinov2.*` plus its classifier) gives the same backbone.
    prefixed = tmp_path / "classifier.pt"
    torch.save(
        {**{f"dinov2.{k}": v for k, v in other.state_dict().items()}, "classifier.weight": torch.ones(2, 64)},
        prefixed,
    )
    torch.testing.assert_close(build_hf_teacher("t", str(dinov2_folder), prefixed)(images).features, expected)
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in other.state_dict().items() if "layernorm" not in k}, wrong)
    message = one_line_error(lambda: build_hf_teacher("t", str(dinov2_folder), wrong))
    assert f"weights file {wrong} does not fit" in message and "2 missing keys (first layernorm." in message
    wider = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=48, num_attention_heads=2))
    save_file(wider.state_dict(), tmp_path / "wider.safetensors")
    message = one_line_error(
        lambda: build_hf_teacher("t", str(dinov2_folder), tmp_path / "wider.safetensors")
    )
    assert "25 shape mismatches (first embeddings.cls_token: file (1, 1, 48), model (1, 1, 32))" in message


def test_hf_repo_downloaded_by_hand_loads_from_beside_the_weights_file_without_the_hub(
    transformers, dinov2_folder, monkeypatch
):
    monkeypatch.setattr(external, "hub_unreachable", lambda: pytest.fail("the hub was consulted"))
    teacher = build_hf_teacher("rad_dino", NO_SUCH_REPO, dinov2_folder / "model.safetensors")
    assert teacher.provenance()["mean"] == list(HF_MEAN)
    assert teacher.provenance()["backbone"] == f"hf:{NO_SUCH_REPO}"


def test_hf_folder_without_an_image_processor_is_one_line(transformers, tmp_path):
    tiny_dinov2(transformers, seed=0).save_pretrained(tmp_path)
    message = one_line_error(lambda: build_hf_teacher("t", str(tmp_path)))
    assert "preprocessor_config.json" in message and str(tmp_path) in message


# --- the extras and the hub -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "extra", "module"),
    [(build_open_clip_teacher, "open-clip", "open_clip"), (build_hf_teacher, "hf", "transformers")],
)
def test_a_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, build, extra, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    monkeypatch.setattr(external, "hub_unreachable", lambda: pytest.fail("got past the import"))
    start = time.monotonic()
    message = one_line_error(lambda: build("t", NO_SUCH_REPO))
    assert install_hint(extra) in message and time.monotonic() - start < 1


def test_hub_probe_names_offline_mode_the_endpoint_and_the_proxy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: closed
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert hub_unreachable().startswith("http://127.0.0.1:9 unreachable: ")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://hub.invalid")
    assert "via the proxy 127.0.0.1:9 unreachable" in hub_unreachable()


@pytest.mark.parametrize("source", ["open_clip", "hf"])
def test_an_unreachable_hub_fails_in_seconds_naming_weights(source, monkeypatch):
    pytest.importorskip("open_clip" if source == "open_clip" else "transformers")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    build = build_open_clip_teacher if source == "open_clip" else build_hf_teacher
    model_id = TEACHERS["biomedclip" if source == "open_clip" else "rad_dino"].model_id
    start = time.monotonic()
    message = one_line_error(lambda: build("t", model_id))
    assert time.monotonic() - start < 10
    assert "cannot reach the Hugging Face hub (http://127.0.0.1:9 unreachable" in message
    assert "--weights FOLDER/" in message
    if source == "open_clip":  # a named architecture's default weights live in a timm hub repo
        message = one_line_error(lambda: build("t", "ViT-B-16"))
        assert "open_clip:ViT-B-16:openai is not in the local cache" in message
        assert "from the hub repo timm/vit_base_patch16_clip_224.openai and pass --weights FILE" in message


@pytest.mark.parametrize("source", ["open_clip", "hf"])
def test_a_hub_id_that_cannot_load_fails_in_seconds_naming_weights_whatever_the_network(source):
    # No patching: here the hub is unreachable; with internet the repo does not exist. One line either way.
    pytest.importorskip("open_clip" if source == "open_clip" else "transformers")
    build = build_open_clip_teacher if source == "open_clip" else build_hf_teacher
    start = time.monotonic()
    message = one_line_error(
        lambda: build("t", f"hf-hub:{NO_SUCH_REPO}" if source == "open_clip" else NO_SUCH_REPO)
    )
    assert time.monotonic() - start < 10 and "--weights FOLDER/" in message and NO_SUCH_REPO in message
