"""Size and speed on this machine (`medkd profile`), MedAlmighty's Table 3: parameters, MACs, CPU latency
at batch 1 and throughput at a batch, for a run's student (and its ONNX export), a teacher or an exported
ONNX model, with the machine named.

MACs are those of one image (batch 1): convolutions, matrix products and attention, plus one per bias
addition (ptflops' convention); normalisation, activations and pooling are not counted. Latency is the
median of timed calls after a warm-up; throughput is the batch over the median time of one batch call.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ptflops import get_model_complexity_info
from rich.markup import escape
from rich.table import Table
from torch import nn

from medkd.backbones import build_teacher
from medkd.deploy import EXPORT_NAMES, onnx_session
from medkd.errors import MedkdError
from medkd.files import write_json
from medkd.registry import RUN_PREFIX, is_run_teacher, teacher_spec
from medkd.runs import RESULT, versions
from medkd.students import count_parameters
from medkd.train import intra_op_threads
from medkd.trained import load_trained_run

PROFILE_FORMAT_VERSION = 1  # the JSON's `medkd_profile`
WARMUP = 3  # untimed calls first: the allocator, oneDNN's kernel choice and onnxruntime's arena settle
KINDS = ("student", "teacher", "onnx")


@dataclass(frozen=True)
class ProfileRow:
    """One model measured on this machine's CPU."""

    name: str  # "resnet18 (run breast_r18_kd)", "efficientnet_lite0 teacher", "student.onnx (onnxruntime)"
    kind: str  # one of KINDS
    runtime: str  # "torch" | "onnxruntime"
    input_shape: tuple[int, ...]  # (C, H, W) of one image as fed
    parameters: int
    macs: int | None  # None: not counted (ONNX models)
    latency_ms: float  # median time of one call at `latency_batch`
    latency_iqr_ms: tuple[float, float]  # its 25th and 75th percentiles
    throughput: float  # images per second at `batch_size`
    batch_size: int
    threads: int
    latency_batch: int = 1  # 1, except for an ONNX model exported with a fixed batch

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "input_shape": list(self.input_shape),
            "latency_iqr_ms": list(self.latency_iqr_ms),
        }


def profile_target(
    target: str,
    teacher_size: int | None = None,
    batch_size: int = 32,
    repeats: int = 50,
    threads: int | None = None,
) -> list[ProfileRow]:
    """Profile a finished run folder (its student, and `student.onnx` when exported), an `.onnx` file, or
    a teacher name (a registry name or `timm:<id>`) at `teacher_size` px (None: the teacher's own).

    Teachers are built with random weights: speed and MACs do not depend on the weights, and every timm
    teacher builds offline that way.
    """
    _check_settings(batch_size, repeats, threads)
    kind, where = resolve_target(target)
    if teacher_size is not None and kind != "teacher":
        what = "an ONNX model" if kind == "onnx" else "a run folder"
        raise MedkdError(f"a teacher size applies to a teacher only; {target} is {what}")
    settings = dict(batch_size=batch_size, repeats=repeats, threads=threads)
    if kind == "onnx":
        return [profile_onnx(where, **settings)]
    if kind == "teacher":
        return [_profile_teacher(where, teacher_size, **settings)]
    return _profile_run(where, **settings)


def resolve_target(target: str) -> tuple[str, str]:
    """`(kind, where)` of a profile target: ("run", folder), ("teacher", name) or ("onnx", path)."""
    # A folder with a result.json is a run even if a teacher has its name; a teacher name wins over a
    # folder that is not a run, and load_trained_run says what a run folder lacks.
    if is_run_teacher(target):  # run:PATH, as `cache-teacher --teacher` takes a run
        return "run", target[len(RUN_PREFIX) :]
    path = Path(target)
    if path.is_dir() and (path / RESULT).is_file():
        return "run", target
    if teacher_spec(target) is not None:
        return "teacher", target
    if path.is_dir():
        return "run", target
    if path.suffix.lower() == ".onnx":
        return "onnx", target
    raise MedkdError(
        f"cannot profile {target!r}: it is not a run folder, an .onnx file or a teacher; give the folder "
        f"of a finished run, a MODEL.onnx written by `medkd export`, or a teacher name "
        f"(e.g. efficientnet_lite0, dinov2_vits14, timm:<id>)"
    )


def _profile_run(path: str, **settings: Any) -> list[ProfileRow]:
    run = load_trained_run(path)
    size = run.view.size
    name = f"{run.result.student} (run {run.path.name})"
    rows = [profile_module(run.model, (3, size, size), name, "student", **settings)]
    exported = run.path / EXPORT_NAMES["onnx"]
    if exported.is_file():  # the deployed form: preprocessing inside, at the data's size
        rows.append(profile_onnx(exported, **settings))
    return rows


