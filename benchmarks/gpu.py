"""GPU throughput of medkd's hot paths, each against a published anchor or a stated goal.

  resnet50  ResNet50 training img/s at 224 px, batch 256, bf16 autocast, channels_last, Adam (fwd +
            bwd + step), eager and torch.compile. Anchor: NVIDIA's H100 reference, 2.6-2.8k img/s.
  resnet18  medkd's small-stem ResNet18 at 28 px, batch 512, the same recipe, eager and compiled, and
            its MACs per image (fvcore if installed, else torch's FLOP counter). Anchor: airbench-class
            small-image training, ~150k img/s on an A100 for a ResNet-18-FLOP-equivalent.
  vitb14    stage one's forward: a random-init ViT-B/14 (DINOv2's architecture) as a BackboneTeacher,
            uint8 28 px batches resized to 224 px on the device, bf16, inference_mode, batch 256.
  kd        a KD-from-cache step (logits gathered by index from an (N, C) tensor on the device) over a
            CE step, ResNet18 at 28 px, batch 512, interleaved rounds.
  data      DeviceSplit.batches at 224 px img/s on the device (N = 20,000 uint8 28 px images).

Synthetic data only, made on the device; nothing is downloaded. Timings are bracketed by
torch.cuda.synchronize, warm-up steps excluded (a compiled variant's first step, its compile, is reported
on its own), variants interleaved round by round and summarised by medians. The default run takes a few
minutes on one H100/H200 (mostly the two compiles); `--quick` is a tiny smoke run that also works on the
CPU. Writes DIR/gpu.json and DIR/gpu.md and ends with one RATIO line per goal.

    bash benchmarks/gpu.sh [--quick] [--device cuda|cpu] [--out DIR] [--only resnet50,kd] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    add_threads_arg,
    cpu_model,
    interleave,
    machine_line,
    median,
    print_table,
    ratio_line,
    set_threads,
    spread,
)

from medkd.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneTeacher
from medkd.data import DeviceSplit, View, prepare_images
from medkd.losses import kd_loss
from medkd.registry import TEACHERS
from medkd.students import build_student

GROUPS = ("resnet50", "resnet18", "vitb14", "kd", "data")
NO_CUDA = "no CUDA GPU visible; pass --device cpu to try the script on the CPU"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
BUDGET_S = 480  # the whole default run on one H100/H200
ALPHA, TEMPERATURE = 0.2, 2.0
CLASSES = 10
# bf16 dense tensor-core peak of an H100/H200 SXM: the ViT goal is a fraction of it.
H100_BF16_PEAK = 989e12


@dataclass
class Setting:
    """Sizes of one run: the defaults fit the time budget on an H100; `--quick` shrinks everything."""

    warmup: int = 10  # untimed steps per variant before the timed rounds
    rounds: int = 6
    steps: int = 5  # per round: 6 x 5 = 30 timed steps per variant
    kd_rounds: int = 20  # more, shorter rounds: a ratio near 1 needs the median of many
    r50_batch: int = 256
    r50_size: int = 224
    r18_batch: int = 512
    vit_batch: int = 256
    vit_size: int = 224
    data_n: int = 20_000
    data_batch: int = 256
    data_size: int = 224
    data_rounds: int = 5  # epochs

    @classmethod
    def quick(cls) -> Setting:
        return cls(
            warmup=1, rounds=2, steps=1, kd_rounds=2, r50_batch=8, r50_size=32, r18_batch=8,
            vit_batch=8, vit_size=32, data_n=64, data_batch=8, data_size=32, data_rounds=2,
        )  # fmt: skip


@dataclass
class Result:
    """One measurement, its setting, and what it is judged against (`goal_value` None: reported only)."""

    name: str
    benchmark: str
    setting: str
    value: float | None
    unit: str
    anchor: str
    goal: str
    goal_value: float | None = None
    higher_is_better: bool = True
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.skipped is not None or self.value is None:
            return "SKIP"
        if self.goal_value is None:
            return "info"
        ok = self.value >= self.goal_value if self.higher_is_better else self.value <= self.goal_value
        return "PASS" if ok else "MISS"

    def measured(self) -> str:
        if self.value is None:
            return f"skipped: {self.skipped}"
        text = f"{self.value:,.0f} {self.unit}" if self.value >= 100 else f"{self.value:.4g} {self.unit}"
        extra = [f"{self.details['ms_per_step']:.2f} ms/step"] if "ms_per_step" in self.details else []
        if "compile_s" in self.details:
            extra.append(f"compile {self.details['compile_s']:.0f} s")
        return f"{text} ({'; '.join(extra)})" if extra else text

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


@dataclass
class Timing:
    """Median throughput of one variant over its timed rounds."""

    img_s: float
    ms_per_step: float
    range_ms: str
    round_s: list[float]
    first_step_s: float  # the first warm-up step: a compiled variant's compile
    warmup_s: float

    def details(self, compiled: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if compiled:
            out["compile_s"] = self.first_step_s  # compiling forward and backward, plus one step
        return out


# ---------------------------------------------------------------- timing


class Bench:
    """The device, the sizes, and the timing helpers every benchmark shares."""

    def __init__(self, device: torch.device, setting: Setting, compile: bool):
        self.device = device
        self.s = setting
        self.compile = compile

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def seed(self, seed: int = 0) -> None:
        torch.manual_seed(seed)  # every device's generator

    def timed(self, step: Callable[[], None], steps: int) -> Callable[[], float]:
        def run() -> float:
            self.sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            self.sync()
            return time.perf_counter() - start

        return run

    def warm_up(self, step: Callable[[], None], steps: int) -> tuple[float, float]:
        """Seconds of the first step and of all `steps` warm-up steps."""
        self.sync()
        start = time.perf_counter()
        step()
        self.sync()
        first = time.perf_counter() - start
        for _ in range(steps - 1):
            step()
        self.sync()
        return first, time.perf_counter() - start

    def throughput(
        self,
        variants: dict[str, Callable[[], None]],
        batch: int,
        rounds: int | None = None,
        errors: dict[str, str] | None = None,
    ) -> dict[str, Timing]:
        """Warm each variant up, then time them interleaved; a variant whose warm-up raises (a compile
        that fails) is dropped with its one-line error in `errors`, so the others still get measured."""
        warm: dict[str, tuple[float, float]] = {}
        for name, step in list(variants.items()):
            try:
                warm[name] = self.warm_up(step, max(self.s.warmup, 1))
            except Exception as exc:  # reported, not fatal
                if errors is None:
                    raise
                lines = str(exc).strip().splitlines()
                errors[name] = f"{type(exc).__name__}: {lines[0] if lines else ''}"
                del variants[name]
        steps = self.s.steps
        times = interleave(
            {n: self.timed(step, steps) for n, step in variants.items()},
            rounds=rounds or self.s.rounds,
            warmup=0,
        )
        out = {}
        for name, t in times.items():
            per_step = median(t) / steps
            out[name] = Timing(
                batch / per_step,
                per_step * 1e3,
                spread([x / steps * 1e3 for x in t]),
                t,
                warm[name][0],
                warm[name][1],
            )
        return out


def adam(bench: Bench, model: torch.nn.Module) -> torch.optim.Adam:
    # Fused on CUDA: one kernel for every parameter instead of a few per tensor; the CPU keeps the default.
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True if bench.device.type == "cuda" else None)


def train_step(bench: Bench, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step (forward in bf16, CE on float logits, backward, Adam) on a fixed batch."""
    optimizer = adam(bench, model)

    def step() -> None:
        with bench.amp():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def uint8_images(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Synthetic RGB images (N, S, S, 3), uint8, on `device`."""
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, device=device)


@contextmanager
def released(bench: Bench) -> Iterator[None]:
    """Free what a benchmark held before the next one: its models, their compiled graphs, cached blocks."""
    try:
        yield
    finally:
        if bench.compile:
            torch._dynamo.reset()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- the benchmarks


def resnet_training(
    bench: Bench,
    arch: str,
    n_out: int,
    build_size: int,
    size: int,
    batch: int,
    label: str,
    anchor: str,
    goals: dict[str, float],
) -> list[Result]:
    """Training img/s of `arch` (built for `build_size`, fed `size` px), eager and compiled."""
    bench.seed()
    base = build_student(arch, n_out, build_size).to(bench.device, memory_format=torch.channels_last).train()
    view = View(size, IMAGENET_MEAN, IMAGENET_STD, channels_last=True)
    x = prepare_images(uint8_images(batch, size, bench.device), view)  # (B, 3, S, S) float, channels_last
    y = torch.randint(0, n_out, (batch,), device=bench.device)
    variants = {"eager": train_step(bench, base, x, y)}
    if bench.compile:
        compiled = torch.compile(copy.deepcopy(base))
        variants["compiled"] = train_step(bench, compiled, x, y)
    errors: dict[str, str] = {}
    timings = bench.throughput(variants, batch, errors=errors)
    setting = f"{size} px, batch {batch}, bf16, channels_last, Adam"
    results = []
    for mode, goal in goals.items():
        name = f"{label}_train_{mode}"
        common = dict(
            name=name,
            benchmark=f"{arch} training ({mode})",
            setting=setting,
            unit="img/s",
            anchor=anchor,
            goal=f">= {goal:,.0f} img/s",
            goal_value=goal,
        )
        if mode in timings:
            timing = timings[mode]
            result = Result(value=timing.img_s, details=timing.details(mode == "compiled"), **common)
        else:
            why = errors.get(mode, "torch.compile off (--no-compile, or --quick without --compile)")
            result = Result(value=None, skipped=why, **common)
        results.append(announce(result))
    return results


def resnet50(bench: Bench) -> list[Result]:
    s = bench.s
    anchor = "NVIDIA H100 reference (ResNet50 training, mixed precision): 2.6-2.8k img/s"
    return resnet_training(
        bench, "resnet50", 1000, 224, s.r50_size, s.r50_batch, "resnet50", anchor,
        {"eager": 3000.0, "compiled": 4000.0},
    )  # fmt: skip


def resnet18(bench: Bench) -> list[Result]:
    s = bench.s
    anchor = "airbench-class small-image training: ~150k img/s on an A100 (ResNet-18-FLOP-equivalent)"
    results = resnet_training(
        bench, "resnet18", CLASSES, 28, 28, s.r18_batch, "resnet18", anchor,
        {"eager": 75_000.0, "compiled": 75_000.0},
    )  # fmt: skip
    results.append(announce(resnet18_macs()))
    return results


def resnet18_macs() -> Result:
    """MACs per 28 px image of the small-stem ResNet18 (fvcore if installed, else torch's FLOP counter)."""
    common = dict(
        name="resnet18_macs",
        benchmark="resnet18 MACs per image",
        setting="28 px, small stem (3x3 conv, no max-pool)",
        unit="GMAC/img",
        anchor="ResNet-18 with a 3x3 stem on 32 px CIFAR images: ~0.56 GMAC/img",
        goal="reported",
    )
    torch.manual_seed(0)
    model = build_student("resnet18", CLASSES, 28).eval()
    x = torch.zeros(1, 3, 28, 28)
    try:
        macs, counter = fvcore_macs(model, x), "fvcore"
    except ImportError:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(x)
        macs, counter = flops.get_total_flops() / 2, "torch.utils.flop_counter"  # 2 FLOPs per MAC
    except Exception as exc:  # optional: never stops the run
        return Result(value=None, skipped=f"MAC count failed: {type(exc).__name__}", **common)
    return Result(value=macs / 1e9, details={"macs": macs, "counter": counter}, **common)


def fvcore_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    from fvcore.nn import FlopCountAnalysis  # counts one "flop" per multiply-add

    analysis = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return float(analysis.total())


def vitb14(bench: Bench) -> list[Result]:
    """Stage one's forward: uint8 28 px → resized on the device → ViT-B/14 features, bf16, inference."""
    import timm

    s = bench.s
    bench.seed()
    spec = TEACHERS["dinov2_vitb14"]
    backbone = timm.create_model(spec.model_id, pretrained=False, img_size=s.vit_size)
    teacher = BackboneTeacher(
        "vit_b14", backbone, spec.model_id, "cls", s.vit_size, IMAGENET_MEAN, IMAGENET_STD, "", True
    ).to(bench.device)
    raw = uint8_images(s.vit_batch, 28, bench.device)

    @torch.inference_mode()
    def step() -> None:
        x = prepare_images(raw, teacher.view)
        with bench.amp():
            teacher.features(x)

    flops = vit_flops(bench, teacher)
    timing = bench.throughput({"forward": step}, s.vit_batch)["forward"]
    details = timing.details()
    if flops:
        details.update(gflop_per_img=flops / 1e9, mfu_vs_h100_bf16_peak=timing.img_s * flops / H100_BF16_PEAK)
    result = Result(
        name="vitb14_forward",
        benchmark="ViT-B/14 stage-one forward",
        setting=f"{spec.model_id} random init, 28 px uint8 -> {s.vit_size} px, batch {s.vit_batch}, bf16",
        value=timing.img_s,
        unit="img/s",
        anchor="~46 GFLOP/img at 224 px: an H100/H200 SXM's 989 TFLOP/s bf16 dense peak is ~21k img/s, "
        "the goal ~25% of it",
        goal=">= 5,000 img/s",
        goal_value=5000.0,
        details=details,
    )
    return [announce(result)]


def vit_flops(bench: Bench, teacher: BackboneTeacher) -> float | None:
    """FLOPs of one image's forward (torch's FLOP counter), to state the timing as a share of peak."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, teacher.img_size, teacher.img_size, device=bench.device)
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode(), bench.amp():
            teacher.features(x)
    except Exception:  # a detail of the report, never a reason to stop
        return None
    return float(counter.get_total_flops())


def synthetic_split(bench: Bench, n: int) -> DeviceSplit:
    """N random RGB 28 px images and labels of CLASSES classes, held on the device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (n, 1), generator=generator)
    return DeviceSplit(images.numpy(), labels.numpy(), "multi-class", bench.device)


def kd_over_ce(bench: Bench) -> list[Result]:
    """Time per step of KD from the cache over CE, same student, batches and device, interleaved."""
    s = bench.s
    batch = s.r18_batch
    bench.seed()
    split = synthetic_split(bench, max(s.data_n, batch))
    cached = torch.randn(len(split), CLASSES, device=bench.device)  # the cache's logits, (N, C)
    base = build_student("resnet18", CLASSES, 28).to(bench.device, memory_format=torch.channels_last)
    view = View(28, channels_last=True)
    order = torch.randperm(len(split), device=bench.device)
    batches = [order[i : i + batch] for i in range(0, len(split) - batch + 1, batch)]

    def variant(kd: bool) -> Callable[[], None]:
        model = copy.deepcopy(base).train()  # the same initial student for both
        optimizer = adam(bench, model)
        cursor = itertools.count()

        def step() -> None:
            idx = batches[next(cursor) % len(batches)]
            x = prepare_images(split.images[idx], view)
            y = split.targets[idx]
            with bench.amp():
                logits = model(x)
            if kd:
                loss = kd_loss(logits.float(), cached[idx], y, ALPHA, TEMPERATURE).loss
            else:
                loss = kd_loss(logits.float(), None, y, 1.0, TEMPERATURE).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    timings = bench.throughput({"ce": variant(False), "kd": variant(True)}, batch, rounds=s.kd_rounds)
    ce, kd = timings["ce"], timings["kd"]
    result = Result(
        name="kd_over_ce",
        benchmark="KD-from-cache step / CE step",
        setting=f"resnet18 at 28 px, batch {batch}, bf16, channels_last, {s.kd_rounds} interleaved rounds",
        value=kd.ms_per_step / ce.ms_per_step,
        unit="x",
        anchor="bench_step.py on the CPU: kd_cache / ce ~1, its extra work ~0.005% of a step",
        goal="<= 1.03",
        goal_value=1.03,
        higher_is_better=False,
        details={"ce": ce.details(), "kd": kd.details()},
    )
    return [announce(result)]


def data_batches(bench: Bench) -> list[Result]:
    """img/s of DeviceSplit.batches at ResNet50's size as distill makes them: the split resized once
    (`DeviceSplit.at_size`, its one-off seconds in the details), then uint8 gather → normalised float."""
    s = bench.s
    view = View(s.data_size, channels_last=True, rounded=True)
    start = time.perf_counter()
    split = synthetic_split(bench, s.data_n).at_size(view, budget=2**40)
    bench.sync()
    resize_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        for _ in split.batches(s.data_batch, view, shuffle=True, generator=generator):
            pass

    first, _ = bench.warm_up(epoch, 1)
    times = interleave({"epoch": bench.timed(epoch, 1)}, rounds=s.data_rounds, warmup=0)["epoch"]
    value = len(split) / median(times)
    result = Result(
        name="data_batches",
        benchmark="DeviceSplit.batches",
        setting=f"N = {len(split):,} uint8 28 px RGB resized once to {s.data_size} px, batch {s.data_batch}, "
        "shuffled",
        value=value,
        unit="img/s",
        anchor="10x the ResNet50 compiled goal (4,000 img/s): batches then take <= 10% of a 224 px step",
        goal=">= 40,000 img/s",
        goal_value=40_000.0,
        details={
            "epoch_s": times,
            "range_img_s": spread([len(split) / t for t in times]),
            "first_s": first,
            "resize_once_s": resize_s,
        },  # fmt: skip
    )
    return [announce(result)]


BENCHMARKS: dict[str, Callable[[Bench], list[Result]]] = {
    "resnet50": resnet50,
    "resnet18": resnet18,
    "vitb14": vitb14,
    "kd": kd_over_ce,
    "data": data_batches,
}


# ---------------------------------------------------------------- report


def announce(result: Result) -> Result:
    """Print a result the moment it is measured (a long run shows its progress)."""
    goal = f" (goal {result.goal})" if result.goal_value is not None else ""
    print(f"{result.name}: {result.measured()}{goal}  {result.verdict}", flush=True)
    return result


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "gpu": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def write_json(
    path: Path, args: argparse.Namespace, info: dict[str, Any], results: list[Result], wall: float
) -> None:
    doc = {
        "script": "benchmarks/gpu.py",
        "argv": sys.argv[1:],
        "quick": args.quick,
        "compile": args.compile,
        "device": info["device"],
        "machine": info,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall,
        "results": [r.as_json() for r in results],
    }
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_markdown(path: Path, info: dict[str, Any], results: list[Result], wall: float) -> None:
    where = info["gpu"] or f"CPU ({info['cpu']})"
    lines = [
        f"GPU benchmarks on {where}, torch {info['torch']}, CUDA {info['cuda']}; wall time {wall:.0f} s.",
        "",
        "| benchmark | setting | measured | anchor / goal | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        against = r.anchor if r.goal_value is None else f"{r.anchor}; goal {r.goal}"
        cells = [f"{r.benchmark} (`{r.name}`)", r.setting, r.measured(), against, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: batch 8, 2 timed steps, 32 px, no compile"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu.json and gpu.md")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile variants too (default: on, off with --quick)",
    )
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in GROUPS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    args.only = only or list(GROUPS)
    if args.compile is None:
        args.compile = not args.quick
    return args


def cuda_visible() -> bool:
    with warnings.catch_warnings():  # a driver warning here would add a second line to the one error
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not cuda_visible():
        sys.exit(NO_CUDA)
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick each convolution's fastest kernel once
    start = time.perf_counter()
    setting = Setting.quick() if args.quick else Setting()
    bench = Bench(device, setting, args.compile)
    info = machine(device)
    print(f"# GPU: {info['gpu'] or 'none (CPU run)'}, torch {info['torch']}, CUDA {info['cuda']}")
    print(machine_line(), flush=True)

    results: list[Result] = []
    for name in args.only:
        with released(bench):
            results += BENCHMARKS[name](bench)
    wall = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gpu.json", args, info, results, wall)
    write_markdown(args.out / "gpu.md", info, results, wall)
    print_table(
        f"gpu: {info['gpu'] or 'CPU'}{', quick' if args.quick else ''}; median of interleaved rounds",
        ["benchmark", "setting", "measured", "goal", "verdict"],
        [
            [r.name, r.setting, r.measured() if r.value is not None else "-", r.goal, r.verdict]
            for r in results
        ],
    )
    over = "" if args.quick or wall <= BUDGET_S else f" -- over the {BUDGET_S} s budget"
    print(f"\ntotal wall time {wall:.1f} s{over}; wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    for r in results:
        if r.verdict == "SKIP":
            print(f"skipped {r.name}: {r.skipped}")
    for r in results:
        if r.goal_value is not None and r.value is not None and math.isfinite(r.value):
            ratio_line(f"{r.name} ({r.unit})", r.value, r.goal, r.verdict == "PASS")


if __name__ == "__main__":
    main()
