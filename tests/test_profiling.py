"""`medkd.profiling`: MACs against hand counts, torch's own counter and published values; the rows of a run
folder, its ONNX export and a teacher; threads, the JSON record, the table and the refusals."""

import io
import json
import platform
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from medkd.backbones import TINY_ARGS, build_teacher
from medkd.config import DistillConfig
from medkd.deploy import EXPORT_NAMES, export_run
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.profiling import (
    count_macs,
    machine,
    profile_module,
    profile_onnx,
    profile_table,
    profile_target,
    write_profile,
)
from medkd.students import build_student, count_parameters
from medkd.trained import load_trained_run

# Speed is not what these tests check: two timed calls at a batch of two keep each profile at milliseconds,
# and one thread keeps them there on a busy machine (two spinning OpenMP threads on two shared cores can
# make a call 100 times slower).
FAST = dict(batch_size=2, repeats=2, threads=1)
STUDENT_SIZE = 8


def torch_macs(model: nn.Module, shape: tuple[int, ...]) -> float:
    """torch's own count (FLOPs = 2 × MACs; it does not count bias additions)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *shape))
    return counter.get_total_flops() / 2


@pytest.fixture(scope="module")
def run_dir(synthetic_root, tmp_path_factory):
    """A finished resnet18 baseline run at 8 px on the synthetic breastmnist (28 px data), not exported."""
    out = tmp_path_factory.mktemp("profile") / "r18"
    cfg = DistillConfig(
        dataset="breastmnist", alpha=1.0, student="resnet18", student_size=STUDENT_SIZE, epochs=1,
        data_dir=str(synthetic_root), out=str(out), device="cpu", quiet=True,
    )  # fmt: skip
    distill(cfg)
    return out


@pytest.fixture(scope="module")
def exported_dir(run_dir, synthetic_root, tmp_path_factory):
    """A copy of `run_dir` with its ONNX export (dynamic batch) beside it."""
    copy = tmp_path_factory.mktemp("exported") / "r18"
    shutil.copytree(run_dir, copy)
    export_run(copy, "onnx", data_dir=str(synthetic_root))
    return copy


def test_macs_of_a_hand_built_model_are_the_hand_count(capsys):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    conv = 8 * 6 * 6 * (3 * 3 * 3) + 8 * 6 * 6  # a 3×3×3 kernel per output element, then its bias
    linear = 288 * 5 + 5
    row = profile_module(model, (3, 6, 6), "hand", "student", **FAST)
    assert row.macs == conv + linear  # the ReLU is not a MAC
    assert row.parameters == sum(p.numel() for p in model.parameters()) == 8 * 27 + 8 + 288 * 5 + 5
    assert row.input_shape == (3, 6, 6) and row.runtime == "torch" and row.batch_size == 2
    assert capsys.readouterr().out == ""  # ptflops prints; stdout is the CLI's machine-readable channel


def test_student_macs_agree_with_torchs_flop_counter():
    model = build_student("resnet18", 2, 28).eval()  # 3×3 stem, no max-pool below 128 px
    macs = count_macs(model, (3, 28, 28))
    # They differ only by the fc bias: 2 additions in 0.56 G.
    assert macs == pytest.approx(torch_macs(model, (3, 28, 28)), rel=1e-6)
    # By hand from the 224 px count: layers 1-3 at a quarter of the pixels, layer 4 at 4×4 (not 3.5×3.5)
    # since 7 px halves to 4, and a 3×3 stem: 0.4567 G.
    assert macs == pytest.approx(0.4567e9, rel=1e-3)


def test_attention_is_counted_as_its_matrix_products():
    teacher = build_teacher("tiny", img_size=28, pretrained=False)
    features = _Features(teacher)
    fused = count_macs(features, (3, 28, 28))  # the CPU's fused kernel, counted by medkd's hook
    with sdpa_kernel(SDPBackend.MATH):  # decomposed into bmm, counted by ptflops and by torch alike
        math_path = count_macs(features, (3, 28, 28))
        reference = torch_macs(features, (3, 28, 28))
    assert fused == math_path
    tokens, dim, depth = (28 // 14) ** 2 + 1, TINY_ARGS["embed_dim"], TINY_ARGS["depth"]
    biases = depth * tokens * (3 * dim + dim + 4 * dim + dim) + (tokens - 1) * dim  # blocks, patch embed
    assert fused == reference + biases


@pytest.mark.parametrize(
    ("build", "giga"),
    [
        (torchvision.models.resnet18, 1.814),  # torchvision's model cards: 1.81 and 4.09 GFLOPS (MACs)
        (torchvision.models.resnet50, 4.089),
        (lambda: timm.create_model("tf_efficientnet_lite0"), 0.385),  # 5 Conv2dSame layers
        (lambda: timm.create_model("vit_small_patch16_224"), 4.607),  # DeiT-S: 4.6 G
    ],
    ids=["resnet18", "resnet50", "efficientnet_lite0", "vit_s16"],
)
def test_macs_at_224_px_are_the_published_ones(build, giga):
    assert count_macs(build().eval(), (3, 224, 224)) / 1e9 == pytest.approx(giga, abs=0.002)


def test_a_run_folder_profiles_its_student(run_dir):
    (row,) = profile_target(str(run_dir), **FAST)
    model = load_trained_run(run_dir).model
    assert row.kind == "student" and row.name == "resnet18 (run r18)"
    assert row.input_shape == (3, STUDENT_SIZE, STUDENT_SIZE)
    assert row.parameters == count_parameters(model)
    assert row.macs == count_macs(model, row.input_shape)
    assert row.latency_iqr_ms[0] <= row.latency_ms <= row.latency_iqr_ms[1] and row.throughput > 0
    (as_teacher,) = profile_target(f"run:{run_dir}", **FAST)
    assert as_teacher.name == row.name and as_teacher.parameters == row.parameters
    with pytest.raises(MedkdError, match="a teacher size applies to a teacher only; .* is a run folder"):
        profile_target(str(run_dir), teacher_size=64, **FAST)


def test_an_exported_run_adds_its_onnx_row(exported_dir):
    student, exported = profile_target(str(exported_dir), **FAST)
    assert exported.name == f"{EXPORT_NAMES['onnx']} (onnxruntime)"
    assert (exported.kind, exported.runtime, exported.macs) == ("onnx", "onnxruntime", None)
    assert exported.input_shape == (1, 28, 28)  # what a deployed model takes: gray images at the data's size
    assert exported.latency_batch == 1 and exported.batch_size == 2 and exported.threads == 1
    # The exporter folds each BatchNorm into its convolution (γ, β → one bias per channel); the model
    # gains the normalisation's scale and shift (1, 3, 1, 1), the two bounds of the resize's clamp and
    # the 255 of its rounding to 8 bits (View.rounded).
    run = load_trained_run(exported_dir)
    assert run.result.rounded
    batchnorm = sum(m.num_features for m in run.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert exported.parameters == student.parameters - batchnorm + 2 * 3 + 2 + 1
    (alone,) = profile_target(str(exported_dir / EXPORT_NAMES["onnx"]), **FAST)
    assert alone.parameters == exported.parameters and alone.input_shape == exported.input_shape


def test_an_onnx_model_with_a_fixed_batch_is_timed_at_it(run_dir, synthetic_root, tmp_path):
    path = tmp_path / "fixed.onnx"
    export_run(run_dir, "onnx", out=path, batch=3, data_dir=str(synthetic_root))
    row = profile_onnx(path, batch_size=32, repeats=2, threads=1)
    assert (row.batch_size, row.latency_batch, row.threads) == (3, 3, 1)
    assert "(b3)" in _render(profile_table([row]))


def test_teachers_by_name_are_profiled_at_their_size():
    (row,) = profile_target("timm:resnet10t", teacher_size=32, **FAST)
    assert (row.kind, row.name, row.input_shape) == ("teacher", "timm:resnet10t teacher", (3, 32, 32))
    teacher = build_teacher("timm:resnet10t", img_size=32, pretrained=False)
    assert row.parameters == count_parameters(teacher)  # the backbone without its ImageNet classifier
    assert row.macs == count_macs(_Features(teacher), (3, 32, 32))
    (lite,) = profile_target("efficientnet_lite0", teacher_size=64, **FAST)
    assert lite.input_shape == (3, 64, 64)
    assert lite.parameters == 4_652_008 - 1_281_000  # tf_efficientnet_lite0 less its ImageNet fc
    (tiny,) = profile_target("tiny", teacher_size=28, **FAST)
    assert tiny.input_shape == (3, 28, 28) and tiny.macs > 0


def test_threads_are_used_then_restored():
    before = torch.get_num_threads()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout()).train()
    row = profile_module(model, (3, 8, 8), "small", "student", batch_size=2, repeats=2, threads=1)
    assert row.threads == 1 and torch.get_num_threads() == before
    assert model.training  # measured in eval mode, handed back as it came
    assert profile_module(model, (3, 8, 8), "small", "student", batch_size=2, repeats=2).threads == before


def test_write_profile_keeps_the_rows_and_names_the_machine(tmp_path):
    rows = profile_target("tiny", teacher_size=28, **FAST)
    path = write_profile(tmp_path / "profile.json", rows)
    record = json.loads(path.read_text())
    assert record["medkd_profile"] == 1 and record["rows"] == [r.to_json() for r in rows]
    assert record["rows"][0]["input_shape"] == [3, 28, 28]
    assert record["machine"]["cpu"] == machine()["cpu"] and record["machine"]["cores"] >= 1
    if platform.system() == "Linux":
        cpuinfo = Path("/proc/cpuinfo").read_text()
        assert record["machine"]["cpu"] in cpuinfo and record["machine"]["cpu"] != platform.machine()
    with pytest.raises(MedkdError, match="folder .*missing does not exist"):
        write_profile(tmp_path / "missing" / "profile.json", rows)


def test_profile_table_shows_each_row(exported_dir):
    text = _render(profile_table(profile_target(str(exported_dir), **FAST)))
    for header in ("params (M)", "MACs (G)", "latency b1 (ms)", "img/s at b2", "threads"):
        assert header in text
    assert "3×8×8" in text and "1×28×28" in text and "11.17" in text and "—" in text


def test_bad_targets_are_one_line_errors(tmp_path):
    kinds = "not a run folder, an .onnx file or a teacher"
    with pytest.raises(MedkdError, match=kinds):
        profile_target("no_such_teacher")
    other = tmp_path / "weights.pt"
    other.write_bytes(b"")
    with pytest.raises(MedkdError, match=kinds):
        profile_target(str(other))
    with pytest.raises(MedkdError, match="missing.onnx not found; `medkd export RUN` writes"):
        profile_target(str(tmp_path / "missing.onnx"))
    with pytest.raises(MedkdError, match="result.json not found: the run did not finish"):
        profile_target(str(tmp_path))  # a folder, but not a run
    with pytest.raises(MedkdError, match="repeats must be a positive integer, got 0"):
        profile_target("tiny", repeats=0)
    with pytest.raises(MedkdError, match="timm teachers only; biomedclip comes from open_clip"):
        profile_target("biomedclip")


class _Features(nn.Module):
    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.features(x)


def _render(table) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()
