"""Images per second delivered to the model: medkd's device-resident splits vs medmnist + DataLoader.

(a) medkd: one uint8 tensor per split; a batch is an index gather, then resize, 1→3 channels and
    normalise on the device (`DeviceSplit.batches`, `prepare_images`).
(b) medmnist's own `Dataset` (PIL image per sample, `as_rgb=True`) with torchvision transforms
    (Resize bicubic when the output is not 28 px, ToTensor, Normalize 0.5/0.5) and a
    `DataLoader(num_workers=2, persistent_workers=True)`, as MedMNIST's training scripts use it.

Both deliver the same thing: shuffled float batches (B, 3, S, S), normalised. Genuine files only.

    .venv/bin/python benchmarks/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
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


def medkd_epoch(flag: str, size: int, batch_size: int) -> Callable[[], None]:
    info = dataset_info(flag)
    split = DeviceSplit(*load_arrays(flag, 28, data_dir())["train"], info["task"], "cpu")
    view = View(size)
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        for batch in split.batches(batch_size, view, shuffle=True, generator=generator):
            assert batch.images.shape[1:] == (3, size, size)

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
            times = interleave(
                {
                    "medkd": medkd_epoch(flag, size, args.batch_size),
                    "medmnist": medmnist_epoch(flag, size, args.batch_size, args.workers),
                },
                rounds=args.rounds,
            )
            a, b = n / median(times["medkd"]), n / median(times["medmnist"])
            worst = min(worst, a / b)
            rows.append(
                [
                    flag,
                    size,
                    n,
                    a,
                    spread([n / t for t in times["medkd"]]),
                    b,
                    spread([n / t for t in times["medmnist"]]),
                    a / b,
                ]
            )
    print_table(
        f"bench_data: train split, 28 px files, batch {args.batch_size}, shuffled, CPU; medkd with "
        f"{args.threads or torch.get_num_threads()} thread(s) vs DataLoader(num_workers={args.workers}); "
        f"median of {args.rounds} interleaved epochs",
        ["dataset", "out px", "images", "medkd img/s", "range", "medmnist img/s", "range", "medkd/medmnist"],
        rows,
    )
    ratio_line("medkd / medmnist+DataLoader img/s (worst row)", worst, ">= 10", worst >= 10)


if __name__ == "__main__":
    main()
