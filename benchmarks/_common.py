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

import torch

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
