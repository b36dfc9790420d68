"""`medkd export` and `medkd predict`: the exported student reproduces its run, and predict reads images
the way the run saw them."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cache_config
from PIL import Image

from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import DistillConfig
from medkd.data import View, load_medmnist, prepare_images
from medkd.deploy import deployed_student, export_run, model_input, sidecar_path
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.metrics import scores_from_logits
from medkd.predict import load_predictor, predict, read_images
from medkd.runs import read_predictions, read_result
from medkd.trained import load_trained_run

ort = pytest.importorskip("onnxruntime")


def train(root, out, flag, student="resnet18", size=8):
    """A one-epoch baseline at `size` px (resized from the 28 px data inside the exported model)."""
    cfg = DistillConfig(
        dataset=flag, alpha=1.0, student=student, student_size=size, epochs=1, data_dir=str(root),
        out=str(out), device="cpu", seed=0, quiet=True,
    )  # fmt: skip
    distill(cfg)
    return out


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """Gray binary at 8 px (resized), RGB multi-class at 28 px (not resized), multi-label timm at 12 px."""
    folder = tmp_path_factory.mktemp("deploy_runs")
    return {
        "breastmnist": train(synthetic_root, folder / "breast", "breastmnist"),
        "pathmnist": train(synthetic_root, folder / "path", "pathmnist", size=28),
        "chestmnist": train(
            synthetic_root, folder / "chest", "chestmnist", student="timm:resnet10t", size=12
        ),
    }


def ort_scores(path, task, images):
    """The exported file's scores computed here, with onnxruntime alone (not medkd's check code)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images[..., None] if images.ndim == 3 else images
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return scores_from_logits(task, torch.from_numpy(logits)).numpy()


@pytest.mark.parametrize("flag", ["breastmnist", "pathmnist", "chestmnist"])
def test_onnx_export_reproduces_the_runs_predictions(runs, synthetic_root, flag, tmp_path):
    run = runs[flag]
    out = tmp_path / "m.onnx"
    exported = export_run(run, "onnx", out, data_dir=str(synthetic_root))
    recorded = read_predictions(run)
    images, _ = load_medmnist(flag, "test", 28, synthetic_root)
    ours = ort_scores(out, recorded["task"], images)
    assert np.abs(ours - recorded["y_score"]).max() <= 1e-4
    assert exported.check.passed and exported.check.images == len(images)
    assert exported.check.max_abs_diff == pytest.approx(np.abs(ours - recorded["y_score"]).max(), abs=1e-6)
    side = json.loads(sidecar_path(out).read_text())
    result = read_result(run)
    channels = 1 if images.ndim == 3 else 3
    assert side["input"]["shape"] == ["batch", channels, 28, 28]
    assert side["task"] == result.task and side["run"]["config_hash"] == result.config_hash
    assert len(side["classes"]) == result.n_outputs
    assert side["preprocessing_inside"]["resize_to"] == result.student_size


