"""Run configurations: frozen dataclasses, validated on creation, loaded from TOML with flags on top.

Stage one (`CacheTeacherConfig`), stage two (`DistillConfig`), a grid of stage-two runs (`SweepConfig`)
and where its trials run (`LaunchConfig`). Torch-free: the CLI reads their defaults for `--help`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkd.datasets import dataset_name, dataset_size, is_custom, locate_dataset
from medkd.errors import MedkdError
from medkd.registry import (
    AUGMENTS,
    HEADS,
    INTERPOLATIONS,
    LAUNCHERS,
    OPTIMIZERS,
    POOLS,
    RUN_PREFIX,
    SCHEDULES,
    SLURM_CLUSTERS,
    STUDENTS,
    TEACHER_PREFIXES,
    TEACHER_WEIGHTINGS,
    TEACHERS,
    is_run_teacher,
    is_student,
    teacher_spec,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Options that steer where and how a run reports, not what it computes: left out of the config hash.
RUN_OPTIONS = (
    "out", "force", "quiet", "data_dir", "device", "resume", "download",
    "max_memory_gb", "tensorboard", "mlflow", "threads", "compile",
)  # fmt: skip
# Distill options added after runs existed, with the value those runs implied: at that value they stay
# out of the config hash, so a finished run keeps its hash (sweeps skip it, --resume finds it).
ADDED_DEFAULTS = {
    "optimizer": "adam",
    "weight_decay": 0.0,
    "schedule": "multistep",
    "warmup_epochs": 0,
    "augment": None,
    "views": None,
    "feature_weight": 0.0,
    "teacher_weighting": "mean",
    "gate_entropy": 0.1,
    "eval_every": 1,
}


MAX_SEED = 2**63  # torch.manual_seed takes a 64-bit seed; medkd's are below this
MAX_TEMPERATURE = 1e4  # beyond it every teacher is uniform, and T² overflows float32 past ~1.8e19
_DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:\d+)?")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MedkdError(message)


# How a scalar annotation reads in an error, alone and inside a list.
_KINDS = {
    "int": "a whole number like 3", "float": "a number like 0.5", "bool": "true or false", "str": "a string",
}  # fmt: skip
_LISTS = {"int": "whole numbers like [5, 8]", "float": "numbers like [0.1, 0.2]", "str": "strings"}


def _split(annotation: str, sep: str) -> list[str]:
    """`annotation` cut at `sep` outside brackets: `str | tuple[str, ...] | None` → its three options."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(annotation):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    return [*parts, annotation[start:].strip()]


def _is_scalar(value: Any, kind: str) -> bool:
    """Whether `value` is a `kind` ("int", "float", "bool", "str", "None"): a bool is no number, an int
    is a float."""
    if kind == "None":
        return value is None
    if isinstance(value, bool) or kind == "bool":
        return isinstance(value, bool) and kind == "bool"
    return isinstance(value, {"int": int, "float": (int, float), "str": str}[kind])


def _matches(value: Any, annotation: str) -> bool:
    """Whether `value` fits a field's (string) annotation: scalars, `X | Y`, `tuple[X, ...]`."""
    for option in _split(annotation, "|"):
        if not option.startswith("tuple["):
            if _is_scalar(value, option):
                return True
        elif isinstance(value, tuple):
            items = _split(option[len("tuple[") : -1], ",")  # ["int", "..."] or ["float", "float"]
            if items[-1] == "...":
                items = [items[0]] * len(value)
            if len(items) == len(value) and all(map(_matches, value, items)):
                return True
    return False


def _describe(annotation: str) -> str:
    """An annotation in words: `int | None` → "a whole number like 3 (or left out)"."""
    options, words = _split(annotation, "|"), []
    for option in options:
        if option.startswith("tuple["):
            words.append(f"a list of {_LISTS.get(_split(option[len('tuple[') : -1], ',')[0], 'lists')}")
        elif option != "None":
            words.append(_KINDS[option])
    return " or ".join(words) + (" (or left out)" if "None" in options else "")


