"""Shipping a trained student: the network and its preprocessing as one module, written as ONNX or
TorchScript, checked against the run's own predictions, with a sidecar JSON that says how to call it.

The exported model takes float32 images in [0, 1], (B, C, H, W) at the data's size (C = 1 gray, 3 RGB),
and returns logits: the resize to the student's size, gray → RGB and the normalisation are inside it, so
a user feeds it what a PNG reader gives, divided by 255. The feature-KD projector is not part of a run's
`best.pt`, so it is never exported.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medkd.data import View, dataset_info, is_multilabel
from medkd.errors import MedkdError, first_line
from medkd.files import atomic_path, file_sha256, write_json
from medkd.metrics import scores_from_logits
from medkd.registry import EXPORT_FORMATS
from medkd.runs import PREDICTIONS, read_predictions, versions
from medkd.trained import TrainedRun, load_trained_run

# Default file names inside the run folder; the sidecar is the model's name + ".json".
EXPORT_NAMES = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt"}
EXPORT_FORMAT_VERSION = 1  # the sidecar's `medkd_export`
TOLERANCE = 1e-4  # max |score difference| the self-check accepts (fp32 end to end: ~1e-6 in practice)
CHECK_BATCH = 256


class DeployedStudent(nn.Module):
    """float32 images in [0, 1], (B, C, H, W) at the data's size → the student's logits (B, K).

    The same arithmetic as `medkd.data.prepare_images` on uint8 / 255: resize (antialiased for bilinear
    and bicubic, clamped to [0, 1], rounded to 8 bits when the run's view was), then x·(1/std) − mean/std,
    whose broadcast turns one channel into three. So an exported model reproduces the run's evaluation,
    not an approximation of it.
    """

    def __init__(self, model: nn.Module, view: View, channels: int, data_size: int):
        super().__init__()
        self.model = model
        self.size = view.size
        self.interpolation = view.interpolation
        self.resize = data_size != view.size
        self.rounded = view.rounded
        self.channels = channels
        mean, std = torch.tensor(view.mean).view(1, 3, 1, 1), torch.tensor(view.std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / std)
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.resize:
            antialias = self.interpolation in ("bilinear", "bicubic")
            x = F.interpolate(x, size=(self.size, self.size), mode=self.interpolation, antialias=antialias)
            x = x.clamp(0, 1)  # bicubic overshoots; PIL clamps too
            if self.rounded:  # as the run trained and evaluated: its resized images held in 8 bits
                x = torch.round(x * 255) / 255
        return self.model(x * self.scale + self.shift)


def data_channels(run: TrainedRun) -> int:
    """1 for a grayscale dataset, 3 for RGB."""
    return int(dataset_info(run.result.dataset)["n_channels"])


def deployed_student(run: TrainedRun) -> DeployedStudent:
    """The run's student with its preprocessing in front, in eval mode on the CPU."""
    return DeployedStudent(run.model, run.view, data_channels(run), int(run.result.size)).eval()


def model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) → what a deployed model takes: float32 (N, C, H, W) in [0, 1]."""
    x = images[..., None] if images.ndim == 3 else images
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def label_names(dataset: str) -> list[str]:
    """The class names in output order (MedMNIST's `label` dict, keyed "0", "1", …)."""
    names = dataset_info(dataset)["label"]
    return [names[str(i)] for i in range(len(names))]


def sidecar_path(model_path: str | os.PathLike) -> Path:
    return Path(f"{model_path}.json")


# ---------------------------------------------------------------- running an exported model


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for `path`; without onnxruntime, one line naming the extra."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MedkdError("onnxruntime is not installed; pip install 'medkd[export]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a bad file
        raise MedkdError(f"cannot load {path} as an ONNX model ({first_line(err)})") from err


def batched_logits(call: Any, x: np.ndarray, batch: int | None) -> np.ndarray:
    """Logits of `call` (float32 (B, C, H, W) → (B, K)) over `x` in batches; a fixed-batch model (`batch`
    set) gets its last batch padded with copies of the last image, and the padding's outputs dropped."""
    size = batch or CHECK_BATCH
    out = []
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        n = len(chunk)
        if batch and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(call(chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def onnx_caller(session: Any) -> Any:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_caller(module: nn.Module) -> Any:
    def call(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return call


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportCheck:
    """The self-check: the exported model's scores on the run's test images against the reference.

    Within `TOLERANCE` it passes. Beyond it, both the export and PyTorch's own fp32 evaluation are held
    against the same `best.pt` in float64: a model whose fp32 rounding alone moves scores by more than
    1e-4 (confident logits through many layers, e.g. EfficientNet-Lite at 112 px) passes when PyTorch
    still reproduces the reference and the export is as close to float64 as PyTorch is (within 2x),
    since no fp32 runtime can do better.
    """

    images: int
    max_abs_diff: float
    against: str  # "predictions.npz", or "best.pt in fp32" for a run evaluated under CUDA bf16
    predictions_diff: float  # against predictions.npz, whatever the reference
    float64: tuple[float, float] | None = None  # (export vs float64, PyTorch fp32 vs float64)
    eager_diff: float = 0.0  # PyTorch fp32 now vs the reference: best.pt still gives the run's scores

    @property
    def passed(self) -> bool:
        if self.max_abs_diff <= TOLERANCE:
            return True
        return (
            self.float64 is not None
            and self.eager_diff <= TOLERANCE
            and self.float64[0] <= max(TOLERANCE, 2 * self.float64[1])
        )

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        line = (
            f"check: max |Δ score| = {self.max_abs_diff:.2e} over {self.images} test images against "
            f"{self.against}"
        )
        if self.against != PREDICTIONS:
            line += f" ({self.predictions_diff:.2e} against {PREDICTIONS}, evaluated in bf16)"
        if self.float64 is not None:
            line += (
                f"; above {TOLERANCE:g}, so against best.pt in float64: export {self.float64[0]:.2e}, "
                f"PyTorch fp32 {self.float64[1]:.2e}; PyTorch fp32 against {self.against} "
                f"{self.eager_diff:.2e}"
            )
        return f"{line}: {verdict}"


@dataclass(frozen=True)
class Exported:
    path: Path
    sidecar: Path
    check: ExportCheck


def parse_batch(batch: str | int) -> int | None:
    """`dynamic` → None (any batch size), a positive integer → that fixed batch size."""
    if str(batch).strip().lower() == "dynamic":
        return None
    try:
        value = int(batch)
    except ValueError:
        value = 0
    if value < 1:
        raise MedkdError(f"--batch must be 'dynamic' or a positive integer, got {batch!r}")
    return value


def export_run(
    run_dir: str | os.PathLike,
    fmt: str = "onnx",
    out: str | os.PathLike | None = None,
    batch: str | int = "dynamic",
    data_dir: str | None = None,
    force: bool = False,
) -> Exported:
    """Write the run's student (with its preprocessing) as `fmt`, check it, then write its sidecar.

    The model is written to a temporary name and checked there: a model that fails the check is never
    renamed into place, and nothing is left on disk.
    """
    if fmt not in EXPORT_FORMATS:
        raise MedkdError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    fixed = parse_batch(batch)
    run = load_trained_run(run_dir)
    path = Path(out) if out is not None else run.path / EXPORT_NAMES[fmt]
    _check_target(path, force)
    images, labels = run.split("test", data_dir)
    predictions = read_predictions(run.path)
    if predictions["y_score"].shape[0] != len(images) or not np.array_equal(predictions["y_true"], labels):
        raise MedkdError(
            f"{run.path / PREDICTIONS} does not describe this run's test split ({len(images)} images); "
            f"rerun the run with `medkd distill --force`"
        )
    module = deployed_student(run)
    x = model_input(images)
    with atomic_path(path) as tmp:
        _write(module, fmt, torch.from_numpy(x[: fixed or 2]), tmp, dynamic=fixed is None)
        check = _self_check(run, module, _loaded(fmt, tmp), x, fixed, predictions["y_score"])
        if not check.passed:
            raise MedkdError(
                f"the exported {fmt} model does not reproduce {run.path}'s predictions: {check.line()}; "
                f"nothing was written"
            )
    sidecar = sidecar_path(path)
    write_json(sidecar, _sidecar(run, fmt, path, fixed, check))
    return Exported(path, sidecar, check)


def _check_target(path: Path, force: bool) -> None:
    if path.is_dir():
        raise MedkdError(f"--out {path} is a folder; give a file name, e.g. {path / 'student.onnx'}")
    if not path.parent.is_dir():
        raise MedkdError(f"--out {path}: folder {path.parent} does not exist")
    if not path.exists():
        return
    if not force:
        raise MedkdError(
            f"{path} already exists; pass --force to replace an export of medkd, or --out elsewhere"
        )
    if not _is_export(sidecar_path(path)):
        raise MedkdError(
            f"{path} exists and has no medkd sidecar {sidecar_path(path).name}, so medkd did not write it: "
            f"--force replaces only medkd's own exports; choose another --out"
        )


def _is_export(sidecar: Path) -> bool:
    try:
        return "medkd_export" in json.loads(sidecar.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _write(module: DeployedStudent, fmt: str, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    # Both exporters print progress and warn about their own internals (TorchScript is deprecated in
    # torch 2.x but still the format many C++ deployments load); a user sees only medkd's check line.
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        try:
            if fmt == "onnx":
                shapes = {"images": {0: torch.export.Dim("batch")}} if dynamic else None
                torch.onnx.export(
                    module, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                    input_names=["images"], output_names=["logits"], dynamic_shapes=shapes,
                )  # fmt: skip
            else:
                traced = torch.jit.trace(module, example, check_trace=False)
                torch.jit.save(traced, str(path))
        except ImportError as err:
            raise MedkdError(
                f"ONNX export needs onnx and onnxscript ({err.name} missing); pip install 'medkd[export]'"
            ) from err


def _loaded(fmt: str, path: Path) -> Any:
    if fmt == "onnx":
        return onnx_caller(onnx_session(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch_caller(torch.jit.load(str(path), map_location="cpu").eval())


def _self_check(
    run: TrainedRun, module: nn.Module, call: Any, x: np.ndarray, batch: int | None, recorded: np.ndarray
) -> ExportCheck:
    task = run.result.task

    def scores(call: Any, x: np.ndarray, batch: int | None = None) -> np.ndarray:
        return scores_from_logits(task, torch.from_numpy(batched_logits(call, x, batch)).float()).numpy()

    exported = scores(call, x, batch)
    predictions_diff = float(np.abs(exported - recorded).max()) if len(x) else 0.0
    against, reference = PREDICTIONS, recorded
    if str(run.result.device).startswith("cuda"):
        # A CUDA run evaluated under bf16 autocast: its predictions are 1e-2-close, not 1e-4; the
        # reference is the same best.pt in fp32.
        against, reference = "best.pt in fp32", scores(torch_caller(module), x)
    diff = float(np.abs(exported - reference).max()) if len(x) else 0.0
    if diff <= TOLERANCE:
        return ExportCheck(len(x), diff, against, predictions_diff)
    exact = copy.deepcopy(module).double()
    truth = scores(lambda b: torch_caller(exact)(b.astype(np.float64)), x)
    eager = reference if against != PREDICTIONS else scores(torch_caller(module), x)
    float64 = (float(np.abs(exported - truth).max()), float(np.abs(eager - truth).max()))
    return ExportCheck(
        len(x), diff, against, predictions_diff, float64, float(np.abs(eager - reference).max())
    )


def _sidecar(run: TrainedRun, fmt: str, path: Path, batch: int | None, check: ExportCheck) -> dict[str, Any]:
    r = run.result
    channels = data_channels(run)
    return {
        "medkd_export": EXPORT_FORMAT_VERSION,
        "model": path.name,
        "format": fmt,
        "sha256": file_sha256(path),
        "dataset": r.dataset,
        "task": r.task,
        "classes": label_names(r.dataset),
        "multilabel": is_multilabel(r.task),
        "scores": "sigmoid per label" if is_multilabel(r.task) else "softmax",
        "input": {
            "name": "images",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "shape": ["batch" if batch is None else batch, channels, int(r.size), int(r.size)],
            "channels": "gray" if channels == 1 else "RGB",
        },
        "output": {"name": "logits", "shape": ["batch" if batch is None else batch, int(r.n_outputs)]},
        "preprocessing_inside": {
            "resize_to": run.view.size,
            "interpolation": run.view.interpolation,
            "antialias": run.view.interpolation in ("bilinear", "bicubic"),
            "mean": list(run.view.mean),
            "std": list(run.view.std),
        },
        "run": {
            "run_dir": str(run.path),
            "student": r.student,
            "config_hash": r.config_hash,
            "best_sha256": run.checkpoint_sha256,
            "best_epoch": r.best_epoch,
            "test_auc": r.test["auc"],
            "test_acc": r.test["acc"],
        },
        "check": {
            "images": check.images,
            "max_abs_diff": check.max_abs_diff,
            "against": check.against,
            "tolerance": TOLERANCE,
            "float64": None
            if check.float64 is None
            else {"export": check.float64[0], "pytorch_fp32": check.float64[1]},
        },
        "versions": versions(),
    }
