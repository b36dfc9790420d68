"""The t-SNE and Grad-CAM figures (`medkd.embeddings`, `medkd.saliency`): features, maps, picks, PNGs."""

import copy
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_cache_config
from matplotlib.image import imread
from torch import nn

from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher
from medkd.config import DistillConfig
from medkd.data import load_medmnist, prepare_images
from medkd.deploy import deployed_student, model_input
from medkd.distill import distill
from medkd.embeddings import (
    DPI,
    PANEL_INCHES,
    check_png_out,
    effective_perplexity,
    embed,
    label_groups,
    source_features,
    tsne_figure,
)
from medkd.errors import MedkdError
from medkd.saliency import (
    cam_grid,
    cams,
    grad_cams,
    gradcam_figure,
    last_conv_block,
    pick_images,
    predictions,
)
from medkd.students import build_student
from medkd.trained import load_trained_run


def train_run(root, out, dataset="breastmnist", student_size=16):
    """A finished 1-epoch resnet18 baseline; at 16 px its layer4 map is 2x2, so a CAM has some shape."""
    cfg = DistillConfig(
        dataset=dataset, alpha=1.0, student="resnet18", student_size=student_size, epochs=1,
        data_dir=str(root), out=str(out), device="cpu", quiet=True,
    )  # fmt: skip
    distill(cfg)
    return out


@pytest.fixture(scope="module")
def run(synthetic_root, tmp_path_factory):
    return train_run(synthetic_root, tmp_path_factory.mktemp("runs") / "breast")


@pytest.fixture(scope="module")
def path_run(synthetic_root, tmp_path_factory):
    return train_run(synthetic_root, tmp_path_factory.mktemp("runs") / "path", "pathmnist", student_size=8)


@pytest.fixture(scope="module")
def cache(synthetic_root, tmp_path_factory):
    return cache_teacher(tiny_cache_config(synthetic_root, tmp_path_factory.mktemp("cache") / "c.h5"))


# ---------------------------------------------------------------- t-SNE


def test_run_features_are_the_penultimate_layer(run, synthetic_root):
    got = source_features(run, "test", str(synthetic_root))
    trained = load_trained_run(run)
    images, labels = load_medmnist("breastmnist", "test", 28, synthetic_root)
    m = trained.model
    with torch.inference_mode():  # the ResNet body by hand, up to fc's input
        h = m.maxpool(m.relu(m.bn1(m.conv1(prepare_images(torch.from_numpy(images), trained.view)))))
        h = m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(h))))).flatten(1)
    assert got.features.shape == (32, 512) and got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, h.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got.labels, labels)
    assert got.names == ["malignant", "normal, benign"] and "resnet18" in got.title


def test_cache_features_are_the_stored_ones(cache):
    got = source_features(cache, "val")
    stored = TeacherCache(cache)
    np.testing.assert_array_equal(got.features, stored.features("val").astype(np.float32))
    np.testing.assert_array_equal(got.labels, stored.labels["val"])
    assert got.names == ["malignant", "normal, benign"] and "tiny" in got.title


def test_source_that_is_neither_is_refused(tmp_path):
    with pytest.raises(MedkdError, match="not found; give a teacher cache"):
        source_features(tmp_path / "nothing")


def test_embed_is_seeded_and_pca_started(monkeypatch):
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    x[:20] += 3
    a, b = embed(x, seed=0, perplexity=8), embed(x, seed=0, perplexity=8)
    assert a.shape == (40, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a[:20].mean(0) - a[20:].mean(0)) > 3 * a[:20].std()  # the two clusters stay apart
    # What reaches sklearn: the seed, a PCA start, the perplexity clamped to the split's size.
    import sklearn.manifold

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, features):
            return np.zeros((len(features), 2), np.float32)

    monkeypatch.setattr(sklearn.manifold, "TSNE", Recorder)
    embed(x, seed=7, perplexity=30)
    assert seen["random_state"] == 7 and seen["init"] == "pca" and seen["perplexity"] == pytest.approx(13)


def test_perplexity_is_clamped_on_small_splits():
    assert effective_perplexity(30, 156) == 30
    assert effective_perplexity(30, 32) == pytest.approx(31 / 3)
    with pytest.raises(MedkdError, match="must be > 0"):
        effective_perplexity(0, 100)
    with pytest.raises(MedkdError, match="at least 4 images"):
        effective_perplexity(30, 3)


