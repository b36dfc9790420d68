"""The `medkd` command line: click parses and loads config, one library call does the work.

Heavy imports (torch, timm, h5py) sit inside the command bodies so `medkd --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console

from medkd import __version__
from medkd.config import INTERPOLATIONS, POOLS, STUDENT_NAMES, TEACHER_NAMES
from medkd.errors import MedkdError
from medkd.launch import LAUNCHERS

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


def build_config(ctx: click.Context, cls: type) -> Any:
    """Defaults ← `--config FILE` (top level, then its table for this command) ← flags given."""
    from medkd.config import make_config, read_toml, section_values

    file_values = read_toml(ctx.params["config"]) if ctx.params.get("config") else {}
    command = ctx.info_name.replace("-", "_")
    return make_config(cls, section_values(file_values, command), given(ctx))


def _milestones(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs like 50,75, got '{value}'") from None


def _teachers(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> str | None:
    """`--teacher` given once or more, each a name or a comma list: one comma-joined string, or None."""
    from medkd.config import RUN_PREFIX

    items = [item.strip() for v in value for item in v.split(",") if item.strip()]
    if not items:
        return None
    runs = [item for item in items if item.startswith(RUN_PREFIX)]
    if not runs:  # backbone names: the last flag wins, as for any repeated option
        items = [item.strip() for item in value[-1].split(",") if item.strip()]
        if len(items) > 1:
            raise click.BadParameter("give one backbone teacher; ensembles are of finished runs (run:PATH)")
        if items[0] not in TEACHER_NAMES:
            raise click.BadParameter(
                f"'{items[0]}' is not one of {', '.join(TEACHER_NAMES)}, nor run:PATH of a finished medkd run"
            )
    elif len(runs) != len(items):
        other = next(item for item in items if not item.startswith(RUN_PREFIX))
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


def training_options(f: Any) -> Any:
    """Options shared by `cache-teacher` (head training) and `distill` (student training)."""
    for option in reversed(
        [
            click.option("--epochs", type=int, default=100, show_default=True),
            click.option("--batch-size", type=int, default=32, show_default=True),
            click.option("--lr", type=float, default=1e-3, show_default=True),
            click.option(
                "--milestones",
                callback=_milestones,
                help="Epochs where lr drops ×0.1 [default: epochs/2, 3·epochs/4].",
            ),
            data_dir_option,
            click.option(
                "--download", is_flag=True, help="Fetch missing MedMNIST files with medmnist's downloader."
            ),
            click.option(
                "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--force", is_flag=True, help="Overwrite an existing output."),
            click.option("--quiet", is_flag=True, help="No progress bars."),
            config_option,
        ]
    ):
        f = option(f)
    return f


@main.command()
@data_dir_option
@click.option("--verify", is_flag=True, help="Check the MD5 of each local file against medmnist.INFO.")
def datasets(data_dir: str | None, verify: bool) -> None:
    """List the 2D MedMNIST datasets: task, classes, split sizes, and which sizes are here."""
    from rich.table import Table

    from medkd.data import data_root, dataset_info, flags_2d, local_status

    table = Table(title=f"MedMNIST v2 (2D) — local folder {data_root(data_dir)}")
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


@main.command("cache-teacher")
@click.option("--dataset", help="MedMNIST flag, e.g. breastmnist.")
@click.option("--size", type=int, default=28, show_default=True, help="MedMNIST image size of the data file.")
@click.option(
    "--teacher",
    multiple=True,
    callback=_teachers,
    help=f"{', '.join(TEACHER_NAMES)} [default: dinov2_vitb14]; or run:PATH, a finished medkd run "
    "(repeat it or give a comma list for a mean-logit ensemble).",
)
@click.option("--weights", help="Backbone weights on disk (official dinov2_vit*14_pretrain.pth or timm).")
@click.option("--teacher-size", type=int, default=224, show_default=True, help="Teacher input size (×14).")
@click.option("--pool", type=click.Choice(POOLS), default="cls", show_default=True)
@click.option("--feature-batch-size", type=int, default=64, show_default=True)
@click.option("--no-features", "features", flag_value=False, default=True, help="Do not store features.")
@click.option("--out", help="Cache path [default: cache/<flag>_<size>_<teacher>.h5].")
@training_options
@click.pass_context
def cache_teacher_cmd(ctx: click.Context, **_: Any) -> None:
    """Stage one: run the frozen teacher once, train its linear head, write the HDF5 logit cache."""
    from medkd.cache_teacher import cache_teacher
    from medkd.config import CacheTeacherConfig

    path = cache_teacher(build_config(ctx, CacheTeacherConfig), console=console)
    click.echo(str(path))


@main.command("inspect")
@click.argument("cache", type=click.Path(dir_okay=False))
def inspect_cmd(cache: str) -> None:
    """Show a cache: provenance, shapes, teacher AUC/ACC per split, and a head(features) = logits check."""
    from medkd.cache_teacher import inspect_cache

    inspect_cache(cache, console=Console())


@main.command()
@click.option("--cache", type=click.Path(dir_okay=False), help="Teacher cache from `medkd cache-teacher`.")
@click.option("--dataset", help="MedMNIST flag, for the supervised baseline (--alpha 1) without a cache.")
@click.option("--size", type=int, default=28, show_default=True, help="MedMNIST image size (with --dataset).")
@click.option("--alpha", type=float, default=0.2, show_default=True, help="Weight of the hard-label loss.")
@click.option("--temperature", type=float, default=2.0, show_default=True)
@click.option("--student", type=click.Choice(STUDENT_NAMES), default="resnet50", show_default=True)
@click.option("--student-size", type=int, help="Student input size [default: the data's size].")
@click.option("--student-weights", help="Initial student weights (a state dict or a medkd best.pt).")
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default="bicubic", show_default=True)
@click.option("--patience", type=int, help="Stop after this many epochs without a better val AUC.")
@click.option("--out", help="Run folder [default: runs/<dataset>_<student>_a<alpha>_t<T>_s<seed>].")
@click.option(
    "--resume", is_flag=True, help="Continue the run folder's interrupted run from its last epoch checkpoint."
)
@training_options
@click.pass_context
def distill(ctx: click.Context, **_: Any) -> None:
    """Stage two: train a student from cached teacher logits (or alone with --alpha 1 --dataset FLAG)."""
    from medkd.config import DistillConfig
    from medkd.distill import distill as run_distill

    result = run_distill(build_config(ctx, DistillConfig), console=console)
    click.echo(result["run_dir"])


def _numbers(kind: type) -> Any:
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


@main.command()
@click.option("--cache", type=click.Path(dir_okay=False), help="Teacher cache, read once for every trial.")
@click.option("--dataset", help="MedMNIST flag, for a baseline-only sweep (--alpha 1) without a cache.")
@click.option("--size", type=int, default=28, show_default=True, help="MedMNIST image size (with --dataset).")
@click.option("--alpha", callback=_numbers(float), help="Comma list of alphas, e.g. 0.1,0.2 [default: 0.2].")
@click.option("--temperature", callback=_numbers(float), help="Comma list of temperatures [default: 2].")
@click.option(
    "--pairs", callback=_pairs, help="TEMPERATURE:ALPHA pairs instead of the grid, e.g. 2:0.2,5:0.5."
)
@click.option("--seed", callback=_numbers(int), help="Comma list of seeds [default: 0].")
@click.option("--lr", callback=_numbers(float), help="Comma list of learning rates [default: 0.001].")
@click.option("--student", type=click.Choice(STUDENT_NAMES), default="resnet50", show_default=True)
@click.option("--student-size", type=int, help="Student input size [default: the data's size].")
@click.option("--student-weights", help="Initial student weights (a state dict or a medkd best.pt).")
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default="bicubic", show_default=True)
@click.option("--patience", type=int, help="Stop after this many epochs without a better val AUC.")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option(
    "--milestones", callback=_milestones, help="Epochs where lr drops ×0.1 [default: epochs/2, 3·epochs/4]."
)
@click.option("--out", help="Sweep folder, one run folder per trial [default: runs/sweep_<cache>_<student>].")
@data_dir_option
@click.option("--download", is_flag=True, help="Fetch missing MedMNIST files with medmnist's downloader.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--force", is_flag=True, help="Retrain trials whose folder holds a run of another config.")
@click.option("--quiet", is_flag=True, help="No progress bars; one status line per trial.")
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="local",
    show_default=True,
    help="Where trials run: here one after another, as Ray tasks, or as a Slurm job array (submitit).",
)
@click.option(
    "--gpus-per-trial",
    type=float,
    default=0,
    show_default=True,
    help="GPUs per trial; fractions (Ray) pack small students onto one GPU, e.g. 0.25 for four.",
)
@click.option("--cpus-per-trial", type=float, default=1, show_default=True, help="CPUs per trial.")
@click.option(
    "--ray-address", help="Ray cluster to join [default: $RAY_ADDRESS, else a new one on this node]."
)
@click.option("--slurm-partition", help="Slurm partition [default: the cluster's].")
@click.option("--slurm-time-min", type=int, default=60, show_default=True, help="Minutes per array task.")
@click.option("--slurm-max-parallel", type=int, help="Array tasks running at once [default: all].")
@click.option(
    "--slurm-trials-per-job",
    type=int,
    default=1,
    show_default=True,
    help="Trials packed into one array task, run one after another.",
)
@click.option(
    "--stage-cache",
    help="Node-local folder (may use $TMPDIR): copy the cache there once per node, sha256-checked.",
)
@config_option
@click.pass_context
def sweep(ctx: click.Context, **_: Any) -> None:
    """Grid of student runs (alpha × temperature × seed × lr) from one cache; finished trials are skipped."""
    from medkd.config import make_config, read_toml, section_values
    from medkd.launch import LaunchConfig, split_launch
    from medkd.sweep import make_sweep_config, run_sweep

    file_values = read_toml(ctx.params["config"]) if ctx.params.get("config") else {}
    # Launcher options may sit in the [sweep] table too; they steer where trials run, not what they are.
    launch_file, sweep_file = split_launch(section_values(file_values, "sweep"))
    launch_flags, sweep_flags = split_launch(given(ctx))
    launch = make_config(LaunchConfig, launch_file, launch_flags)
    sweep_cfg = make_sweep_config(sweep_file, sweep_flags)
    run_sweep(sweep_cfg, console=console, launch=launch)
    click.echo(str(sweep_cfg.out_path()))


@main.command()
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(("table", "csv", "markdown")), default="table", show_default=True
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write ablation curves (PNG) like the paper's Fig. 4."
)
def report(runs_dir: str, fmt: str, plot: str | None) -> None:
    """Summarise every run below RUNS_DIR over seeds (mean ± std); list incomplete and broken runs."""
    from medkd.report import report as run_report

    run_report(runs_dir, fmt=fmt, plot=plot, console=console)


@main.command()
@click.option(
    "--out", default="medkd-demo", show_default=True, help="Folder for data, cache, runs and report."
)
@click.option("--force", is_flag=True, help="Redo the demo in a folder that already holds one.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, force: bool, quiet: bool) -> None:
    """The whole pipeline on synthetic data, on the CPU, in minutes: cache, baseline, KD, sweep, report."""
    from medkd.demo import run_demo

    run_demo(out, quiet=quiet, force=force, console=console)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
