"""Stage two: a student run from the cached teacher logits (or the supervised baseline at alpha=1).

The teacher is never built here: its logits are an in-memory tensor indexed by the batch's dataset indices.
`distill` reads top to bottom: inputs → model → resume → loop → finish.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from medkd.cache import TeacherCache
from medkd.config import DistillConfig, path_safe, short_number, to_dict
from medkd.data import SPLITS, DeviceSplit, View, data_sha256, dataset_info, load_arrays, num_outputs
from medkd.errors import MedkdError
from medkd.metrics import BestEpoch
from medkd.runs import (
    CHECKPOINT,
    EPOCH_CHECKPOINT,
    RESULT,
    RunResult,
    config_hash,
    legacy_config_hash,
    load_checkpoint,
    prepare_run_dir,
    read_result,
    same_experiment,
    save_checkpoint,
    versions,
    write_predictions,
    write_result,
)
from medkd.students import FeatureTap, build_student
from medkd.train import (
    Augmentation,
    FeatureDistillation,
    LoopState,
    NonFiniteLossError,
    evaluate_model,
    resolve_device,
    train_epochs,
)

# The epoch checkpoint is written after epoch 1 and then at most this often: a ResNet50 with its Adam
# state is ~300 MB, which on a GPU can take longer than a small dataset's epoch.
EPOCH_CHECKPOINT_SECONDS = 60.0


@dataclass
class Inputs:
    """What a run learns from: the data (checked against the cache) and the cache, if any."""

    dataset: str
    size: int
    task: str
    n_outputs: int
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    data_sha256: dict[str, str]
    cache: TeacherCache | None


@dataclass
class Sources:
    """What the student learns from beside the labels, on the CPU: the teacher's logits (N, C) or, for
    stored views, (N, K, C); its features likewise (only with --feature-weight); how images are varied."""

    logits: torch.Tensor | None
    features: torch.Tensor | None
    augmentation: Augmentation | None

    @property
    def views(self) -> int | None:
        """K, the stored views used; None: the plain view, or views drawn on the fly."""
        aug = self.augmentation
        return aug.params.shape[1] if aug is not None and aug.params is not None else None

    def describe(self) -> dict[str, Any] | None:
        """result.json's `augment`: the preset and the stored views used (None: drawn on the fly)."""
        if self.augmentation is None:
            return None
        return {"preset": self.augmentation.preset, "views": self.views}

    def augmentation_on(self, device: torch.device) -> Augmentation | None:
        """The augmentation with its stored views' parameters on the training device."""
        aug = self.augmentation
        if aug is None or aug.params is None:
            return aug
        return Augmentation(aug.preset, aug.params.to(device))

    def feature_distillation(
        self, weight: float, model: nn.Module, device: torch.device
    ) -> FeatureDistillation | None:
        """The feature term for `model` (a fresh projector to the teacher's width), or None without one."""
        if self.features is None:
            return None
        tap = FeatureTap(model)
        projector = nn.Linear(tap.dim, self.features.shape[-1]).to(device)
        return FeatureDistillation(weight, projector, tap, self.features.to(device))

    def label(self) -> str:
        """The run-name part: `medmnist-v8` (stored views), `medmnist` (on the fly), or "" (plain)."""
        if self.augmentation is None:
            return ""
        return self.augmentation.preset + (f"-v{self.views}" if self.views else "")