def test_multilabel_images_are_grouped_by_their_first_positive_label():
    groups, names = label_groups(np.array([[0, 1, 1], [0, 0, 0], [1, 0, 1]]), ["a", "b", "c"])
    np.testing.assert_array_equal(groups, [1, 3, 0])
    assert names == ["a", "b", "c", "none"]
    groups, names = label_groups(np.array([[1], [0]]), ["a", "b"])
    np.testing.assert_array_equal(groups, [1, 0])
    assert names == ["a", "b"]


def test_tsne_png_has_one_panel_per_source(cache, run, synthetic_root, tmp_path):
    one = tsne_figure([cache], tmp_path / "one.png", perplexity=5)
    two = tsne_figure([cache, run], tmp_path / "two.png", perplexity=5, data_dir=str(synthetic_root))
    h1, w1 = imread(one).shape[:2]
    h2, w2 = imread(two).shape[:2]
    assert h1 == h2 and w2 == 2 * w1 and w1 == round(PANEL_INCHES * DPI)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic_path left no temporary behind


def test_tsne_refuses_sources_of_other_images(cache, path_run, synthetic_root, tmp_path):
    with pytest.raises(MedkdError, match="describe different test images"):
        tsne_figure([cache, path_run], tmp_path / "x.png", data_dir=str(synthetic_root))
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- Grad-CAM


