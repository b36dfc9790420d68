"""The student's data path: splits resized once to the model's size, grayscale kept one channel up to the
first convolution, and the speed options (--threads, --eval-every, --compile) of distill and sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from medkd.cli import main
from medkd.config import DistillConfig
from medkd.data import DeviceSplit, View, device_splits, prepare_images
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.runs import CHECKPOINT, config_hash, load_checkpoint
from medkd.students import GrayInputConv2d, build_student, takes_one_channel
from medkd.train import intra_op_threads, place_student


def split_of(channels: int, n: int = 40, size: int = 28, seed: int = 0) -> DeviceSplit:
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 2, (n, 1)).astype(np.int64)
    return DeviceSplit(images, labels, "binary-class", "cpu")


def all_images(split: DeviceSplit, view: View) -> torch.Tensor:
    return torch.cat([b.images for b in split.batches(16, view)])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_a_split_resized_once_gives_the_batches_resized_as_drawn(channels, interpolation):
    split = split_of(channels)
    view = View(64, interpolation=interpolation, gray=True, rounded=True)
    resized = split.at_size(view, budget=10**9)
    assert resized.images.dtype == torch.uint8 and resized.images.shape[1:3] == (64, 64)
    assert split.images.shape[1] == 28  # the source split is left as it was
    once, drawn = all_images(resized, view), all_images(split, view)
    assert once.shape == (40, channels, 64, 64)
    assert torch.equal(once, drawn)  # bit for bit: a run gives the same result whichever path it takes


def test_the_resized_images_are_pils_bicubic_resize_within_a_grey_level():
    # Smooth images, as scans are: on pixel noise PIL's 8-bit clamp between its two passes differs more.
    rng = np.random.default_rng(0)
    coarse = rng.integers(30, 220, (6, 7, 7)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(c).resize((28, 28), Image.BILINEAR)) for c in coarse])
    split = DeviceSplit(images, np.zeros((6, 1), np.int64), "binary-class", "cpu")
    resized = split.at_size(View(56, rounded=True), budget=10**9).images.numpy().astype(int)
    for image, mine in zip(images, resized, strict=True):
        pil = np.asarray(Image.fromarray(image).resize((56, 56), Image.BICUBIC)).astype(int)
        # PIL rounds to 8 bits between its two passes, in fixed point; torch rounds once, in float
        assert np.abs(pil - mine).max() <= 1 and (pil == mine).mean() > 0.75


def test_at_size_keeps_the_split_when_it_would_not_fit_or_is_already_that_size():
    split = split_of(1)
    view = View(64, rounded=True)
    assert split.at_size(view, budget=split.image_bytes(64) - 1) is split
    assert split.at_size(View(28), budget=10**9) is split
    assert split.image_bytes(64) == 40 * 64 * 64 and split_of(3).image_bytes(64) == 3 * 40 * 64 * 64


def test_device_splits_resizes_all_three_or_none_and_leaves_an_augmented_train_split():
    arrays = {s: (split_of(1, seed=i).images.numpy(), split_of(1, seed=i).labels.numpy()) for i, s in
              enumerate(("train", "val", "test"))}  # fmt: skip
    view = View(32, rounded=True)
    sizes = {s: d.images.shape[1] for s, d in device_splits(arrays, "binary-class", "cpu", view).items()}
    assert sizes == {"train": 32, "val": 32, "test": 32}
    augmented = device_splits(arrays, "binary-class", "cpu", view, augmented=True)
    assert {s: d.images.shape[1] for s, d in augmented.items()} == {"train": 28, "val": 32, "test": 32}
    tight = device_splits(arrays, "binary-class", "cpu", view, max_memory_gb=2 * 40 * 32 * 32 / 2**30)
    assert {d.images.shape[1] for d in tight.values()} == {28}  # three splits need 3 × 40 × 32²


def test_gray_stays_one_channel_only_when_every_channel_is_normalised_alike():
    raw = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    assert prepare_images(raw, View(28, gray=True)).shape == (2, 1, 28, 28)
    assert prepare_images(raw, View(28)).shape == (2, 3, 28, 28)
    imagenet = View(28, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), gray=True)
    assert prepare_images(raw, imagenet).shape == (2, 3, 28, 28)
    rgb = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    assert prepare_images(rgb, View(28, gray=True)).shape == (2, 3, 28, 28)


@pytest.mark.parametrize("student", ["resnet18", "timm:resnet10t"])
def test_one_gray_channel_gives_the_replicated_rgb_output_and_gradients(student):
    torch.manual_seed(0)
    model = build_student(student, 3, 28).eval()
    assert takes_one_channel(model)
    raw = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    gray, rgb = prepare_images(raw, View(28, gray=True)), prepare_images(raw, View(28))
    assert torch.equal(rgb[:, :1], gray) and torch.equal(rgb[:, 1:2], gray)
    grads = []
    for x in (gray, rgb):
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_one_channel_conv_keeps_checkpoints_as_they_were():
    import torchvision

    model = build_student("resnet18", 2, 224)
    assert type(model.conv1) is GrayInputConv2d
    plain = torchvision.models.resnet18(weights=None, num_classes=2)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())  # a checkpoint of a plain ResNet loads, and back
    plain.load_state_dict(model.state_dict())
    # timm's `same`-padding stem pads in its own forward: left as it is, so grayscale goes in as RGB
    assert not takes_one_channel(build_student("timm:tf_efficientnet_lite0", 2, 64))


def test_place_student_is_channels_last_and_compile_keeps_the_students_keys(monkeypatch):
    model = build_student("resnet18", 2, 28)
    assert place_student(model, torch.device("cpu")) is model
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    compiled = place_student(model, torch.device("cpu"), compile=True)  # compiles at its first call
    assert compiled is not model and isinstance(compiled, torch.nn.Module)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())


def test_intra_op_threads_sets_and_restores():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(0):
        assert torch.get_num_threads() == before


def baseline(root, out, **kwargs) -> DistillConfig:
    values = dict(
        dataset="breastmnist", alpha=1.0, student="resnet18", epochs=3, batch_size=64, data_dir=str(root),
        out=str(out), device="cpu", seed=0, quiet=True,
    )  # fmt: skip
    return DistillConfig(**{**values, **kwargs})


def test_eval_every_validates_every_nth_epoch_and_the_last(synthetic_root, tmp_path):
    result = distill(baseline(synthetic_root, tmp_path / "run", eval_every=2))
    history = json.loads((tmp_path / "run" / "result.json").read_text())["history"]
    assert [h["val_auc"] is None for h in history] == [True, False, False]
    assert result.best_epoch in (2, 3)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT, "x")["epoch"] == result.best_epoch


def test_a_split_too_big_to_resize_once_trains_to_the_same_result(synthetic_root, tmp_path):
    resized = distill(baseline(synthetic_root, tmp_path / "a", student_size=32, epochs=1))
    drawn = distill(baseline(synthetic_root, tmp_path / "b", student_size=32, epochs=1, max_memory_gb=1e-5))
    assert resized.rounded and drawn.rounded
    assert resized.history[0]["loss"] == drawn.history[0]["loss"]
    assert resized.test == drawn.test


def test_compile_trains_and_saves_the_plain_students_weights(synthetic_root, tmp_path, monkeypatch):
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule (same key prefix)
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            calls.append(len(x))
            return self._orig_mod(x)

    monkeypatch.setattr(torch, "compile", Wrapper)
    result = distill(baseline(synthetic_root, tmp_path / "run", epochs=1, compile=True))
    assert calls  # training and evaluation went through the compiled module
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT, "x")["model"]
    build_student("resnet18", 2, 28).load_state_dict(state)  # no _orig_mod. prefix
    assert result.config["compile"] is True


def test_speed_options_leave_the_config_hash_and_eval_every_1_is_the_old_hash(synthetic_root, tmp_path):
    base = baseline(synthetic_root, tmp_path)
    fast = baseline(synthetic_root, tmp_path, threads=1, compile=True)
    from medkd.config import to_dict

    assert config_hash(to_dict(base)) == config_hash(to_dict(fast))
    old = {k: v for k, v in to_dict(base).items() if k not in ("eval_every", "threads", "compile")}
    assert config_hash(old) == config_hash(to_dict(base))  # runs from before these options keep their hash
    assert config_hash(to_dict(baseline(synthetic_root, tmp_path, eval_every=2))) != config_hash(
        to_dict(base)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"eval_every": 0}, "--eval-every must be >= 1"), ({"threads": -1}, "--threads must be >= 0")],
)
def test_bad_speed_options_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(MedkdError, match=message):
        baseline(tmp_path, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_the_cli_passes_the_speed_options(tmp_path):
    out = CliRunner().invoke(main, ["distill", "--help"]).output
    assert "--threads" in out and "--eval-every" in out and "--compile" in out
    out = CliRunner().invoke(main, ["sweep", "--help"]).output
    assert "--threads" in out and "--eval-every" in out and "--compile" in out
    result = CliRunner().invoke(
        main, ["distill", "--dataset", "breastmnist", "--alpha", "1", "--eval-every", "0"]
    )
    assert result.exit_code != 0 and "--eval-every must be >= 1" in result.output
