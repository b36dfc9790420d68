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
    EPOCH_CHECKPOINT,
    PREDICTIONS,
    RESULT,
    atomic_path,
    config_hash,
    prepare_run_dir,
    read_result,
    versions,
    write_json,
)
from medkd.students import build_student
from medkd.train import LoopState, NonFiniteLossError, evaluate_model, resolve_device, train_epochs

# The epoch checkpoint is written after epoch 1 and then at most this often: a ResNet50 with its Adam
# state is ~300 MB, which on a GPU can take longer than a small dataset's epoch.
EPOCH_CHECKPOINT_SECONDS = 60.0


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
    if cache and cfg.dataset and cfg.size != size:
        raise MedkdError(
            f"--size {cfg.size} does not match the cache {cfg.cache}, built from {dataset} at {size} px; "
            f"pass --size {size} or a cache of {cfg.size} px"
        )
    info = dataset_info(dataset)
    task = info["task"]
    arrays = load_arrays(dataset, size, cfg.data_dir, cfg.download)
    if cache:
        cache.check_data(dataset, size, arrays)  # hashes every split: the cache's hashes are now the data's
        data_shas = {s: cache.split_attrs[s]["data_sha256"] for s in SPLITS}
    else:
        data_shas = {s: data_sha256(*arrays[s]) for s in SPLITS}
    n_out = num_outputs(task, len(info["label"]))
    if cache and cache.logits["train"].shape[1] != n_out:
        raise MedkdError(
            f"cache {cfg.cache} has {cache.logits['train'].shape[1]} logits per image; "
            f"{dataset} needs {n_out}"
        )
    teacher = cache.attrs["teacher"] if cache else None
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / run_name(cfg, dataset, size, teacher)
    config = to_dict(cfg)
    chash = config_hash(config, cache.fingerprint if cache else None)
    if cfg.resume and (run_dir / RESULT).exists():
        done = read_result(run_dir)
        if done.get("config_hash") == chash:
            console.print(f"{run_dir} already holds this finished run; nothing to resume", soft_wrap=True)
            return done

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student_size = cfg.student_size or size
    model = build_student(cfg.student, n_out, student_size, cfg.student_weights).to(device)
    loop = LoopState.create(model, cfg.lr, cfg.epochs, cfg.milestones, cfg.seed)
    history, best_auc, best_epoch, best_state, stale = [], None, 0, None, 0
    checkpoint = _read_epoch_checkpoint(run_dir, chash) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        console.print(f"no epoch checkpoint in {run_dir}: starting at epoch 1", soft_wrap=True)
    prepare_run_dir(run_dir, cfg.force)  # last check before work: nothing is written on bad input
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        loop.load_state_dict(checkpoint["loop"])
        history, best_auc, best_epoch, stale = (
            checkpoint[k] for k in ("history", "best_auc", "best_epoch", "stale")
        )
        # best.pt is written before last.pt in the same epoch: it holds best_epoch's weights, or those of
        # a later epoch that this run repeats (exactly) and so will write again.
        best_state = _read_best(run_dir) if best_epoch else None
        console.print(f"resuming {run_dir} after epoch {loop.epoch} of {cfg.epochs}", soft_wrap=True)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    view = View(student_size, interpolation=cfg.interpolation, channels_last=channels_last)
    splits = {s: DeviceSplit(*arrays[s], task, device) for s in SPLITS}
    teacher_logits = cache.logits["train"].to(device) if cache and cfg.alpha < 1.0 else None

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
        bar = progress.add_task(
            "train", total=cfg.epochs * steps_per_epoch, completed=loop.epoch * steps_per_epoch, info=""
        )
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
            state=loop,
            on_step=lambda *_: progress.advance(bar),
        )
        saved_epoch, saved_at = loop.epoch, time.monotonic()
        try:
            for stats in epochs:
                history.append(vars(stats))
                line = (
                    f"epoch {stats.epoch} loss {stats.loss:.4f} val AUC {stats.val_auc:.3f} "
                    f"{stats.images_per_second:.0f} img/s"
                )
                progress.update(bar, info=line)
                if not cfg.quiet and not console.is_terminal:
                    # A log file (nohup, Slurm) never sees a live bar: one line per epoch instead.
                    console.print(f"{run_dir.name}: {line}", highlight=False)
                if _is_better(stats.val_auc, best_auc):
                    best_auc, best_epoch, stale = stats.val_auc, stats.epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                    with atomic_path(run_dir / CHECKPOINT) as tmp:
                        torch.save({"model": best_state, "epoch": stats.epoch, "config": config}, tmp)
                else:
                    stale += 1
                stopped = cfg.patience is not None and stale >= cfg.patience
                due = time.monotonic() - saved_at >= EPOCH_CHECKPOINT_SECONDS or saved_epoch == 0
                if due and stats.epoch < cfg.epochs and not stopped:
                    checkpoint = {
                        "model": model.state_dict(),
                        "loop": loop.state_dict(),
                        "history": history,
                        "best_auc": best_auc,
                        "best_epoch": best_epoch,
                        "stale": stale,
                        "config_hash": chash,
                        "config": config,
                    }
                    with atomic_path(run_dir / EPOCH_CHECKPOINT) as tmp:
                        torch.save(checkpoint, tmp)
                    saved_epoch, saved_at = stats.epoch, time.monotonic()
                if stopped:
                    console.print(
                        f"early stop after epoch {stats.epoch}: no better val AUC for {cfg.patience} epochs"
                    )
                    break
        except NonFiniteLossError as err:
            kept = (
                f"{run_dir / EPOCH_CHECKPOINT} keeps epoch {saved_epoch}, {CHECKPOINT} the best (epoch "
                f"{best_epoch})"
                if saved_epoch
                else "no epoch had finished, so no checkpoint was written"
            )
            raise MedkdError(f"{err}; stopped: {kept}") from err

    model.load_state_dict(best_state)
    val_metrics, _ = evaluate_model(model, splits["val"], view)
    test_metrics, test_scores = evaluate_model(model, splits["test"], view)
    with atomic_path(run_dir / PREDICTIONS) as tmp, open(tmp, "wb") as f:
        np.savez(f, y_true=arrays["test"][1], y_score=test_scores, task=np.array(task))
    train_seconds = sum(h["seconds"] for h in history)
    result = {
        "medkd_result": 1,
        "run_dir": str(run_dir),
        "config": config,
        "config_hash": chash,
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
        "data_sha256": data_shas,
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
    (run_dir / EPOCH_CHECKPOINT).unlink(missing_ok=True)  # only an unfinished run needs it
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
        "fingerprint": cache.fingerprint,
        "test_auc": test["auc"],
        "test_acc": test["acc"],
    }


def _read_epoch_checkpoint(run_dir: Path, chash: str) -> dict[str, Any] | None:
    """The run folder's epoch checkpoint if it has one, checked to come from this very config."""
    path = run_dir / EPOCH_CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean the same here
        raise MedkdError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); drop --resume to start over"
        ) from err
    if checkpoint.get("config_hash") != chash:
        raise MedkdError(
            f"{path} is a checkpoint of another config (hash {checkpoint.get('config_hash')}, this run "
            f"{chash}); resume with the same options and cache, or drop --resume to start over"
        )
    return checkpoint


def _read_best(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / CHECKPOINT
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["model"]
    except FileNotFoundError as err:
        raise MedkdError(f"{path} is missing, so the run cannot resume; drop --resume to start over") from err
