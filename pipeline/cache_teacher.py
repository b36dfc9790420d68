"""Stage one, `medkd cache-teacher`: one frozen-backbone pass per image, a linear head, an HDF5 cache.

Also `inspect_cache` (`medkd inspect`): what a cache holds and whether its head reproduces its logits.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medkd.cache import HEAD_ATTRS, TeacherCache, data_split_attrs, dataset_attrs, split_datasets, write_cache
from medkd.config import CacheTeacherConfig, to_dict
from medkd.data import SPLITS, DeviceSplit, dataset_info, load_arrays
from medkd.errors import MedkdError
from medkd.head import train_head
from medkd.teachers import build_teacher, extract_features
from medkd.train import resolve_device

# A feature chunk is this many feature batches: a killed run loses at most one chunk of teacher passes.
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


def _check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise MedkdError(f"{path} already exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedkdError(f"cannot create the output folder {path.parent} ({err.strerror})") from err
    if not os.access(path.parent, os.W_OK):
        raise MedkdError(f"output folder {path.parent} is not writable; pass --out PATH elsewhere")


def partial_features_path(out: Path) -> Path:
    """The temporary file the feature pass writes chunk by chunk, beside the cache it is for."""
    return out.parent / f".{out.name}.features.partial"


def _feature_key(
    cfg: CacheTeacherConfig, teacher: Any, split_attrs: dict[str, dict[str, Any]], device: torch.device
) -> str:
    # Everything the features depend on: a partial file with another key is not resumed but redone.
    # The seed counts because it sets a random-init teacher's weights; the device type because bf16
    # autocast on CUDA gives other bits than the CPU's float32; the batch size because chunks are whole
    # batches of it.
    return json.dumps(
        {
            "dataset": cfg.dataset,
            "size": cfg.size,
            "teacher": cfg.teacher,
            "backbone": teacher.backbone_id,
            "weights_sha256": teacher.weights_sha256,
            "teacher_input_size": teacher.img_size,
            "pool": teacher.pool,
            "seed": cfg.seed,
            "feature_batch_size": cfg.feature_batch_size,
            "device": device.type,
            "data_sha256": {split: split_attrs[split]["data_sha256"] for split in SPLITS},
        },
        sort_keys=True,
    )


def _open_partial(path: Path, key: str, console: Console) -> h5py.File:
    """The partial feature file for `key`: the one on disk if it is for the same run, else a fresh one."""
    if path.exists():
        try:
            f = h5py.File(path, "a")
        except OSError as err:
            if "lock" in str(err):
                raise MedkdError(
                    f"{path} is locked: another cache-teacher with the same --out is running; wait for it "
                    f"or pass another --out"
                ) from err
            console.print(
                f"[yellow]{path} is damaged ({type(err).__name__}); computing features anew", soft_wrap=True
            )
        else:
            if f.attrs.get("key") == key:
                return f
            f.close()
            console.print(f"{path} was made with other arguments; computing features anew", soft_wrap=True)
        path.unlink()
    f = h5py.File(path, "w")
    f.attrs["key"] = key
    return f


def extract_features_resumable(
    teacher: Any,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    task: str,
    device: torch.device,
    cfg: CacheTeacherConfig,
    partial: Path,
    console: Console,
    split_attrs: dict[str, dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """Features (N, D) float32 on the CPU per split, written to `partial` one chunk at a time.

    Rerun with the same arguments after a kill, it starts after the last complete chunk (each chunk is
    `FEATURE_CHUNK_BATCHES` whole feature batches, so the features equal those of an uninterrupted run).
    """
    chunk = FEATURE_CHUNK_BATCHES * cfg.feature_batch_size
    total = sum(len(arrays[split][0]) for split in SPLITS)
    features = {}
    with (
        _open_partial(partial, _feature_key(cfg, teacher, split_attrs, device), console) as f,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=cfg.quiet,
        ) as progress,
    ):
        done_before = sum(int(f[split].attrs["done"]) for split in SPLITS if split in f)
        if done_before:
            console.print(
                f"resuming the teacher's features from {partial}: {done_before}/{total} done", soft_wrap=True
            )
        bar = progress.add_task(f"{cfg.teacher} features", total=total, completed=done_before)
        for split in SPLITS:
            images, split_labels = arrays[split]
            n = len(images)
            done = int(f[split].attrs["done"]) if split in f else 0
            for start in range(done, n, chunk):
                stop = min(start + chunk, n)
                data = DeviceSplit(images[start:stop], split_labels[start:stop], task, device)
                block = extract_features(teacher, data, cfg.feature_batch_size, console, quiet=True)  # (B, D)
                if split not in f:
                    f.create_dataset(split, shape=(n, block.shape[1]), dtype=np.float32)
                f[split][start:stop] = block.numpy()
                # Rows first, then the count, then flush: a kill at any point leaves `done` <= rows written.
                f[split].attrs["done"] = stop
                f.flush()
                progress.advance(bar, stop - start)
            features[split] = torch.from_numpy(f[split][()])
    return features


def cache_teacher(cfg: CacheTeacherConfig, console: Console | None = None) -> Path:
    """Run the frozen teacher once over the dataset, train its head on the features, write the cache."""
    from medkd.run_teacher import cache_run_teacher, is_run_teacher

    if is_run_teacher(cfg.teacher):  # finished medkd runs: their own classifiers, no backbone, no head
        return cache_run_teacher(cfg, console)
    console = console or Console(stderr=True)
    out = cfg.out_path()
    _check_output(out, cfg.force)  # before any data or model is loaded
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    info = dataset_info(cfg.dataset)
    task, label_names = info["task"], info["label"]
    arrays = load_arrays(cfg.dataset, cfg.size, cfg.data_dir, cfg.download)
    split_attrs = data_split_attrs(arrays)  # hashed once: the partial file's key and the cache's attrs
    teacher = build_teacher(cfg.teacher, cfg.weights, cfg.teacher_size, cfg.pool)

    start = time.perf_counter()
    partial = partial_features_path(out)
    features = extract_features_resumable(  # (N, D)
        teacher, arrays, task, device, cfg, partial, console, split_attrs
    )
    labels = {split: arrays[split][1] for split in SPLITS}
    targets = {split: DeviceSplit(*arrays[split], task, "cpu").targets for split in SPLITS}
    feature_seconds = time.perf_counter() - start
    n_images = sum(len(f) for f in features.values())

    start = time.perf_counter()
    head, head_info = train_head(
        features,
        targets,
        labels,
        task,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        milestones=cfg.milestones,
        seed=cfg.seed,
        n_labels=len(label_names),
    )
    head_seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = {split: head(features[split]).float().numpy() for split in SPLITS}  # (N, C) float32

    attrs = {
        **dataset_attrs(cfg.dataset, cfg.size, task, label_names),
        "teacher": cfg.teacher,
        "backbone": teacher.backbone_id,
        "weights_sha256": teacher.weights_sha256,
        "teacher_input_size": teacher.img_size,
        "resize": "bicubic",
        "mean": list(teacher.mean),
        "std": list(teacher.std),
        "pool": teacher.pool,
        "random_init": teacher.is_random_init,
        "feature_seconds": feature_seconds,
        "head_seconds": head_seconds,
        "images_per_second": n_images / max(feature_seconds, 1e-9),
        "config": to_dict(cfg),
    }
    kept = {split: features[split].numpy() for split in SPLITS} if cfg.features else None
    splits = split_datasets(logits, labels, kept)
    head_record = {
        "weight": head.weight.detach().cpu().numpy(),
        "bias": head.bias.detach().cpu().numpy(),
        **{k: head_info[k] for k in HEAD_ATTRS},
    }
    write_cache(out, attrs=attrs, splits=splits, split_attrs=split_attrs, head=head_record)
    partial.unlink(missing_ok=True)  # the cache is complete: a rerun has nothing to resume

    note = " [yellow](random-init teacher: a test, not a real teacher)[/]" if teacher.is_random_init else ""
    console.print(
        f"[bold]{cfg.teacher}[/] on {cfg.dataset} ({cfg.size} px → {teacher.img_size} px){note}: "
        f"val AUC {head_info['val_auc']:.3f} ACC {head_info['val_acc']:.3f}, "
        f"test AUC {head_info['test_auc']:.3f} ACC {head_info['test_acc']:.3f} "
        f"(best epoch {head_info['best_epoch']}/{cfg.epochs}); features {feature_seconds:.1f} s "
        f"({attrs['images_per_second']:.0f} img/s), head {head_seconds:.1f} s → {out}"
    )
    return out


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
    feature_shapes = {}
    if cache.has_features:
        import h5py

        with h5py.File(cache.path, "r", locking=False) as f:
            feature_shapes = {split: tuple(f[split]["features"].shape) for split in SPLITS}
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