@dataclass
class RunSoFar:
    """The run so far: its history and best epoch (with that epoch's weights); an epoch checkpoint's core."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)
    best_state: dict[str, torch.Tensor] | None = None


def run_name(cfg: DistillConfig, dataset: str, size: int, teacher: str | None, views: str = "") -> str:
    """A readable default folder name: `breastmnist_28_resnet50-28_dinov2_vitb14_a0.2_t2_s0`, with
    `_medmnist-v8` for views and `_fw1` for a feature term."""
    student_size = cfg.student_size or size
    source = "baseline" if (cfg.alpha == 1.0 and not cfg.feature_weight) or teacher is None else teacher
    knobs = f"a{short_number(cfg.alpha)}_t{short_number(cfg.temperature)}_s{cfg.seed}"
    knobs += f"_{views}" if views else ""
    knobs += f"_fw{short_number(cfg.feature_weight)}" if cfg.feature_weight else ""
    return f"{dataset}_{size}_{path_safe(cfg.student)}-{student_size}_{source}_{knobs}"


def training_sources(cfg: DistillConfig, cache: TeacherCache | None) -> Sources:
    """The teacher logits, features and augmentation of a run, checked against the cache.

    A multi-view cache's stored views are what the run trains on (the first `--views` of them; 0: the
    plain view). Augmentation without stored views is drawn on the fly, and only for a run that uses no
    teacher output: the plain view's logits are not the teacher's on an augmented image.
    """
    kd, fkd = cfg.alpha < 1.0, cfg.feature_weight > 0
    if cache is not None and cache.views and cfg.views != 0:
        k = cfg.views or cache.views
        if k > cache.views:
            raise MedkdError(
                f"--views {k}: cache {cfg.cache} stores {cache.views} views per training image; pass "
                f"--views 1..{cache.views}, or --views 0 for the plain view"
            )
        if cfg.augment is not None and cfg.augment != cache.augment:
            raise MedkdError(
                f"--augment {cfg.augment} does not match cache {cfg.cache}, whose views are {cache.augment} "
                f"views; drop --augment (the run trains on the cache's views) or build a cache with "
                f"--augment {cfg.augment}"
            )
        return Sources(
            cache.view_logits[:, :k] if kd else None,
            torch.from_numpy(cache.view_features()[:, :k]) if fkd else None,
            Augmentation(cache.augment, cache.view_params[:, :k]),
        )
    if cache is not None and cfg.views:
        raise MedkdError(
            f"--views {cfg.views}: cache {cfg.cache} stores the plain view only; build a multi-view cache "
            f"with `medkd cache-teacher ... --views 8 --augment medmnist`, or drop --views"
        )
    augment = cfg.augment not in (None, "none")
    if augment and cache is not None and (kd or fkd):
        raise MedkdError(
            f"--augment {cfg.augment} with a teacher needs the teacher's outputs on the same views, and "
            f"{cfg.cache} holds {'views not used (--views 0)' if cache.views else 'the plain view only'}; "
            f"build a multi-view cache with `medkd cache-teacher ... --views 8 --augment {cfg.augment}`, or "
            f"use --alpha 1 for an augmented baseline"
        )
    return Sources(
        cache.logits["train"] if cache is not None and kd else None,
        torch.from_numpy(cache.features("train")) if cache is not None and fkd else None,
        Augmentation(cfg.augment) if augment else None,
    )


def distill(
    cfg: DistillConfig, console: Console | None = None, cache: TeacherCache | None = None
) -> RunResult:
    """Train one student, write its run folder and return its result; `cache` skips re-reading the file."""
    console = console or Console(stderr=True, quiet=cfg.quiet)
    started = time.perf_counter()
    inputs = load_inputs(cfg, cache)
    cache = inputs.cache
    sources = training_sources(cfg, cache)
    teacher = cache.attrs["teacher"] if cache else None
    name = run_name(cfg, inputs.dataset, inputs.size, teacher, sources.label())
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / name
    config = to_dict(cfg)
    chash = config_hash(config, cache.fingerprint if cache else None)
    if cfg.resume and (run_dir / RESULT).exists():
        done = read_result(run_dir)
        if same_experiment(done, chash):
            console.print(f"{run_dir} already holds this finished run; nothing to resume", soft_wrap=True)
            return done

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student_size = cfg.student_size or inputs.size
    model = build_student(cfg.student, inputs.n_outputs, student_size, cfg.student_weights).to(device)
    feature_kd = sources.feature_distillation(cfg.feature_weight, model, device)
    # The projector trains with the student (one optimizer) but is not part of it: best.pt holds the student.
    trained = model if feature_kd is None else nn.ModuleList([model, feature_kd.projector])
    loop = LoopState.create(
        trained, cfg.lr, cfg.epochs, cfg.milestones, cfg.seed, optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
    )  # fmt: skip
    checkpoint = read_epoch_checkpoint(run_dir, chash, config, cache) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        console.print(f"no epoch checkpoint in {run_dir}: starting at epoch 1", soft_wrap=True)
    prepare_run_dir(run_dir, cfg.force)  # last check before work: nothing is written on bad input
    run = RunSoFar()
    if checkpoint is not None:
        run = resume(checkpoint, model, loop, run_dir)
        if feature_kd is not None:
            feature_kd.projector.load_state_dict(checkpoint["projector"])
        console.print(f"resuming {run_dir} after epoch {loop.epoch} of {cfg.epochs}", soft_wrap=True)

    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    view = View(student_size, interpolation=cfg.interpolation, channels_last=channels_last)
    splits = {s: DeviceSplit(*inputs.arrays[s], inputs.task, device) for s in SPLITS}
    teacher_logits = sources.logits.to(device) if sources.logits is not None else None
    checkpointing = {"config": config, "config_hash": chash}
    if feature_kd is not None:  # the projector is not part of the student: last.pt keeps it for --resume
        checkpointing["projector"] = feature_kd.projector.state_dict()
    extras = {"augmentation": sources.augmentation_on(device), "feature_kd": feature_kd}
    train_run(cfg, model, loop, splits, view, teacher_logits, run, run_dir, checkpointing, console, extras)

    model.load_state_dict(run.best_state)
    val_metrics, _ = evaluate_model(model, splits["val"], view)
    test_metrics, test_scores = evaluate_model(model, splits["test"], view)
    write_predictions(run_dir, inputs.arrays["test"][1], test_scores, inputs.task)
    train_seconds = sum(h["seconds"] for h in run.history)
    result = RunResult(
        config=config,
        dataset=inputs.dataset,
        size=inputs.size,
        val=val_metrics,
        test=test_metrics,
        run_dir=str(run_dir),
        config_hash=chash,
        task=inputs.task,
        n_outputs=inputs.n_outputs,
        student_size=student_size,
        baseline=teacher_logits is None and feature_kd is None,
        augment=sources.describe(),
        teacher=cache.summary(cfg.cache) if cache else None,
        data_sha256=inputs.data_sha256,
        history=run.history,
        epochs_run=len(run.history),
        best_epoch=run.best.epoch,
        wall_seconds=time.perf_counter() - started,
        train_images_per_second=len(splits["train"]) * len(run.history) / train_seconds,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        versions=versions(),
    )
    write_result(run_dir, result)
    (run_dir / EPOCH_CHECKPOINT).unlink(missing_ok=True)  # only an unfinished run needs it
    console.print(
        f"[bold]{run_dir}[/]: best epoch {run.best.epoch}, val AUC {val_metrics['auc']:.4f} "
        f"ACC {val_metrics['acc']:.4f}; test AUC {test_metrics['auc']:.4f} ACC {test_metrics['acc']:.4f}"
    )
    return result


def load_inputs(cfg: DistillConfig, cache: TeacherCache | None) -> Inputs:
    """The cache (read unless given) and the data, checked against each other and against the flags."""
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
    arrays = load_arrays(dataset, size, cfg.data_dir, cfg.download)
    if cache:
        cache.check_data(dataset, size, arrays)  # hashes every split: the cache's hashes are now the data's
        shas = {s: cache.split_attrs[s]["data_sha256"] for s in SPLITS}
    else:
        shas = {s: data_sha256(*arrays[s]) for s in SPLITS}
    n_out = num_outputs(info["task"], len(info["label"]))
    if cache and cache.logits["train"].shape[1] != n_out:
        raise MedkdError(
            f"cache {cfg.cache} has {cache.logits['train'].shape[1]} logits per image; "
            f"{dataset} needs {n_out}"
        )
    return Inputs(dataset, size, info["task"], n_out, arrays, shas, cache)


def train_run(
    cfg: DistillConfig,
    model: torch.nn.Module,
    loop: LoopState,
    splits: dict[str, DeviceSplit],
    view: View,
    teacher_logits: torch.Tensor | None,
    run: RunSoFar,
    run_dir: Path,
    checkpointing: dict[str, Any],
    console: Console,
    extras: dict[str, Any] | None = None,
) -> None:
    """The epochs, with a progress bar: `best.pt` at each new best, `last.pt` now and then, early stop.

    `extras` are `train_epochs`' augmentation and feature_kd."""
    extras = extras or {}
    steps_per_epoch = -(-len(splits["train"]) // cfg.batch_size)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(
        *columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=cfg.quiet
    ) as progress:
        bar = progress.add_task(
            "train", total=cfg.epochs * steps_per_epoch, completed=loop.epoch * steps_per_epoch, info=""
        )
        epochs = train_epochs(
            model, splits["train"], splits["val"], view, loop, teacher_logits=teacher_logits,
            alpha=cfg.alpha, temperature=cfg.temperature, batch_size=cfg.batch_size,
            on_step=lambda: progress.advance(bar), **extras,
        )  # fmt: skip
        saved_epoch, saved_at = loop.epoch, time.monotonic()
        try:
            for stats in epochs:
                run.history.append(vars(stats))
                line = (
                    f"epoch {stats.epoch} loss {stats.loss:.4f} val AUC {stats.val_auc:.3f} "
                    f"{stats.images_per_second:.0f} img/s"
                )
                progress.update(bar, info=line)
                if not cfg.quiet and not console.is_terminal:
                    # A log file (nohup, Slurm) never sees a live bar: one line per epoch instead.
                    console.print(f"{run_dir.name}: {line}", highlight=False)
                if run.best.update(stats.epoch, stats.val_auc):
                    run.best_state = copy.deepcopy(model.state_dict())
                    state = {"model": run.best_state, "epoch": stats.epoch, "config": checkpointing["config"]}
                    save_checkpoint(run_dir / CHECKPOINT, state)
                stopped = cfg.patience is not None and run.best.stale >= cfg.patience
                due = time.monotonic() - saved_at >= EPOCH_CHECKPOINT_SECONDS or saved_epoch == 0
                if due and stats.epoch < cfg.epochs and not stopped:
                    save_checkpoint(
                        run_dir / EPOCH_CHECKPOINT, epoch_checkpoint(model, loop, run, checkpointing)
                    )
                    saved_epoch, saved_at = stats.epoch, time.monotonic()
                if stopped:
                    console.print(
                        f"early stop after epoch {stats.epoch}: no better val AUC for {cfg.patience} epochs"
                    )
                    break
        except NonFiniteLossError as err:
            kept = (
                f"{run_dir / EPOCH_CHECKPOINT} keeps epoch {saved_epoch}, {CHECKPOINT} the best (epoch "
                f"{run.best.epoch})"
                if saved_epoch
                else "no epoch had finished, so no checkpoint was written"
            )
            raise MedkdError(f"{err}; stopped: {kept}") from err


