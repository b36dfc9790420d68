"""Stage one, `medkd cache-teacher`: one teacher pass per image, heads when needed, an HDF5 cache.

One skeleton serves every teacher kind (`medkd.teachers.Teacher`): check the output, load the teacher
(before any data), load and hash the data, run the teacher over every image in resumable chunks, take
its logits or train heads on its features or patch tokens (`medkd.head`), say how good it is and refuse a
teacher near chance, write the cache.
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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medkd.backbones import build_teacher
from medkd.cache import (
    HEAD_ATTRS,
    TeacherCache,
    chance_metrics,
    data_split_attrs,
    dataset_attrs,
    is_medkd_cache,
    split_datasets,
    write_cache,
)
from medkd.config import CacheTeacherConfig, to_dict
from medkd.data import SPLITS, DeviceSplit, dataset_info, load_arrays, num_outputs
from medkd.errors import MedkdError
from medkd.head import HEAD_INPUTS, FittedHeads, Rows, fit_heads, fold_logits, head_record, predict
from medkd.mapped import release
from medkd.metrics import evaluate, scores_from_logits
from medkd.partial import (
    PartialOutputs,
    keep_tokens,
    open_tokens,
    partial_path,
    remove_kept_tokens,
    tokens_partial_path,
    views_partial_path,
)
from medkd.registry import is_run_teacher, teacher_spec
from medkd.run_teacher import load_run_teacher
from medkd.teacher_views import teacher_views, view_logits_fn, views_key
from medkd.teachers import Teacher, TeacherOutput, encode
from medkd.train import resolve_device
from medkd.views import augment_attr, draw_views

# A chunk is this many feature batches: a killed run loses at most one chunk of teacher passes.
FEATURE_CHUNK_BATCHES = 16
PROVENANCE = (  # the root attrs `inspect` shows, in this order
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
    "view_seconds",
)


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing cache (unless `force`), any other existing file or folder (even with `force`: it
    is not medkd's to replace) or an unwritable folder, before anything is loaded."""
    if path.exists() and not is_medkd_cache(path):
        kind = "a folder" if path.is_dir() else "not a medkd cache (no HDF5 root attr medkd_format)"
        raise MedkdError(
            f"{path} exists and is {kind}; cache-teacher replaces only its own caches, even with --force: "
            f"pass --out PATH for a new file (or move {path} away)"
        )
    if path.exists() and not force:
        raise MedkdError(f"{path} already exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedkdError(f"cannot create the output folder {path.parent} ({err.strerror})") from err
    if not os.access(path.parent, os.W_OK):
        raise MedkdError(f"output folder {path.parent} is not writable; pass --out PATH elsewhere")


def load_teacher(cfg: CacheTeacherConfig) -> Teacher:
    """The teacher `cfg.teacher` names: finished runs (`run:PATH`, comma list), or a backbone of timm,
    open_clip or transformers (a registry name or `timm:`/`open_clip:`/`hf:` id)."""
    if is_run_teacher(cfg.teacher):
        if cfg.weights is not None:
            raise MedkdError("--weights is for backbone teachers; a run: teacher uses the run's own best.pt")
        return load_run_teacher(cfg.teacher)
    torch.manual_seed(cfg.seed)
    spec = teacher_spec(cfg.teacher)
    if spec is not None and spec.source in ("open_clip", "hf"):
        from medkd import external  # the optional extras' teachers; external imports them lazily

        build = {"open_clip": external.build_open_clip_teacher, "hf": external.build_hf_teacher}[spec.source]
        return build(cfg.teacher, spec.model_id, cfg.weights, cfg.teacher_size, cfg.pool or spec.pool or None)
    return build_teacher(cfg.teacher, cfg.weights, cfg.teacher_size, cfg.pool)


def cache_teacher(cfg: CacheTeacherConfig, console: Console | None = None) -> Path:
    """Run the frozen teacher once over the dataset, take its logits or train heads, write the cache."""
    console = console or Console(stderr=True)
    out = cfg.out_path()
    check_output(out, cfg.force)  # before any data or model is loaded
    teacher = load_teacher(cfg)
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.dataset)
    task, label_names = info["task"], info["label"]
    arrays = load_arrays(cfg.dataset, cfg.size, cfg.data_dir, cfg.download, cfg.max_memory_gb, device.type)
    split_attrs = data_split_attrs(arrays)  # hashed once: the teacher's check, the partial key, the attrs
    shas = {split: split_attrs[split]["data_sha256"] for split in SPLITS}
    teacher.check_data(cfg.dataset, cfg.size, num_outputs(task, len(label_names)), shas)
    labels = {split: arrays[split][1] for split in SPLITS}

    start = time.perf_counter()
    partial, tokens = partial_path(out), tokens_partial_path(out)
    with_tokens = cfg.head == "attention"
    key = _partial_key(cfg, teacher, shas, device)
    with PartialOutputs(partial, key, tokens if with_tokens else None) as f:
        resumed = sum(f.done(split) for split in SPLITS)  # images a killed run already passed
        outputs = teacher_outputs(teacher, arrays, device, cfg, f, console)
        feature_seconds = time.perf_counter() - start
        start = time.perf_counter()
        logits, head, fitted = _logits_and_heads(cfg, teacher, outputs, f, arrays, task, device)
        head_seconds = time.perf_counter() - start
    quality = {split: _metrics(task, labels[split], logits[split]) for split in SPLITS}
    chance = {split: chance_metrics(task, labels[split])["acc"] for split in SPLITS}
    console.print(_quality_line(cfg, teacher, quality, chance, head, fitted), soft_wrap=True)
    check_quality(cfg, quality["val"]["auc"], out, [partial, tokens] if with_tokens else [partial])
    views, view_seconds = None, 0.0
    if cfg.has_views:  # after the gate: a teacher near chance is not run K more times
        start = time.perf_counter()
        views = _views(cfg, teacher, arrays["train"][0], fitted, key, device, out, console)
        view_seconds = time.perf_counter() - start
        console.print(_views_line(cfg, task, labels["train"], views["view_logits"], quality), soft_wrap=True)

    passed = sum(len(arrays[s][0]) for s in SPLITS) - resumed  # the speed is of this run's own pass
    attrs = {
        **dataset_attrs(cfg.dataset, cfg.size, task, label_names),
        "teacher": teacher.name,
        **teacher.provenance(),
        "cross_fit": cfg.cross_fit,
        "views": cfg.views if cfg.has_views else 1,
        "augment": augment_attr(cfg.augment),
        "feature_seconds": feature_seconds,
        "head_seconds": head_seconds,
        "view_seconds": view_seconds,
        "images_per_second": passed / max(feature_seconds, 1e-9),
        "config": to_dict(cfg),
    }
    kept = {split: outputs[split].features.numpy() for split in SPLITS} if cfg.features else None
    folds = fitted.folds if fitted is not None else None
    fold_heads = _fold_records(fitted) if folds is not None else None
    splits = split_datasets(logits, labels, kept, folds, views)
    write_cache(out, attrs=attrs, splits=splits, split_attrs=split_attrs, head=head, fold_heads=fold_heads)
    partial.unlink(missing_ok=True)  # the cache is complete: a rerun has nothing to resume
    views_partial_path(out).unlink(missing_ok=True)
    note = ""
    if with_tokens and cfg.keep_tokens:
        note = f", tokens kept in {keep_tokens(tokens, out)}"
    else:  # and tokens a replaced cache kept belong to it, not to this one
        tokens.unlink(missing_ok=True)
        remove_kept_tokens(out)
    speed = f"{attrs['images_per_second']:.0f} img/s" if passed else "all resumed from the partial file"
    console.print(
        f"features {feature_seconds:.1f} s ({speed}), head {head_seconds:.1f} s → {out}{note}",
        soft_wrap=True,
    )
    return out


