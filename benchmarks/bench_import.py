"""A MedMNIST flag written out as PNG folders, imported back with `medkd import`, and trained on both ways.

The round trip a user's own data takes: every image of FLAG goes to `OUT/png/<split>/<class name>/<i>.png`
(the ImageFolder layout with a split level), `medkd import` turns the folder into `OUT/FLAG_png.npz`, and
the same supervised baseline (`--alpha 1`, one seed) is trained from the flag and from the imported file,
as two processes of one thread each. It prints whether the pixels and labels came back exactly (as a
multiset: import orders each split by path), the import's speed, and both test AUC/ACC side by side.

    MEDKD_DATA=../shared/data/medmnist .venv/bin/python benchmarks/bench_import.py pneumoniamnist \\
        --out /tmp/roundtrip --epochs 10 --student resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medkd.data import SPLITS, dataset_info, load_arrays


def write_pngs(flag: str, folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every image of `flag` as a PNG under `folder/<split>/<class name>/`; returns the arrays written."""
    arrays, names = load_arrays(flag), dataset_info(flag)["label"]
    for split in SPLITS:
        images, labels = arrays[split]
        for name in names.values():
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels[:, 0], strict=True)):
            Image.fromarray(image).save(folder / split / names[str(label)] / f"{i:06d}.png")
    return arrays


def same_multiset(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two splits hold the same (image, label) pairs in any order."""

    def keys(split: tuple[np.ndarray, np.ndarray]) -> list[bytes]:
        images, labels = split
        return sorted(images[i].tobytes() + labels[i].astype(np.int64).tobytes() for i in range(len(images)))

    return len(a[0]) == len(b[0]) and keys(a) == keys(b)


def baseline(dataset: str, out: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "medkd.cli", "distill", "--dataset", dataset, "--alpha", "1",
        "--student", args.student, "--epochs", str(args.epochs), "--batch-size", "128", "--seed", "0",
        "--out", str(out), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flag")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student", default="resnet18")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size = 28

    start = time.perf_counter()
    original = write_pngs(args.flag, args.out / "png")
    written = time.perf_counter() - start
    npz = args.out / f"{args.flag}_png.npz"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "medkd.cli", "import", str(args.out / "png"), "--out", str(npz)]
    subprocess.run([*cmd, "--size", str(size), "--force"], check=True)
    imported = time.perf_counter() - start
    back = load_arrays(str(npz))
    n = sum(len(original[s][0]) for s in SPLITS)
    exact = {s: same_multiset(original[s], back[s]) for s in SPLITS}
    speed = f"{imported:.1f} s ({n / imported:.0f} img/s)"
    print(f"wrote {n} PNGs in {written:.1f} s; `medkd import` took {speed}")
    print(f"pixels and labels back exactly (as a multiset): {exact}")
    print(f"facts: {json.loads(npz.with_suffix('.json').read_text())['label']}")

    runs = {"flag": args.out / "runs" / "flag", "imported": args.out / "runs" / "imported"}
    jobs = [baseline(args.flag, runs["flag"], args), baseline(str(npz), runs["imported"], args)]
    if any(job.wait() for job in jobs):
        raise SystemExit("a baseline run failed")
    print(f"\n{args.student} baseline, {args.epochs} epochs, seed 0, test split:")
    print(f"{'data':<10} {'test AUC':>9} {'test ACC':>9} {'best epoch':>11}")
    for name, run in runs.items():
        result = json.loads((run / "result.json").read_text())
        test = result["test"]
        print(f"{name:<10} {test['auc']:>9.4f} {test['acc']:>9.4f} {result['best_epoch']:>11}")
    print(f"\n{' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
