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
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from medkd.cache import TeacherCache, data_difference, joint_fingerprint
from medkd.config import DistillConfig, cache_paths, path_safe, short_number, to_dict
from medkd.data import (
    SPLITS,
    DeviceSplit,
    View,
    batch_bounds,
    data_sha256,
    dataset_info,
    device_splits,
    load_arrays,
    num_outputs,
)
from medkd.datasets import dataset_name, dataset_sha256, is_custom, locate_dataset, same_dataset
from medkd.errors import MedkdError
from medkd.metrics import BestEpoch
from medkd.runs import (
    CHECKPOINT,
    EPOCH_CHECKPOINT,
    RESULT,
    SWEEP,
    RunIdentity,
    RunResult,
    checkpoint_hash,
    claim_run_dir,
    load_checkpoint,
    prepare_run_dir,
    read_result,
    same_experiment,
    save_checkpoint,
    student_weights_sha256,
    versions,
    write_predictions,
    write_result,
)
from medkd.students import FeatureTap, build_student, takes_one_channel
from medkd.tracking import Trackers, check_trackers, open_trackers
from medkd.train import (
    Augmentation,
    FeatureDistillation,
    LoopState,
    NonFiniteLossError,
    evaluate_model,
    intra_op_threads,
    place_student,
    resolve_device,
    train_epochs,
)
from medkd.weighting import TeacherWeighting

# The epoch checkpoint is written after epoch 1 and then at most this often: a ResNet50 with its Adam
# state is ~300 MB, which on a GPU can take longer than a small dataset's epoch.
EPOCH_CHECKPOINT_SECONDS = 60.0


@dataclass
class Inputs:
    """What a run learns from: the data (checked against the caches) and the caches, if any.

    Several caches (a multi-teacher run) are held sorted by fingerprint, so the order they were given in
    changes nothing; `given` holds the path each was given as, in the same order."""

    dataset: str
    size: int
    task: str
    n_outputs: int
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    data_sha256: dict[str, str]
    caches: list[TeacherCache] = field(default_factory=list)
    given: list[str] = field(default_factory=list)
    dataset_sha256: str | None = None  # a custom file's sha256 (None for a flag)

    def fingerprint(self) -> str | tuple[str, ...] | None:
        """What the config hash counts of the caches (`joint_fingerprint`)."""
        return joint_fingerprint(tuple(c.fingerprint for c in self.caches))

    def identity(self, cfg: DistillConfig) -> RunIdentity:
        """What a run of `cfg` on these inputs learns from, for its config hash: caches, data, init file."""
        legacy = joint_fingerprint(tuple(c.legacy_fingerprint for c in self.caches))
        weights = student_weights_sha256(cfg.student_weights)
        return RunIdentity(self.fingerprint(), self.data_sha256, weights, legacy)

    def teacher_fields(self, weighting: str) -> dict[str, Any]:
        """RunResult's `teacher` (one cache), or `teachers` and `teacher_weighting` (several)."""
        summaries = [c.summary(path) for c, path in zip(self.caches, self.given, strict=True)]
        if len(summaries) < 2:
            return {"teacher": summaries[0] if summaries else None}
        return {"teacher": None, "teachers": summaries, "teacher_weighting": weighting}

    def teacher_label(self, weighting: str) -> str | None:
        """The run-name part of the teachers: the cache's teacher, or `A+B_mean` for several (`3-teachers`
        when their names are long)."""
        if len(self.caches) < 2:
            return self.caches[0].attrs["teacher"] if self.caches else None
        names = "+".join(path_safe(c.attrs["teacher"]) for c in self.caches)
        return f"{names if len(names) <= 80 else f'{len(self.caches)}-teachers'}_{weighting}"


