"""The run folder's contract: the typed result (formats 1 and 2), its validator, and the config hash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medkd.config import DistillConfig, to_dict
from medkd.distill import run_name
from medkd.errors import MedkdError
from medkd.runs import (
    RunResult,
    config_hash,
    legacy_config_hash,
    read_result,
    same_experiment,
    write_result,
)


def result_json(**config_overrides) -> dict:
    config = to_dict(DistillConfig(cache="c.h5", out="runs/x", **config_overrides))
    return {
        "medkd_result": 2, "config": config, "dataset": "breastmnist", "size": 28,
        "val": {"auc": 0.8, "acc": 0.7}, "test": {"auc": 0.75, "acc": 0.65},
        "teacher": {"fingerprint": "f" * 64}, "config_hash": config_hash(config, "f" * 64),
    }  # fmt: skip


def test_format_1_reads_as_format_2_and_its_copies_must_agree(tmp_path):
    data = result_json(alpha=0.5, seed=3)
    v1 = {
        **data,
        "medkd_result": 1,
        "alpha": 0.5,
        "temperature": 2.0,
        "lr": 1e-3,
        "seed": 3,
        "student": "resnet50",
    }
    (tmp_path / "result.json").write_text(json.dumps(v1))
    result = read_result(tmp_path)
    assert result.medkd_result == 2 and (result.alpha, result.seed, result.student) == (0.5, 3, "resnet50")
    assert "alpha" not in result.to_json()  # written once, in the config
    (tmp_path / "result.json").write_text(json.dumps({**v1, "seed": 4}))
    with pytest.raises(MedkdError, match="top-level seed 4 differs from config 3"):
        read_result(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.pop("test"), "lacks test"),
        (lambda d: d["config"].pop("alpha"), "lacks alpha"),
        (lambda d: d.update(val={"auc": 0.5}), "'val' must hold auc and acc"),
        (lambda d: d.update(medkd_result=7), "has result format 7; this medkd reads 1 and 2"),
        (lambda d: d.pop("medkd_result"), "not a medkd result"),
    ],
)
def test_a_result_that_is_not_one_is_one_line_naming_the_gap(tmp_path, change, message):
    data = result_json()
    change(data)
    (tmp_path / "result.json").write_text(json.dumps(data))
    with pytest.raises(MedkdError, match=message):
        read_result(tmp_path)


def test_write_result_refuses_what_read_result_would_refuse(tmp_path):
    result = RunResult.from_json(result_json(), "x")
    result.test = {"auc": 0.5}
    with pytest.raises(MedkdError, match="'test' must hold auc and acc"):
        write_result(tmp_path, result)
    assert list(tmp_path.iterdir()) == []


def test_config_hash_counts_what_a_run_computes_not_where_it_reports():
    base = to_dict(DistillConfig(cache="c.h5"))
    for key, value in [("out", "elsewhere"), ("device", "cpu"), ("data_dir", "/d"), ("quiet", True),
                       ("force", True), ("resume", True), ("download", True)]:  # fmt: skip
        assert config_hash({**base, key: value}, "f") == config_hash(base, "f"), key
    assert config_hash({**base, "lr": 0.1}, "f") != config_hash(base, "f")
    assert config_hash(base, "f") != config_hash(base, "g")  # the cache counts by content
    # medkd 0.1 counted --download: its stored hashes are recognised, not matched by accident.
    assert legacy_config_hash({**base, "download": True}, "f") != legacy_config_hash(base, "f")


def test_a_result_written_with_download_is_the_same_experiment_as_a_rerun_without():
    data = result_json(download=True)
    data["config_hash"] = legacy_config_hash(data["config"], "f" * 64)  # as medkd 0.1 stored it
    result = RunResult.from_json(data, "x")
    rerun = to_dict(DistillConfig(cache="c.h5", out="runs/x"))
    assert same_experiment(result, config_hash(rerun, "f" * 64))
    assert not same_experiment(result, config_hash({**rerun, "lr": 0.5}, "f" * 64))


def test_default_run_names_of_close_alphas_do_not_collide():
    names = {
        run_name(DistillConfig(cache="c.h5", alpha=a), "breastmnist", 28, "tiny") for a in (0.1, 0.1000001)
    }
    assert len(names) == 2
    assert run_name(DistillConfig(cache="c.h5"), "breastmnist", 28, "tiny") == (
        "breastmnist_28_resnet50-28_tiny_a0.2_t2_s0"
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["distill", "--help"], ["sweep", "--help"], ["cache-teacher", "-h"]]
)
def test_help_imports_no_torch(args):
    code = (
        "import sys\nfrom medkd.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'h5py', 'numpy'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out and out.strip().endswith("HEAVY []"), out[-500:]
