"""Run configurations: frozen dataclasses, validated on creation, loaded from TOML with flags on top."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkd.errors import MedkdError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The CLI choices. Kept here, free of torch, so `medkd --help` stays fast; the builders check them too.
TEACHER_NAMES = (
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vitg14",
    "dinov2_vits14_reg",
    "dinov2_vitb14_reg",
    "dinov2_vitl14_reg",
    "dinov2_vitg14_reg",
    "tiny",
)
# A finished medkd run as teacher: `run:runs/NAME`; several (comma list) make a mean-logit ensemble.
RUN_PREFIX = "run:"
STUDENT_NAMES = ("resnet18", "resnet50")
POOLS = ("cls", "cls+mean")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MedkdError(message)


def _check_common(cfg: Any) -> None:
    _check(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    _check(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    _check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _check(cfg.size >= 8, f"--size must be a MedMNIST size (28, 64, 128, 224), got {cfg.size}")
    if cfg.milestones is not None:
        _check(all(m >= 1 for m in cfg.milestones), f"--milestones must be epochs >= 1, got {cfg.milestones}")
    _check(
        cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
        f"--device must be auto, cpu, cuda[:N] or mps, got '{cfg.device}'",
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
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise MedkdError(f"teacher run {duplicates[0]} is listed more than once in '{teacher}'")
    return paths


def lr_milestones(epochs: int, milestones: tuple[int, ...] | None) -> tuple[int, ...]:
    """Epochs at which the lr drops ×0.1: given, else half and three quarters of the run (50, 75 of 100)."""
    return tuple(milestones) if milestones is not None else (epochs // 2, (3 * epochs) // 4)


@dataclass(frozen=True)
class CacheTeacherConfig:
    """Stage one: run a frozen teacher once over a dataset, train its linear head, write the cache."""

    dataset: str
    size: int = 28
    teacher: str = "dinov2_vitb14"
    weights: str | None = None
    teacher_size: int = 224
    pool: str = "cls"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    milestones: tuple[int, ...] | None = None
    feature_batch_size: int = 64
    features: bool = True
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    seed: int = 0
    force: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        _check_common(self)
        if isinstance(self.teacher, (list, tuple)):  # TOML `teacher = ["run:A", "run:B"]`, repeated flags
            object.__setattr__(self, "teacher", ",".join(str(t).strip() for t in self.teacher))
        if self.teacher.startswith(RUN_PREFIX):
            run_teacher_paths(self.teacher)  # every item run:PATH, none twice
        else:
            _check(
                self.teacher in TEACHER_NAMES,
                f"unknown teacher '{self.teacher}'; valid: {', '.join(TEACHER_NAMES)}, or run:PATH of a "
                f"finished medkd run (comma list for an ensemble)",
            )
        _check(self.pool in POOLS, f"unknown --pool '{self.pool}'; valid: {', '.join(POOLS)}")
        _check(
            self.teacher_size % 14 == 0 and self.teacher_size > 0,
            f"--teacher-size must be a multiple of the patch size 14 (e.g. 28, 56, 224), "
            f"got {self.teacher_size}",
        )
        _check(
            self.feature_batch_size >= 1, f"--feature-batch-size must be >= 1, got {self.feature_batch_size}"
        )

    def out_path(self) -> Path:
        """Where the cache goes: `--out`, else `cache/<flag>_<size>_<teacher>.h5`.

        A run teacher is named by its folder names: `cache/<flag>_<size>_run-<name>[+<name>...].h5`.
        """
        if self.out:
            return Path(self.out)
        if self.teacher.startswith(RUN_PREFIX):
            name = "run-" + "+".join(Path(p).name for p in run_teacher_paths(self.teacher))
        else:
            name = self.teacher
        return Path("cache") / f"{self.dataset}_{self.size}_{name}.h5"


@dataclass(frozen=True)
class DistillConfig:
    """Stage two: train a student from the cached teacher logits (or alone, with alpha=1)."""

    cache: str | None = None
    dataset: str | None = None
    size: int = 28
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
    patience: int | None = None
    out: str | None = None
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    seed: int = 0
    force: bool = False
    quiet: bool = False
    resume: bool = False  # continue from the run folder's epoch checkpoint (last.pt) when it has one

    def __post_init__(self) -> None:
        _check_common(self)
        _check(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        _check(self.temperature < float("inf"), f"--temperature must be finite, got {self.temperature}")
        _check(
            self.student in STUDENT_NAMES,
            f"unknown student '{self.student}'; valid: {', '.join(STUDENT_NAMES)}",
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
        _check(
            self.cache is not None or self.dataset is not None,
            "give --cache CACHE (knowledge distillation) or --dataset FLAG with --alpha 1 (baseline)",
        )
        _check(
            self.cache is not None or self.alpha == 1.0,
            f"--alpha {self.alpha} needs teacher logits: give --cache CACHE, or use --alpha 1 for the "
            f"supervised baseline",
        )


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
    if values.get("milestones") is not None:
        values["milestones"] = tuple(int(m) for m in values["milestones"])
    try:
        return cls(**values)
    except TypeError as err:  # a required field missing, e.g. --dataset for cache-teacher
        raise MedkdError(str(err).replace("__init__() ", "")) from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-plain copy of a config, saved next to every output."""
    out = dataclasses.asdict(cfg)
    if out.get("milestones") is not None:
        out["milestones"] = list(out["milestones"])
    return out