@dataclass
class Sources:
    """What the student learns from beside the labels, on the CPU: the teacher's logits (N, C) or, for
    stored views, (N, K, C), with a teacher axis before the last for several caches ((N, M, C), (N, K, M, C));
    each teacher's features likewise (only with --feature-weight); how images are varied."""

    logits: torch.Tensor | None
    features: list[torch.Tensor] | None
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
        self, weight: float, tap: FeatureTap | None, device: torch.device
    ) -> FeatureDistillation | None:
        """The feature term on `tap`'s features: a fresh projector to each teacher's width (None without)."""
        if self.features is None:
            return None
        projectors = nn.ModuleList(nn.Linear(tap.dim, f.shape[-1]) for f in self.features).to(device)
        return FeatureDistillation(weight, projectors, tap, [f.to(device) for f in self.features])

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
    return f"{dataset_name(dataset)}_{size}_{path_safe(cfg.student)}-{student_size}_{source}_{knobs}"


def training_sources(
    cfg: DistillConfig, caches: list[TeacherCache], given: list[str] | None = None
) -> Sources:
    """The teacher logits, features and augmentation of a run, checked against the caches (`given`: the
    paths to name them by).

    A multi-view cache's stored views are what the run trains on (the first `--views` of them; 0: the
    plain view); several caches must then hold the same views. Augmentation without stored views is
    drawn on the fly, and only for a run that uses no teacher output: the plain view's logits are not the
    teacher's on an augmented image.
    """
    given = given or [str(c.path) for c in caches]
    kd, fkd = cfg.alpha < 1.0, cfg.feature_weight > 0
    k = _stored_views(cfg, caches, given)
    if k:
        logits = [c.view_logits[:, :k] for c in caches]
        features = [torch.from_numpy(c.view_features()[:, :k]) for c in caches] if fkd else None
        augmentation = Augmentation(caches[0].augment, caches[0].view_params[:, :k])
    else:
        augment = cfg.augment not in (None, "none")
        if augment and caches and (kd or fkd):
            held = "views not used (--views 0)" if any(c.views for c in caches) else "the plain view only"
            raise MedkdError(
                f"--augment {cfg.augment} with a teacher needs the teacher's outputs on the same views, and "
                f"{given[0]} holds {held}; build a multi-view cache with `medkd cache-teacher ... --views 8 "
                f"--augment {cfg.augment}`, or use --alpha 1 for an augmented baseline"
            )
        logits = [c.logits["train"] for c in caches]
        features = [torch.from_numpy(c.features("train")) for c in caches] if fkd else None
        augmentation = Augmentation(cfg.augment) if augment else None
    if len(caches) > 1:  # the weights need every teacher's logits, for the feature term too
        stacked = torch.stack(logits, dim=-2) if kd or fkd else None
    else:
        stacked = logits[0] if caches and kd else None
    return Sources(stacked, features, augmentation)


def _stored_views(cfg: DistillConfig, caches: list[TeacherCache], given: list[str]) -> int:
    """K, the stored views a run trains on (0: the plain view), checked against every cache."""
    with_views = [(path, c) for path, c in zip(given, caches, strict=True) if c.views]
    if not with_views or cfg.views == 0:
        if cfg.views:
            raise MedkdError(
                f"--views {cfg.views}: cache {given[0]} stores the plain view only; build a multi-view cache "
                f"with `medkd cache-teacher ... --views 8 --augment medmnist`, or drop --views"
            )
        return 0
    plain = [path for path, c in zip(given, caches, strict=True) if not c.views]
    first_path, first = with_views[0]
    if plain:
        raise MedkdError(
            f"cache {plain[0]} stores the plain view only and cache {first_path} {first.views} "
            f"{first.augment} views: a student sees one view of each image, and every teacher must have "
            f"seen it; pass --views 0 to train on the plain view, or build {plain[0]} with --views "
            f"{first.views} --augment {first.augment}"
        )
    k = cfg.views or min(c.views for c in caches)
    for path, cache in with_views:
        if k > cache.views:
            raise MedkdError(
                f"--views {k}: cache {path} stores {cache.views} views per training image; pass "
                f"--views 1..{cache.views}, or --views 0 for the plain view"
            )
        if cfg.augment is not None and cfg.augment != cache.augment:
            raise MedkdError(
                f"--augment {cfg.augment} does not match cache {path}, whose views are {cache.augment} "
                f"views; drop --augment (the run trains on the cache's views) or build a cache with "
                f"--augment {cfg.augment}"
            )
        same = torch.equal(cache.view_params[:, :k], first.view_params[:, :k])
        if cache.augment != first.augment or not same:
            raise MedkdError(
                f"caches {first_path} and {path} hold different views ({first.augment} vs {cache.augment} "
                f"views, first {k} compared): every teacher must have seen the view the student is shown; "
                f"build them with the same --augment, --views and --seed, or pass --views 0"
            )
    return k