def _check_types(cfg: Any) -> None:
    """Refuse a field whose value does not fit its annotation (a TOML `epochs = 1.5`, `quiet = "no"`);
    a list for a tuple field (TOML has no tuples) becomes a tuple first."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, list) and "tuple[" in field.type:
            object.__setattr__(cfg, field.name, tuple(value))
        if not _matches(getattr(cfg, field.name), field.type):
            raise MedkdError(
                f"{field.name} must be {_describe(field.type)}, got {value!r} ({type(value).__name__}); "
                f"fix it in the config file or on the command line (--{field.name.replace('_', '-')})"
            )


def _resolve_data(cfg: Any) -> None:
    """A custom dataset as its absolute path (what caches and runs record), and `size` left as None as the
    data's own: a custom file's image size, else MedMNIST's 28 px."""
    dataset = cfg.dataset
    if dataset is not None and is_custom(dataset):
        object.__setattr__(cfg, "dataset", locate_dataset(dataset, cfg.data_dir))
        if cfg.size is None:
            object.__setattr__(cfg, "size", dataset_size(cfg.dataset))
    elif cfg.size is None:
        object.__setattr__(cfg, "size", 28)
    _check(
        cfg.max_memory_gb is None or cfg.max_memory_gb > 0,
        f"--max-memory-gb must be > 0 GB, got {cfg.max_memory_gb}",
    )