def _views(
    cfg: CacheTeacherConfig,
    teacher: Teacher,
    images: np.ndarray,
    fitted: FittedHeads | None,
    key: str,
    device: torch.device,
    out: Path,
    console: Console,
) -> dict[str, np.ndarray]:
    """The view datasets of a multi-view cache: `cfg.views` views of every training image drawn from
    `cfg.augment` (seeded by `cfg.seed`), the teacher's logits on each and, unless --no-features, its
    features."""
    params = draw_views(cfg.augment, len(images), cfg.views, cfg.seed)  # (N, K, P)
    with PartialOutputs(views_partial_path(out), views_key(key, cfg.views, cfg.augment, fitted)) as f:
        if f.note:
            console.print(f"[yellow]{f.note}", soft_wrap=True)
        features, logits = teacher_views(
            teacher, images, params, view_logits_fn(fitted), device, cfg.feature_batch_size,
            FEATURE_CHUNK_BATCHES * cfg.feature_batch_size, f, console, cfg.quiet,
            with_tokens=cfg.head == "attention",
        )  # fmt: skip
    views = {"view_params": params.numpy(), "view_logits": logits}
    if cfg.features:
        views["view_features"] = features
    return views


def _views_line(
    cfg: CacheTeacherConfig,
    task: str,
    labels: np.ndarray,
    view_logits: np.ndarray,
    quality: dict[str, dict[str, float]],
) -> str:
    """The teacher's train AUC on its views (mean, min, max over the K) beside the plain view's."""
    aucs = [_metrics(task, labels, view_logits[:, k])["auc"] for k in range(view_logits.shape[1])]
    return (
        f"{cfg.views} {cfg.augment} views of each training image: teacher train AUC {np.mean(aucs):.3f} "
        f"(views {min(aucs):.3f}–{max(aucs):.3f}; plain view {quality['train']['auc']:.3f})"
    )


