"""Augmented views as parameter rows: each op against torchvision's own function, and the presets' draws."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from medkd.data import View, prepare_images
from medkd.errors import MedkdError
from medkd.views import IDENTITY, PRESETS, VIEW_COLUMNS, apply_views, draw_views, sample_views

COL = {name: i for i, name in enumerate(VIEW_COLUMNS)}


def row(**values: float) -> torch.Tensor:
    """One view's parameters (1, P): the plain view with `values` changed."""
    params = torch.tensor([IDENTITY])
    for name, value in values.items():
        params[0, COL[name]] = value
    return params


@pytest.fixture
def gray():
    return torch.rand((1, 1, 32, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def rgb():
    return torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(1))


def test_the_plain_view_is_the_image_itself_bit_for_bit(gray, rgb):
    for x in (gray, rgb):
        assert torch.equal(apply_views(x, row()), x)
    raw = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    plain = torch.tensor([IDENTITY]).repeat(4, 1)
    assert torch.equal(prepare_images(raw, View(56), plain), prepare_images(raw, View(56)))


def test_flip_and_rotation_are_torchvisions(gray, rgb):
    for x in (gray, rgb):
        torch.testing.assert_close(apply_views(x, row(flip=1)), TF.horizontal_flip(x), rtol=0, atol=1e-6)
        # 90 degrees maps pixel centres onto pixel centres: exact, and it fixes the sign (counter-clockwise)
        torch.testing.assert_close(apply_views(x, row(angle=90)), TF.rotate(x, 90.0), rtol=0, atol=1e-6)
        ref = TF.rotate(x, 30.0, interpolation=TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(apply_views(x, row(angle=30)), ref, rtol=0, atol=1e-5)
        assert not torch.allclose(apply_views(x, row(angle=-30)), ref, atol=1e-2)


def test_a_crop_is_torchvisions_resized_crop_inside_the_box(gray):
    # Box rows 8..23, cols 4..19 (16 px) stretched to 32 px. torchvision crops, then resizes, so at the
    # box's border it repeats the box's edge pixels, where one grid_sample reads the real neighbours:
    # the two agree everywhere but the outermost output pixels.
    params = row(top=8 / 32, left=4 / 32, height=16 / 32, width=16 / 32)
    ref = TF.resized_crop(
        gray, 8, 4, 16, 16, [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=False
    )
    got = apply_views(gray, params)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_brightness_and_contrast_are_torchvisions(gray, rgb):
    for x in (gray, rgb):
        ref = TF.adjust_contrast(TF.adjust_brightness(x, 1.08), 0.93)
        torch.testing.assert_close(
            apply_views(x, row(brightness=1.08, contrast=0.93)), ref, rtol=0, atol=1e-6
        )


def test_each_image_of_a_batch_gets_its_own_view(gray):
    batch = gray.repeat(3, 1, 1, 1)
    params = torch.cat([row(), row(flip=1), row(angle=90)])
    out = apply_views(batch, params)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], apply_views(gray, params[i : i + 1]), rtol=0, atol=1e-6)
    assert torch.equal(out[0:1], gray)


def test_draws_repeat_with_the_seed_and_stay_in_each_presets_ranges():
    n = 4000
    params = draw_views("medmnist", n // 8, 8, seed=3)
    assert params.shape == (n // 8, 8, len(VIEW_COLUMNS)) and params.dtype == torch.float32
    assert torch.equal(params, draw_views("medmnist", n // 8, 8, seed=3))
    assert not torch.equal(params, draw_views("medmnist", n // 8, 8, seed=4))
    p = params.reshape(n, -1)
    c = {name: p[:, i] for name, i in COL.items()}
    area, ratio = c["height"] * c["width"], c["width"] / c["height"]
    assert area.min() >= 0.6 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert (c["top"] >= 0).all() and (c["top"] + c["height"] <= 1 + 1e-6).all()
    assert (c["left"] >= 0).all() and (c["left"] + c["width"] <= 1 + 1e-6).all()
    assert set(c["flip"].tolist()) == {0.0, 1.0} and abs(c["flip"].mean().item() - 0.5) < 0.05
    assert c["angle"].abs().max() <= 15 and c["angle"].std() > 7  # uniform on ±15: std 8.7
    for name in ("brightness", "contrast"):
        assert (c[name] - 1).abs().max() <= 0.1 + 1e-6 and (c[name] - 1).abs().mean() > 0.04


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_varies_only_its_own_columns(preset):
    p = sample_views(preset, 500, torch.Generator().manual_seed(0))
    varied = {name for name, i in COL.items() if not torch.all(p[:, i] == IDENTITY[i])}
    expected = {
        "none": set(),
        "flip": {"flip"},
        "crop": {"top", "left", "height", "width"},
        "medmnist": set(VIEW_COLUMNS),
    }[preset]
    assert varied == expected


def test_a_crop_that_never_fits_falls_back_to_the_whole_image(monkeypatch):
    monkeypatch.setitem(PRESETS, "crop", {"scale": [1.0, 1.0], "ratio": [2.0, 2.0]})  # width sqrt(2) > 1
    p = sample_views("crop", 10, torch.Generator().manual_seed(0))
    assert torch.equal(p, torch.tensor([IDENTITY]).repeat(10, 1))
    assert math.isclose(float(p[:, COL["height"]].min()), 1.0)


def test_an_unknown_preset_is_one_line():
    with pytest.raises(
        MedkdError, match="unknown augmentation preset 'mixup'; valid: none, flip, crop, medmnist"
    ):
        sample_views("mixup", 1, torch.Generator())