def test_deployed_module_is_prepare_images_then_the_student(runs, synthetic_root):
    # The wrapper's own arithmetic against the training path it replaces, on RGB data resized 28 → 20.
    run = load_trained_run(runs["pathmnist"])
    images, _ = load_medmnist("pathmnist", "test", 28, synthetic_root)
    module = deployed_student(run)
    assert module.rounded  # a run of this medkd rounds its resized images to 8 bits (View.rounded)
    view = View(20, interpolation="bicubic", rounded=True)
    module.size, module.resize = 20, True
    with torch.inference_mode():
        expected = run.model(prepare_images(torch.from_numpy(images), view))
        got = module(torch.from_numpy(model_input(images)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_torchscript_and_fixed_batch(runs, synthetic_root, tmp_path):
    run = runs["breastmnist"]
    ts = export_run(run, "torchscript", tmp_path / "m.pt", data_dir=str(synthetic_root))
    assert ts.check.passed
    loaded = torch.jit.load(str(ts.path))
    images, _ = load_medmnist("breastmnist", "test", 28, synthetic_root)
    with torch.inference_mode():
        scores = torch.softmax(loaded(torch.from_numpy(model_input(images))), 1).numpy()
    assert np.abs(scores - read_predictions(run)["y_score"]).max() <= 1e-4

    # A fixed batch of 5 does not divide the 32 test images: the check pads the last batch.
    fixed = export_run(run, "onnx", tmp_path / "b5.onnx", batch="5", data_dir=str(synthetic_root))
    assert fixed.check.passed
    session = ort.InferenceSession(str(fixed.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [5, 1, 28, 28]
    assert json.loads(sidecar_path(fixed.path).read_text())["input"]["shape"] == [5, 1, 28, 28]


def test_a_failing_check_writes_nothing(runs, synthetic_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["breastmnist"], run)
    recorded = read_predictions(run)
    with open(run / "predictions.npz", "wb") as f:  # scores off by 1e-3: another model's predictions
        np.savez(
            f, y_true=recorded["y_true"], y_score=recorded["y_score"] + 1e-3, task=np.array(recorded["task"])
        )
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(MedkdError, match="does not reproduce .*nothing was written"):
        export_run(run, "onnx", data_dir=str(synthetic_root))
    assert sorted(p.name for p in run.iterdir()) == before  # no model, no sidecar, no temporary file


def test_export_refuses_to_replace_what_medkd_did_not_write(runs, synthetic_root, tmp_path):
    run = runs["breastmnist"]
    mine = tmp_path / "user.onnx"
    mine.write_bytes(b"the user's own model")
    with pytest.raises(MedkdError, match="already exists; pass --force"):
        export_run(run, "onnx", mine, data_dir=str(synthetic_root))
    with pytest.raises(MedkdError, match="has no medkd sidecar"):
        export_run(run, "onnx", mine, data_dir=str(synthetic_root), force=True)
    assert mine.read_bytes() == b"the user's own model"
    ours = export_run(run, "torchscript", tmp_path / "m.pt", data_dir=str(synthetic_root))
    again = export_run(run, "torchscript", ours.path, data_dir=str(synthetic_root), force=True)
    assert again.check.passed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "--batch must be 'dynamic' or a positive integer, got '0'"),
        (["--format", "tflite"], "Invalid value for '--format'"),
        (["--out", "nowhere/m.onnx"], "folder nowhere does not exist"),
    ],
)
def test_cli_export_errors_are_one_line(runs, synthetic_root, args, message):
    result = CliRunner().invoke(
        main, ["export", str(runs["breastmnist"]), "--data-dir", str(synthetic_root), *args]
    )
    assert result.exit_code != 0 and message in result.output


def write_pngs(images, folder, bits=8):
    folder.mkdir()
    for i, image in enumerate(images):
        array = image.astype(np.uint16) * 257 if bits == 16 else image
        Image.fromarray(array).save(folder / f"img_{i:03d}.png")
    return folder


def test_predict_on_pngs_gives_the_runs_labels_from_the_run_and_from_onnx(runs, synthetic_root, tmp_path):
    run = runs["breastmnist"]
    images, _ = load_medmnist("breastmnist", "test", 28, synthetic_root)
    folder = write_pngs(images, tmp_path / "pngs")
    model = export_run(run, "onnx", tmp_path / "m.onnx", data_dir=str(synthetic_root)).path
    recorded = read_predictions(run)["y_score"]
    for source in (run, model):
        rows, read = predict(source, folder)
        assert read.resized == 0 and [r["path"] for r in rows] == [str(p) for p in sorted(folder.iterdir())]
        assert [r["label"] for r in rows] == recorded.argmax(1).tolist()
        names = list(rows[0])[3:]
        assert names == ["malignant", "normal, benign"]
        assert np.abs(np.array([[float(r[n]) for n in names] for r in rows]) - recorded).max() < 1e-5
    # 16-bit PNGs of the same images (×257) read back as the same 8-bit images.
    sixteen = read_images(write_pngs(images, tmp_path / "png16", bits=16), 1, 28)
    np.testing.assert_array_equal(sixteen.images, images)


def test_predict_csv_npz_index_multilabel_and_resize(runs, synthetic_root, tmp_path):
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(
        main, ["predict", str(runs["chestmnist"]), str(synthetic_root / "chestmnist.npz"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    recorded = read_predictions(runs["chestmnist"])["y_score"]
    assert [r["index"] for r in rows] == [str(i) for i in range(len(recorded))]
    for row, scores in zip(rows, recorded, strict=True):
        chosen = [str(i) for i in np.flatnonzero(scores >= 0.5)]
        assert row["label"] == "|".join(chosen)
    # An image at another size is resized to the model's 28 px (PIL bicubic), and said so.
    big = tmp_path / "big.png"
    Image.fromarray(np.full((56, 56, 3), 120, np.uint8)).save(big)
    result = CliRunner().invoke(main, ["predict", str(runs["pathmnist"]), str(big)])
    assert result.exit_code == 0 and "1 image(s) were not at the model's size" in result.output
    assert list(csv.reader(io.StringIO(result.stdout)))[1][0] == str(big)


def test_predict_refusals(runs, synthetic_root, tmp_path):
    model = export_run(runs["breastmnist"], "onnx", tmp_path / "m.onnx", data_dir=str(synthetic_root)).path
    sidecar_path(model).unlink()
    with pytest.raises(MedkdError, match="has no sidecar m.onnx.json"):
        load_predictor(model)
    with pytest.raises(MedkdError, match="neither a run folder"):
        load_predictor(tmp_path / "m.onnx.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedkdError, match=r"holds no image files \(.png/.jpg/.jpeg/.tif"):
        predict(runs["breastmnist"], tmp_path / "empty")
    with pytest.raises(MedkdError, match="has no 'test_images'"):
        np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 28, 28), np.uint8))
        predict(runs["breastmnist"], tmp_path / "x.npz")
    with pytest.raises(MedkdError, match=r"the model takes uint8 \(N, 28, 28\)"):
        np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 28, 28, 3), np.uint8))
        predict(runs["breastmnist"], tmp_path / "rgb.npz")
    taken = tmp_path / "taken.csv"
    taken.write_text("mine")
    with pytest.raises(MedkdError, match="already exists"):
        predict(runs["breastmnist"], synthetic_root / "breastmnist.npz", out=taken)
    assert taken.read_text() == "mine"