def _check_common(cfg: Any) -> None:
    _resolve_data(cfg)
    _check(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    _check(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    _check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _check(cfg.size >= 8, f"--size must be a MedMNIST size (28, 64, 128, 224), got {cfg.size}")
    if cfg.milestones is not None:
        _check(all(m >= 1 for m in cfg.milestones), f"--milestones must be epochs >= 1, got {cfg.milestones}")
    _check(
        _DEVICE.fullmatch(cfg.device) is not None,
        f"--device must be auto, cpu, cuda[:N] or mps, got '{cfg.device}'",
    )
    _check(
        0 <= cfg.seed < MAX_SEED,
        f"--seed must be in [0, 2^63) (torch takes 64-bit seeds), got {cfg.seed}; pick a seed in that range",
    )


def run_teacher_paths(teacher: str) -> list[str]:
    """The run folders of a `run:A,run:B` teacher, in order; refuses an item that is not `run:PATH`."""
    items = [item.strip() for item in teacher.split(",")]
    bad = [item for item in items if not item.startswith(RUN_PREFIX) or not item[len(RUN_PREFIX) :].strip()]
    if bad:
        raise MedkdError(
            f"teacher '{bad[0]}' in '{teacher}' is not run:PATH; an ensemble lists only finished runs "
            f"(run:runs/A,run:runs/B), not backbone names"
        )
    paths = [item[len(RUN_PREFIX) :].strip() for item in items]
    # One folder however it is spelt: `runs/A`, `runs/A/`, `./runs/A` or a symlink to it.
    seen: dict[Path, str] = {}
    for path in paths:
        same = seen.setdefault(Path(path).expanduser().resolve(), path)
        if same != path or paths.count(path) > 1:
            alias = f" ({same} is the same folder)" if same != path else ""
            raise MedkdError(f"teacher run {path} is listed more than once in '{teacher}'{alias}")
    return paths


def path_safe(name: str) -> str:
    """A teacher or student name as one portable file-name part: `timm:org/m.tag` → `timm-org-m.tag`."""
    return name.replace(":", "-").replace("/", "-")


def unknown_teacher(teacher: str) -> str:
    """The one line for a teacher that is neither a registry name, a library id nor run:PATH."""
    prefixes = ", ".join(f"{p}ID" for p in TEACHER_PREFIXES)
    return (
        f"unknown teacher '{teacher}'; valid: a name listed by `medkd teachers` "
        f"({', '.join(list(TEACHERS)[:3])}, …), {prefixes}, "
        f"or run:PATH of a finished medkd run (comma list for an ensemble)"
    )


def lr_milestones(epochs: int, milestones: tuple[int, ...] | None) -> tuple[int, ...]:
    """Epochs at which the lr drops ×0.1: given, else half and three quarters of the run (50, 75 of 100).

    Short runs get each drop once (2 epochs: one drop after epoch 1, not ×0.01 at once) and none at 0.
    """
    if milestones is not None:
        return tuple(milestones)
    return tuple(sorted({m for m in (epochs // 2, (3 * epochs) // 4) if m >= 1}))


@dataclass(frozen=True)
class CacheTeacherConfig:
    """Stage one: run a frozen teacher once over a dataset, train its linear head, write the cache."""

    dataset: str
    size: int | None = None  # None: the data's own (a custom file's size, else 28)
    teacher: str = "dinov2_vitb14"
    weights: str | None = None
    teacher_size: int | None = None  # None: the teacher's own default input size (its registry spec)
    pool: str | None = None  # None: the teacher's own pooling (its registry spec)
    head: str = "linear"
    keep_tokens: bool = False  # keep the patch tokens an attention head was trained on
    cross_fit: int = 1  # K >= 2: out-of-fold train logits from K heads, each trained on K-1 folds
    min_teacher_auc: float = 0.6  # refuse to write a cache whose teacher val AUC is lower (0: never)
    views: int = 1  # augmented views of every training image the teacher is run on (K)
    augment: str = "none"  # the preset those views are drawn from (`medkd.views.PRESETS`)
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    milestones: tuple[int, ...] | None = None
    feature_batch_size: int = 64
    features: bool = True
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    max_memory_gb: float | None = None  # a split above it is read memory-mapped (None: mapped.memory_budget)
    device: str = "auto"
    seed: int = 0
    force: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.teacher, (list, tuple)):  # TOML `teacher = ["run:A", "run:B"]`, repeated flags
            object.__setattr__(self, "teacher", ",".join(str(t).strip() for t in self.teacher))
        _check_types(self)
        _check_common(self)
        if is_run_teacher(self.teacher):
            run_teacher_paths(self.teacher)  # every item run:PATH, none twice
            for name, value, default in (("head", self.head, "linear"), ("cross_fit", self.cross_fit, 1)):
                _check(
                    value == default,
                    f"--{name.replace('_', '-')} {value} trains heads on a backbone's features; a run: "
                    f"teacher brings its own classifier (leave --{name.replace('_', '-')} at {default})",
                )
        else:
            _check(teacher_spec(self.teacher) is not None, unknown_teacher(self.teacher))
        _check(self.pool in (None, *POOLS), f"unknown --pool '{self.pool}'; valid: {', '.join(POOLS)}")
        _check(
            self.teacher_size is None or self.teacher_size > 0,
            f"--teacher-size must be a positive number of pixels, got {self.teacher_size}",
        )
        _check(self.head in HEADS, f"unknown --head '{self.head}'; valid: {', '.join(HEADS)}")
        _check(
            self.cross_fit >= 1, f"--cross-fit must be >= 2 folds (1: no cross-fitting), got {self.cross_fit}"
        )
        _check(
            0.0 <= self.min_teacher_auc <= 1.0,
            f"--min-teacher-auc must be in [0, 1] (0 disables the check), got {self.min_teacher_auc}",
        )
        _check(
            self.feature_batch_size >= 1, f"--feature-batch-size must be >= 1, got {self.feature_batch_size}"
        )
        _check(self.augment in AUGMENTS, f"unknown --augment '{self.augment}'; valid: {', '.join(AUGMENTS)}")
        _check(self.views >= 1, f"--views must be >= 1 augmented views per training image, got {self.views}")
        _check(
            self.views == 1 or self.augment != "none",
            f"--views {self.views} with --augment none would store the plain view {self.views} times; pick "
            f"a preset: --augment {' | '.join(a for a in AUGMENTS if a != 'none')}",
        )

    @property
    def has_views(self) -> bool:
        """Whether the teacher also runs on augmented views (a multi-view cache)."""
        return self.augment != "none"

    def out_path(self) -> Path:
        """Where the cache goes: `--out`, else `cache/<flag>_<size>_<teacher>.h5`, with
        `_<preset>-v<K>` for a multi-view cache (so it never replaces the plain one).

        A run teacher is named by its folder names: `cache/<flag>_<size>_run-<name>[+<name>...].h5`.
        """
        if self.out:
            return Path(self.out)
        if is_run_teacher(self.teacher):
            name = "run-" + "+".join(Path(p).name for p in run_teacher_paths(self.teacher))
        else:
            name = path_safe(self.teacher)
        views = f"_{self.augment}-v{self.views}" if self.has_views else ""
        return Path("cache") / f"{dataset_name(self.dataset)}_{self.size}_{name}{views}.h5"


@dataclass(frozen=True)
class DistillConfig:
    """Stage two: train a student from the cached teacher logits (or alone, with alpha=1).

    `cache` is one cache path, or several (a tuple) for a multi-teacher run.
    """

    cache: str | tuple[str, ...] | None = None
    dataset: str | None = None
    size: int | None = None  # None: the data's own (a custom file's size, else 28)
    alpha: float = 0.2
    temperature: float = 2.0
    student: str = "resnet50"
    student_size: int | None = None
    student_weights: str | None = None
    interpolation: str = "bicubic"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    milestones: tuple[int, ...] | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "multistep"
    warmup_epochs: int = 0
    patience: int | None = None
    eval_every: int = 1  # validate every N epochs (and after the last); best epoch and patience count these
    # None: a multi-view cache's preset (else no augmentation); a preset: drawn on the fly for a run
    # without teacher logits, and checked against a multi-view cache's for one with them
    augment: str | None = None
    views: int | None = None  # the first N views of a multi-view cache (None: all; 0: the plain view only)
    feature_weight: float = 0.0  # beta of the cosine feature-distillation term (0: none)
    teacher_weighting: str = "mean"  # how several caches' teachers are weighed per image (TEACHER_WEIGHTINGS)
    gate_entropy: float = 0.1  # weight of the learned gate's entropy bonus (teacher_weighting "learned")
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    max_memory_gb: float | None = None
    tensorboard: str | None = None  # a folder for TensorBoard event files (None: off)
    mlflow: str | None = None  # an MLflow tracking URI ("": MLflow's default; None: off)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: torch's default, one per core)
    compile: bool = False  # torch.compile the student (see docs/performance.md for where it pays)
    seed: int = 0
    force: bool = False
    quiet: bool = False
    resume: bool = False  # continue from the run folder's epoch checkpoint (last.pt) when it has one

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", _as_caches(self.cache))
        _check_types(self)
        _check_common(self)
        _check(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        _check(self.temperature < float("inf"), f"--temperature must be finite, got {self.temperature}")
        _check(
            self.temperature <= MAX_TEMPERATURE,
            f"--temperature must be <= {MAX_TEMPERATURE:g}, got {self.temperature:g}: a larger T makes every "
            f"teacher uniform, and the loss's T² overflows float32; MedMNIST KD uses T of 1 to 20",
        )
        _check(
            is_student(self.student),
            f"unknown student '{self.student}'; valid: {', '.join(STUDENTS)} or timm:<any timm model id>",
        )
        _check(
            self.optimizer in OPTIMIZERS,
            f"unknown --optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZERS)}",
        )
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _check(
            self.schedule in SCHEDULES, f"unknown --schedule '{self.schedule}'; valid: {', '.join(SCHEDULES)}"
        )
        _check(
            0 <= self.warmup_epochs < self.epochs,
            f"--warmup-epochs must be >= 0 and below --epochs {self.epochs}, got {self.warmup_epochs}",
        )
        _check(
            self.interpolation in INTERPOLATIONS,
            f"unknown --interpolation '{self.interpolation}'; valid: {', '.join(INTERPOLATIONS)}",
        )
        _check(
            self.student_size is None or self.student_size >= 8,
            f"--student-size must be >= 8 pixels, got {self.student_size}",
        )
        _check(self.patience is None or self.patience >= 1, f"--patience must be >= 1, got {self.patience}")
        _check(self.eval_every >= 1, f"--eval-every must be >= 1 (1: every epoch), got {self.eval_every}")
        _check(self.threads >= 0, f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        _check_views(self.augment, self.views, self.feature_weight, self.cache)
        _check_weighting(self.teacher_weighting, self.gate_entropy, self.cache)
        _check(
            self.cache is not None or self.dataset is not None,
            "give --cache CACHE (knowledge distillation) or --dataset FLAG with --alpha 1 (baseline)",
        )
        _check(
            self.cache is not None or self.alpha == 1.0,
            f"--alpha {self.alpha} needs teacher logits: give --cache CACHE, or use --alpha 1 for the "
            f"supervised baseline",
        )


def _check_views(augment: str | None, views: int | None, feature_weight: float, cache: str | None) -> None:
    _check(
        augment is None or augment in AUGMENTS, f"unknown --augment '{augment}'; valid: {', '.join(AUGMENTS)}"
    )
    _check(views is None or views >= 0, f"--views must be >= 0 (0: the plain view only), got {views}")
    _check(
        views is None or cache is not None,
        f"--views {views} picks views of a multi-view cache; without --cache, augment with --augment PRESET",
    )
    _check(feature_weight >= 0, f"--feature-weight must be >= 0, got {feature_weight}")
    _check(
        feature_weight == 0 or cache is not None,
        f"--feature-weight {feature_weight} distils the cached teacher features: give --cache CACHE",
    )


def _as_caches(cache: Any) -> str | tuple[str, ...] | None:
    """A `cache` value as one path, or a tuple of two or more (TOML lists and repeated flags); no repeats."""
    if not isinstance(cache, (list, tuple)):
        return cache
    paths = tuple(str(p) for p in cache)
    _check(len(paths) > 0, "--cache: give at least one teacher cache")
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    _check(not repeated, f"--cache {repeated[0] if repeated else ''} is given twice; give each cache once")
    return paths[0] if len(paths) == 1 else paths


def cache_paths(cache: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The cache paths of a config's `cache`: none, one, or several (a multi-teacher run)."""
    if cache is None:
        return ()
    return (cache,) if isinstance(cache, str) else tuple(cache)


def _check_weighting(weighting: str, gate_entropy: float, cache: str | tuple[str, ...] | None) -> None:
    _check(
        weighting in TEACHER_WEIGHTINGS,
        f"unknown --teacher-weighting '{weighting}'; valid: {', '.join(TEACHER_WEIGHTINGS)}",
    )
    _check(
        weighting == "mean" or len(cache_paths(cache)) >= 2,
        f"--teacher-weighting {weighting} weighs several teachers against each other; give two or more "
        f"--cache, or leave it at mean",
    )
    _check(gate_entropy >= 0, f"--gate-entropy must be >= 0, got {gate_entropy}")


def config_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def read_toml(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a TOML config file (keys are option names with underscores)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as err:
        raise MedkdError(f"config file {path} not found") from err
    except tomllib.TOMLDecodeError as err:
        raise MedkdError(f"config file {path} is not valid TOML: {err}") from err


COMMANDS = ("cache_teacher", "distill", "sweep")


def section_values(file_values: dict[str, Any], command: str) -> dict[str, Any]:
    """A config file's top-level keys, updated by its `[command]` table (one file can hold both stages)."""
    tables = {k for k, v in file_values.items() if isinstance(v, dict)}
    unknown = sorted(tables - set(COMMANDS))
    if unknown:
        raise MedkdError(
            f"unknown config table(s) [{'], ['.join(unknown)}]; known: [{'], ['.join(COMMANDS)}]"
        )
    values = {k: v for k, v in file_values.items() if k not in tables}
    return {**values, **file_values.get(command, {})}


def make_config(cls: type, file_values: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """`cls` from its defaults, then `file_values` (a TOML file), then `overrides` (flags given)."""
    known = config_fields(cls)
    unknown = sorted(set(file_values) - set(known))
    if unknown:
        raise MedkdError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return cls(**values)
    except TypeError as err:  # a required field missing, e.g. --dataset for cache-teacher
        raise MedkdError(str(err).replace("__init__() ", "")) from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-plain copy of a config, saved next to every output."""
    out = dataclasses.asdict(cfg)
    for key in ("milestones", "cache"):
        if isinstance(out.get(key), tuple):
            out[key] = list(out[key])
    return out


# ---------------------------------------------------------------- sweeps and launchers

GRID_KEYS = ("alpha", "temperature", "seed", "lr", "teacher_weighting")


def _as_tuple(key: str, value: Any, kind: type) -> tuple:
    """A grid value from TOML or a flag as a tuple: a scalar is a one-element list."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise MedkdError(f"sweep key '{key}' is an empty list; give at least one value")
    if not all(_is_scalar(v, kind.__name__) for v in values):  # no `"0.1"`, `true` or `1.5` for a seed
        raise MedkdError(f"sweep key '{key}' must hold {_LISTS[kind.__name__]}, got {values!r}")
    out = tuple(kind(v) for v in values)
    duplicates = sorted({v for v in out if out.count(v) > 1})
    if duplicates:
        text = str if kind is str else short_number
        raise MedkdError(f"sweep key '{key}' lists {', '.join(map(text, duplicates))} more than once")
    return out


def _as_pairs(value: Any) -> tuple[tuple[float, float], ...]:
    try:
        if not all(_is_scalar(x, "float") for pair in value for x in pair):
            raise TypeError("not a number")
        pairs = tuple((float(t), float(a)) for t, a in value)
    except (TypeError, ValueError):
        raise MedkdError(
            f"sweep key 'pairs' must be a list of [temperature, alpha] pairs like [[2, 0.2], [5, 0.5]], "
            f"got {value!r}"
        ) from None
    if not pairs:
        raise MedkdError("sweep key 'pairs' is an empty list; give at least one [temperature, alpha] pair")
    if len(set(pairs)) != len(pairs):
        raise MedkdError(f"sweep key 'pairs' lists a pair more than once: {value!r}")
    return pairs


def short_number(value: float) -> str:
    """`2.0` → `2`, `0.2` → `0.2`, `1e-4` → `0.0001`: short, and exact (trial names must not collide)."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


@dataclass(frozen=True)
class SweepConfig:
    """A grid of distill runs: lists for the grid keys, one value for everything else.

    `alpha` × `temperature` is the grid, or `pairs` lists (temperature, alpha) pairs instead (Table 4).
    `alpha` and `temperature` left as None mean the distill defaults (0.2 and 2). `cache` may list several
    caches (a multi-teacher grid), `teacher_weighting` several weightings.
    """

    cache: str | tuple[str, ...] | None = None
    dataset: str | None = None
    size: int | None = None
    alpha: tuple[float, ...] | None = None
    temperature: tuple[float, ...] | None = None
    pairs: tuple[tuple[float, float], ...] | None = None
    seed: tuple[int, ...] = (0,)
    lr: tuple[float, ...] = (1e-3,)
    student: str = "resnet50"
    student_size: int | None = None
    student_weights: str | None = None
    interpolation: str = "bicubic"
    epochs: int = 100
    batch_size: int = 32
    milestones: tuple[int, ...] | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "multistep"
    warmup_epochs: int = 0
    patience: int | None = None
    eval_every: int = 1
    augment: str | None = None
    views: int | None = None
    feature_weight: float = 0.0
    teacher_weighting: tuple[str, ...] = ("mean",)
    gate_entropy: float = 0.1
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    max_memory_gb: float | None = None
    tensorboard: str | None = None
    mlflow: str | None = None
    device: str = "auto"
    threads: int = 0
    compile: bool = False
    force: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", _as_caches(self.cache))
        if self.pairs is not None and (self.alpha is not None or self.temperature is not None):
            raise MedkdError(
                "give either pairs (a list of [temperature, alpha]) or the alpha × temperature grid, not both"
            )
        normal = {
            "alpha": None if self.alpha is None else _as_tuple("alpha", self.alpha, float),
            "temperature": None
            if self.temperature is None
            else _as_tuple("temperature", self.temperature, float),
            "pairs": None if self.pairs is None else _as_pairs(self.pairs),
            "seed": _as_tuple("seed", self.seed, int),
            "lr": _as_tuple("lr", self.lr, float),
            "teacher_weighting": _as_tuple("teacher_weighting", self.teacher_weighting, str),
        }
        for key, value in normal.items():
            object.__setattr__(self, key, value)
        _check_types(self)
        _resolve_data(self)
        for trial in self.grid():  # every trial must be a valid distill config before anything runs
            DistillConfig(**self.shared(), **trial)

    def shared(self) -> dict[str, Any]:
        """The distill options every trial has in common (everything but the grid and `out`)."""
        skip = {*GRID_KEYS, "pairs", "out"}
        # A distill option a sweep does not set (e.g. `resume`) keeps distill's default.
        keys = [k for k in config_fields(DistillConfig) if k not in skip and hasattr(self, k)]
        return {k: getattr(self, k) for k in keys}

    def grid(self) -> list[dict[str, Any]]:
        """The grid points in order, one dict per trial: alpha, temperature, seed, lr, teacher_weighting."""
        if self.pairs is not None:
            points = [(a, t) for t, a in self.pairs]
        else:
            alphas = self.alpha if self.alpha is not None else (DistillConfig.alpha,)
            temperatures = self.temperature if self.temperature is not None else (DistillConfig.temperature,)
            points = list(itertools.product(alphas, temperatures))
        return [
            {"alpha": a, "temperature": t, "seed": s, "lr": lr, "teacher_weighting": w}
            for w, lr, (a, t), s in itertools.product(self.teacher_weighting, self.lr, points, self.seed)
        ]

    def out_path(self) -> Path:
        """`--out`, else `runs/sweep_<cache name>_<student>` (`<first cache>+N` for N more caches, or
        `_<dataset>_<size>` without a cache)."""
        if self.out:
            return Path(self.out)
        caches = cache_paths(self.cache)
        source = Path(caches[0]).stem if caches else f"{dataset_name(self.dataset)}_{self.size}"
        source += f"+{len(caches) - 1}" if len(caches) > 1 else ""
        return Path("runs") / f"sweep_{source}_{path_safe(self.student)}"


def make_sweep_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> SweepConfig:
    """A SweepConfig from a config file's values and flags; a flag's grid replaces the file's grid.

    `--alpha`/`--temperature` on the command line drop the file's `pairs`, and `--pairs` drops the
    file's `alpha` and `temperature`, so a flag never collides with the file it overrides.
    """
    file_values = dict(file_values)
    given = {k for k, v in overrides.items() if v is not None}
    if given & {"alpha", "temperature"}:
        file_values.pop("pairs", None)
    if "pairs" in given:
        file_values.pop("alpha", None)
        file_values.pop("temperature", None)
    return make_config(SweepConfig, file_values, overrides)


@dataclass(frozen=True)
class LaunchConfig:
    """Where a sweep's trials run and what each one is given (`medkd sweep --launcher ...`)."""

    launcher: str = "local"
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time_min: int = 60
    slurm_max_parallel: int | None = None
    slurm_trials_per_job: int = 1
    slurm_cluster: str = "slurm"
    stage_cache: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        _check(
            self.launcher in LAUNCHERS, f"unknown --launcher '{self.launcher}'; valid: {', '.join(LAUNCHERS)}"
        )
        _check(self.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial:g}")
        _check(self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial:g}")
        _check(self.slurm_time_min >= 1, f"--slurm-time-min must be >= 1, got {self.slurm_time_min}")
        _check(
            self.slurm_max_parallel is None or self.slurm_max_parallel >= 1,
            f"--slurm-max-parallel must be >= 1, got {self.slurm_max_parallel}",
        )
        _check(
            self.slurm_trials_per_job >= 1,
            f"--slurm-trials-per-job must be >= 1, got {self.slurm_trials_per_job}",
        )
        _check(
            self.slurm_cluster in SLURM_CLUSTERS,
            f"unknown slurm_cluster '{self.slurm_cluster}'; valid: {', '.join(SLURM_CLUSTERS)}",
        )
        # Options of another launcher are almost always a forgotten --launcher: say so instead of ignoring.
        _check(self.launcher == "ray" or self.ray_address is None, "--ray-address needs --launcher ray")
        for name in ("slurm_partition", "slurm_max_parallel"):
            _check(
                self.launcher == "slurm" or getattr(self, name) is None,
                f"--{name.replace('_', '-')} needs --launcher slurm",
            )
        if self.launcher == "slurm":
            # Slurm hands out whole CPUs and GPUs; packing several trials into one task is
            # --slurm-trials-per-job (they run one after another on the task's GPU).
            for name in ("gpus_per_trial", "cpus_per_trial"):
                value = getattr(self, name)
                _check(
                    float(value).is_integer(),
                    f"--{name.replace('_', '-')} {value:g}: Slurm gives whole CPUs and GPUs; use "
                    f"--launcher ray for fractions, or --slurm-trials-per-job to pack small trials",
                )


def split_launch(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split sweep options (flags or a `[sweep]` table) into (LaunchConfig keys, the rest)."""
    keys = set(config_fields(LaunchConfig))
    return {k: v for k, v in values.items() if k in keys}, {k: v for k, v in values.items() if k not in keys}
