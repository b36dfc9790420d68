"""Stage one, `medkd cache-teacher`: one teacher pass per image, a linear head when needed, an HDF5 cache.

One skeleton serves every teacher kind (`medkd.teachers.Teacher`): check the output, load the teacher
(before any data), load and hash the data, run the teacher over every image in resumable chunks, take
its logits or train a linear head on its features, write the cache, say what it got.
Also `inspect_cache` (`medkd inspect`): what a cache holds and whether its head reproduces its logits.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medkd.backbones import build_teacher
from medkd.cache import (
    HEAD_ATTRS,
    PartialOutputs,
    TeacherCache,
    data_split_attrs,
    dataset_attrs,
    partial_path,
    split_datasets,
    write_cache,
)
from medkd.config import CacheTeacherConfig, to_dict
from medkd.data import SPLITS, DeviceSplit, dataset_info, load_arrays, num_outputs
from medkd.errors import MedkdError
from medkd.head import train_head
from medkd.metrics import evaluate, scores_from_logits
from medkd.registry import is_run_teacher
from medkd.run_teacher import load_run_teacher
from medkd.teachers import Teacher, TeacherOutput, encode
from medkd.train import resolve_device

# A chunk is this many feature batches: a killed run loses at most one chunk of teacher passes.
FEATURE_CHUNK_BATCHES = 16
PROVENANCE = (
    "dataset",
    "image_size",
    "task",
    "n_classes",
    "teacher",
    "backbone",
    "pool",
    "random_init",
    "weights_sha256",
    "teacher_input_size",
    "resize",
    "mean",
    "std",
    "medkd_version",
    "torch_version",
    "created_utc",
    "images_per_second",
    "feature_seconds",
    "head_seconds",
)


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing cache (unless `force`) or an unwritable folder, before anything is loaded."""
    if path.exists() and not force:
        raise MedkdError(f"{path} already exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedkdError(f"cannot create the output folder {path.parent} ({err.strerror})") from err
    if not os.access(path.parent, os.W_OK):
        raise MedkdError(f"output folder {path.parent} is not writable; pass --out PATH elsewhere")


def load_teacher(cfg: CacheTeacherConfig) -> Teacher:
    """The teacher `cfg.teacher` names: finished runs (`run:PATH`, comma list) or a registry backbone."""
    if is_run_teacher(cfg.teacher):
        if cfg.weights is not None:
            raise MedkdError("--weights is for backbone teachers; a run: teacher uses the run's own best.pt")
        return load_run_teacher(cfg.teacher)
    torch.manual_seed(cfg.seed)
    return build_teacher(cfg.teacher, cfg.weights, cfg.teacher_size, cfg.pool)


def cache_teacher(cfg: CacheTeacherConfig, console: Console | None = None) -> Path:
    """Run the frozen teacher once over the dataset, take its logits or train a head, write the cache."""
    console = console or Console(stderr=True)
    out = cfg.out_path()
    check_output(out, cfg.force)  # before any data or model is loaded
    teacher = load_teacher(cfg)
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.dataset)
    task, label_names = info["task"], info["label"]
    arrays = load_arrays(cfg.dataset, cfg.size, cfg.data_dir, cfg.download)
    split_attrs = data_split_attrs(arrays)  # hashed once: the teacher's check, the partial key, the attrs
    shas = {split: split_attrs[split]["data_sha256"] for split in SPLITS}
    teacher.check_data(cfg.dataset, cfg.size, num_outputs(task, len(label_names)), shas)

    start = time.perf_counter()
    partial = partial_path(out)
    outputs = teacher_outputs(
        teacher, arrays, device, cfg, partial, console, _partial_key(cfg, teacher, shas, device)
    )
    feature_seconds = time.perf_counter() - start
    features = {split: outputs[split].features for split in SPLITS}  # (N, D)
    labels = {split: arrays[split][1] for split in SPLITS}

    start = time.perf_counter()
    has_logits = outputs["train"].logits is not None  # a teacher with a classifier of its own
    if has_logits:
        logits = {split: outputs[split].logits.numpy() for split in SPLITS}  # (N, C)
        head = teacher.head_record({s: _metrics(task, labels[s], logits[s]) for s in ("val", "test")})
    else:
        logits, head = fit_head(cfg, task, len(label_names), features, arrays)
    head_seconds = time.perf_counter() - start
    n_images = sum(len(f) for f in features.values())
    attrs = {
        **dataset_attrs(cfg.dataset, cfg.size, task, label_names),
        "teacher": teacher.name,
        **teacher.provenance(),
        "feature_seconds": feature_seconds,
        "head_seconds": head_seconds,
        "images_per_second": n_images / max(feature_seconds, 1e-9),
        "config": to_dict(cfg),
    }
    kept = {split: features[split].numpy() for split in SPLITS} if cfg.features else None
    write_cache(
        out, attrs=attrs, splits=split_datasets(logits, labels, kept), split_attrs=split_attrs, head=head
    )
    partial.unlink(missing_ok=True)  # the cache is complete: a rerun has nothing to resume
    best = "" if has_logits else f" (best epoch {head['best_epoch']}/{cfg.epochs})"
    console.print(
        f"[bold]{teacher.name}[/] on {cfg.dataset} ({cfg.size} px {teacher.summary()}): "
        f"val AUC {head['val_auc']:.3f} ACC {head['val_acc']:.3f}, test AUC {head['test_auc']:.3f} "
        f"ACC {head['test_acc']:.3f}{best}; features {feature_seconds:.1f} s "
        f"({attrs['images_per_second']:.0f} img/s), head {head_seconds:.1f} s → {out}"
    )
    return out


