"""An N-trial sweep from one teacher cache against N runs of online KD (a teacher forward every step).

Cached: `cache_teacher` once (backbone pass + head), the cache read once, then N `run_trial`s (full
`distill` runs: data checks, training, checkpoints, predictions, result.json).
Online: N runs of the same training loop (`medkd.train.train_epochs`, same student, data, epochs and
seed) whose teacher logits come from a teacher forward on each batch instead of an index into the
cache. The online side gets the trained head for free (taken from the cache), so the ratio is, if
anything, generous to online KD.

Trials are interleaved (cached, online, cached, online, ...); totals for N trials are the cache build
plus the first N cached trials against the first N online runs.

    .venv/bin/python benchmarks/bench_sweep.py [--quick] [--teacher vits14]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import add_threads_arg, interleave, median, print_table, ratio_line, set_threads
from rich.console import Console
from torch import nn

from medkd.backbones import BackboneTeacher, build_teacher
from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher
from medkd.config import CacheTeacherConfig, DistillConfig, to_dict
from medkd.data import (
    SPLITS,
    DeviceSplit,
    View,
    dataset_info,
    load_arrays,
    make_synthetic_like,
    num_outputs,
    prepare_images,
)
from medkd.students import build_student
from medkd.train import LoopState, evaluate_model, train_epochs
from medkd.trials import run_trial

FLAG = "breastmnist"
GRID = [(0.2, 2.0), (0.5, 5.0), (0.8, 8.0), (0.1, 2.0), (0.3, 2.0), (0.2, 4.0), (0.4, 2.0), (0.2, 1.0)]


class OnlineLogits:
    """Stands in for the cached (N, C) logits tensor: indexing it runs the teacher on those images."""

    def __init__(self, teacher: BackboneTeacher, head: nn.Linear, images: torch.Tensor):
        self.teacher, self.head, self.images = teacher, head, images
        self.view = View(teacher.img_size, teacher.mean, teacher.std)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.head(self.teacher.features(prepare_images(self.images[index], self.view)))  # (B, C)


def online_run(cfg: DistillConfig, teacher: BackboneTeacher, head: nn.Linear) -> dict[str, float]:
    """One online-KD student run: the distill recipe, with the teacher in the step instead of the cache."""
    info = dataset_info(FLAG)
    arrays = load_arrays(FLAG, cfg.size, cfg.data_dir)
    splits = {s: DeviceSplit(*arrays[s], info["task"], "cpu") for s in SPLITS}
    torch.manual_seed(cfg.seed)
    model = build_student(cfg.student, num_outputs(info["task"], len(info["label"])), cfg.student_size)
    view = View(cfg.student_size)
    for _ in train_epochs(
        model,
        splits["train"],
        splits["val"],
        view,
        LoopState.create(model, cfg.lr, cfg.epochs, cfg.milestones, cfg.seed),
        teacher_logits=OnlineLogits(teacher, head, splits["train"].images),  # type: ignore[arg-type]
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
    ):
        pass
    return evaluate_model(model, splits["test"], view)[0]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="N = 1, 2; 96 train images, 1 epoch (< 1 min)")
    parser.add_argument("--n", default="1,2,4", help="sweep sizes to report (the largest is run)")
    parser.add_argument("--teacher", choices=("tiny", "vits14"), default="tiny")
    parser.add_argument(
        "--teacher-size", type=int, default=0, help="teacher input px (0: tiny 224, vits14 112)"
    )
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--student-size", type=int, default=14, help="student input px (small: CPU time)")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--head-epochs", type=int, default=100)
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.n, args.n_train, args.epochs = "1,2", 96, 1
    set_threads(args.threads)
    sizes = sorted(int(n) for n in args.n.split(","))
    if sizes[-1] > len(GRID):
        parser.error(f"--n goes up to {len(GRID)} trials (the grid's length), got {sizes[-1]}")
    teacher_size = args.teacher_size or (224 if args.teacher == "tiny" else 112)

    tmp = Path(tempfile.mkdtemp(prefix="medkd_bench_sweep_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # data, caches, runs: nothing is kept
    n_eval = max(args.n_train // 4, 16)
    make_synthetic_like(tmp, FLAG, n_train=args.n_train, n_val=n_eval, n_test=n_eval, seed=0)
    weights = None
    if args.teacher == "vits14":
        from bench_cache_teacher import write_vits14_weights

        weights = str(write_vits14_weights(tmp, teacher_size))
    name = "tiny" if args.teacher == "tiny" else "dinov2_vits14"
    quiet = Console(stderr=True, quiet=True)

    # Stage one, once: backbone pass over every image, head training, cache written and read back.
    start = time.perf_counter()
    cache_cfg = CacheTeacherConfig(
        dataset=FLAG,
        teacher=name,
        min_teacher_auc=0,  # random-init or synthetic teachers: the gate is not the point here
        weights=weights,
        teacher_size=teacher_size,
        epochs=args.head_epochs,
        out=str(tmp / "cache.h5"),
        data_dir=str(tmp),
        device="cpu",
        quiet=True,
    )
    cache_teacher(cache_cfg, console=quiet)
    cache = TeacherCache(cache_cfg.out)
    build_seconds = time.perf_counter() - start

    teacher, head = build_teacher(name, weights, teacher_size), cache.head()
    configs = [
        DistillConfig(
            cache=cache_cfg.out,
            alpha=a,
            temperature=t,
            student=args.student,
            student_size=args.student_size,
            epochs=args.epochs,
            data_dir=str(tmp),
            device="cpu",
            out=str(tmp / "runs" / f"a{a}_t{t}"),
            quiet=True,
            force=True,
        )
        for a, t in GRID[: sizes[-1]]
    ]
    cached_configs, online_configs = iter(configs), iter(configs)

    def cached_trial() -> None:
        run_trial(to_dict(next(cached_configs)), cache=cache, console=quiet)

    def online_trial() -> None:
        online_run(next(online_configs), teacher, head)

    # No warm-up: each trial is a whole training run, and the first one is part of what a user pays.
    times = interleave({"cached": cached_trial, "online": online_trial}, rounds=sizes[-1], warmup=0)
    rows = []
    for n in sizes:
        cached = build_seconds + sum(times["cached"][:n])
        on = sum(times["online"][:n])
        rows.append([n, cached, on, on / cached])
    per_trial = median(times["online"]) / median(times["cached"])
    print_table(
        f"bench_sweep: {args.student} at {args.student_size} px, {args.epochs} epoch(s), {args.n_train} "
        f"train images (synthetic {FLAG}), teacher {name}@{teacher_size}, CPU; cache build "
        f"{build_seconds:.1f} s (head {cache.attrs['head_seconds']:.1f} s), cached trial "
        f"{median(times['cached']):.1f} s, online run {median(times['online']):.1f} s (medians)",
        ["N trials", "cache + N trials s", "N online runs s", "online/cached"],
        rows,
    )
    print(f"online / cached per trial (the limit as N grows) = {per_trial:.3f}")
    final = rows[-1][3]
    ratio_line(f"online / cached, N={sizes[-1]}", final, "> 1, growing with N", final > 1)


if __name__ == "__main__":
    main()