@pytest.mark.realdata
@pytest.mark.slow
def test_genuine_breastmnist_export_and_png_predictions(real_data, tmp_path):
    # A short genuine run (1 epoch, 28 px): its ONNX export reproduces it and predicts the PNGs alike.
    run = train(real_data, tmp_path / "run", "breastmnist", size=28)
    exported = export_run(run, "onnx", data_dir=str(real_data))
    assert exported.check.passed and exported.check.images == 156
    images, _ = load_medmnist("breastmnist", "test", 28, real_data)
    rows, _ = predict(exported.path, write_pngs(images, tmp_path / "pngs"))
    assert [r["label"] for r in rows] == read_predictions(run)["y_score"].argmax(1).tolist()


def test_a_feature_kd_run_exports_without_its_projector(synthetic_root, tmp_path):
    cache = cache_teacher(tiny_cache_config(synthetic_root, tmp_path / "c.h5"))
    cfg = DistillConfig(
        cache=str(cache), alpha=0.5, feature_weight=1.0, student="resnet18", student_size=8, epochs=1,
        data_dir=str(synthetic_root), out=str(tmp_path / "run"), device="cpu", quiet=True,
    )  # fmt: skip
    distill(cfg)
    exported = export_run(tmp_path / "run", "onnx", data_dir=str(synthetic_root))
    # best.pt holds the student alone (the projector trained beside it is not saved), and the export
    # reproduces the run's predictions from it.
    assert exported.check.passed and exported.check.images == 32
    assert json.loads(sidecar_path(exported.path).read_text())["output"]["shape"] == ["batch", 2]


def test_the_check_falls_back_to_float64_only_for_fp32_rounding():
    from medkd.deploy import ExportCheck

    assert ExportCheck(10, 5e-5, "predictions.npz", 5e-5).passed
    assert not ExportCheck(10, 3e-4, "predictions.npz", 3e-4).passed  # no float64 reference: fails
    # As close to float64 as PyTorch's own fp32 (within 2x): the model's rounding, not the export.
    ok = ExportCheck(10, 3.7e-4, "predictions.npz", 3.7e-4, float64=(5.6e-4, 5.3e-4))
    assert ok.passed and "against best.pt in float64" in ok.line() and ok.line().endswith(": ok")
    bad = ExportCheck(10, 2e-2, "predictions.npz", 2e-2, float64=(2e-2, 5e-4))
    assert not bad.passed and bad.line().endswith(": FAILED")
    # Exact against float64, but best.pt no longer gives the recorded scores: another run's predictions.
    other = ExportCheck(10, 1e-3, "predictions.npz", 1e-3, float64=(1e-7, 1e-7), eager_diff=1e-3)
    assert not other.passed


def test_cli_profile_tsne_and_gradcam_on_a_run(runs, synthetic_root, tmp_path):
    run = runs["breastmnist"]
    invoke = CliRunner().invoke
    result = invoke(main, ["profile", f"run:{run}", "--repeats", "2", "--batch-size", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "profile.json").read_text())
    assert saved["rows"][0]["input_shape"] == [3, 8, 8] and saved["rows"][0]["threads"] == 1
    assert "resnet18 (run breast)" in result.output and result.stdout == ""  # the table goes to stderr
    for args in (
        ["tsne", str(run), "--out", str(tmp_path / "t.png"), "--perplexity", "5"],
        ["gradcam", str(run), "--images", "4", "--out", str(tmp_path / "g.png")],
    ):
        result = invoke(main, [*args, "--data-dir", str(synthetic_root)])
        assert result.exit_code == 0, result.output
        assert Image.open(args[args.index("--out") + 1]).format == "PNG"
    result = invoke(
        main, ["gradcam", str(run), "--out", str(tmp_path / "g.png"), "--data-dir", str(synthetic_root)]
    )
    assert result.exit_code == 1 and "already exists" in result.output