class _Features(nn.Module):
    """A teacher's `features` as a forward: normalised images (B, 3, S, S) → pooled features (B, D)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.features(x)


def _profile_teacher(name: str, size: int | None, **settings: Any) -> ProfileRow:
    spec = teacher_spec(name)
    if spec is not None and spec.source not in ("timm", "tiny"):
        raise MedkdError(f"profile builds timm teachers only; {name} comes from {spec.source}")
    teacher = build_teacher(name, img_size=size, pretrained=False)
    shape = (3, teacher.img_size, teacher.img_size)
    return profile_module(_Features(teacher), shape, f"{name} teacher", "teacher", **settings)


def profile_module(
    module: nn.Module,
    input_shape: Sequence[int],
    name: str,
    kind: str,
    batch_size: int = 32,
    repeats: int = 50,
    threads: int | None = None,
) -> ProfileRow:
    """Parameters, MACs and CPU speed of `module` (on the CPU; run in eval mode) on float32 (B, *shape)."""
    _check_settings(batch_size, repeats, threads)
    if kind not in KINDS:
        raise MedkdError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if any(p.device.type != "cpu" for p in module.parameters()):
        raise MedkdError(f"{name} is not on the CPU; profile measures CPU speed, move it there first")
    shape = tuple(int(d) for d in input_shape)
    training = module.training
    module.eval()
    try:
        with intra_op_threads(threads) as used:
            macs = count_macs(module, shape, name)
            with torch.inference_mode():
                one, batch = torch.rand(1, *shape), torch.rand(batch_size, *shape)
                speed = _speed(lambda: module(one), lambda: module(batch), batch_size, repeats)
    finally:
        module.train(training)
    return ProfileRow(name, kind, "torch", shape, count_parameters(module), macs, *speed, batch_size, used)


def profile_onnx(
    path: str | os.PathLike,
    name: str | None = None,
    batch_size: int = 32,
    repeats: int = 50,
    threads: int | None = None,
) -> ProfileRow:
    """Parameters and CPU speed of an ONNX model under onnxruntime, on float32 images in [0, 1].

    A model exported with a fixed batch is timed at that batch, for latency and throughput alike.
    """
    _check_settings(batch_size, repeats, threads)
    path = Path(path)
    if not path.is_file():
        raise MedkdError(f"ONNX model {path} not found; `medkd export RUN` writes RUN/{EXPORT_NAMES['onnx']}")
    # onnxruntime's default is one thread per physical core; torch's count makes a run's two rows
    # comparable, and the recorded count true.
    used = threads or torch.get_num_threads()
    session = onnx_session(path, used)
    fixed, shape = _onnx_input(session, path)
    batch_size = fixed or batch_size
    feed = session.get_inputs()[0].name
    one = np.random.rand(fixed or 1, *shape).astype(np.float32)
    batch = np.random.rand(batch_size, *shape).astype(np.float32)
    latency, spread, throughput = _speed(
        lambda: session.run(None, {feed: one}), lambda: session.run(None, {feed: batch}), batch_size, repeats
    )
    return ProfileRow(
        name or f"{path.name} (onnxruntime)", "onnx", "onnxruntime", shape, onnx_parameters(path), None,
        latency, spread, throughput, batch_size, used, latency_batch=fixed or 1,
    )  # fmt: skip


def _onnx_input(session: Any, path: Path) -> tuple[int | None, tuple[int, ...]]:
    """(the fixed batch or None, (C, H, W)) of the model's one image input."""
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else []
    if len(inputs) != 1 or len(shape) != 4 or inputs[0].type != "tensor(float)":
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise MedkdError(f"{path} must take one float32 (B, C, H, W) input to be profiled; it takes {found}")
    if not all(isinstance(d, int) for d in shape[1:]):
        raise MedkdError(f"{path} has a symbolic image size {shape}; profile needs a fixed C, H and W")
    return (shape[0] if isinstance(shape[0], int) else None), tuple(shape[1:])


def onnx_parameters(path: str | os.PathLike) -> int:
    """Elements of an ONNX model's floating-point initializers: its weights, after the exporter's folding.

    Integer initializers (shapes for Reshape, Resize sizes) are not weights, so they are left out.
    """
    try:
        import onnx
    except ImportError:
        raise MedkdError("onnx is not installed; pip install 'medkd[export]'") from None
    tensor = onnx.TensorProto
    floats = {tensor.FLOAT, tensor.FLOAT16, tensor.BFLOAT16, tensor.DOUBLE}
    graph = onnx.load(str(path), load_external_data=False).graph  # dims suffice: no weights read
    return sum(math.prod(t.dims) for t in graph.initializer if t.data_type in floats)


# ---------------------------------------------------------------- measuring


