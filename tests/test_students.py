"""Student ResNets: shapes, the small-image stem, and loading saved weights."""

import pytest
import torch
from torch import nn

from medkd.errors import MedkdError
from medkd.students import build_student, count_parameters


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
