"""`medkd import`: image files read by the stated rules, folders and CSVs become MedMNIST-format npz files
with stratified, seeded splits and a sidecar of facts, and bad input is refused before anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medkd
from medkd.datasets import dataset_info
from medkd.errors import MedkdError
from medkd.image_files import decode_image, is_colour, read_image
from medkd.importing import import_dataset

SIDECAR_KEYS = {
    "medkd_dataset", "python_class", "description", "task", "label", "n_channels", "n_samples", "size",
    "source", "source_kind", "split_rule", "resize", "bit_depth", "medkd_version", "created_utc",
}  # fmt: skip


def pil_gray(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB → L, written out: ITU-R 601-2 luma in 16-bit fixed point, rounded."""
    r, g, b = (rgb[..., c].astype(np.int64) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def top_byte_rounded(v: np.ndarray) -> np.ndarray:
    """round(v / 257) in integers (no ties: 257k + 128.5 is never a whole number)."""
    return ((v.astype(np.int64) * 2 + 257) // 514).clip(0, 255).astype(np.uint8)


def tagged(tag: int, shape=(12, 12), channels: int = 1) -> np.ndarray:
    """A distinct uint8 image whose top-left pixel is `tag`, so a test can tell which file it came from."""
    rng = np.random.default_rng(tag)
    array = rng.integers(0, 256, size=shape + ((3,) if channels == 3 else ()), dtype=np.uint8)
    array[0, 0] = tag
    return array


def image_folder(root: Path, counts: dict[str, int] | dict[str, dict[str, int]], start: int = 0) -> Path:
    """PNGs in ImageFolder layout: {class: n} or {split: {class: n}}; tags count up from `start`."""
    tag = start
    for name, value in counts.items():
        for cls, n in value.items() if isinstance(value, dict) else [(name, value)]:
            folder = root / name / cls if isinstance(value, dict) else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                Image.fromarray(tagged(tag)).save(folder / f"img_{tag:03d}.png")
                tag += 1
    return root


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads(path.with_suffix(".json").read_text())


def tags(arrays: dict[str, np.ndarray], split: str) -> list[int]:
    return arrays[f"{split}_images"][:, 0, 0].tolist()


# ---------------------------------------------------------------- reading one file


def test_sixteen_bit_and_float_files_follow_the_rule(tmp_path):
    values = np.array([[0, 128, 129, 385], [386, 32767, 65406, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    Image.fromarray(values).save(tmp_path / "a.tif")
    for name in ("a.png", "a.tif"):
        decoded = decode_image(tmp_path / name)
        assert decoded.depth == "16-bit"
        np.testing.assert_array_equal(decoded.array, top_byte_rounded(values))
    np.testing.assert_array_equal(top_byte_rounded(values), [[0, 0, 1, 1], [2, 127, 254, 255]])  # by hand
    unit = np.array([[-0.5, 0.0, 0.25], [0.5, 0.999, 1.0]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    expected = np.round(np.clip(unit.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif", None, None), expected)
    wide = np.array([[0.0, 10.0], [20.0, 40.0]], dtype=np.float32)
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "wide.tif", None, None), [[0, 64], [128, 255]])


def test_channels_modes_and_resizing(tmp_path):
    rgb = tagged(7, (10, 14), channels=3)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", None, None), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "c.bmp", 3, None), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", 1, None), pil_gray(rgb))
    gray = tagged(8, (10, 14))
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png", None, None).shape == (10, 14)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png", 3, None), np.stack([gray] * 3, axis=-1))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", None, None), rgb)  # alpha dropped
    Image.fromarray(np.dstack([gray, gray])).save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png", None, None), gray)
    palette = Image.fromarray(rgb).quantize(8)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        read_image(tmp_path / "p.png", None, None), np.asarray(palette.convert("RGB"))
    )
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / "j.jpg")
    jpeg = read_image(tmp_path / "j.jpg", None, 8)
    assert jpeg.shape == (8, 8) and np.abs(jpeg.astype(int) - 100).max() <= 2
    # Straight to the square (no crop): a 10x14 image keeps its whole width, squeezed.
    small = read_image(tmp_path / "g.png", None, 7)
    assert small.shape == (7, 7) and small.dtype == np.uint8
    expected = np.asarray(Image.fromarray(gray).resize((7, 7), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(small, expected)
    assert is_colour(rgb) and not is_colour(np.stack([gray] * 3, axis=-1)) and not is_colour(gray)


def test_an_unreadable_file_is_one_line(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(MedkdError, match=r"cannot read .*bad.png as an image \(") as err:
        read_image(tmp_path / "bad.png", 1, 28)
    assert "\n" not in str(err.value)


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, tags.pop("photometric", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = np.array([[0, 50, 100], [150, 200, 1000]], dtype=np.uint16)
    hu = raw * 2.0 - 100  # RescaleSlope 2, RescaleIntercept -100
    windowed = write_dicom(
        tmp_path / "w.dcm",
        raw,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=[100, 40],
        WindowWidth=[200, 80],
    )
    expected = np.round(np.clip((hu - 0) / 200, 0, 1) * 255).astype(np.uint8)  # first window: 0 … 200
    decoded = decode_image(windowed)
    assert decoded.depth == "dicom"
    np.testing.assert_array_equal(decoded.array, expected)
    np.testing.assert_array_equal(expected[0], [0, 0, 128])  # -100, 0, 100 in the 0 … 200 window
    # No window: the image's min … max; MONOCHROME1 inverted; sniffed by its DICM magic without a suffix.
    plain = write_dicom(tmp_path / "IM0001", raw, photometric="MONOCHROME1")
    minmax = np.round(raw / 1000 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(plain, None, None), 255 - minmax)
    assert read_image(plain, 3, 4).shape == (4, 4, 3)


def test_a_folder_of_dicom_files_is_imported_windowed(tmp_path):
    for k in range(3):
        (tmp_path / "s" / "ct").mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((12, 12), np.uint16)
        pixels[0, 0], pixels[5, 5] = 1000, 250 * k  # no window: 0 … 1000 → 0 … 255
        write_dicom(tmp_path / "s" / "ct" / f"{k}.dcm", pixels)
        image_folder(tmp_path / "s", {"xray": 1}, start=k)
    arrays, info = load(import_dataset(tmp_path / "s", tmp_path / "d.npz", size=12).path)
    assert info["bit_depth"].startswith("DICOM rescaled, then windowed") and info["n_channels"] == 1
    ct = np.concatenate(
        [arrays[f"{s}_images"][arrays[f"{s}_labels"][:, 0] == 0] for s in ("train", "val", "test")]
    )
    assert sorted(ct[:, 5, 5].tolist()) == [0, 64, 128]


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "x.dcm").write_bytes(b"\0" * 128 + b"DICM")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(MedkdError, match=r"^reading DICOM needs pydicom: pip install 'medkd\[dicom\]'$"):
        read_image(tmp_path / "x.dcm", 1, 28)


# ---------------------------------------------------------------- folders


def test_folder_is_split_stratified_by_class_and_seeded(tmp_path):
    counts = {"benign": 30, "malignant": 20, "normal": 10}
    source = image_folder(tmp_path / "src", counts)
    (source / "benign" / ".DS_Store").write_bytes(b"junk")
    (source / "benign" / "._img_000.png").write_bytes(b"macOS resource fork")
    (source / "benign" / "notes.txt").write_text("not an image")
    imported = import_dataset(source, tmp_path / "mine.npz", size=12)
    arrays, info = load(imported.path)
    assert imported.info == info and imported.facts == tmp_path / "mine.json"
    assert set(arrays) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape[1:] == (12, 12)
    assert arrays["train_labels"].dtype == np.uint8 and arrays["train_labels"].shape[1] == 1
    assert info["label"] == {"0": "benign", "1": "malignant", "2": "normal"} and info["task"] == "multi-class"
    first = {"benign": 0, "malignant": 30, "normal": 50}  # tags by class, in folder order
    every = []
    for split, ratio in zip(("train", "val", "test"), (0.7, 0.1, 0.2), strict=True):
        labels = arrays[f"{split}_labels"][:, 0]
        for k, (cls, n) in enumerate(counts.items()):
            assert abs((labels == k).sum() - n * ratio) <= 1, (split, cls)
            # Each image keeps its own pixels and its class.
            assert all(first[cls] <= t < first[cls] + n for t in np.array(tags(arrays, split))[labels == k])
        # Within a split, images are in path order (tags were written in path order).
        assert tags(arrays, split) == sorted(tags(arrays, split))
        np.testing.assert_array_equal(arrays[f"{split}_images"][0], tagged(tags(arrays, split)[0]))
        every += tags(arrays, split)
    assert sorted(every) == list(range(60))
    assert info["n_samples"] == {s: len(arrays[f"{s}_labels"]) for s in ("train", "val", "test")}
    assert set(info) == SIDECAR_KEYS
    assert info["medkd_dataset"] == 1 and info["python_class"] is None and info["n_channels"] == 1
    assert info["source"] == str(source.resolve()) and info["source_kind"] == "folder" and info["size"] == 12
    assert info["split_rule"] == "stratified 0.7/0.1/0.2, seed 0" and info["bit_depth"] == "8-bit"
    assert info["resize"] == "PIL bicubic to 12x12 (0 resized)" and info["medkd_version"] == medkd.__version__
    assert info["created_utc"].endswith("+00:00") and "\n" not in info["description"]
    assert dataset_info(str(imported.path)) == info  # what medkd reads back for `--dataset mine.npz`
    assert imported.summary().startswith(f"{imported.path}: {info['n_samples']['train']}/")
    # The same seed gives the same file; another seed another split.
    again, _ = load(import_dataset(source, tmp_path / "again.npz", size=12).path)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    other, info1 = load(import_dataset(source, tmp_path / "other.npz", size=12, seed=1).path)
    assert tags(other, "test") != tags(arrays, "test") and info1["split_rule"].endswith("seed 1")
    assert sorted(tags(other, "train") + tags(other, "val") + tags(other, "test")) == list(range(60))


def test_given_folders_are_kept_and_missing_ones_carved_from_train(tmp_path):
    three = image_folder(
        tmp_path / "three", {"train": {"a": 6, "b": 4}, "valid": {"a": 2, "b": 2}, "test": {"a": 3, "b": 3}}
    )
    arrays, info = load(import_dataset(three, tmp_path / "three.npz", size=12).path)
    assert info["split_rule"] == "train/val/test folders" and info["task"] == "binary-class"
    assert tags(arrays, "train") == list(range(10)) and tags(arrays, "val") == list(range(10, 14))
    assert tags(arrays, "test") == list(range(14, 20))
    assert arrays["val_labels"][:, 0].tolist() == [0, 0, 1, 1]
    two = image_folder(tmp_path / "two", {"train": {"a": 24, "b": 16}, "test": {"a": 5, "b": 5}})
    arrays, info = load(import_dataset(two, tmp_path / "two.npz", size=12, seed=3).path)
    assert info["split_rule"] == "given train/test; val carved from train, stratified, seed 3"
    assert tags(arrays, "test") == list(range(40, 50))
    val = arrays["val_labels"][:, 0]
    # val takes 0.1 / (0.7 + 0.1) of each class's train images.
    assert (val == 0).sum() == 3 and (val == 1).sum() == 2
    assert info["n_samples"] == {"train": 35, "val": 5, "test": 10}
    assert sorted(tags(arrays, "train") + tags(arrays, "val")) == list(range(40))


def test_channels_auto_bit_depth_and_resize_count(tmp_path):
    source = tmp_path / "src"
    for cls in ("x", "y"):
        (source / cls).mkdir(parents=True)
    colour = tagged(1, (12, 12), channels=3)
    gray = tagged(2)
    Image.fromarray(colour).save(source / "x" / "c.png")
    Image.fromarray(gray).save(source / "x" / "g.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(source / "y" / "g16.png")
    Image.fromarray(tagged(3, (20, 16))).save(source / "y" / "big.tif")
    Image.fromarray(tagged(4)).save(source / "y" / "h.png")
    Image.fromarray(tagged(5)).save(source / "x" / "i.png")
    split = "0.34,0.33,0.33"
    arrays, info = load(import_dataset(source, tmp_path / "auto.npz", size=12, split=split).path)
    assert info["n_channels"] == 3 and arrays["train_images"].shape[1:] == (12, 12, 3)
    assert info["bit_depth"] == "16-bit scaled to 8 by round(v/257)"
    assert info["resize"] == "PIL bicubic to 12x12 (1 resized)"
    everything = np.concatenate([arrays[f"{s}_images"] for s in ("train", "val", "test")])
    assert any(np.array_equal(im, colour) for im in everything)
    assert sum(np.array_equal(im, np.stack([gray] * 3, axis=-1)) for im in everything) == 2  # 8- and 16-bit
    arrays, info = load(import_dataset(source, tmp_path / "one.npz", size=12, split=split, channels=1).path)
    assert info["n_channels"] == 1
    everything = np.concatenate([arrays[f"{s}_images"] for s in ("train", "val", "test")])
    assert everything.shape[1:] == (12, 12) and any(np.array_equal(im, pil_gray(colour)) for im in everything)
    (source / "x" / "c.png").unlink()  # gray images only: auto gives one channel
    Image.fromarray(tagged(6)).save(source / "x" / "c.png")
    _, info = load(import_dataset(source, tmp_path / "gray.npz", size=12, split=split).path)
    assert info["n_channels"] == 1


# ---------------------------------------------------------------- CSV and TSV


def write_images(folder: Path, n: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for tag in range(start, start + n):
        Image.fromarray(tagged(tag)).save(folder / f"{tag:03d}.png")
    return [f"{folder.name}/{tag:03d}.png" for tag in range(start, start + n)]


def test_csv_with_a_split_column_and_ordinal_grades(tmp_path):
    names = write_images(tmp_path / "imgs", 12)
    grades = ["10", "2", "1"] * 4
    splits = ["train"] * 6 + ["validation"] * 3 + ["test"] * 3
    rows = [f"{n},{g},{s}" for n, g, s in zip(names, grades, splits, strict=True)]
    (tmp_path / "labels.csv").write_text("Filename,label,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "grades.npz"
    arrays, info = load(import_dataset(tmp_path / "labels.csv", out, size=12, task="ordinal-regression").path)
    assert info["task"] == "ordinal-regression" and info["label"] == {"0": "1", "1": "2", "2": "10"}
    assert info["split_rule"] == "csv split column" and info["source_kind"] == "csv"
    assert tags(arrays, "train") == list(range(6)) and tags(arrays, "val") == [6, 7, 8]
    grade_index = {"1": 0, "2": 1, "10": 2}
    assert arrays["train_labels"][:, 0].tolist() == [grade_index[g] for g in grades[:6]]
    # Without --task the same names sort as text: multi-class, "1" < "10" < "2".
    _, info = load(import_dataset(tmp_path / "labels.csv", tmp_path / "text.npz", size=12).path)
    assert info["task"] == "multi-class" and list(info["label"].values()) == ["1", "10", "2"]


def test_tsv_multilabel_with_bars_and_csv_with_flag_columns(tmp_path):
    names = write_images(tmp_path / "imgs", 30)
    sets = ["a|b", "b", "", "a", "c|a", "b|c"] * 5
    rows = [f"{n}\t{s}" for n, s in zip(names, sets, strict=True)]
    (tmp_path / "labels.tsv").write_text("path\tlabel\n" + "\n".join(rows) + "\n")
    arrays, info = load(import_dataset(tmp_path / "labels.tsv", tmp_path / "ml.npz", size=12).path)
    assert info["task"] == "multi-label, binary-class" and info["label"] == {"0": "a", "1": "b", "2": "c"}
    expected = {t: [int(x in s.split("|")) for x in "abc"] for t, s in enumerate(sets)}
    for split in ("train", "val", "test"):
        assert arrays[f"{split}_labels"].shape[1] == 3
        assert arrays[f"{split}_labels"].tolist() == [expected[t] for t in tags(arrays, split)]
    assert sum(info["n_samples"].values()) == 30 and min(info["n_samples"].values()) >= 1
    # The same labels as one 0/1 column per label (the names in column order), sniffed from a .txt.
    flags = ["\t".join(str(v) for v in expected[t][::-1]) for t in range(30)]
    lines = [f"{n}\t{f}" for n, f in zip(names, flags, strict=True)]
    (tmp_path / "flags.txt").write_text("image\tc\tb\ta\n" + "\n".join(lines) + "\n")
    again, info = load(import_dataset(tmp_path / "flags.txt", tmp_path / "flags.npz", size=12).path)
    assert info["label"] == {"0": "c", "1": "b", "2": "a"}
    for split in ("train", "val", "test"):
        assert again[f"{split}_labels"].tolist() == [expected[t][::-1] for t in tags(again, split)]


# ---------------------------------------------------------------- refusals


def csv_source(tmp_path: Path, header: str, rows: list[str], name: str = "l.csv") -> Path:
    write_images(tmp_path / "imgs", 4)
    (tmp_path / name).write_text(header + "\n" + "\n".join(rows) + "\n")
    return tmp_path / name


REFUSALS = {
    "missing source": (lambda t: t / "nowhere", {}, r"nowhere does not exist; give a folder"),
    "neither": (
        lambda t: Image.fromarray(tagged(1)).save(t / "x.png") or t / "x.png",
        {},
        "is neither a folder",
    ),
    "no class folders": (
        lambda t: (t / "flat").mkdir() or t / "flat",
        {},
        r"holds no class folders \(0 image",
    ),
    "empty class": (
        lambda t: (image_folder(t / "s", {"a": 3, "b": 3}) / "c").mkdir() or t / "s",
        {},
        r"class folder .*s/c holds no images",
    ),
    "only one split": (
        lambda t: image_folder(t / "s", {"train": {"a": 4, "b": 4}, "test": {"a": 2}}),
        {},
        r"class 'b' has images only in train",
    ),
    "unreadable": (
        lambda t: (image_folder(t / "s", {"a": 3, "b": 3}) / "b" / "z.png").write_bytes(b"x") and t / "s",
        {},
        r"cannot read .*z\.png as an image",
    ),
    "no path column": (
        lambda t: csv_source(t, "name,label", ["imgs/000.png,a"]),
        {},
        r"has no path column \(path, file, filename, image\); found columns: name, label",
    ),
    "no label column": (
        lambda t: csv_source(t, "path,split", ["imgs/000.png,train"]),
        {},
        r"has no label column .*; found columns: path, split",
    ),
    "missing row": (
        lambda t: csv_source(t, "path,label", ["imgs/000.png,a", "imgs/gone.png,b"]),
        {},
        r"l\.csv, line 3: image imgs/gone\.png not found",
    ),
    "bad ratios": (lambda t: image_folder(t / "s", {"a": 3, "b": 3}), {"split": "0.7,0.2,0.2"}, "sum to 1"),
    "two ratios": (
        lambda t: image_folder(t / "s", {"a": 3, "b": 3}),
        {"split": (0.8, 0.2)},
        "three positive",
    ),
    "too few": (
        lambda t: image_folder(t / "s", {"a": 5, "rare": 2}),
        {},
        r"class 'rare' has 2 image\(s\); a split, stratified, needs at least 3",
    ),
    "too few to carve": (
        lambda t: image_folder(t / "s", {"train": {"a": 5, "b": 1}, "test": {"a": 2, "b": 2}}),
        {},
        r"class 'b' has 1 image\(s\) in train; carving val from train, stratified, needs at least 2",
    ),
    "one class": (lambda t: image_folder(t / "s", {"a": 5}), {}, r"only one class \('a'\)"),
    "binary of three": (
        lambda t: image_folder(t / "s", {"a": 3, "b": 3, "c": 3}),
        {"task": "binary-class"},
        r"binary-class needs exactly 2 classes; found 3 \(a, b, c\)",
    ),
    "sets as multi-class": (
        lambda t: csv_source(t, "path,label", ["imgs/000.png,a|b", "imgs/001.png,a"]),
        {"task": "multi-class"},
        "labels are sets",
    ),
    "bad split value": (
        lambda t: csv_source(t, "path,label,split", ["imgs/000.png,a,dev"]),
        {},
        r"line 2: split 'dev' is not train, val or test",
    ),
    "not 0/1": (
        lambda t: csv_source(t, "path,a,patient", ["imgs/000.png,1,P7"]),
        {},
        r"column 'patient' holds 'P7'",
    ),
    "no train": (
        lambda t: image_folder(t / "s", {"val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}),
        {},
        "val/test given but no train split",
    ),
    "class without train": (
        lambda t: image_folder(
            t / "s", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1, "c": 1}, "test": {"b": 1, "c": 1}}
        ),
        {},
        r"class 'c' has no train images \(only val/test\)",
    ),
    "mixed folders": (
        lambda t: image_folder(t / "s", {"train": {"a": 2}}) and image_folder(t / "s", {"b": 2}),
        {},
        r"mixes split folders \(train\) with other folders \(b\)",
    ),
    "val and valid": (
        lambda t: image_folder(t / "s", {"train": {"a": 2}, "val": {"a": 1}, "valid": {"a": 1}}),
        {},
        "has both val/ and valid/",
    ),
    "repeated row": (
        lambda t: csv_source(t, "path,label", ["imgs/000.png,a", "imgs/001.png,b", "imgs/000.png,b"]),
        {},
        r"lines 2 and 4 both name imgs/000\.png",
    ),
    "empty label": (
        lambda t: csv_source(t, "path,label", ["imgs/000.png,a", "imgs/001.png,"]),
        {},
        r"001\.png has an empty label",
    ),
    "header only": (lambda t: csv_source(t, "path,label", []), {}, "lists no images"),
    "text file": (lambda t: (t / "notes.txt").write_text("hello\n") and t / "notes.txt", {}, "is neither"),
    "bad channels": (lambda t: image_folder(t / "s", {"a": 3, "b": 3}), {"channels": 2}, "auto, 1 or 3"),
    "unknown task": (
        lambda t: image_folder(t / "s", {"a": 3, "b": 3}),
        {"task": "regression"},
        "unknown task",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(tmp_path, case):
    make, kwargs, message = REFUSALS[case]
    source = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(MedkdError, match=message) as err:
        import_dataset(source, tmp_path / "out.npz", size=12, **kwargs)
    assert "\n" not in str(err.value)
    assert sorted(tmp_path.rglob("*")) == before  # no npz, no json, no temporary file


def test_out_is_checked_and_force_is_needed_to_replace(tmp_path):
    source = image_folder(tmp_path / "s", {"a": 3, "b": 3})
    with pytest.raises(MedkdError, match=r"must end in \.npz"):
        import_dataset(source, tmp_path / "out.h5")
    with pytest.raises(MedkdError, match=r"folder .*missing does not exist"):
        import_dataset(source, tmp_path / "missing" / "out.npz")
    out = tmp_path / "out.npz"
    out.write_bytes(b"the user's own file")
    with pytest.raises(MedkdError, match="already exists; pass --force to replace it"):
        import_dataset(source, out, size=12)
    assert out.read_bytes() == b"the user's own file" and not out.with_suffix(".json").exists()
    out.unlink()
    out.with_suffix(".json").write_text("{}")  # the sidecar's name is taken too
    with pytest.raises(MedkdError, match=r"out\.json already exists; pass --force"):
        import_dataset(source, out, size=12)
    imported = import_dataset(source, out, size=12, force=True)
    assert load(imported.path)[1]["n_samples"] == {"train": 2, "val": 2, "test": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.npz", "s"]