def epoch_checkpoint(
    model: torch.nn.Module, loop: LoopState, run: RunSoFar, checkpointing: dict[str, Any]
) -> dict[str, Any]:
    """`last.pt`: everything `--resume` needs to continue exactly after this epoch."""
    return {
        "model": model.state_dict(),
        "loop": loop.state_dict(),
        "history": run.history,
        "best_auc": run.best.auc,
        "best_epoch": run.best.epoch,
        "stale": run.best.stale,
        **checkpointing,
    }


def read_epoch_checkpoint(
    run_dir: Path, chash: str, config: dict[str, Any], cache: TeacherCache | None
) -> dict[str, Any] | None:
    """The run folder's epoch checkpoint if it has one, checked to come from this very config."""
    path = run_dir / EPOCH_CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = load_checkpoint(path, "a medkd epoch checkpoint")
    except MedkdError as err:
        raise MedkdError(f"{err}; drop --resume to start over") from err
    # A checkpoint of medkd 0.1 carries the old hash, which counted --download.
    accepted = (chash, legacy_config_hash(config, cache.fingerprint if cache else None))
    if checkpoint.get("config_hash") not in accepted:
        raise MedkdError(
            f"{path} is a checkpoint of another config (hash {checkpoint.get('config_hash')}, this run "
            f"{chash}); resume with the same options and cache, or drop --resume to start over"
        )
    return checkpoint


def resume(checkpoint: dict[str, Any], model: torch.nn.Module, loop: LoopState, run_dir: Path) -> RunSoFar:
    """Load an epoch checkpoint into `model` and `loop`; the run so far, with its best epoch's weights."""
    model.load_state_dict(checkpoint["model"])
    loop.load_state_dict(checkpoint["loop"])
    best = BestEpoch(checkpoint["best_auc"], checkpoint["best_epoch"], checkpoint["stale"])
    # best.pt is written before last.pt in the same epoch: it holds best_epoch's weights, or those of a
    # later epoch that this run repeats (exactly) and so will write again.
    best_state = None
    if best.epoch:
        try:
            best_state = load_checkpoint(run_dir / CHECKPOINT, "a medkd checkpoint")["model"]
        except FileNotFoundError as err:
            raise MedkdError(
                f"{run_dir / CHECKPOINT} is missing, so the run cannot resume; drop --resume to start over"
            ) from err
    return RunSoFar(checkpoint["history"], best, best_state)