def distill(
    cfg: DistillConfig,
    console: Console | None = None,
    cache: TeacherCache | list[TeacherCache] | None = None,
    inputs: Inputs | None = None,
) -> RunResult:
    """Train one student, write its run folder and return its result; `cache` (a list for several
    caches) skips re-reading the files, `inputs` (`load_inputs` of the same data and caches, as a sweep
    shares them) the data as well.

    From its first write on, this process is the run folder's one writer (`claim_run_dir`): another
    process on the same folder is refused until this one ends, however it ends."""
    console = console or Console(stderr=True, quiet=cfg.quiet)
    started = time.perf_counter()
    inputs = inputs if inputs is not None else load_inputs(cfg, cache)
    sources = training_sources(cfg, inputs.caches, inputs.given)
    teacher = inputs.teacher_label(cfg.teacher_weighting)
    name = run_name(cfg, inputs.dataset, inputs.size, teacher, sources.label())
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / name
    identity = inputs.identity(cfg)
    chash = identity.config_hash(to_dict(cfg))
    # What is read in the folder (a finished result, the epoch checkpoint) is read under the lock.
    with claim_run_dir(run_dir, chash):
        done = finished_run(cfg, run_dir, identity.hashes(to_dict(cfg)), console)
        if done is not None:
            return done
        with intra_op_threads(cfg.threads):
            return train_student(cfg, inputs, sources, run_dir, identity, console, started)


def train_student(
    cfg: DistillConfig,
    inputs: Inputs,
    sources: Sources,
    run_dir: Path,
    identity: RunIdentity,
    console: Console,
    started: float,
) -> RunResult:
    """`distill` in its claimed run folder: the student, resumed if asked, trained, evaluated, written."""
    config = to_dict(cfg)
    chash = identity.config_hash(config)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student_size = cfg.student_size or inputs.size
    model, helpers, loop = build_training(cfg, inputs, sources, student_size, device)
    checkpoint = read_epoch_checkpoint(run_dir, config, identity) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        console.print(f"no epoch checkpoint in {escape(str(run_dir))}: starting at epoch 1", soft_wrap=True)
    check_trackers(cfg.tensorboard, cfg.mlflow)
    prepare_run_dir(run_dir, cfg.force)  # last check before work: nothing is written on bad input
    run = RunSoFar()
    if checkpoint is not None:
        run = resume(checkpoint, model, loop, run_dir)
        helpers.load_state_dict(checkpoint)
        console.print(
            f"resuming {escape(str(run_dir))} after epoch {loop.epoch} of {cfg.epochs}", soft_wrap=True
        )

    forward = place_student(model, device, cfg.compile)
    view = student_view(cfg, model, student_size)
    augmented = sources.augmentation is not None
    splits = device_splits(inputs.arrays, inputs.task, device, view, cfg.max_memory_gb, augmented)
    teacher_logits = sources.logits.to(device) if sources.logits is not None else None
    checkpointing = {"config": config, "config_hash": chash, **helpers.state_dict()}
    extras = {"augmentation": sources.augmentation_on(device), **vars(helpers)}
    with run_trackers(cfg, run_dir, config) as trackers:
        train_run(
            cfg, forward, loop, splits, view, teacher_logits, run, run_dir, checkpointing, console, extras,
            trackers, state_of=model,
        )  # fmt: skip
        model.load_state_dict(run.best_state)
        val_metrics, _ = evaluate_model(forward, splits["val"], view)
        test_metrics, test_scores = evaluate_model(forward, splits["test"], view)
        trackers.log_final(test_metrics, val_metrics, {"best_epoch": run.best.epoch})
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
        rounded=view.rounded,
        baseline=teacher_logits is None and helpers.feature_kd is None,
        augment=sources.describe(),
        **inputs.teacher_fields(cfg.teacher_weighting),
        data_sha256=inputs.data_sha256,
        dataset_sha256=inputs.dataset_sha256,
        student_weights_sha256=identity.weights_sha256,
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
        f"[bold]{escape(str(run_dir))}[/]: best epoch {run.best.epoch}, val AUC {val_metrics['auc']:.4f} "
        f"ACC {val_metrics['acc']:.4f}; test AUC {test_metrics['auc']:.4f} ACC {test_metrics['acc']:.4f}",
        soft_wrap=True,
    )
    return result


