"""Stage one end to end (`cache_teacher`) against the bare backbone forward over the same images.

The stage loads the .npz, builds the teacher, runs one backbone pass per image, trains the linear head
on the cached features (paper schedule: 100 epochs), fingerprints the data and writes the HDF5 cache.
The bare forward is only `teacher.features(prepare_images(batch))` over the same splits and batch
size, teacher already built. Goals: stage img/s >= 0.9 x bare img/s, and head training < 5% of the stage.

Teachers: the tiny random DINOv2-architecture ViT (a test fixture, microseconds per image), and (not
with --quick) DINOv2 ViT-S/14's real architecture, random-init, loaded through `--weights` from a
file written here: a teacher whose forward costs what a real one costs.

    .venv/bin/python benchmarks/bench_cache_teacher.py [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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
from rich.console import Console

from medkd.backbones import BackboneTeacher, build_teacher
from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher
from medkd.config import CacheTeacherConfig
from medkd.data import SPLITS, DeviceSplit, View, dataset_info, load_arrays
from medkd.registry import TEACHERS


def write_vits14_weights(folder: Path, img_size: int) -> Path:
    """A random-init ViT-S/14 (DINOv2 architecture) state dict: no pretrained download offline."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TEACHERS["dinov2_vits14"].model_id, pretrained=False, img_size=img_size)
    path = folder / "vits14_random.pth"
    torch.save(model.state_dict(), path)
    return path


def bare_forward(teacher: BackboneTeacher, arrays: dict, task: str, batch_size: int) -> Callable[[], None]:
    view = View(teacher.img_size, teacher.mean, teacher.std)

    @torch.inference_mode()
    def run() -> None:
        for split in SPLITS:
            data = DeviceSplit(*arrays[split], task, "cpu")
            for batch in data.batches(batch_size, view):
                teacher.features(batch.images)  # (B, D)

    return run


def measure(
    cfg: CacheTeacherConfig, teacher: BackboneTeacher, arrays: dict, rounds: int, warmup: int
) -> tuple[dict[str, list[float]], list[dict]]:
    """Interleaved seconds of the whole stage and of the bare forward, and each timed stage's cache attrs."""
    quiet = Console(stderr=True, quiet=True)
    attrs: list[dict] = []

    def stage() -> None:
        cache_teacher(cfg, console=quiet)
        attrs.append(TeacherCache(cfg.out).attrs)  # feature_seconds, head_seconds as the stage timed them

    bare = bare_forward(teacher, arrays, dataset_info(cfg.dataset)["task"], cfg.feature_batch_size)
    times = interleave({"stage": stage, "bare": bare}, rounds, warmup)
    return times, attrs[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny teacher only, 2 rounds (< 1 min)")
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--teacher-size", type=int, default=224)
    parser.add_argument("--vit-size", type=int, default=112, help="ViT-S/14 input size (px); 0 skips it")
    parser.add_argument("--epochs", type=int, default=100, help="head epochs (paper: 100)")
    parser.add_argument("--batch-size", type=int, default=64, help="feature batch size of both sides")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (one warm-up before)")
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.vit_size, args.rounds = 0, 2
    set_threads(args.threads)

    arrays = load_arrays(args.dataset, 28, data_dir())
    n = sum(len(arrays[s][0]) for s in SPLITS)
    tmp = Path(tempfile.mkdtemp(prefix="medkd_bench_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # data, caches, runs: nothing is kept
    setups = [("tiny", None, args.teacher_size)]
    if args.vit_size:
        setups.append(("dinov2_vits14", str(write_vits14_weights(tmp, args.vit_size)), args.vit_size))

    rows, e2e_ratios, head_shares = [], [], []
    for name, weights, size in setups:
        cfg = CacheTeacherConfig(
            dataset=args.dataset,
            teacher=name,
            min_teacher_auc=0,  # random-init or synthetic teachers: the gate is not the point here
            weights=weights,
            teacher_size=size,
            epochs=args.epochs,
            feature_batch_size=args.batch_size,
            out=str(tmp / f"{name}.h5"),
            data_dir=data_dir(),
            device="cpu",
            force=True,
            quiet=True,
        )
        # A forward of a real-size teacher takes tens of seconds: warm-up effects vanish in it.
        warmup = 1 if name == "tiny" else 0
        times, attrs = measure(cfg, build_teacher(name, weights, size), arrays, args.rounds, warmup)
        wall = median(times["stage"])
        feature = median([a["feature_seconds"] for a in attrs])
        head = median([a["head_seconds"] for a in attrs])
        bare = n / median(times["bare"])
        e2e_ratios.append(n / wall / bare)
        head_shares.append(head / wall)
        label = f"{name}@{size}" + (" (random-init)" if weights else "")
        bare_range = spread([n / t for t in times["bare"]])
        share = f"{head / wall:.1%}"
        rows.append(
            [label, n, bare, bare_range, n / feature, n / wall, wall, feature, head, share, n / wall / bare]
        )
    print_table(
        f"bench_cache_teacher: {args.dataset} (all splits, 28 px files), CPU, feature batch "
        f"{args.batch_size}, head {args.epochs} epochs; median of {args.rounds} interleaved rounds",
        [
            "teacher",
            "images",
            "bare img/s",
            "range",
            "feature-pass img/s",
            "stage img/s",
            "stage s",
            "features s",
            "head s",
            "head share",
            "stage/bare",
        ],
        rows,
    )
    # The goal is about a real teacher: the last row (ViT-S/14 when run, else the tiny fixture).
    ratio_line("stage / bare forward img/s", e2e_ratios[-1], ">= 0.9", e2e_ratios[-1] >= 0.9)
    print(f"head share of the stage = {head_shares[-1]:.1%} (goal < 5%)")


if __name__ == "__main__":
    main()
