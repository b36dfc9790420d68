"""The data layer: loading official files and its errors, DeviceSplit, prepare_images, synthetic data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TASK_FLAGS

from medkd.data import (
    DeviceSplit,
    View,
    data_root,
    data_sha256,
    is_multilabel,
    load_arrays,
    load_medmnist,
    local_status,
    make_synthetic,
    make_synthetic_like,
    npz_name,
    num_outputs,
    prepare_images,
)
from medkd.errors import MedkdError
from medkd.metrics import evaluate, scores_from_logits

KEYS = {f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")}
RGB_FLAGS = {"pathmnist", "retinamnist"}


def info(flag: str) -> dict:
    from medmnist import INFO

    return INFO[flag]


def expected_label_columns(flag: str) -> int:
    return len(info(flag)["label"]) if is_multilabel(info(flag)["task"]) else 1


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def valid_arrays(n: int = 4, size: int = 28) -> dict[str, np.ndarray]:
    """A minimal valid breastmnist-like split set, to be broken one key at a time."""
    return {
        **{f"{s}_images": np.zeros((n, size, size), np.uint8) for s in ("train", "val", "test")},
        **{f"{s}_labels": np.zeros((n, 1), np.uint8) for s in ("train", "val", "test")},
    }


# ---------------------------------------------------------------- loading synthetic files


@pytest.mark.parametrize("task", list(TASK_FLAGS))
def test_load_medmnist_every_task_type(synthetic_root: Path, task: str) -> None:
    flag = TASK_FLAGS[task]
    columns = expected_label_columns(flag)
    sizes = {"train": 96, "val": 32, "test": 32}
    for split, n in sizes.items():
        images, labels = load_medmnist(flag, split, root=synthetic_root)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        if flag in RGB_FLAGS:
            assert images.shape == (n, 28, 28, 3)
        else:
            assert images.shape == (n, 28, 28)
        assert labels.shape == (n, columns)
        n_labels = len(info(flag)["label"])
        assert labels.min() >= 0
        assert labels.max() <= (1 if is_multilabel(task) else n_labels - 1)
    assert columns == (14 if flag == "chestmnist" else 1)


@pytest.mark.parametrize("task", list(TASK_FLAGS))
def test_load_arrays_equals_the_file(synthetic_root: Path, task: str) -> None:
    flag = TASK_FLAGS[task]
    arrays = load_arrays(flag, root=synthetic_root)
    assert set(arrays) == {"train", "val", "test"}
    with np.load(synthetic_root / npz_name(flag, 28)) as raw:
        for split, (images, labels) in arrays.items():
            np.testing.assert_array_equal(images, raw[f"{split}_images"])
            np.testing.assert_array_equal(labels, raw[f"{split}_labels"].astype(np.int64))
            assert images.flags["C_CONTIGUOUS"]
    # load_medmnist is one split of the same thing
    images, labels = load_medmnist(flag, "val", root=synthetic_root)
    np.testing.assert_array_equal(images, arrays["val"][0])
    np.testing.assert_array_equal(labels, arrays["val"][1])


def test_official_file_names() -> None:
    assert npz_name("breastmnist", 28) == "breastmnist.npz"
    assert npz_name("breastmnist", 64) == "breastmnist_64.npz"
    assert npz_name("chestmnist", 224) == "chestmnist_224.npz"


@pytest.mark.parametrize("flag", ["breastmnist", "pathmnist"])
def test_size_64_file_loads(tmp_path: Path, flag: str) -> None:
    path = make_synthetic_like(tmp_path, flag, size=64, n_train=10, n_val=4, n_test=6)
    assert path == tmp_path / f"{flag}_64.npz"
    images, labels = load_medmnist(flag, "test", size=64, root=tmp_path)
    assert images.shape == ((6, 64, 64, 3) if flag in RGB_FLAGS else (6, 64, 64))
    assert labels.shape == (6, 1) and labels.dtype == np.int64
    # the 28 px file is a different file: it is not here
    with pytest.raises(MedkdError, match="breastmnist.npz|pathmnist.npz"):
        load_medmnist(flag, "test", size=28, root=tmp_path)


def test_size_mismatch_in_file_is_refused(tmp_path: Path) -> None:
    # a 28 px file saved under the 64 px name
    write_npz(tmp_path / "breastmnist_64.npz", **valid_arrays(size=28))
    with pytest.raises(MedkdError, match=r"expected uint8 \(N, 64, 64\)"):
        load_medmnist("breastmnist", "train", size=64, root=tmp_path)


# ---------------------------------------------------------------- root resolution


def test_root_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medmnist.info import DEFAULT_ROOT

    monkeypatch.delenv("MEDKD_DATA", raising=False)
    assert data_root() == Path(DEFAULT_ROOT)
    monkeypatch.setenv("MEDKD_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_env_var_is_used_and_explicit_root_wins(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MEDKD_DATA", str(synthetic_root))
    images, _ = load_medmnist("breastmnist", "train")
    assert len(images) == 96
    # explicit root beats the env var, even when the env var would have worked
    with pytest.raises(MedkdError, match="not found"):
        load_medmnist("breastmnist", "train", root=empty)
    monkeypatch.setenv("MEDKD_DATA", str(empty))
    with pytest.raises(MedkdError, match="not found"):
        load_medmnist("breastmnist", "train")
    assert len(load_medmnist("breastmnist", "train", root=synthetic_root)[0]) == 96


# ---------------------------------------------------------------- errors


def test_unknown_flag_lists_valid_flags(synthetic_root: Path) -> None:
    with pytest.raises(MedkdError) as err:
        load_medmnist("breastmnsit", "train", root=synthetic_root)
    message = str(err.value)
    assert "breastmnsit" in message
    for flag in ("breastmnist", "pathmnist", "chestmnist", "organsmnist"):
        assert flag in message
    assert "3d" not in message  # the 3D volumes are out of scope


def test_unknown_split(synthetic_root: Path) -> None:
    with pytest.raises(MedkdError) as err:
        load_medmnist("breastmnist", "training", root=synthetic_root)
    assert "training" in str(err.value)
    assert "train, val, test" in str(err.value)


def test_size_not_offered_lists_valid_sizes(synthetic_root: Path) -> None:
    with pytest.raises(MedkdError) as err:
        load_medmnist("breastmnist", "train", size=32, root=synthetic_root)
    message = str(err.value)
    assert "32" in message and "breastmnist" in message
    assert "28, 64, 128, 224" in message


def test_missing_file_names_file_folder_and_option(tmp_path: Path) -> None:
    with pytest.raises(MedkdError) as err:
        load_medmnist("pneumoniamnist", "train", size=64, root=tmp_path)
    message = str(err.value)
    assert "pneumoniamnist_64.npz" in message
    assert str(tmp_path) in message
    assert "--data-dir" in message
    assert "\n" not in message


def test_missing_key(tmp_path: Path) -> None:
    arrays = valid_arrays()
    del arrays["val_labels"]
    path = write_npz(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(MedkdError) as err:
        load_medmnist("breastmnist", "train", root=tmp_path)
    assert "val_labels" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("key", "bad", "needle"),
    [
        ("train_images", np.zeros((4, 28, 28), np.float32), "float32"),
        ("train_images", np.zeros((4, 27, 27), np.uint8), "(4, 27, 27)"),
        ("val_images", np.zeros((4, 28, 28, 4), np.uint8), "(4, 28, 28, 4)"),
        ("test_images", np.zeros((4, 28 * 28), np.uint8), "(4, 784)"),
        ("test_labels", np.zeros((4,), np.uint8), "test_labels has shape (4,)"),
        ("val_labels", np.zeros((5, 1), np.uint8), "val_labels has shape (5, 1)"),
        ("train_labels", np.full((4, 1), 2, np.uint8), "integers in [0, 1]"),
        ("train_labels", np.full((4, 1), 0.5, np.float32), "integers in [0, 1]"),
        ("test_labels", np.zeros((4, 2), np.uint8), "expected (4, 1)"),
        ("train_images", np.zeros((4, 28, 28, 3), np.uint8), "1-channel breastmnist"),
    ],
)
def test_wrong_shape_or_dtype(tmp_path: Path, key: str, bad: np.ndarray, needle: str) -> None:
    arrays = valid_arrays()
    arrays[key] = bad
    write_npz(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(MedkdError) as err:
        load_arrays("breastmnist", root=tmp_path)
    assert needle in str(err.value)
    assert key.split("_")[0] in str(err.value)


@pytest.mark.parametrize("content", ["text", "npy"])
def test_not_an_npz_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "breastmnist.npz"
    if content == "text":
        path.write_text("this is not a numpy archive\n")
    else:
        with open(path, "wb") as f:
            np.save(f, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(MedkdError, match="not a readable .npz"):
        load_medmnist("breastmnist", "train", root=tmp_path)


def test_download_offline_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils

    calls = []

    def offline(**kwargs):
        calls.append(kwargs)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    folder = tmp_path / "fresh"  # does not exist yet: download makes it
    with pytest.raises(MedkdError) as err:
        load_medmnist("breastmnist", "train", size=64, root=folder, download=True)
    message = str(err.value)
    assert "breastmnist_64.npz" in message and str(folder) in message and "--data-dir" in message
    assert len(calls) == 1
    assert calls[0]["filename"] == "breastmnist_64.npz"
    assert calls[0]["md5"] == info("breastmnist")["MD5_64"]
    assert calls[0]["url"] == info("breastmnist")["url_64"]


def test_download_success_and_no_download_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils

    def fake_download(url, root, filename, md5):
        make_synthetic_like(root, "breastmnist", n_train=8, n_val=4, n_test=4)

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download)
    images, labels = load_medmnist("breastmnist", "val", root=tmp_path, download=True)
    assert images.shape == (4, 28, 28) and labels.shape == (4, 1)

    def must_not_run(**kwargs):
        raise AssertionError("download attempted although the file is present")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", must_not_run)
    assert len(load_medmnist("breastmnist", "train", root=tmp_path, download=True)[0]) == 8


def test_num_outputs() -> None:
    assert num_outputs("binary-class", 2) == 2
    assert num_outputs("multi-class", 9) == 9
    assert num_outputs("multi-label, binary-class", 14) == 14
    with pytest.raises(MedkdError, match="unknown task"):
        num_outputs("regression", 1)


# ---------------------------------------------------------------- data_sha256


def test_data_sha256_is_a_content_fingerprint() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(10, 1)).astype(np.int64)
    reference = data_sha256(images, labels)
    assert len(reference) == 64
    assert data_sha256(images.copy(), labels.copy()) == reference
    assert data_sha256(images, labels.astype(np.uint8)) == reference  # labels hashed as int64
    assert data_sha256(np.asfortranarray(images), labels) == reference  # memory layout is irrelevant
    pixel = images.copy()
    pixel[7, 3, 5] ^= 1
    assert data_sha256(pixel, labels) != reference
    label = labels.copy()
    label[4, 0] = 1 - label[4, 0]
    assert data_sha256(images, label) != reference
    assert data_sha256(images[:9], labels[:9]) != reference


# ---------------------------------------------------------------- DeviceSplit


@pytest.fixture(scope="module")
def split_arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(53, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 5, size=(53, 1)).astype(np.int64)
    return images, labels


def epoch_order(split: DeviceSplit, seed: int | None, batch_size: int = 8) -> list[int]:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    batches = split.batches(batch_size, View(28), shuffle=seed is not None, generator=generator)
    return [i for batch in batches for i in batch.index.tolist()]


def test_batches_cover_every_index_once(split_arrays) -> None:
    split = DeviceSplit(*split_arrays, task="multi-class", device="cpu")
    assert len(split) == 53
    sizes = [len(b.index) for b in split.batches(8, View(28))]
    assert sizes == [8] * 6 + [5]
    assert epoch_order(split, None) == list(range(53))
    shuffled = epoch_order(split, 0)
    assert sorted(shuffled) == list(range(53))
    assert shuffled != list(range(53))


def test_shuffle_is_reproducible_per_seed(split_arrays) -> None:
    split = DeviceSplit(*split_arrays, task="multi-class", device="cpu")
    assert epoch_order(split, 0) == epoch_order(split, 0)
    assert epoch_order(split, 0) != epoch_order(split, 1)
    # one generator, two epochs: each epoch is a fresh permutation
    generator = torch.Generator().manual_seed(0)
    first = torch.cat([b.index for b in split.batches(8, View(28), shuffle=True, generator=generator)])
    second = torch.cat([b.index for b in split.batches(8, View(28), shuffle=True, generator=generator)])
    assert not torch.equal(first, second)


def test_batch_targets_and_images_follow_the_dataset_index(split_arrays) -> None:
    images, labels = split_arrays
    split = DeviceSplit(images, labels, task="multi-class", device="cpu")
    generator = torch.Generator().manual_seed(5)
    view = View(28)
    for batch in split.batches(16, view, shuffle=True, generator=generator):
        idx = batch.index.numpy()
        assert batch.index.dtype == torch.int64
        assert batch.targets.dtype == torch.int64 and batch.targets.shape == (len(idx),)
        np.testing.assert_array_equal(batch.targets.numpy(), labels[idx, 0])
        expected = torch.from_numpy(images[idx]).float().div(255).sub(0.5).div(0.5)
        torch.testing.assert_close(batch.images, expected.unsqueeze(1).expand(-1, 3, -1, -1))


def test_multilabel_targets_are_float_rows() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(20, 14)).astype(np.int64)
    split = DeviceSplit(images, labels, task="multi-label, binary-class", device="cpu")
    generator = torch.Generator().manual_seed(0)
    for batch in split.batches(6, View(28), shuffle=True, generator=generator):
        assert batch.targets.dtype == torch.float32 and batch.targets.shape == (len(batch.index), 14)
        np.testing.assert_array_equal(batch.targets.numpy(), labels[batch.index.numpy()].astype(np.float32))


# ---------------------------------------------------------------- prepare_images


def reference_prepare(x: np.ndarray, size: int, mode: str, mean, std) -> torch.Tensor:
    """Independent computation: float copy → 3 channels → F.interpolate → clamp → normalise."""
    t = torch.from_numpy(x.astype(np.float64) / 255.0)
    t = t.unsqueeze(1).repeat(1, 3, 1, 1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
    if t.shape[-1] != size:
        t = F.interpolate(t, size=(size, size), mode=mode, antialias=mode in ("bilinear", "bicubic"))
        t = t.clamp(0, 1)
    mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((t - mean) / std).float()


MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
@pytest.mark.parametrize(("src", "dst"), [(28, 28), (28, 56), (64, 28), (28, 224)])
@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_prepare_images_matches_reference(rgb: bool, src: int, dst: int, mode: str) -> None:
    rng = np.random.default_rng(src + dst)
    shape = (3, src, src, 3) if rgb else (3, src, src)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    view = View(dst, mean=MEAN, std=STD, interpolation=mode)
    out = prepare_images(torch.from_numpy(x), view)
    assert out.shape == (3, 3, dst, dst) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_prepare(x, dst, mode, MEAN, STD), atol=2e-5, rtol=1e-5)
    if not rgb:  # grayscale is replicated: the three channels are equal before normalisation
        raw = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        torch.testing.assert_close(raw[:, 0], raw[:, 1])
        torch.testing.assert_close(raw[:, 0], raw[:, 2])


def test_prepare_images_downscale_uses_antialias() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 64, 64), dtype=np.uint8)
    out = prepare_images(torch.from_numpy(x), View(28))
    t = torch.from_numpy(x).float().div(255).unsqueeze(1)
    aliased = F.interpolate(t, size=(28, 28), mode="bicubic", antialias=False).clamp(0, 1)
    smooth = F.interpolate(t, size=(28, 28), mode="bicubic", antialias=True).clamp(0, 1)
    assert (aliased - smooth).abs().max() > 0.05  # the two really differ on noise
    torch.testing.assert_close(out[:, :1], (smooth - 0.5) / 0.5, atol=1e-5, rtol=1e-5)


def test_prepare_images_clamps_bicubic_overshoot() -> None:
    # a checkerboard of 0 and 255: bicubic upsampling overshoots below 0 and above 1
    board = (np.indices((28, 28)).sum(axis=0) % 2 * 255).astype(np.uint8)[None]
    t = torch.from_numpy(board).float().div(255).unsqueeze(1)
    raw = F.interpolate(t, size=(56, 56), mode="bicubic", antialias=True)
    assert raw.min() < -0.01 and raw.max() > 1.01
    out = prepare_images(torch.from_numpy(board), View(56))
    assert out.min() >= -1.0 and out.max() <= 1.0  # (0 - .5)/.5 and (1 - .5)/.5
    assert out.min() == -1.0 and out.max() == 1.0


def test_prepare_images_does_not_modify_input_and_keeps_device() -> None:
    x = torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8)
    before = x.clone()
    out = prepare_images(x, View(28))
    assert torch.equal(x, before)
    assert out.device == x.device


@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
@pytest.mark.parametrize("size", [28, 56])
def test_channels_last_flag(rgb: bool, size: int) -> None:
    x = torch.randint(0, 256, (4, 28, 28, 3) if rgb else (4, 28, 28), dtype=torch.uint8)
    last = prepare_images(x, View(size, channels_last=True))
    assert last.is_contiguous(memory_format=torch.channels_last)
    default = prepare_images(x, View(size))
    assert default.is_contiguous()
    torch.testing.assert_close(last, default)


# ---------------------------------------------------------------- make_synthetic


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("task", list(TASK_FLAGS))
def test_make_synthetic_is_medmnist_format(tmp_path: Path, task: str, size: int) -> None:
    import medmnist

    flag = TASK_FLAGS[task]
    n_labels = len(info(flag)["label"])
    path = make_synthetic_like(tmp_path, flag, size=size, n_train=12, n_val=5, n_test=7, seed=2)
    assert path.name == npz_name(flag, size)
    with np.load(path) as npz:
        assert set(npz.files) == KEYS
        for split, n in (("train", 12), ("val", 5), ("test", 7)):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            assert images.dtype == np.uint8 and labels.dtype == np.uint8  # as the official files
            assert images.shape == ((n, size, size, 3) if flag in RGB_FLAGS else (n, size, size))
            assert labels.shape == (n, n_labels if is_multilabel(task) else 1)
            assert labels.max() <= (1 if is_multilabel(task) else n_labels - 1)
            assert images.std() > 5  # not a constant image
    # medmnist's own dataset class reads the file (its __len__ asserts the official sizes, so no len())
    dataset = getattr(medmnist, info(flag)["python_class"])(split="val", root=str(tmp_path), size=size)
    assert dataset.imgs.shape[0] == 5
    image, target = dataset[0]
    assert image.size == (size, size)
    assert image.mode == ("RGB" if flag in RGB_FLAGS else "L")
    assert target.shape == ((n_labels,) if is_multilabel(task) else (1,))


def test_make_synthetic_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a.npz", "multi-class", 4, n_train=10, n_val=2, n_test=2, seed=7)
    b = make_synthetic(tmp_path / "b.npz", "multi-class", 4, n_train=10, n_val=2, n_test=2, seed=7)
    c = make_synthetic(tmp_path / "c.npz", "multi-class", 4, n_train=10, n_val=2, n_test=2, seed=8)
    with np.load(a) as na, np.load(b) as nb, np.load(c) as nc:
        for key in KEYS:
            np.testing.assert_array_equal(na[key], nb[key])
        assert not np.array_equal(na["train_images"], nc["train_images"])


def test_make_synthetic_multilabel_has_several_labels_active(tmp_path: Path) -> None:
    path = make_synthetic_like(tmp_path, "chestmnist", n_train=200, n_val=10, n_test=10)
    with np.load(path) as npz:
        labels = npz["train_labels"]
    per_image = labels.sum(axis=1)
    assert labels.shape == (200, 14)
    assert per_image.mean() > 2
    assert (per_image >= 2).mean() > 0.5
    assert (labels.sum(axis=0) > 0).all()  # every label occurs
    assert (labels.sum(axis=0) < 200).all()  # and none is always on


def test_make_synthetic_single_label_uses_every_class(tmp_path: Path) -> None:
    path = make_synthetic_like(tmp_path, "pathmnist", n_train=200, n_val=10, n_test=10)
    with np.load(path) as npz:
        assert set(np.unique(npz["train_labels"])) == set(range(9))


def test_make_synthetic_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MedkdError, match="unknown task"):
        make_synthetic(tmp_path / "x.npz", "segmentation", 3)
    with pytest.raises(MedkdError, match="channels"):
        make_synthetic(tmp_path / "x.npz", "multi-class", 3, channels=2)
    assert not (tmp_path / "x.npz").exists()


# ---------------------------------------------------------------- learnability


class TinyCNN(torch.nn.Module):
    """Two conv layers, ~3k parameters: enough to find class-specific blobs, far from a ResNet."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # (B, 8, 14, 14)
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4),  # (B, 16, 4, 4): coarse position survives
        )
        self.head = torch.nn.Linear(16 * 16, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def train_tiny_cnn(task: str, arrays: dict, train_labels: np.ndarray) -> dict[str, float]:
    """3 epochs of Adam on the train split (with `train_labels`), then val AUC/ACC."""
    threads = torch.get_num_threads()
    # Ops this small gain nothing from a second thread, and its sync cost explodes on a busy machine.
    torch.set_num_threads(1)
    try:
        return _train_tiny_cnn(task, arrays, train_labels)
    finally:
        torch.set_num_threads(threads)


def _train_tiny_cnn(task: str, arrays: dict, train_labels: np.ndarray) -> dict[str, float]:
    torch.manual_seed(0)
    n_labels = len(info(TASK_FLAGS[task])["label"])
    train = DeviceSplit(arrays["train"][0], train_labels, task=task, device="cpu")
    val = DeviceSplit(*arrays["val"], task=task, device="cpu")
    model = TinyCNN(num_outputs(task, n_labels))
    assert sum(p.numel() for p in model.parameters()) < 8000
    loss_fn = torch.nn.BCEWithLogitsLoss() if is_multilabel(task) else torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    view = View(28)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for batch in train.batches(32, view, shuffle=True, generator=generator):
            optimizer.zero_grad()
            loss_fn(model(batch.images), batch.targets).backward()
            optimizer.step()
    with torch.no_grad():
        logits = torch.cat([model(b.images) for b in val.batches(100, view)])
    return evaluate(task, arrays["val"][1], scores_from_logits(task, logits).numpy())


@pytest.mark.parametrize("task", list(TASK_FLAGS))
def test_synthetic_data_is_learnable(tmp_path: Path, task: str) -> None:
    flag = TASK_FLAGS[task]
    make_synthetic_like(tmp_path, flag, n_train=320, n_val=100, n_test=4, seed=4)
    arrays = load_arrays(flag, root=tmp_path)
    metrics = train_tiny_cnn(task, arrays, arrays["train"][1])
    assert metrics["auc"] > 0.8, metrics


def test_learnability_control_with_shuffled_labels(tmp_path: Path) -> None:
    # The same recipe on permuted train labels must stay near chance: the signal is in the images.
    make_synthetic_like(tmp_path, "pathmnist", n_train=320, n_val=100, n_test=4, seed=4)
    arrays = load_arrays("pathmnist", root=tmp_path)
    shuffled = np.random.default_rng(0).permutation(arrays["train"][1])
    metrics = train_tiny_cnn("multi-class", arrays, shuffled)
    assert metrics["auc"] < 0.7, metrics


# ---------------------------------------------------------------- the genuine files


@pytest.mark.realdata
def test_real_breastmnist_loads_with_official_split_sizes(real_data: Path) -> None:
    arrays = load_arrays("breastmnist", root=real_data)
    sizes = {split: len(images) for split, (images, _) in arrays.items()}
    assert sizes == {"train": 546, "val": 78, "test": 156}
    assert sizes == info("breastmnist")["n_samples"]
    for images, labels in arrays.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert labels.dtype == np.int64 and labels.shape[1] == 1
        assert set(np.unique(labels)) == {0, 1}


@pytest.mark.realdata
def test_real_files_verify_md5(real_data: Path) -> None:
    assert local_status("breastmnist", real_data, verify=True) == {28: "md5 ok"}
    assert local_status("pneumoniamnist", real_data, verify=True) == {28: "md5 ok"}
    assert local_status("breastmnist", real_data) == {28: "present"}
    assert local_status("pathmnist", real_data, verify=True) == {}


def test_local_status_detects_a_wrong_file(tmp_path: Path) -> None:
    make_synthetic_like(tmp_path, "breastmnist", n_train=4, n_val=2, n_test=2)
    make_synthetic_like(tmp_path, "breastmnist", size=64, n_train=4, n_val=2, n_test=2)
    assert local_status("breastmnist", tmp_path) == {28: "present", 64: "present"}
    assert local_status("breastmnist", tmp_path, verify=True) == {28: "MD5 MISMATCH", 64: "MD5 MISMATCH"}


def test_label_columns_and_channels_follow_medmnist_info(tmp_path: Path) -> None:
    arrays = {k: v for k, v in valid_arrays().items()}
    write_npz(tmp_path / "chestmnist.npz", **arrays)  # chestmnist has 14 labels per image
    with pytest.raises(MedkdError, match=r"expected \(4, 14\)"):
        load_arrays("chestmnist", root=tmp_path)
    write_npz(tmp_path / "pathmnist.npz", **arrays)  # pathmnist is RGB
    with pytest.raises(MedkdError, match=r"expected uint8 \(N, 28, 28, 3\)"):
        load_arrays("pathmnist", root=tmp_path)
