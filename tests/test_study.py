"""configs/study.sh and its configs: the commands each arm issues, with a fake `medkd` that logs them."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medkd.config import make_sweep_config, read_toml, section_values, split_launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "configs" / "study.sh"
DATASETS = ("breastmnist", "pneumoniamnist")

# Logs one line per call; cache-teacher writes its --out, as the real one does.
FAKE = """#!/usr/bin/env bash
echo "$*" >> "$MEDKD_LOG"
if [[ $1 == cache-teacher ]]; then
  while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && { mkdir -p "$(dirname "$2")"; touch "$2"; }; shift; done
fi
"""


@pytest.fixture
def study(tmp_path: Path):
    """A checkout-like folder (configs/ only) and a runner for the study script with the fake medkd."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    fake = tmp_path / "fake-medkd"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        before = log.read_text().splitlines() if log.exists() else []
        proc = subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=tmp_path,
            env={**os.environ, "MEDKD": str(fake), "MEDKD_LOG": str(log), **env},
            capture_output=True,
            text=True,
        )
        calls = log.read_text().splitlines() if log.exists() else []
        return proc, calls[len(before) :]

    return tmp_path, run


@pytest.mark.parametrize("dataset", DATASETS)
def test_study_configs_load_as_sweeps(dataset):
    values = section_values(read_toml(ROOT / "configs" / f"study-{dataset}.toml"), "sweep")
    launch, sweep_values = split_launch(values)
    cfg = make_sweep_config(sweep_values, {"dataset": dataset, "alpha": (1.0,)})
    assert launch == {}
    assert cfg.student == "resnet18"
    assert cfg.seed == (0, 1, 2, 3, 4)  # every arm pairs with the baseline by seed
    assert cfg.epochs == (10 if dataset == "breastmnist" else 1)


def test_ensemble_and_mixture_arms_issue_the_documented_commands(study):
    folder, run = study
    proc, calls = run("breastmnist", "kd-r18ens", "kd-mean3", MEDKD_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    base = "runs/study/breastmnist/baseline"
    assert calls[0] == (
        "cache-teacher --dataset breastmnist --quiet --out cache/study/breastmnist_r18ens.h5 "
        f"--teacher run:{base}/a1_t2_s0,run:{base}/a1_t2_s1,run:{base}/a1_t2_s2"
    )
    assert calls[1] == (
        "sweep --config configs/study-breastmnist.toml --threads 1 --quiet "
        "--out runs/study/breastmnist/kd-r18ens --cache cache/study/breastmnist_r18ens.h5"
    )
    assert calls[2].endswith(
        "--out cache/study/breastmnist_lite0.h5 --teacher efficientnet_lite0 --teacher-size 112"
    )
    assert calls[3].endswith(
        "--out cache/study/breastmnist_lite2.h5 --teacher efficientnet_lite2 --teacher-size 112"
    )
    assert calls[4].endswith(
        "--out runs/study/breastmnist/kd-mean3 --cache cache/study/breastmnist_lite0.h5 "
        "--cache cache/study/breastmnist_lite2.h5 --cache cache/study/breastmnist_r18ens.h5 "
        "--teacher-weighting mean"
    )
    assert len(calls) == 5
    # Run again: every cache exists, so only the sweeps (which skip finished trials themselves) run.
    proc, calls = run("breastmnist", "kd-r18ens", "kd-mean3", MEDKD_SEEDS="0,1,2")
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls] == ["sweep", "sweep"]
    assert all("--seed 0,1,2" in c for c in calls)


def test_every_arm_runs_in_the_documented_order(study):
    _, run = study
    proc, calls = run("pneumoniamnist")
    assert proc.returncode == 0, proc.stderr
    outs = [c.split("--out ")[1].split()[0] for c in calls if c.startswith("sweep")]
    assert [Path(o).name for o in outs] == [
        "baseline", "kd-lite0", "kd-r18ens", "kd-mean3", "kd-lite0-cf5",
        "baseline-flip", "kd-lite0-flip2", "kd-lite0-feat", "kd-lite0-attn",
    ]  # fmt: skip
    sweeps = {Path(c.split("--out ")[1].split()[0]).name: c for c in calls if c.startswith("sweep")}
    assert "--alpha 1 --augment flip" in sweeps["baseline-flip"]
    assert sweeps["kd-lite0-feat"].endswith("--cache cache/study/pneumoniamnist_lite0.h5 --feature-weight 1")
    caches = [c for c in calls if c.startswith("cache-teacher")]
    assert len(caches) == 6  # lite0, r18ens, lite2, cf5, flip2, attn: lite0 once, though three arms read it
    assert any(c.endswith("--head attention --epochs 30") for c in caches)
    assert any(c.endswith("--views 2 --augment flip") for c in caches)
    assert any(c.endswith("--cross-fit 5") for c in caches)


def test_compare_pairs_each_arm_with_the_baseline_of_its_augmentation(study):
    folder, run = study
    for arm in (
        "baseline",
        "baseline-flip",
        "kd-lite0",
        "kd-lite0-flip2",
        "kd-mean3",
        "baseline-r50",
        "kd-mean3-r50",
    ):
        (folder / "runs" / "study" / "breastmnist" / arm).mkdir(parents=True)
    proc, calls = run("breastmnist", "compare")
    assert proc.returncode == 0, proc.stderr
    r = "runs/study/breastmnist"
    assert calls == [
        f"compare {r}/baseline {r}/kd-lite0",
        f"compare {r}/baseline {r}/kd-mean3",
        f"compare {r}/baseline-flip {r}/kd-lite0-flip2",
        f"compare {r}/baseline-r50 {r}/kd-mean3-r50",
    ]


def test_resnet50_arms_repeat_the_mixture_with_a_resnet50_student(study):
    _, run = study
    proc, calls = run("breastmnist", "baseline-r50", "kd-mean3-r50")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].endswith(
        "--out runs/study/breastmnist/baseline-r50 --dataset breastmnist --alpha 1 --student resnet50"
    )
    assert calls[1].endswith("--teacher-weighting mean --student resnet50")
    assert "--cache cache/study/breastmnist_r18ens.h5" in calls[1] and len(calls) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("breastmnist", "kd-lite0", "kd-bogus"), "unknown arm 'kd-bogus'; known: baseline kd-lite0"),
        (("bloodmnist",), "no study config configs/study-bloodmnist.toml; the study has"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(study, args, message):
    folder, run = study
    proc, calls = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert calls == []
    assert not (folder / "cache").exists() and not (folder / "runs").exists()
