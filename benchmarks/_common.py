"""Shared helpers of the benchmark scripts: interleaved timing, the machine line, plain-text tables.

The machine these run on is usually shared, so every comparison is measured side by side in one
process, the variants interleaved (A, B, A, B, ...), and summarised by medians: a burst of load from
another process then hits every variant alike instead of deciding the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medkd.data import DeviceSplit, View, dataset_info, load_arrays, num_outputs
from medkd.students import build_student

DATA_DIR = "/work/shared/data/medmnist"


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a busy 2-core machine a second thread waits for a "
        "core at every op, making steps 3-10x slower and far noisier; 0 keeps torch's default)",
    )


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def data_dir() -> str:
    """Folder of the genuine MedMNIST .npz files: `$MEDKD_DATA`, else the shared data folder."""
    return os.environ.get("MEDKD_DATA", DATA_DIR)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming what the numbers were measured on, and how busy it was."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"# {cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load}"
    )


def interleave(
    variants: dict[str, Callable[[], float | None]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call each variant once per round, in turn (A, B, C, A, B, C, ...), after `warmup` untimed rounds.

    A variant returns the seconds it measured itself, or None to be timed here as a whole; the result
    holds every round's seconds per variant.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            measured = fn()
            seconds = measured if measured is not None else time.perf_counter() - start
            if r >= warmup:
                times[name].append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min–max of the rounds, so a reader sees how noisy the machine was."""
    return f"{min(values):.4g}–{max(values):.4g}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table on stdout (copyable into Markdown by hand, greppable as text)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    print(machine_line())
    for i, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ratio_line(name: str, value: float, goal: str, ok: bool | None) -> None:
    """The last line of every script: the ratio that answers "does the cache pay?"."""
    verdict = "" if ok is None else ("  PASS" if ok else "  MISS")
    print(f"RATIO {name} = {value:.3f} (goal {goal}){verdict}")


# ---------------------------------------------------------------- training-step benchmarks


def step_parser(
    doc: str, rounds: int = 12, quick: str = "batch 8, 6 rounds (< 1 min)"
) -> argparse.ArgumentParser:
    """The options every training-step benchmark has: data, student, batch, rounds, threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--size", type=int, default=28, help="student input size (px)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="timed rounds (one untimed warm-up before)"
    )
    add_threads_arg(parser)
    return parser


def parse_step_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, `--quick` applied (batch 8, 6 rounds) and the threads set."""
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.rounds = 8, 6
    set_threads(args.threads)
    return args


@dataclass
class StepSetup:
    """What a training-step benchmark times on: the genuine training split on the CPU, its outputs, the
    student's view, fixed batches of dataset indices, and the one initial student every variant copies."""

    train: DeviceSplit
    n_out: int
    view: View
    batches: list[torch.Tensor]
    student: torch.nn.Module


def step_setup(args: argparse.Namespace) -> StepSetup:
    torch.manual_seed(0)
    info = dataset_info(args.dataset)
    images, labels = load_arrays(args.dataset, 28, data_dir())["train"]
    train = DeviceSplit(images, labels, info["task"], "cpu")
    n_out = num_outputs(info["task"], len(info["label"]))
    order, b = torch.randperm(len(train)), args.batch_size
    batches = [order[i : i + b] for i in range(0, len(train) - b + 1, b)]
    return StepSetup(train, n_out, View(args.size), batches, build_student(args.student, n_out, args.size))


def step_rows(
    times: dict[str, list[float]], batch_size: int, reference: Callable[[str], str]
) -> tuple[list[list[object]], dict[str, float]]:
    """Table rows (variant, ms/step, range, img/s, × its reference variant) and the median step times."""
    per_step = {name: median(t) for name, t in times.items()}
    rows = [
        [
            name,
            per_step[name] * 1e3,
            spread([s * 1e3 for s in t]),
            batch_size / per_step[name],
            per_step[name] / per_step[reference(name)],
        ]
        for name, t in times.items()
    ]
    return rows, per_step
