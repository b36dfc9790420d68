"""Sweeps: the grid and its trial names, one cache read, resuming a killed sweep, and no teacher built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_cache_config

import medkd.cache
import medkd.distill
import medkd.trials
from medkd.cache_teacher import cache_teacher
from medkd.cli import main
from medkd.config import SweepConfig, make_sweep_config, read_toml, section_values
from medkd.data import make_synthetic_like
from medkd.errors import MedkdError
from medkd.report import collect_runs
from medkd.runs import read_result
from medkd.sweep import expand
from medkd.trials import run_trial

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Small and quick: one epoch, one optimiser step, the student at 16 px.
QUICK = ["--student", "resnet18", "--student-size", "16", "--epochs", "1", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, cache) for a tiny synthetic breastmnist and its tiny-teacher cache."""
    root = tmp_path_factory.mktemp("sweepdata")
    make_synthetic_like(root, "breastmnist", n_train=64, n_val=32, n_test=32, seed=3)
    return root, cache_teacher(tiny_cache_config(root, root / "breastmnist_28_tiny.h5"))


@pytest.fixture
def no_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any teacher backbone (ours or a timm model) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher backbone was built during a sweep")

    monkeypatch.setattr("medkd.backbones.build_teacher", refuse)
    monkeypatch.setattr("medkd.cache_teacher.build_teacher", refuse)
    monkeypatch.setattr("timm.create_model", refuse)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Counts cache reads and the trials `distill` trains (by folder name)."""
    calls: dict[str, list] = {"cache_reads": [], "trained": []}
    real_cache, real_distill = medkd.cache.TeacherCache, medkd.distill.distill

    def reading_cache(path):
        calls["cache_reads"].append(str(path))
        return real_cache(path)

    def training(cfg, console=None, cache=None, inputs=None):
        calls["trained"].append(Path(cfg.out).name)
        return real_distill(cfg, console=console, cache=cache, inputs=inputs)

    monkeypatch.setattr(medkd.cache, "TeacherCache", reading_cache)
    monkeypatch.setattr(medkd.distill, "TeacherCache", reading_cache)
    monkeypatch.setattr(medkd.trials, "TeacherCache", reading_cache)
    monkeypatch.setattr(medkd.trials, "distill", training)
    return calls


def test_3x3_sweep_runs_every_trial_and_a_rerun_trains_only_the_killed_ones(
    data, tmp_path, no_teacher, counted
):
    root, cache = data
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", str(cache), "--data-dir", str(root), "--out", str(out), *QUICK]
    args += ["--alpha", "0.2,0.5,0.8", "--temperature", "1,2,4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    names = {f"a{a}_t{t}_s0" for a in ("0.2", "0.5", "0.8") for t in ("1", "2", "4")}
    assert {p.parent.name for p in out.glob("*/result.json")} == names
    assert len(counted["trained"]) == 9 and counted["cache_reads"] == [str(cache)]
    assert result.output.count(" ran in ") == 9 and "9 trial(s) ran, 0 skipped" in result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    first = {n: json.loads((out / n / "result.json").read_text()) for n in names}
    assert len({r["config_hash"] for r in first.values()}) == 9

    # A kill: two trials never wrote result.json (one left its best.pt behind), one never started.
    killed = ["a0.5_t2_s0", "a0.8_t4_s0", "a0.2_t1_s0"]
    for name in killed[:2]:
        (out / name / "result.json").unlink()
    shutil.rmtree(out / killed[2])
    counted["trained"].clear()
    counted["cache_reads"].clear()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(counted["trained"]) == sorted(killed)
    assert counted["cache_reads"] == [str(cache)]
    assert result.output.count(" skipped (finished)") == 6 and "3 trial(s) ran, 6 skipped" in result.output
    for name in killed:  # CPU runs repeat exactly: the resumed sweep is the sweep that was killed
        assert json.loads((out / name / "result.json").read_text())["test"] == first[name]["test"]

    # Everything finished: a third run trains nothing; it reads the cache once, to check it and the data.
    counted["trained"].clear()
    counted["cache_reads"].clear()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and counted == {"cache_reads": [str(cache)], "trained": []}


def test_trial_with_another_config_in_its_folder_is_refused_unless_force(data, tmp_path, no_teacher):
    root, cache = data
    sweep = SweepConfig(
        cache=str(cache), alpha=(0.5,), data_dir=str(root), out=str(tmp_path / "s"), student="resnet18",
        student_size=16, epochs=1, batch_size=64, quiet=True,
    )  # fmt: skip
    (config,) = expand(sweep)
    first = run_trial(config)
    assert run_trial(config) == read_result(config["out"]) == first
    changed = {**config, "lr": 1e-2}
    with pytest.raises(MedkdError, match="another config.*--force"):
        run_trial(changed)
    forced = run_trial({**changed, "force": True})
    assert forced.lr == 1e-2 and forced.config_hash != first.config_hash


def test_failed_trial_leaves_error_json_that_report_lists(tmp_path, monkeypatch):
    def failing(cfg, console=None, cache=None, inputs=None):
        assert Path(cfg.out).is_dir()  # the trial made and claimed its folder
        raise RuntimeError("loss exploded")

    monkeypatch.setattr(medkd.trials, "distill", failing)
    (config,) = expand(SweepConfig(dataset="breastmnist", alpha=(1.0,), out=str(tmp_path / "s")))
    with pytest.raises(RuntimeError, match="loss exploded"):
        run_trial(config)
    results, problems = collect_runs(tmp_path)
    assert results == []
    assert problems == [
        {"run_dir": config["out"], "status": "broken", "reason": "RuntimeError: loss exploded"}
    ]


def names(sweep: SweepConfig) -> list[str]:
    return [Path(t["out"]).name for t in expand(sweep)]


def test_expand_gives_plain_distill_configs_with_readable_unique_names():
    sweep = SweepConfig(cache="c.h5", alpha=(0.1, 0.2), temperature=(2, 4.5), seed=(0, 1), out="runs/s")
    trials = expand(sweep)
    assert len(trials) == 8
    assert json.loads(json.dumps(trials)) == trials  # JSON-plain
    assert names(sweep)[:4] == ["a0.1_t2_s0", "a0.1_t2_s1", "a0.1_t4.5_s0", "a0.1_t4.5_s1"]
    assert trials[0]["out"] == str(Path("runs/s") / "a0.1_t2_s0") and trials[0]["cache"] == "c.h5"
    assert trials[0]["temperature"] == 2.0 and isinstance(trials[0]["temperature"], float)
    two_lrs = SweepConfig(cache="c.h5", lr=(1e-3, 1e-4), out="s")
    assert names(two_lrs) == ["a0.2_t2_s0_lr0.001", "a0.2_t2_s0_lr0.0001"]
    # Names stay unique when %g would round two values to one.
    assert len(set(names(SweepConfig(cache="c.h5", alpha=(0.1234567, 0.1234568), out="s")))) == 2
    assert SweepConfig(cache="c.h5").out_path() == Path("runs/sweep_c_resnet50")


def test_pairs_instead_of_the_grid():
    sweep = SweepConfig(cache="c.h5", pairs=((2, 0.2), (5, 0.5), (8, 0.8)), out="s")
    assert names(sweep) == ["a0.2_t2_s0", "a0.5_t5_s0", "a0.8_t8_s0"]
    with pytest.raises(MedkdError, match="either pairs .* or the alpha × temperature grid, not both"):
        SweepConfig(cache="c.h5", pairs=((2, 0.2),), alpha=(0.1,))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": [0.1, 0.1]}, "lists 0.1 more than once"),
        ({"alpha": []}, "empty list"),
        ({"alpha": [0.5, 1.5]}, "--alpha must be in [0, 1], got 1.5"),
        ({"temperature": ["x"]}, "must hold numbers"),
        ({"pairs": [[2]]}, "list of [temperature, alpha] pairs"),
        ({"alphas": [0.1]}, "unknown config key(s) alphas"),
    ],
)
def test_bad_sweep_values_are_one_clear_error(values, message):
    with pytest.raises(MedkdError) as err:
        make_sweep_config(values, {"cache": "c.h5"})
    assert message in str(err.value)


def test_toml_lists_scalars_and_flags_overriding():
    cfg = make_sweep_config({"alpha": 0.3, "temperature": [1, 2], "seed": 4, "epochs": 5}, {"cache": "c.h5"})
    assert (cfg.alpha, cfg.temperature, cfg.seed, cfg.epochs) == ((0.3,), (1.0, 2.0), (4,), 5)
    table4 = section_values(read_toml(CONFIGS / "ablation-table4.toml"), "sweep")
    # A grid flag replaces the file's pairs instead of colliding with them, and the other way round.
    assert names(make_sweep_config(table4, {"cache": "c.h5", "alpha": (0.1,)})) == ["a0.1_t2_s0"]
    alpha_file = {"alpha": [0.1, 0.2], "temperature": [2]}
    assert names(make_sweep_config(alpha_file, {"cache": "c.h5", "pairs": ((3, 0.3),)})) == ["a0.3_t3_s0"]


@pytest.mark.parametrize(
    ("name", "grid"),
    [
        ("alpha", [(a / 10, 2.0) for a in range(1, 10)]),
        ("temperature", [(0.2, float(t)) for t in range(1, 10)]),
        ("table4", [(0.2, 2.0), (0.5, 5.0), (0.8, 8.0)]),
    ],
)
def test_ablation_configs_are_the_paper_grids_on_the_paper_recipe(name, grid):
    cfg = make_sweep_config(
        section_values(read_toml(CONFIGS / f"ablation-{name}.toml"), "sweep"), {"cache": "c.h5"}
    )
    trials = expand(cfg)
    assert [(t["alpha"], t["temperature"]) for t in trials] == grid
    for t in trials:
        assert (t["epochs"], t["batch_size"], t["lr"], t["milestones"]) == (100, 32, 1e-3, [50, 75])
        assert (t["student"], t["student_size"]) == ("resnet50", 224)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "0.1,x"], "expected comma-separated numbers like 0.1,0.2, got '0.1,x'"),
        (["--seed", "0,1.5"], "expected comma-separated numbers like 0,1,2"),
        (["--alpha", "0.2,1.5"], "--alpha must be in [0, 1], got 1.5"),
        (["--pairs", "2-0.2"], "expected TEMPERATURE:ALPHA pairs"),
        (["--pairs", "2:0.2", "--alpha", "0.1"], "not both"),
        ([], "missing.h5 not found"),
        (["--cache", "missing.h5"], "--cache missing.h5 is given twice"),
        (["--cache", "other.h5"], "missing.h5 not found"),
        (["--teacher-weighting", "mean,mixup"], "'mixup' is not one of mean, confidence, learned"),
        (["--teacher-weighting", "confidence"], "give two or more --cache"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sweep", "--cache", "missing.h5", "--out", "s", *QUICK, *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