def student_view(cfg: DistillConfig, model: nn.Module, size: int) -> View:
    """How the student sees its images: at `size`, channels_last (`place_student`), grayscale as one
    channel when its first convolution takes it, resized images rounded to 8 bits (`View`)."""
    return View(
        size, interpolation=cfg.interpolation, channels_last=True, gray=takes_one_channel(model), rounded=True
    )


def build_training(
    cfg: DistillConfig, inputs: Inputs, sources: Sources, student_size: int, device: torch.device
) -> tuple[nn.Module, TrainingHelpers, LoopState]:
    """The student, what trains beside it, and one optimizer and schedule for both (best.pt holds the
    student alone)."""
    model = build_student(cfg.student, inputs.n_outputs, student_size, cfg.student_weights).to(device)
    helpers = TrainingHelpers.create(cfg, sources, len(inputs.caches), model, device)
    trained = nn.ModuleList([model, *helpers.modules()])
    loop = LoopState.create(
        trained, cfg.lr, cfg.epochs, cfg.milestones, cfg.seed, optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
    )  # fmt: skip
    return model, helpers, loop


def finished_run(
    cfg: DistillConfig, run_dir: Path, hashes: tuple[str, ...], console: Console
) -> RunResult | None:
    """With --resume, the run folder's result when it already holds this very run (nothing to do)."""
    if cfg.resume and (run_dir / RESULT).exists():
        done = read_result(run_dir)
        if same_experiment(done, hashes):
            console.print(
                f"{escape(str(run_dir))} already holds this finished run; nothing to resume", soft_wrap=True
            )
            return done
    return None


def run_trackers(cfg: DistillConfig, run_dir: Path, config: dict[str, Any]) -> Trackers:
    """The run's --tensorboard / --mlflow trackers; a run inside a sweep's folder is logged as a trial of
    that sweep (its own run, grouped under the sweep's name)."""
    group = run_dir.parent.name if (run_dir.parent / SWEEP).is_file() else None
    return open_trackers(cfg.tensorboard, cfg.mlflow, run_dir.name, config, group)


