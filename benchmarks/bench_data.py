"""Images per second delivered to the model: medkd's device-resident splits vs medmnist + DataLoader.

(a) medkd as `distill` does it: one uint8 tensor per split, resized once per run to the model's size
    (`DeviceSplit.at_size`; its one-off cost is its own column); a batch is an index gather, then
    uint8 → normalised float in one pass, grayscale kept one channel (`View.gray`: the student's first
    convolution sums its weights instead), channels_last.
(b) medmnist's own `Dataset` (PIL image per sample, `as_rgb=True`) with torchvision transforms
    (Resize bicubic when the output is not 28 px, ToTensor, Normalize 0.5/0.5) and a
    `DataLoader(num_workers=2, persistent_workers=True)`, as MedMNIST's training scripts use it.

Both deliver what the same model trains on: shuffled normalised float batches, (B, 3, S, S) from the
DataLoader and (B, 1, S, S) from medkd for grayscale (a 3-channel convolution of replicated gray is the
1-channel convolution with summed weights). Genuine files only.

    .venv/bin/python benchmarks/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import medmnist
import torch
from _common import (
    add_threads_arg,
    data_dir,
    interleave,
    median,
    print_table,
    ratio_line,
    set_threads,
    spread,
)
from torch.utils.data import DataLoader
from torchvision import transforms

from medkd.data import MEDMNIST_MEAN, MEDMNIST_STD, DeviceSplit, View, dataset_info, load_arrays
from medkd.mapped import memory_budget


def medkd_epoch(flag: str, size: int, batch_size: int, resize: list[float]) -> Callable[[], None]:
    """One epoch of medkd's batches; the one-off resize of the split (seconds) is appended to `resize`."""
    info = dataset_info(flag)
    split = DeviceSplit(*load_arrays(flag, 28, data_dir())["train"], info["task"], "cpu")
    view = View(size, channels_last=True, gray=True, rounded=True)
    start = time.perf_counter()
    split = split.at_size(view, memory_budget(None))
    resize.append(time.perf_counter() - start)
    generator = torch.Generator().manual_seed(0)
    channels = view.channels(info["n_channels"])

    def run() -> None:
        for batch in split.batches(batch_size, view, shuffle=True, generator=generator):
            assert batch.images.shape[1:] == (channels, size, size)

    return run


def medmnist_epoch(flag: str, size: int, batch_size: int, workers: int) -> Callable[[], None]:
    steps = (
        [transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC)]
        if size != 28
        else []
    )
    steps += [transforms.ToTensor(), transforms.Normalize(MEDMNIST_MEAN, MEDMNIST_STD)]
    cls = getattr(medmnist, dataset_info(flag)["python_class"])
    dataset = cls(
        split="train", transform=transforms.Compose(steps), as_rgb=True, root=data_dir(), download=False
    )
    # Persistent workers: worker start-up is paid once (in the warm-up round), never inside a timed epoch.
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )

    def run() -> None:
        for images, _ in loader:
            assert images.shape[1:] == (3, size, size)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="breastmnist only, 3 rounds (< 1 min)")
    parser.add_argument("--datasets", default="breastmnist,pneumoniamnist")
    parser.add_argument("--sizes", default="28,224", help="output sizes (px); the files are 28 px")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b)")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per side (one warm-up before)")
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.rounds = "breastmnist", 3
    set_threads(args.threads)

    rows, worst = [], float("inf")
    for flag in args.datasets.split(","):
        n = len(load_arrays(flag, 28, data_dir())["train"][0])
        for size in map(int, args.sizes.split(",")):
            resize: list[float] = []
            times = interleave(
                {
                    "medkd": medkd_epoch(flag, size, args.batch_size, resize),
                    "medmnist": medmnist_epoch(flag, size, args.batch_size, args.workers),
                },
                rounds=args.rounds,
            )
            a, b = n / median(times["medkd"]), n / median(times["medmnist"])
            worst = min(worst, a / b)
            # The first epoch pays the one-off resize: what a one-epoch run would see.
            first = n / (median(times["medkd"]) + resize[0])
            row = [flag, size, n, a, spread([n / t for t in times["medkd"]]), resize[0], first]
            rows.append([*row, b, spread([n / t for t in times["medmnist"]]), a / b])
    print_table(
        f"bench_data: train split, 28 px files, batch {args.batch_size}, shuffled, CPU; medkd with "
        f"{args.threads or torch.get_num_threads()} thread(s) vs DataLoader(num_workers={args.workers}); "
        f"median of {args.rounds} interleaved epochs",
        [
            "dataset",
            "out px",
            "images",
            "medkd img/s",
            "range",
            "resize once s",
            "1st epoch img/s",
            "medmnist img/s",
            "range",
            "medkd/medmnist",
        ],
        rows,
    )
    ratio_line("medkd / medmnist+DataLoader img/s (worst row)", worst, ">= 15", worst >= 15)


if __name__ == "__main__":
    main()