def _logits_and_heads(
    cfg: CacheTeacherConfig,
    teacher: Teacher,
    outputs: dict[str, TeacherOutput],
    f: PartialOutputs,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    task: str,
    device: torch.device,
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, FittedHeads | None]:
    """The logits (N, C) per split and the `/head` record: the teacher's own classifier, or heads trained
    on its features (linear) or on the patch tokens in the partial file (attention)."""
    labels = {split: arrays[split][1] for split in SPLITS}
    if outputs["train"].logits is not None:  # a teacher with a classifier of its own
        logits = {split: outputs[split].logits.numpy() for split in SPLITS}  # (N, C)
        head = teacher.head_record({s: _metrics(task, labels[s], logits[s]) for s in ("val", "test")})
        return logits, head, None
    inputs = {split: f.tokens[split] if f.tokens is not None else outputs[split].features for split in SPLITS}
    fitted = fit_heads(
        inputs, {s: DeviceSplit(*arrays[s], task, "cpu").targets for s in SPLITS}, labels, task,
        kind=cfg.head, cross_fit=cfg.cross_fit, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        milestones=cfg.milestones, seed=cfg.seed, n_labels=len(dataset_info(cfg.dataset)["label"]),
        device=device if cfg.head == "attention" else None,  # a linear head is fastest on one CPU core
    )  # fmt: skip
    if fitted.folds is None:
        return fitted.logits, _fold_records(fitted)[0], fitted
    return fitted.logits, {"kind": cfg.head, **fitted.summary}, fitted  # /head: attrs only, heads in /heads


def _fold_records(fitted: FittedHeads) -> list[dict[str, Any]]:
    """Each trained head's record for the cache: arrays, kind, HEAD_ATTRS (and its in-fold train metrics)."""
    extra = ("train_auc", "train_acc")  # cross-fitted heads only
    return [
        {**head_record(head), **{k: info[k] for k in (*HEAD_ATTRS, *extra) if k in info}}
        for head, info in fitted.heads
    ]


def _quality_line(
    cfg: CacheTeacherConfig,
    teacher: Teacher,
    quality: dict[str, dict[str, float]],
    chance: dict[str, float],
    head: dict[str, Any] | None,
    fitted: FittedHeads | None,
) -> str:
    """The teacher's val/test AUC and ACC beside chance (and its head's best epoch, the cross-fit gap)."""
    val, test = quality["val"], quality["test"]
    line = (
        f"[bold]{teacher.name}[/] on {cfg.dataset} ({cfg.size} px {teacher.summary()}): "
        f"val AUC {val['auc']:.3f} ACC {val['acc']:.3f}, test AUC {test['auc']:.3f} ACC {test['acc']:.3f} "
        f"(chance: AUC 0.5, ACC {chance['val']:.3f} val / {chance['test']:.3f} test)"
    )
    if fitted is not None:
        line += f"; {cfg.head} head, best epoch {head['best_epoch']}/{cfg.epochs}"
    if fitted is not None and fitted.folds is not None:
        line += (
            f"; {cfg.cross_fit}-fold cross-fit: train AUC {quality['train']['auc']:.3f} out-of-fold, "
            f"{fitted.summary['in_fold_train_auc']:.3f} in-fold"
        )
    return line