@dataclass
class TrainingHelpers:
    """What trains beside the student: the feature term's projectors and the teacher weighting with its
    learned gate (either may be absent), on the student's one feature tap. Not part of the student:
    best.pt leaves them out, last.pt keeps them for --resume. Its fields are `train_epochs` arguments."""

    feature_kd: FeatureDistillation | None
    weighting: TeacherWeighting | None

    @classmethod
    def create(
        cls, cfg: DistillConfig, sources: Sources, n_caches: int, model: nn.Module, device: torch.device
    ) -> TrainingHelpers:
        weighed = n_caches > 1 and sources.logits is not None  # several teachers' outputs are used
        tap = None
        if sources.features is not None or (weighed and cfg.teacher_weighting == "learned"):
            purpose = "--feature-weight" if sources.features is not None else "--teacher-weighting learned"
            tap = FeatureTap(model, purpose)
        feature_kd = sources.feature_distillation(cfg.feature_weight, tap, device)
        weighting = None
        if weighed:
            weighting = TeacherWeighting.create(cfg.teacher_weighting, n_caches, tap, cfg.gate_entropy)
            if weighting.gate is not None:
                weighting.gate.to(device)
        return cls(feature_kd, weighting)

    def modules(self) -> list[nn.Module]:
        """The modules the optimizer trains with the student, in a fixed order."""
        projectors = list(self.feature_kd.projectors) if self.feature_kd is not None else []
        gate = [self.weighting.gate] if self.weighting is not None and self.weighting.gate is not None else []
        return [*projectors, *gate]

    def state_dict(self) -> dict[str, Any]:
        """Their weights for the epoch checkpoint (live references: saved as they are when it is written)."""
        state = {}
        if self.feature_kd is not None:
            state["projectors"] = self.feature_kd.projectors.state_dict()
        if self.weighting is not None and self.weighting.gate is not None:
            state["gate"] = self.weighting.gate.state_dict()
        return state

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        if self.feature_kd is not None:
            if "projector" in checkpoint:  # an epoch checkpoint of medkd before several teachers
                self.feature_kd.projectors[0].load_state_dict(checkpoint["projector"])
            else:
                self.feature_kd.projectors.load_state_dict(checkpoint["projectors"])
        if self.weighting is not None and self.weighting.gate is not None:
            self.weighting.gate.load_state_dict(checkpoint["gate"])


def load_inputs(cfg: DistillConfig, cache: TeacherCache | list[TeacherCache] | None = None) -> Inputs:
    """The caches (read unless given) and the data, checked against each other and against the flags."""
    given = list(cache_paths(cfg.cache))
    if cache is None:
        caches = [TeacherCache(path) for path in given]
    else:
        caches = list(cache) if isinstance(cache, list) else [cache]
        if len(given) != len(caches):  # caches handed over without their config paths
            given = [str(c.path) for c in caches]
    for path, other in zip(given[1:], caches[1:], strict=True):
        difference = data_difference(caches[0], other)
        if difference:
            raise MedkdError(
                f"caches {given[0]} and {path} were built from different data ({difference}); a "
                f"multi-teacher run needs caches of one dataset, size and split"
            )
    first, where = (caches[0], given[0]) if caches else (None, None)
    dataset = _cache_dataset(cfg, first, where) if first else cfg.dataset
    size = int(first.attrs["image_size"]) if first else cfg.size
    if first and cfg.dataset and cfg.size != size:
        raise MedkdError(
            f"--size {cfg.size} does not match the cache {where}, built from {dataset} at {size} px; "
            f"pass --size {size} or a cache of {cfg.size} px"
        )
    info = dataset_info(dataset)
    device = resolve_device(cfg.device).type
    arrays = load_arrays(dataset, size, cfg.data_dir, cfg.download, cfg.max_memory_gb, device)
    if first:
        first.check_data(dataset, size, arrays)  # hashes every split: the caches' hashes are now the data's
        shas = {s: first.split_attrs[s]["data_sha256"] for s in SPLITS}
    else:
        shas = {s: data_sha256(*arrays[s]) for s in SPLITS}
    n_out = num_outputs(info["task"], len(info["label"]))
    for path, c in zip(given, caches, strict=True):
        if c.logits["train"].shape[1] != n_out:
            raise MedkdError(
                f"cache {path} has {c.logits['train'].shape[1]} logits per image; {dataset} needs {n_out}"
            )
    order = sorted(range(len(caches)), key=lambda i: caches[i].fingerprint)
    caches, given = [caches[i] for i in order], [given[i] for i in order]
    return Inputs(dataset, size, info["task"], n_out, arrays, shas, caches, given, dataset_sha256(dataset))