def _metrics(task: str, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    return evaluate(task, labels, scores_from_logits(task, torch.from_numpy(logits)).numpy())


def _partial_key(
    cfg: CacheTeacherConfig, teacher: Teacher, shas: dict[str, str], device: torch.device
) -> str:
    # Everything the outputs depend on: a partial file with another key is not resumed but redone.
    # The seed counts because it sets a random-init teacher's weights; the device type because bf16
    # autocast on CUDA gives other bits than the CPU's float32; the batch size because chunks are whole
    # batches of it.
    return json.dumps(
        {
            "dataset": cfg.dataset,
            "size": cfg.size,
            "teacher": cfg.teacher,
            **teacher.provenance(),
            "seed": cfg.seed,
            "feature_batch_size": cfg.feature_batch_size,
            "device": device.type,
            "data_sha256": shas,
        },
        sort_keys=True,
    )


def teacher_outputs(
    teacher: Teacher,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    device: torch.device,
    cfg: CacheTeacherConfig,
    partial: Path,
    console: Console,
    key: str,
) -> dict[str, TeacherOutput]:
    """The teacher's features (N, D) and logits (N, C) or None per split, float32 on the CPU, written to
    `partial` one chunk at a time.

    Rerun with the same arguments after a kill, it starts after the last complete chunk (each chunk is
    `FEATURE_CHUNK_BATCHES` whole feature batches, so the outputs equal those of an uninterrupted run).
    """
    chunk = FEATURE_CHUNK_BATCHES * cfg.feature_batch_size
    total = sum(len(arrays[split][0]) for split in SPLITS)
    teacher = teacher.to_device(device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    outputs = {}
    with (
        PartialOutputs(partial, key) as f,
        Progress(*columns, console=console, disable=cfg.quiet) as progress,
    ):
        if f.note:
            console.print(f"[yellow]{f.note}", soft_wrap=True)
        done_before = sum(f.done(split) for split in SPLITS)
        if done_before:
            console.print(
                f"resuming the teacher's features from {partial}: {done_before}/{total} done", soft_wrap=True
            )
        bar = progress.add_task(f"{teacher.name} features", total=total, completed=done_before)
        for split in SPLITS:
            images = arrays[split][0]
            for start in range(f.done(split), len(images), chunk):
                block = torch.from_numpy(images[start : start + chunk]).to(device)  # (B, H, W[, 3]) uint8
                out = encode(teacher, block, cfg.feature_batch_size)
                logits = out.logits.numpy() if out.logits is not None else None
                f.write(split, len(images), start, out.features.numpy(), logits)
                progress.advance(bar, len(block))
            outputs[split] = TeacherOutput(*f.read(split))
    return outputs


def fit_head(
    cfg: CacheTeacherConfig,
    task: str,
    n_labels: int,
    features: dict[str, torch.Tensor],
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the linear head on the features; its logits per split and its record for the cache."""
    labels = {split: arrays[split][1] for split in SPLITS}
    targets = {split: DeviceSplit(*arrays[split], task, "cpu").targets for split in SPLITS}
    head, info = train_head(
        features, targets, labels, task, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        milestones=cfg.milestones, seed=cfg.seed, n_labels=n_labels,
    )  # fmt: skip
    with torch.no_grad():
        logits = {split: head(features[split]).float().numpy() for split in SPLITS}  # (N, C) float32
    record = {
        "weight": head.weight.detach().cpu().numpy(),
        "bias": head.bias.detach().cpu().numpy(),
        **{k: info[k] for k in HEAD_ATTRS},
    }
    return logits, record


def _head_check(cache: TeacherCache) -> dict[str, Any]:
    """Does the stored head applied to the stored (fp16) features give the stored logits?"""
    head = cache.head()
    if head is None:
        return {"status": "no head", "max_abs_diff": None, "tolerance": None}
    if not cache.has_features:
        return {"status": "no features", "max_abs_diff": None, "tolerance": None}
    diff, scale = 0.0, 0.0
    weight = cache.head_weight.abs().float()  # (C, D)
    for split in SPLITS:
        feats = torch.from_numpy(cache.features(split)).float()  # (N, D)
        with torch.no_grad():
            diff = max(diff, (head(feats) - cache.logits[split]).abs().max().item())
        scale = max(scale, (feats.abs() @ weight.T).max().item())  # bound on |logit| terms
    # fp16 keeps 11 significant bits (relative error ≤ 2^-11 ≈ 5e-4 per feature); 1e-2·scale is generous.
    tolerance = 1e-2 * scale + 1e-5
    return {"status": "ok" if diff <= tolerance else "MISMATCH", "max_abs_diff": diff, "tolerance": tolerance}


def inspect_cache(path: str | os.PathLike, console: Console | None = None) -> dict[str, Any]:
    """Print a cache's provenance, shapes, teacher AUC/ACC per split and the head check; return them."""
    console = console or Console()
    cache = TeacherCache(path)
    feature_shapes = cache.feature_shapes()
    splits = {
        split: {
            "n": cache.split_attrs[split]["n"],
            "logits_shape": tuple(cache.logits[split].shape),
            "features_shape": feature_shapes.get(split),
            **cache.teacher_metrics(split),
        }
        for split in SPLITS
    }
    head_check = _head_check(cache)

    provenance = Table(title=f"teacher cache {cache.path}", show_header=False)
    for key in ("medkd_format", *PROVENANCE):
        if key in cache.attrs:
            value = cache.attrs[key]
            provenance.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if cache.head_attrs:
        items = cache.head_attrs.items()
        provenance.add_row(
            "head", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)
        )
    console.print(provenance)
    table = Table(title="splits")
    for column in ("split", "n", "logits", "features", "teacher AUC", "teacher ACC"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, s in splits.items():
        table.add_row(
            split,
            str(s["n"]),
            str(s["logits_shape"]),
            str(s["features_shape"] or "-"),
            f"{s['auc']:.4f}",
            f"{s['acc']:.4f}",
        )
    console.print(table)
    if head_check["max_abs_diff"] is None:
        console.print(f"head(features) = logits: {head_check['status']}")
    else:
        colour = "green" if head_check["status"] == "ok" else "red"
        console.print(
            f"head(features) = logits: [{colour}]{head_check['status']}[/] (max abs diff "
            f"{head_check['max_abs_diff']:.2e}, tolerance {head_check['tolerance']:.2e})"
        )
    return {
        "path": str(cache.path),
        "attrs": cache.attrs,
        "head": cache.head_attrs,
        "splits": splits,
        "head_check": head_check,
    }
