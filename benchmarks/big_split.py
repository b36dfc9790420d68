"""Peak memory of one big training split: decompressed into RAM (today) vs mapped from its uncompressed copy.

Writes a synthetic MedMNIST-format .npz (grayscale, N training images at SIZE px, smooth gradients that
deflate fast; 512 val and test images) with `medkd.mapped.write_npz_streamed`, then runs each mode in
its own process, so that each peak is its own, and reports the child's peak RSS (`ru_maxrss`) and the
seconds its work took (imports excluded; the RSS after imports is shown apart):

  (a) ram-sha       np.load(npz)["train_images"] whole in RAM, then its sha256 (medkd today)
  (b) mapped-first  mapped_copy (makes the uncompressed copy), then sha256_rows over the map
  (c) mapped-pass   mapped_copy (reuses it), then a stage-one-like pass: chunks(images, 2048) -> float,
                    bicubic antialiased resize to 28 px (what the teacher sees) -> sum
  (d) ram-pass      (c)'s pass over the split loaded as in (a): the time (c) is to be compared with

Before each mode the npz and the copy are dropped from the page cache (posix_fadvise DONTNEED), as on a
first run after a reboot. Everything is written in a new folder under --dir (default: the system's
temporary folder) and deleted at the end unless --keep.

    .venv/bin/python benchmarks/big_split.py [--n 100000] [--size 224] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medkd.mapped import StreamedArray, chunks, copy_path, mapped_copy, sha256_rows, write_npz_streamed

N_EVAL = 512
PASS_ROWS = 2048  # stage one's slice of images per teacher pass
TEACHER_SIZE = 28
GIB = 2**30
MODES = {
    "ram-sha": "(a) np.load whole + sha256",
    "mapped-first": "(b) mapped_copy (made) + sha256_rows",
    "mapped-pass": f"(c) mapped_copy (reused) + chunks({PASS_ROWS}) resize pass",
    "ram-pass": f"(d) np.load whole + chunks({PASS_ROWS}) resize pass",
}


def smooth_images(n: int, size: int) -> StreamedArray:
    """N grayscale images, each a diagonal gradient shifted by its index: no two alike, cheap to make."""
    y, x = np.mgrid[0:size, 0:size]
    base = ((x + y) * 255 // max(1, 2 * size - 2)).astype(np.uint8)

    def block(start: int, stop: int) -> np.ndarray:
        shift = ((np.arange(start, stop) * 37) % 256).astype(np.uint8)
        return base[None] + shift[:, None, None]  # uint8 + uint8 wraps around: stays uint8, no temporaries

    return StreamedArray((n, size, size), np.dtype(np.uint8), block)


def write_data(path: Path, n: int, size: int) -> None:
    arrays: dict[str, np.ndarray | StreamedArray] = {}
    for split, count in (("train", n), ("val", N_EVAL), ("test", N_EVAL)):
        arrays[f"{split}_images"] = smooth_images(count, size)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).astype(np.uint8)[:, None]
    write_npz_streamed(path, arrays)  # deflated at zlib's default level, as np.savez_compressed


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the page cache, so each mode reads from disk as a fresh run does."""
    for path in paths:
        if path.exists() and hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def resize_pass(images: np.ndarray, threads: int) -> float:
    """What stage one does to each slice before the teacher: float, resize to the teacher's size."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    total = 0.0
    for _, block in chunks(images, PASS_ROWS):
        x = torch.from_numpy(block).float().unsqueeze(1)  # (B, 1, S, S)
        x = F.interpolate(
            x, size=TEACHER_SIZE, mode="bicubic", antialias=True, align_corners=False
        )  # (B, 1, 28, 28)
        total += x.sum(dtype=torch.float64).item()
    return total


def child(mode: str, npz: str, args: argparse.Namespace) -> None:
    """Write the data, or run one mode and print its measurements as JSON (in a process of its own)."""
    if mode == "write":
        write_data(Path(npz), args.n, args.size)
        return
    if mode.endswith("pass"):
        import torch  # noqa: F401  (imported before the clock and the "after imports" RSS)
    existed = copy_path(npz, "train_images").exists()
    after_imports = peak_rss()
    start = time.perf_counter()
    if mode.startswith("ram"):
        with np.load(npz) as data:
            images = data["train_images"]
    else:
        images = mapped_copy(npz, "train_images")
    if mode.endswith("sha"):
        value: str | float = hashlib.sha256(images).hexdigest()
    elif mode == "mapped-first":
        digest = hashlib.sha256()
        sha256_rows(digest, images)
        value = digest.hexdigest()
    else:
        value = resize_pass(images, args.threads)
    seconds = time.perf_counter() - start
    result = {"maxrss": peak_rss(), "after_imports": after_imports, "seconds": seconds, "value": value}
    print(json.dumps({**result, "copy_existed": existed}))


def run_child(mode: str, npz: Path, args: argparse.Namespace) -> dict | None:
    evict([npz, copy_path(npz, "train_images")] if npz.exists() else [])
    command = [sys.executable, __file__, "--n", str(args.n), "--size", str(args.size)]
    command += ["--threads", str(args.threads), "--child", mode, str(npz)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else None


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--n", type=int, default=100_000, help="training images (default 100000)")
    parser.add_argument("--size", type=int, default=224, help="image size in px (default 224)")
    parser.add_argument("--dir", type=Path, help="folder to work in (a new subfolder is made there)")
    parser.add_argument("--keep", action="store_true", help="keep the npz and its copy")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the resize pass (default 1)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "NPZ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args)
        return
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a folder; pass an existing folder")

    # Linux carries the parent's peak RSS over into a child's ru_maxrss (through fork/vfork and exec),
    # so the parent stays small: the data is written by a child, and torch (through _common) is imported
    # only once the children are done.
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="medkd_big_split_", dir=args.dir))
    try:
        npz = folder / f"bigsplit_{args.size}.npz"
        run_child("write", npz, args)
        written = time.perf_counter() - started
        results = {mode: run_child(mode, npz, args) for mode in MODES}
        copy = copy_path(npz, "train_images")
        sizes = (npz.stat().st_size, copy.stat().st_size)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)  # the folder and all in it were made by this run
    report(args, results, written, sizes, time.perf_counter() - started, folder, peak_rss())


def report(
    args: argparse.Namespace,
    results: dict[str, dict],
    written: float,
    sizes: tuple[int, int],
    total: float,
    folder: Path,
    floor: int,
) -> None:
    from _common import print_table, ratio_line

    split = args.n * args.size * args.size
    base = results["ram-sha"]["maxrss"]
    rows = [
        [
            label,
            r["maxrss"] / GIB,
            r["after_imports"] / GIB,
            (r["maxrss"] - r["after_imports"]) / GIB,
            r["seconds"],
            r["maxrss"] / base,
        ]
        for mode, label in MODES.items()
        for r in [results[mode]]
    ]
    print_table(
        f"big_split: train split of {args.n} x {args.size}x{args.size} uint8 = {split / GIB:.2f} GiB; "
        f"npz {sizes[0] / GIB:.3f} GiB (deflated), copy {sizes[1] / GIB:.2f} GiB; one process per mode, "
        f"page cache dropped before each",
        ["mode", "peak RSS GiB", "after imports GiB", "peak - imports GiB", "seconds", "peak / (a)"],
        rows,
    )
    same_sha = results["ram-sha"]["value"] == results["mapped-first"]["value"]
    same_pass = results["mapped-pass"]["value"] == results["ram-pass"]["value"]
    made = not results["mapped-first"]["copy_existed"] and results["mapped-pass"]["copy_existed"]
    print(
        f"sha256 (a) == (b): {same_sha}; pass sums (c) == (d): {same_pass}; "
        f"copy made by (b), reused by (c): {made}"
    )
    print(f"parent's peak RSS {floor / GIB:.3f} GiB: no child's ru_maxrss can read lower")
    print(f"npz written in {written:.1f} s; whole run {total:.1f} s; torch threads {args.threads}")
    print(f"{'kept' if args.keep else 'deleted'}: {folder}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    ratio_line(
        "peak RSS, mapped stage-one pass (c) / in-RAM pass (d)",
        results["mapped-pass"]["maxrss"] / results["ram-pass"]["maxrss"],
        "none: reported",
        None,
    )


if __name__ == "__main__":
    main()
