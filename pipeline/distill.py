"""Stage two: a student run from the cached teacher logits (or the supervised baseline at alpha=1).

The teacher is never built here: its logits are an in-memory tensor indexed by the batch's dataset indices.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medkd.cache import TeacherCache
from medkd.config import DistillConfig, to_dict
from medkd.data import SPLITS, DeviceSplit, View, data_sha256, dataset_info, load_arrays, num_outputs
from medkd.errors import MedkdError
from medkd.runs import (
    CHECKPOINT,
    PREDICTIONS,
    RESULT,
    atomic_path,
    config_hash,
    prepare_run_dir,
    versions,
    write_json,
)
from medkd.students import build_student
from medkd.train import evaluate_model, resolve_device, train_epochs


def run_name(cfg: DistillConfig, dataset: str, size: int, teacher: str | None) -> str:
    """A readable default folder name: `breastmnist_28_resnet50-28_dinov2_vitb14_a0.2_t2_s0`."""
    student_size = cfg.student_size or size
    source = "baseline" if cfg.alpha == 1.0 or teacher is None else teacher
    knobs = f"a{cfg.alpha:g}_t{cfg.temperature:g}_s{cfg.seed}"
    return f"{dataset}_{size}_{cfg.student}-{student_size}_{source}_{knobs}"


def _is_better(auc: float, best: float | None) -> bool:
    # NaN (a val split with one class) never beats a number; the first epoch always counts.
    return best is None or (auc == auc and (best != best or auc > best))


def distill(
    cfg: DistillConfig, console: Console | None = None, cache: TeacherCache | None = None
) -> dict[str, Any]:
    """Train one student, write its run folder and return its result; `cache` skips re-reading the file."""
    console = console or Console(stderr=True, quiet=cfg.quiet)
    started = time.perf_counter()
    if cache is None and cfg.cache is not None:
        cache = TeacherCache(cfg.cache)
    dataset = cache.attrs["dataset"] if cache else cfg.dataset
    size = int(cache.attrs["image_size"]) if cache else cfg.size
    if cache and cfg.dataset and cfg.dataset != dataset:
        raise MedkdError(
            f"--dataset {cfg.dataset} does not match the cache {cfg.cache}, built from {dataset}"
        )
    info = dataset_info(dataset)
    task = info["task"]
    arrays = load_arrays(dataset, size, cfg.data_dir, cfg.download)
    if cache:
        cache.check_data(dataset, size, arrays)
    n_out = num_outputs(task, len(info["label"]))
    if cache and cache.logits["train"].shape[1] != n_out:
        raise MedkdError(
            f"cache {cfg.cache} has {cache.logits['train'].shape[1]} logits per image; "
            f"{dataset} needs {n_out}"
        )
    teacher = cache.attrs["teacher"] if cache else None
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / run_name(cfg, dataset, size, teacher)

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student_size = cfg.student_size or size
    model = build_student(cfg.student, n_out, student_size, cfg.student_weights).to(device)
    prepare_run_dir(run_dir, cfg.force)  # last check before work: nothing is written on bad input
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    view = View(student_size, interpolation=cfg.interpolation, channels_last=channels_last)
    splits = {s: DeviceSplit(*arrays[s], task, device) for s in SPLITS}
    teacher_logits = cache.logits["train"].to(device) if cache and cfg.alpha < 1.0 else None

    history, best_auc, best_epoch, best_state, stale = [], None, 0, None, 0
    steps_per_epoch = -(-len(splits["train"]) // cfg.batch_size)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=cfg.quiet,
    ) as progress:
        bar = progress.add_task("train", total=cfg.epochs * steps_per_epoch, info="")
        epochs = train_epochs(
            model,
            splits["train"],
            splits["val"],
            view,
            teacher_logits=teacher_logits,
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            milestones=cfg.milestones,
            seed=cfg.seed,
            on_step=lambda *_: progress.advance(bar),
        )
        for stats in epochs:
            history.append(vars(stats))
            progress.update(
                bar,
                info=f"epoch {stats.epoch} loss {stats.loss:.4f} val AUC {stats.val_auc:.3f} "
                f"{stats.images_per_second:.0f} img/s",
            )
            if _is_better(stats.val_auc, best_auc):
                best_auc, best_epoch, stale = stats.val_auc, stats.epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                with atomic_path(run_dir / CHECKPOINT) as tmp:
                    torch.save({"model": best_state, "epoch": stats.epoch, "config": to_dict(cfg)}, tmp)
            else:
                stale += 1
            if cfg.patience is not None and stale >= cfg.patience:
                console.print(
                    f"early stop after epoch {stats.epoch}: no better val AUC for {cfg.patience} epochs"
                )
                break

    model.load_state_dict(best_state)
    val_metrics, _ = evaluate_model(model, splits["val"], view)
    test_metrics, test_scores = evaluate_model(model, splits["test"], view)
    with atomic_path(run_dir / PREDICTIONS) as tmp, open(tmp, "wb") as f:
        np.savez(f, y_true=arrays["test"][1], y_score=test_scores, task=np.array(task))
    train_seconds = sum(h["seconds"] for h in history)
    config = to_dict(cfg)
    result = {
        "medkd_result": 1,
        "run_dir": str(run_dir),
        "config": config,
        "config_hash": config_hash(config),
        "dataset": dataset,
        "size": size,
        "task": task,
        "n_outputs": n_out,
        "student": cfg.student,
        "student_size": student_size,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "baseline": teacher_logits is None,
        "teacher": _teacher_summary(cache, cfg.cache) if cache else None,
        "data_sha256": {s: data_sha256(*arrays[s]) for s in SPLITS},
        "history": history,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "val": val_metrics,
        "test": test_metrics,
        "wall_seconds": time.perf_counter() - started,
        "train_images_per_second": len(splits["train"]) * len(history) / train_seconds,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "versions": versions(),
    }
    write_json(run_dir / RESULT, result)
    console.print(
        f"[bold]{run_dir}[/]: best epoch {best_epoch}, val AUC {val_metrics['auc']:.4f} "
        f"ACC {val_metrics['acc']:.4f}; test AUC {test_metrics['auc']:.4f} ACC {test_metrics['acc']:.4f}"
    )
    return result


def _teacher_summary(cache: TeacherCache, path: str | None) -> dict[str, Any]:
    attrs = cache.attrs
    test = cache.teacher_metrics("test")
    return {
        "cache": str(path),
        "teacher": attrs["teacher"],
        "backbone": attrs.get("backbone"),
        "medkd_format": attrs["medkd_format"],
        "teacher_input_size": attrs.get("teacher_input_size"),
        "weights_sha256": attrs.get("weights_sha256"),
        "data_sha256": {s: cache.split_attrs[s]["data_sha256"] for s in SPLITS},
        "test_auc": test["auc"],
        "test_acc": test["acc"],
    }