def check_quality(cfg: CacheTeacherConfig, val_auc: float, out: Path, kept: list[Path]) -> None:
    """Refuse to write a cache whose teacher is near chance: its soft labels would teach nothing.

    An undefined val AUC (one class in val) is not judged. The teacher's outputs stay, so a rerun with a
    lower threshold only retrains the head.
    """
    if cfg.min_teacher_auc > 0 and val_auc < cfg.min_teacher_auc:
        raise MedkdError(
            f"teacher val AUC {val_auc:.3f} is below --min-teacher-auc {cfg.min_teacher_auc:g} (chance: "
            f"0.5): {out} not written; pass --min-teacher-auc 0 to write it anyway (the teacher's outputs "
            f"stay in {', '.join(str(p) for p in kept)}, so that rerun only retrains the head)"
        )


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
    f: PartialOutputs,
    console: Console,
) -> dict[str, TeacherOutput]:
    """The teacher's features (N, D) and logits (N, C) or None per split, float32 on the CPU, written to
    the partial file `f` one chunk at a time (and, when `f` has a tokens file, the patch tokens there).

    Rerun with the same arguments after a kill, it starts after the last complete chunk (each chunk is
    `FEATURE_CHUNK_BATCHES` whole feature batches, so the outputs equal those of an uninterrupted run).
    """
    chunk = FEATURE_CHUNK_BATCHES * cfg.feature_batch_size
    total = sum(len(arrays[split][0]) for split in SPLITS)
    teacher = teacher.to_device(device)
    with_tokens = f.tokens is not None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    outputs = {}
    with Progress(*columns, console=console, disable=cfg.quiet) as progress:
        if f.note:
            console.print(f"[yellow]{f.note}", soft_wrap=True)
        done_before = sum(f.done(split) for split in SPLITS)
        if done_before:
            console.print(
                f"resuming the teacher's outputs from {f.path}: {done_before}/{total} done", soft_wrap=True
            )
        bar = progress.add_task(f"{teacher.name} features", total=total, completed=done_before)
        for split in SPLITS:
            images = arrays[split][0]
            for start in range(f.done(split), len(images), chunk):
                rows = images[start : start + chunk]  # a memory-mapped split: copied, as torch wants writable
                rows = np.array(rows) if isinstance(images, np.memmap) else rows
                block = torch.from_numpy(rows).to(device)  # (B, H, W[, 3]) uint8
                out = encode(teacher, block, cfg.feature_batch_size, with_tokens=with_tokens)
                logits = out.logits.numpy() if out.logits is not None else None
                tokens = out.tokens.numpy() if with_tokens else None  # (B, T, D_tok) float16
                f.write(split, len(images), start, out.features.numpy(), logits, tokens)
                progress.advance(bar, len(block))
                release(images)  # a memory-mapped split streams: the chunk's pages are let go
            outputs[split] = TeacherOutput(*f.read(split))
    return outputs


def _reproduced(cache: TeacherCache, inputs: dict[str, Rows], views: list[Rows] | None = None) -> float:
    """Max |stored head(inputs) - stored logits| over the splits (and each stored view's inputs against
    its view logits); train per fold when cross-fitted."""
    head, fold_heads, diffs = cache.head(), cache.fold_heads(), [0.0]

    def train_logits(rows: Rows) -> torch.Tensor:  # (N, C): out-of-fold when cross-fitted
        return fold_logits(fold_heads, cache.folds, rows) if fold_heads else predict(head, rows)

    for split in SPLITS:
        logits = train_logits(inputs[split]) if split == "train" else predict(head, inputs[split])
        diffs.append((logits - cache.logits[split]).abs().max().item())
    for k, rows in enumerate(views or []):
        logits = train_logits(rows)
        diffs.append((logits - cache.view_logits[:, k]).abs().max().item())
    return float(np.max(diffs))  # NaN-aware: Python's max(0.1, nan) is 0.1, np.max is nan


def _head_check(cache: TeacherCache) -> dict[str, Any]:
    """Does the stored head, applied to the stored (fp16) features or kept tokens, give the stored logits?"""
    result = {"status": "no head", "max_abs_diff": None, "tolerance": None, "note": ""}
    if cache.head_kind == "attention":
        kept = cache.kept_tokens()
        if kept is None:
            return {**result, "status": "tokens not kept", "note": "attention head (tokens not kept)"}
        with open_tokens(kept) as f:
            diff = _reproduced(cache, {split: Rows.of(f[split]) for split in SPLITS})
        # The logits were computed from these very fp16 tokens: only float32 rounding differs.
        scale = max(cache.logits[s].abs().max().item() for s in SPLITS)
        result.update(
            max_abs_diff=diff, tolerance=1e-3 * (1 + scale), note="attention head: checked on kept tokens"
        )
    elif cache.head_kind == "linear":
        if not cache.has_features:
            return {**result, "status": "no features"}
        features = {split: torch.from_numpy(cache.features(split)).float() for split in SPLITS}  # (N, D)
        views = torch.from_numpy(cache.view_features()).float() if cache.has_view_features else None
        view_rows = [Rows(v) for v in views.unbind(dim=1)] if views is not None else None  # K of (N, D)
        diff = _reproduced(cache, {split: Rows(features[split]) for split in SPLITS}, view_rows)
        if views is not None:
            features["views"] = views.flatten(0, 1)  # their |logit| bound too
        bad = [name for name, f in features.items() if not torch.isfinite(f).all()]
        heads = cache.fold_heads() or [cache.head()]
        weight = torch.stack([h.weight.abs() for h in heads]).amax(
            dim=0
        )  # (C, D), the largest |w| of any head
        # A bound on |logit| terms, from the finite features (NaN features are a mismatch, not a scale).
        scale = max((f.abs().nan_to_num(0.0, 0.0, 0.0) @ weight.T).max().item() for f in features.values())
        # fp16 keeps 11 significant bits (relative error ≤ 2^-11 ≈ 5e-4 per feature); 1e-2·scale is generous.
        note = f"checked on the plain view and the {cache.views} views" if views is not None else ""
        note = f"NaN or inf in features ({', '.join(bad)})" if bad else note
        result.update(max_abs_diff=diff, tolerance=1e-2 * scale + 1e-5, note=note)
    else:
        return result
    if np.isnan(result["max_abs_diff"]) and not result["note"].startswith("NaN"):
        result["note"] = f"NaN in the head's logits of the {HEAD_INPUTS[cache.head_kind]}"
    return {**result, "status": "ok" if result["max_abs_diff"] <= result["tolerance"] else "MISMATCH"}


