"""The user's own data end to end: `medkd import` of a PNG folder and of a CSV, then cache-teacher →
distill → report → export on the custom .npz; a cache finds its file, refuses a changed one; big splits
read memory-mapped give the numbers held ones give."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import CacheTeacherConfig, DistillConfig
from medkd.data import data_sha256, load_arrays, make_synthetic
from medkd.datasets import dataset_info
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.runs import read_result

CLASSES = ("cyst", "mass", "normal")


def blob_image(rng: np.random.Generator, k: int, size: int = 20, rgb: bool = False) -> np.ndarray:
    """A noisy image whose bright square sits in class k's corner: learnable in one epoch."""
    image = rng.normal(60, 15, size=(size, size)).clip(0, 255)
    y, x = divmod(k, 2)
    half = size // 2
    image[y * half : (y + 1) * half, x * half : (x + 1) * half] += 120
    image = image.clip(0, 255).astype(np.uint8)
    return np.stack([image, image // 2, image], axis=-1) if rgb else image


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """ImageFolder layout: cyst/ mass/ normal/, 30 gray PNGs each, no split level."""
    root = tmp_path_factory.mktemp("pngs") / "scans"
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(blob_image(rng, k)).save(root / name / f"{i:03d}.png")
    return root


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def run_stages(npz, tmp_path, student_size=8):
    """cache-teacher (tiny teacher) → distill from the cache with no --dataset → report → export."""
    out = invoke(
        "cache-teacher", "--dataset", str(npz), "--teacher", "tiny", "--teacher-size", "28", "--epochs", "2",
        "--min-teacher-auc", "0", "--out", str(tmp_path / "c.h5"), "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    out = invoke(
        "distill", "--cache", str(tmp_path / "c.h5"), "--student", "resnet18", "--student-size",
        str(student_size), "--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    report = invoke("report", str(tmp_path), "--format", "csv")
    assert report.exit_code == 0, report.output
    export = invoke("export", str(tmp_path / "run"), "--format", "onnx")
    assert export.exit_code == 0, export.output
    # stdout alone holds the CSV: notes and the best-setting line go to stderr
    return read_result(tmp_path / "run"), report.stdout


def test_a_png_folder_goes_through_every_stage(png_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    npz = tmp_path / "scans.npz"
    out = invoke("import", str(png_folder), "--out", str(npz), "--size", "28", "--seed", "3")
    assert out.exit_code == 0, out.output
    facts = json.loads(npz.with_suffix(".json").read_text())
    assert facts["task"] == "multi-class" and facts["label"] == {"0": "cyst", "1": "mass", "2": "normal"}
    with np.load(npz) as data:
        assert data["train_images"].shape[1:] == (28, 28) and data["train_images"].dtype == np.uint8
        counts = {s: len(data[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 90 and counts == facts["n_samples"]

    result, report = run_stages(npz, tmp_path)
    assert result.dataset == str(npz.resolve()) and result.size == 28
    assert result.dataset_sha256 == __import__("hashlib").sha256(npz.read_bytes()).hexdigest()
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["dataset"] == str(npz.resolve())
        assert json.loads(f.attrs["label_names"]) == facts["label"]
    rows = list(csv.DictReader(report.splitlines()))
    assert {r["dataset"] for r in rows} == {"scans"}  # the file's stem, not its whole path
    sidecar = json.loads((tmp_path / "run" / "student.onnx.json").read_text())
    assert sidecar["classes"] == list(CLASSES)  # the export names the user's classes


def test_a_csv_of_multilabel_rgb_images_goes_through_every_stage(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(72):
        labels = [k for k in range(2) if rng.random() < 0.5]
        image = np.maximum.reduce(
            [blob_image(rng, k, rgb=True) for k in labels] or [blob_image(rng, 3, rgb=True)]
        )
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        split = "test" if i % 4 == 0 else "train"  # val is carved out of train
        rows.append(
            {
                "path": f"img/{i}.png",
                "label": "|".join(("effusion", "nodule")[k] for k in labels),
                "split": split,
            }
        )
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    npz = tmp_path / "chest.npz"
    out = invoke("import", str(tmp_path / "labels.csv"), "--out", str(npz))
    assert out.exit_code == 0, out.output
    info = dataset_info(str(npz))
    assert info["task"] == "multi-label, binary-class" and info["n_channels"] == 3
    assert info["n_samples"]["test"] == 18
    result, _ = run_stages(npz, tmp_path / "stages")
    assert result.task == "multi-label, binary-class" and result.n_outputs == 2


@pytest.fixture
def custom_cache(tmp_path):
    """A custom npz without NAME.json, and a tiny-teacher cache built from it."""
    npz = make_synthetic(tmp_path / "data" / "mine.npz", "multi-class", 3, n_train=60, n_val=30, n_test=30)
    cache = cache_teacher(
        CacheTeacherConfig(
            dataset=str(npz),
            teacher="tiny",
            teacher_size=28,
            epochs=2,
            out=str(tmp_path / "mine.h5"),
            quiet=True,
            min_teacher_auc=0,
            device="cpu",
        )  # fmt: skip
    )
    return npz, cache


def quick(tmp_path, name, **kwargs):
    values = dict(
        student="resnet18", student_size=8, epochs=1, out=str(tmp_path / name), quiet=True, device="cpu"
    )
    return DistillConfig(**{**values, **kwargs})


def test_a_cache_finds_its_custom_file_and_refuses_it_changed(capsys, custom_cache, tmp_path):
    npz, cache = custom_cache
    assert "inferred multi-class with 3 classes" in capsys.readouterr().err  # no mine.json: a note
    result = distill(quick(tmp_path, "a", cache=str(cache)))  # no --dataset: the cache knows the file
    assert result.dataset == str(npz.resolve())

    moved = tmp_path / "elsewhere" / "copy.npz"  # the same bytes elsewhere are the same data
    moved.parent.mkdir()
    shutil.copy(npz, moved)
    assert distill(quick(tmp_path, "b", cache=str(cache), dataset=str(moved))).test == result.test

    arrays = dict(np.load(npz))
    arrays["test_labels"][0] = (arrays["test_labels"][0] + 1) % 3
    np.savez_compressed(npz, **arrays)
    with pytest.raises(MedkdError, match=r"mine.npz changed since the cache .* was built from it"):
        distill(quick(tmp_path, "c", cache=str(cache)))
    npz.unlink()
    with pytest.raises(MedkdError, match="which is not there now; pass --dataset PATH"):
        distill(quick(tmp_path, "d", cache=str(cache)))


def test_custom_file_errors_are_one_line(tmp_path):
    npz = make_synthetic(tmp_path / "m.npz", "binary-class", 2, size=28, n_train=20, n_val=10, n_test=10)
    with pytest.raises(MedkdError, match=r"holds 28 px images, not 64 px: drop --size"):
        load_arrays(str(npz), 64)
    with pytest.raises(MedkdError, match=r"dataset .*nothere.npz not found; make one with `medkd import"):
        DistillConfig(dataset=str(tmp_path / "nothere.npz"), alpha=1)
    npz.with_suffix(".json").write_text(
        json.dumps({"task": "regression", "label": {"0": "a"}, "n_channels": 1})
    )
    with pytest.raises(MedkdError, match=r"m.json: task 'regression' is not one of"):
        dataset_info(str(npz))


def test_datasets_lists_custom_files(tmp_path, png_folder):
    assert invoke("import", str(png_folder), "--out", str(tmp_path / "scans.npz")).exit_code == 0
    make_synthetic(tmp_path / "bare.npz", "binary-class", 2, n_train=20, n_val=10, n_test=10)
    out = CliRunner().invoke(main, ["datasets", "--data-dir", str(tmp_path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    lines = {line.split()[1]: line for line in out.output.splitlines() if ".npz" in line}
    assert "multi-class" in lines["scans.npz"] and "scans.json" in lines["scans.npz"]
    assert "binary-class" in lines["bare.npz"] and "inferred" in lines["bare.npz"]
    # and a relative --dataset is found in --data-dir, as the listing suggests
    assert DistillConfig(dataset="scans.npz", data_dir=str(tmp_path), alpha=1).dataset == str(
        (tmp_path / "scans.npz").resolve()
    )


def test_a_split_over_the_memory_budget_is_mapped_and_gives_the_same_numbers(tmp_path):
    npz = make_synthetic(tmp_path / "big.npz", "binary-class", 2, n_train=64, n_val=32, n_test=32)
    held, mapped = load_arrays(str(npz)), load_arrays(str(npz), max_memory_gb=1e-6)
    for split in ("train", "val", "test"):
        assert not isinstance(held[split][0], np.memmap) and isinstance(mapped[split][0], np.memmap)
        assert data_sha256(*held[split]) == data_sha256(*mapped[split])
    assert (
        sorted(p.name for p in tmp_path.glob("big.*_images.*.npy"))
        == sorted(p.name for p in tmp_path.glob("big.*.npy"))
        and len(list(tmp_path.glob("big.*.npy"))) == 3
    )

    def stage_one(name, budget):
        cfg = CacheTeacherConfig(
            dataset=str(npz), teacher="tiny", teacher_size=28, epochs=2, out=str(tmp_path / name), quiet=True,
            min_teacher_auc=0, device="cpu", max_memory_gb=budget, feature_batch_size=16,
        )  # fmt: skip
        with h5py.File(cache_teacher(cfg), "r") as f:
            return f["train/features"][:], f["test/logits"][:]

    for a, b in zip(stage_one("held.h5", None), stage_one("mapped.h5", 1e-6), strict=True):
        np.testing.assert_array_equal(a, b)
    held_run = distill(quick(tmp_path, "held", cache=str(tmp_path / "held.h5")))
    mapped_run = distill(quick(tmp_path, "mapped", cache=str(tmp_path / "held.h5"), max_memory_gb=1e-6))
    assert held_run.test == mapped_run.test and held_run.history[0]["loss"] == mapped_run.history[0]["loss"]


@pytest.mark.realdata
def test_genuine_breastmnist_survives_the_png_round_trip(real_data, tmp_path):
    """Every genuine breastmnist image written as a PNG under train|val|test/<class name>/ and imported
    back: the same (image, label) pairs in every split, and the class names of medmnist.INFO."""
    arrays = load_arrays("breastmnist", root=real_data)
    names = dataset_info("breastmnist")["label"]
    for split, (images, labels) in arrays.items():
        for name in names.values():
            (tmp_path / "png" / split / name).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels[:, 0], strict=True)):
            Image.fromarray(image).save(tmp_path / "png" / split / names[str(label)] / f"{i:04d}.png")
    out = invoke("import", str(tmp_path / "png"), "--out", str(tmp_path / "b.npz"))
    assert out.exit_code == 0, out.output
    back = load_arrays(str(tmp_path / "b.npz"))
    assert dataset_info(str(tmp_path / "b.npz"))["label"] == names
    for split, (images, labels) in arrays.items():
        pairs = sorted(im.tobytes() + lab.tobytes() for im, lab in zip(images, labels, strict=True))
        again = sorted(im.tobytes() + lab.tobytes() for im, lab in zip(*back[split], strict=True))
        assert pairs == again