def test_last_conv_block():
    resnet = build_student("resnet18", 2, 28)
    assert last_conv_block(resnet) is resnet.layer4[-1]
    r10 = build_student("timm:resnet10t", 2, 32)
    assert last_conv_block(r10) is r10.layer4
    lite = build_student("timm:tf_efficientnet_lite0", 2, 32)
    assert last_conv_block(lite) is lite.blocks[6]
    with pytest.raises(MedkdError, match="no last conv block is known for a Sequential"):
        last_conv_block(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(MedkdError, match="has no convolution"):
        last_conv_block(build_student("timm:vit_tiny_patch16_224", 2, 224))


class BrightVsDark(nn.Module):
    """Channel 0 sees bright pixels, channel 1 dark ones (a stride-2 conv, so the map is half size);
    logit 0 = bright − dark, logit 1 = dark − bright."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=2, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2) / 4)
            self.conv.bias.copy_(torch.tensor([-0.5, 0.5]))
        self.block = nn.Sequential(self.conv, nn.ReLU())

    def forward(self, x):
        pooled = self.block(x).mean(dim=(2, 3))  # (B, 2)
        return torch.stack([pooled[:, 0] - pooled[:, 1], pooled[:, 1] - pooled[:, 0]], dim=1)


def test_grad_cam_peaks_where_the_evidence_is():
    x = torch.full((2, 1, 16, 16), 0.3)
    x[0, 0, 2:6, 10:14] = 1.0  # a bright square top right
    x[1, 0, 10:14, 2:6] = 1.0  # bottom left
    model = BrightVsDark()
    maps = grad_cams(model, model.block, x, [0, 0])
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    for k, (rows, cols) in enumerate(((slice(2, 6), slice(10, 14)), (slice(10, 14), slice(2, 6)))):
        inside = np.zeros((16, 16), bool)
        inside[rows, cols] = True
        assert maps[k][inside].mean() > 0.5 > maps[k][~inside].mean() + 0.3
        assert inside[np.unravel_index(maps[k].argmax(), (16, 16))]
    # Explaining the other logit (darkness) lights up everything but the square.
    dark = grad_cams(model, model.block, x[:1], [1])[0]
    assert dark[2:6, 10:14].mean() < 0.3 and dark[8:, :8].mean() > 0.5


def test_cams_of_a_run_match_grad_cam_called_directly(run, synthetic_root):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    trained = load_trained_run(run)
    images, _ = trained.split("test", str(synthetic_root))
    images = images[:6]
    maps = cams(trained, images)
    assert cam_grid(trained) == (2, 2)  # 16 px through three stride-2 stages
    assert maps.shape == (6, 28, 28) and maps.dtype == np.float32  # the data's size, not the student's 16
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0
    # pytorch-grad-cam by hand, on a copy of the deployed module, for each image's predicted class.
    module = copy.deepcopy(deployed_student(trained)).requires_grad_(True)
    predicted = predictions(trained, images)
    targets = [ClassifierOutputTarget(int(t)) for t in predicted]
    direct = GradCAM(model=module, target_layers=[module.model.layer4[-1]])(
        torch.from_numpy(model_input(images)), targets
    )
    np.testing.assert_allclose(maps, direct, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cams(trained, images, predicted), maps, rtol=0, atol=1e-6)
    # The run's own network stays frozen and hook-free.
    assert not any(p.requires_grad for p in trained.model.parameters())
    assert not trained.model.layer4[-1]._forward_hooks


def test_cams_of_rgb_images(path_run, synthetic_root):
    trained = load_trained_run(path_run)
    images, _ = trained.split("test", str(synthetic_root))
    assert images.ndim == 4
    maps = cams(trained, images[:3], [0, 1, 2])
    assert maps.shape == (3, 28, 28) and maps.min() >= 0 and maps.max() <= 1


def test_pick_images_is_stratified_and_seeded(run, synthetic_root):
    _, labels = load_medmnist("breastmnist", "test", 28, synthetic_root)
    picked = pick_images(labels, 8, seed=0)
    assert len(set(picked.tolist())) == 8
    assert np.bincount(labels[picked, 0], minlength=2).tolist() == [4, 4]
    assert list(labels[picked, 0]) == sorted(labels[picked, 0])  # grouped by class
    np.testing.assert_array_equal(picked, pick_images(labels, 8, seed=0))
    assert set(picked.tolist()) != set(pick_images(labels, 8, seed=1).tolist())
    rare = np.array([[0]] * 30 + [[1]] * 2)  # a rare class still shows, fully
    assert set(pick_images(rare, 8, seed=3).tolist()) >= {30, 31}
    with pytest.raises(MedkdError, match="between 1 and 32"):
        pick_images(labels, 33)


def test_gradcam_png_has_a_row_per_model(run, synthetic_root, tmp_path):
    alone = gradcam_figure(run, tmp_path / "a.png", images=4, data_dir=str(synthetic_root))
    both = gradcam_figure(run, tmp_path / "b.png", images=4, teacher_run=run, data_dir=str(synthetic_root))
    (ha, wa), (hb, wb) = imread(alone).shape[:2], imread(both).shape[:2]
    assert wa == wb and hb > ha and wa == round((1.0 + 1.75 * 4) * DPI)


def test_multilabel_figures(synthetic_root, tmp_path):
    # chestmnist: 14 labels; colours and picks by the first positive label or "none", CAMs of the top label.
    chest = train_run(synthetic_root, tmp_path / "chest", "chestmnist", student_size=8)
    _, labels = load_medmnist("chestmnist", "test", 28, synthetic_root)
    groups, names = label_groups(labels, [str(k) for k in range(14)])
    picked = pick_images(labels, 12, seed=0)
    assert set(groups[picked]) == set(groups)  # 12 picks cover every group present in 32 images
    for out in (
        tsne_figure([chest], tmp_path / "t.png", data_dir=str(synthetic_root)),
        gradcam_figure(chest, tmp_path / "g.png", images=4, data_dir=str(synthetic_root)),
    ):
        assert imread(out).ndim == 3


def test_teacher_run_on_other_data_is_refused(run, path_run, synthetic_root, tmp_path):
    with pytest.raises(
        MedkdError, match=r"was trained on pathmnist at 28 px, run .* on breastmnist at 28 px"
    ):
        gradcam_figure(run, tmp_path / "x.png", teacher_run=path_run, data_dir=str(synthetic_root))
    assert not (tmp_path / "x.png").exists()


def test_out_rules(run, tmp_path):
    data = tmp_path / "labels.npz"
    data.write_bytes(b"user data")
    fake = tmp_path / "notes.png"  # named .png but not an image medkd could have written
    fake.write_bytes(b"not a png")
    for out, message in (
        (data, "must end in .png"),
        (fake, "is not a PNG image"),
        (tmp_path / "missing" / "f.png", "does not exist"),
    ):
        with pytest.raises(MedkdError, match=message):
            gradcam_figure(run, out, force=True)
    assert data.read_bytes() == b"user data" and fake.read_bytes() == b"not a png"
    png = tmp_path / "old.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(MedkdError, match="already exists; pass --force"):
        check_png_out(png, force=False)
    assert check_png_out(png, force=True) == png


def test_missing_grad_cam_names_the_extra(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # `import pytorch_grad_cam` now fails
    with pytest.raises(MedkdError, match=r"pip install 'medkd\[explain\]'"):
        gradcam_figure(run, tmp_path / "x.png")