def inspect_cache(path: str | os.PathLike, console: Console | None = None) -> dict[str, Any]:
    """Print a cache's provenance, shapes, teacher AUC/ACC per split beside chance, the cross-fit gap and
    the head check; return them."""
    console = console or Console()
    cache = TeacherCache(path)
    feature_shapes = cache.feature_shapes()
    splits = {
        split: {
            "n": cache.split_attrs[split]["n"],
            "logits_shape": tuple(cache.logits[split].shape),
            "features_shape": feature_shapes.get(split),
            **cache.teacher_metrics(split),
            "chance_acc": cache.chance_metrics(split)["acc"],
        }
        for split in SPLITS
    }
    head_check = _head_check(cache)
    views = {"views": cache.views, "augment": cache.attrs["augment"], "train": cache.view_metrics()}

    provenance = Table(title=f"teacher cache {escape(str(cache.path))}", show_header=False)
    for key in ("medkd_format", *PROVENANCE, "cross_fit", "views", "augment"):
        if key in cache.attrs:
            value = cache.attrs[key]
            provenance.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    if cache.head_attrs:
        items = cache.head_attrs.items()
        provenance.add_row(
            "head", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)
        )
    console.print(provenance)
    table = Table(title="splits", caption="chance: AUC 0.5; ACC of always predicting the majority class")
    for column in ("split", "n", "logits", "features", "teacher AUC", "teacher ACC", "chance ACC"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, s in splits.items():
        table.add_row(
            split,
            str(s["n"]),
            str(s["logits_shape"]),
            str(s["features_shape"] or "-"),
            f"{s['auc']:.4f}",
            f"{s['acc']:.4f}",
            f"{s['chance_acc']:.4f}",
        )
    console.print(table)
    if cache.cross_fit >= 2:
        console.print(
            f"{cache.cross_fit}-fold cross-fit: train AUC {splits['train']['auc']:.4f} out-of-fold (the "
            f"cached logits), {cache.head_attrs.get('in_fold_train_auc', float('nan')):.4f} in-fold; val "
            f"{splits['val']['auc']:.4f}, test {splits['test']['auc']:.4f} (mean of the fold heads)"
        )
    if cache.views:
        aucs = [m["auc"] for m in views["train"]]
        console.print(
            f"{cache.views} {cache.augment} views of each training image, teacher train AUC per view: "
            f"{', '.join(f'{a:.4f}' for a in aucs)} (mean {np.mean(aucs):.4f}; plain view "
            f"{splits['train']['auc']:.4f})",
            soft_wrap=True,
        )
    what = HEAD_INPUTS.get(cache.head_kind, "features")
    note = f"{head_check['note']}; " if head_check["note"] else ""
    if head_check["max_abs_diff"] is None:
        console.print(f"head({what}) = logits: {head_check['note'] or head_check['status']}")
    else:
        colour = "green" if head_check["status"] == "ok" else "red"
        console.print(
            f"head({what}) = logits: [{colour}]{head_check['status']}[/] ({note}max abs diff "
            f"{head_check['max_abs_diff']:.2e}, tolerance {head_check['tolerance']:.2e})"
        )
    return {
        "path": str(cache.path),
        "attrs": cache.attrs,
        "head": cache.head_attrs,
        "splits": splits,
        "head_check": head_check,
        "views": views,
    }
