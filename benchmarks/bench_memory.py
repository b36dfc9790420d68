"""Peak memory of `distill` as the dataset grows, and the teacher cache's size per image.

For each training-set size N a MedMNIST-format file (breastmnist's task and shape, random pixels) and
its cache (tiny teacher at 14 px: the fastest pass; the cache's size does not depend on the teacher's
input size) are written, then `distill` runs in a fresh subprocess that reports its peak RSS
(`ru_maxrss`). Everything that grows with N is what distill holds: the uint8 images, the labels and the
cache's logits. The training itself does not grow with N, so each epoch is cut to a few steps
(val and test stay at 128 images) to keep the run short.

    .venv/bin/python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import add_threads_arg, print_table, ratio_line, set_threads

FLAG = "breastmnist"  # binary: C = 2 logits, L = 1 label column, grayscale
N_EVAL = 128
STEPS = 4  # training steps per epoch in the child: memory does not depend on how many


def write_npz(path: Path, n_train: int, size: int, seed: int = 0) -> None:
    """A MedMNIST-format .npz (uncompressed: fast to write and to read) with random pixels and labels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", N_EVAL), ("test", N_EVAL)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 1), dtype=np.uint8)
    np.savez(path, **arrays)


def child(cache: str, data_dir: str, out: str, threads: int) -> None:
    """Run one distill with capped epochs and print its peak RSS as JSON (runs in its own process)."""
    set_threads(threads)
    import medkd.data
    from medkd.config import DistillConfig
    from medkd.distill import distill

    full = medkd.data.DeviceSplit.batches

    def capped(self, batch_size, view, shuffle=False, generator=None):  # noqa: ANN001, ANN202
        batches = full(self, batch_size, view, shuffle, generator)
        return itertools.islice(batches, STEPS) if shuffle else batches  # shuffled = the training pass

    medkd.data.DeviceSplit.batches = capped
    cfg = DistillConfig(
        cache=cache,
        student="resnet18",
        student_size=8,
        epochs=1,
        batch_size=32,
        data_dir=data_dir,
        device="cpu",
        out=out,
        force=True,
        quiet=True,
    )
    distill(cfg)
    print(json.dumps({"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="N = 2000, 32000 (< 1 min; the slope is rough)")
    parser.add_argument("--n", default="4000,16000,64000", help="training-set sizes")
    parser.add_argument("--size", type=int, default=28, help="image size of the .npz (28, 64, 128, 224)")
    parser.add_argument("--child", nargs=3, metavar=("CACHE", "DATA_DIR", "OUT"), help=argparse.SUPPRESS)
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return
    if args.quick:
        args.n = "2000,32000"
    set_threads(args.threads)
    from rich.console import Console

    from medkd.cache_teacher import cache_teacher
    from medkd.config import CacheTeacherConfig
    from medkd.data import npz_name

    tmp = Path(tempfile.mkdtemp(prefix="medkd_bench_mem_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # data, caches, runs: nothing is kept
    rows, points, per_image = [], [], {}
    for n in map(int, args.n.split(",")):
        folder = tmp / str(n)
        folder.mkdir()
        write_npz(folder / npz_name(FLAG, args.size), n, args.size)
        sizes = {}
        for features in (True, False):
            cfg = CacheTeacherConfig(
                dataset=FLAG,
                size=args.size,
                teacher="tiny",
                min_teacher_auc=0,  # random-init or synthetic teachers: the gate is not the point here
                teacher_size=14,
                epochs=1,
                features=features,
                out=str(folder / ("cache.h5" if features else "cache_nofeatures.h5")),
                data_dir=str(folder),
                device="cpu",
                quiet=True,
                feature_batch_size=1024,
            )
            sizes[features] = os.path.getsize(cache_teacher(cfg, console=Console(stderr=True, quiet=True)))
        total = n + 2 * N_EVAL
        per_image[n] = (sizes[True] / total, sizes[False] / total)
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--child",
                str(folder / "cache.h5"),
                str(folder),
                str(folder / "run"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rss = json.loads(result.stdout.strip().splitlines()[-1])["maxrss_bytes"]
        points.append((total, rss))
        rows.append(
            [n, total, sizes[True], sizes[True] / total, sizes[False], sizes[False] / total, rss / 2**20]
        )
    (n0, r0), (n1, r1) = points[0], points[-1]
    slope = (r1 - r0) / (n1 - n0)
    pixels = args.size * args.size
    c, label_cols, d = 2, 1, 48  # breastmnist: 2 logits, 1 label column; tiny teacher: 48 features
    print_table(
        f"bench_memory: {FLAG}-shaped data at {args.size} px (uint8, {pixels} B an image), tiny teacher "
        f"(C={c}, L={label_cols}, D={d}); distill of resnet18 in a fresh process per size, peak RSS",
        [
            "N train",
            "images",
            "cache B",
            "B/image",
            "cache B (no features)",
            "B/image",
            "distill peak RSS MiB",
        ],
        rows,
    )
    print(
        f"cache bytes/image, formula 4C + 8L + 2D = {4 * c + 8 * label_cols + 2 * d} (features), "
        f"{4 * c + 8 * label_cols} (--no-features), plus a fixed HDF5 overhead per file"
    )
    print(
        f"peak RSS grows by {slope:.0f} B per image = {slope / pixels:.2f} x the uint8 image bytes "
        f"({pixels} B)"
    )
    ratio_line(
        "distill peak RSS growth / (uint8 image bytes + cache logits)",
        slope / (pixels + 4 * c),
        "none: reported",
        None,
    )


if __name__ == "__main__":
    main()