def count_macs(module: nn.Module, input_shape: Sequence[int], name: str = "the model") -> int | None:
    """Multiply-accumulates of one forward pass of one image (batch 1); None if ptflops cannot count them.

    ptflops' "aten" backend counts at the dispatcher, so every convolution and matrix product is seen
    whatever module issues it; its default "pytorch" backend hooks modules by exact type, so it misses
    timm's Conv2dSame (EfficientNet-Lite0 0.374 instead of 0.385 G) and counts BatchNorm and ReLU as
    MACs (ResNet50 4.13 instead of torchvision's 4.09 G). Neither backend, nor torch's FlopCounterMode,
    counts the fused attention kernel a ViT runs on the CPU (ViT-S/16: aten 4.25 G, pytorch 3.22 G
    instead of 4.61 G), hence the hook for it below.
    """
    shape = tuple(int(d) for d in input_shape)
    hooks = {op: _attention_macs for op in _ATTENTION_OPS}
    # Inference mode hides the decomposition into convolution/addmm that the aten backend counts.
    with torch.inference_mode(False), torch.no_grad(), _captured() as sink:
        macs, _ = get_model_complexity_info(
            _Call(module), shape, as_strings=False, print_per_layer_stat=False, ost=sink,
            input_constructor=lambda s: torch.rand(1, *s), backend="aten", custom_modules_hooks=hooks,
        )  # fmt: skip
    if macs is None:
        warnings.warn(f"ptflops could not count the MACs of {name}; they are left out", stacklevel=2)
        return None
    return int(macs)


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    # ptflops prints (a failure's traceback too), and the CLI's stdout carries machine-readable output.
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield sink


class _Call(nn.Module):
    """`module` behind a forward, held as a plain attribute: ptflops' aten backend hooks the children of
    the module it is given and never removes those hooks, so the profiled model is not one of them."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["inner"] = module  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


# torch's fused scaled-dot-product attention on the CPU (the math fallback decomposes into bmm, which
# ptflops counts); the CUDA kernels' names, should a model call them.
_ATTENTION_OPS = [
    getattr(torch.ops.aten, op)
    for op in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
    )
    if hasattr(torch.ops.aten, op)
]


def _attention_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    q, k, v = inputs[:3]  # (B, H, L, E), (B, H, S, E), (B, H, S, Ev)
    heads = math.prod(q.shape[:-2])
    return heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])  # Q·Kᵀ, then softmax·V


def _speed(
    single: Callable[[], Any], batched: Callable[[], Any], batch_size: int, repeats: int
) -> tuple[float, tuple[float, float], float]:
    """(median latency ms, its (25th, 75th) percentiles, img/s at `batch_size`)."""
    q25, median, q75 = np.percentile(_timings(single, repeats), [25, 50, 75]) * 1e3
    per_batch = float(np.median(_timings(batched, max(5, repeats // 5))))
    return float(median), (float(q25), float(q75)), batch_size / per_batch


def _timings(call: Callable[[], Any], repeats: int) -> np.ndarray:
    for _ in range(WARMUP):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    return times


def _check_settings(batch_size: int, repeats: int, threads: int | None) -> None:
    for what, value in (("batch size", batch_size), ("repeats", repeats), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise MedkdError(f"{what} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------- the machine and the outputs


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, logical cores, torch threads, platform, versions."""
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": {**versions(), "onnxruntime": _version("onnxruntime"), "ptflops": _version("ptflops")},
    }


def _cpu_name() -> str:
    # Linux names the CPU in /proc/cpuinfo; platform.processor() there is only "x86_64" or empty.
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def profile_record(rows: list[ProfileRow]) -> dict[str, Any]:
    """The JSON form of a profile: its rows and the machine they were measured on."""
    rows_json = [r.to_json() for r in rows]
    return {"medkd_profile": PROFILE_FORMAT_VERSION, "machine": machine(), "rows": rows_json}


def write_profile(path: str | os.PathLike, rows: list[ProfileRow]) -> Path:
    """Write `profile_record(rows)` to `path` (atomically); returns the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MedkdError(f"cannot write {path}: folder {path.parent} does not exist")
    write_json(path, profile_record(rows))
    return path


def profile_table(rows: list[ProfileRow]) -> Table:
    """The rows as a rich table: model, input, params (M), MACs (G), latency at batch 1, img/s, threads."""
    batches = {r.batch_size for r in rows}
    shared = len(batches) == 1
    table = Table()
    table.add_column("model")
    table.add_column("input")
    for column in ("params (M)", "MACs (G)", "latency b1 (ms)"):
        table.add_column(column, justify="right")
    table.add_column(f"img/s at b{batches.pop()}" if shared else "img/s", justify="right")
    table.add_column("threads", justify="right")
    for r in rows:
        latency = f"{r.latency_ms:.2f}" + (f" (b{r.latency_batch})" if r.latency_batch != 1 else "")
        table.add_row(
            escape(r.name),
            "×".join(str(d) for d in r.input_shape),
            f"{r.parameters / 1e6:.2f}",
            "—" if r.macs is None else f"{r.macs / 1e9:.3g}",
            latency,
            f"{r.throughput:.0f}" + ("" if shared else f" (b{r.batch_size})"),
            str(r.threads),
        )
    return table