def _cache_dataset(cfg: DistillConfig, cache: TeacherCache, where: str) -> str:
    """The dataset a cache was built from, as this run reads it: `--dataset` when given (it must be the
    same data), else the cache's own record; a custom file must be there and unchanged."""
    recorded = cache.attrs["dataset"]
    if cfg.dataset and not same_dataset(cfg.dataset, recorded):
        raise MedkdError(f"--dataset {cfg.dataset} does not match the cache {where}, built from {recorded}")
    dataset = cfg.dataset or recorded
    if not is_custom(dataset):
        return dataset
    path = Path(locate_dataset(dataset, cfg.data_dir))
    if not path.is_file():
        raise MedkdError(
            f"cache {where} was built from {recorded}, which is not there now; pass --dataset PATH to where "
            f"the file is"
        )
    then, now = cache.attrs.get("dataset_sha256"), dataset_sha256(str(path))
    if then and then != now:
        raise MedkdError(
            f"{path} changed since the cache {where} was built from it (file sha256 {then[:12]}… then, "
            f"{now[:12]}… now): rebuild the cache with `medkd cache-teacher --dataset {path} --force`, or "
            f"restore the file"
        )
    return str(path)


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
    trackers: Trackers | None = None,
    state_of: torch.nn.Module | None = None,
) -> None:
    """The epochs, with a progress bar: `best.pt` at each new best, `last.pt` now and then, early stop.

    `extras` are `train_epochs`' augmentation, feature_kd and weighting; `trackers` see every epoch;
    `state_of` is the student whose weights are saved when `model` is its torch.compile wrapper."""
    state_of = state_of if state_of is not None else model
    extras = extras or {}
    trackers = trackers or Trackers()
    # The batches `train_epochs` takes (a last batch of one image joins the batch before it).
    steps_per_epoch = len(batch_bounds(len(splits["train"]), cfg.batch_size, merge_single=True))
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
            on_step=lambda: progress.advance(bar), eval_every=cfg.eval_every, **extras,
        )  # fmt: skip
        saved_epoch, saved_at = loop.epoch, time.monotonic()
        try:
            for stats in epochs:
                run.history.append(vars(stats))
                trackers.log_epoch(stats)
                val = f" val AUC {stats.val_auc:.3f}" if stats.val_auc is not None else ""
                line = f"epoch {stats.epoch} loss {stats.loss:.4f}{val} {stats.images_per_second:.0f} img/s"
                progress.update(bar, info=line)
                if not cfg.quiet and not console.is_terminal:
                    # A log file (nohup, Slurm) never sees a live bar: one line per epoch instead.
                    console.print(f"{escape(run_dir.name)}: {line}", highlight=False)
                validated = stats.val_auc is not None
                if validated and run.best.update(stats.epoch, stats.val_auc):
                    run.best_state = copy.deepcopy(state_of.state_dict())
                    state = {"model": run.best_state, "epoch": stats.epoch, "config": checkpointing["config"]}
                    save_checkpoint(run_dir / CHECKPOINT, state)
                stopped = validated and cfg.patience is not None and run.best.stale >= cfg.patience
                due = time.monotonic() - saved_at >= EPOCH_CHECKPOINT_SECONDS or saved_epoch == 0
                if due and stats.epoch < cfg.epochs and not stopped:
                    save_checkpoint(
                        run_dir / EPOCH_CHECKPOINT, epoch_checkpoint(state_of, loop, run, checkpointing)
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
    run_dir: Path, config: dict[str, Any], identity: RunIdentity
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
    accepted = identity.hashes(config)
    if checkpoint.get("config_hash") not in accepted:
        raise MedkdError(
            f"{path} is a checkpoint of another config (hash {checkpoint.get('config_hash')}, this run "
            f"{accepted[0]}); resume with the same options, cache, data and --student-weights file, or drop "
            f"--resume to start over"
        )
    return checkpoint


def resumable(run_dir: Path, config: dict[str, Any], identity: RunIdentity) -> bool:
    """Does the run folder hold an epoch checkpoint (and best.pt) of this very config, to resume? What a
    sweep asks of a trial that was killed; a checkpoint of another config is no reason to stop."""
    if not (run_dir / CHECKPOINT).is_file():
        return False
    return checkpoint_hash(run_dir / EPOCH_CHECKPOINT) in identity.hashes(config)


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
