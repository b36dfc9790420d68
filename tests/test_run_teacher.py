"""Finished runs as teachers (`cache-teacher --teacher run:PATH`): logits, ensembles, refusals."""

import hashlib
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medkd.cache import TeacherCache
from medkd.cache_teacher import cache_teacher, inspect_cache
from medkd.cli import main
from medkd.config import CacheTeacherConfig, DistillConfig, make_config
from medkd.data import SPLITS
from medkd.distill import distill
from medkd.errors import MedkdError
from medkd.runs import read_result

# The students see 8 px (resized from the 28 px data): 12 times cheaper than 28 px, and the run teacher
# has to resize exactly as the run did for its logits to match predictions.npz.
STUDENT_SIZE = 8


def train_run(root, out, seed):
    """A finished resnet18 baseline run on the synthetic breastmnist (1 epoch at 8 px: seconds on a CPU)."""
    cfg = DistillConfig(
        dataset="breastmnist",
        alpha=1.0,
        student="resnet18",
        student_size=STUDENT_SIZE,
        epochs=1,
        data_dir=str(root),
        out=str(out),
        device="cpu",
        seed=seed,
        quiet=True,
    )
    distill(cfg)
    return out


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """Two runs of different seeds, A and C, and B: a byte-for-byte copy of A."""
    folder = tmp_path_factory.mktemp("runs")
    a = train_run(synthetic_root, folder / "A", seed=0)
    c = train_run(synthetic_root, folder / "C", seed=1)
    b = folder / "B"
    shutil.copytree(a, b)
    return {"A": a, "B": b, "C": c}


def cache_config(root, out, teacher, **kwargs):
    values = dict(dataset="breastmnist", teacher=teacher, data_dir=str(root), out=str(out), device="cpu")
    return CacheTeacherConfig(**{**values, "quiet": True, **kwargs})


@pytest.fixture(scope="module")
def single(runs, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "a.h5"
    return TeacherCache(cache_teacher(cache_config(synthetic_root, out, f"run:{runs['A']}")))


def test_cached_logits_are_the_runs_own_predictions(single, runs):
    predictions = np.load(runs["A"] / "predictions.npz")
    scores = torch.softmax(single.logits["test"], dim=1).numpy()
    np.testing.assert_allclose(scores, predictions["y_score"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(single.labels["test"], predictions["y_true"])
    result = read_result(runs["A"])
    for split in ("val", "test"):
        assert single.teacher_metrics(split) == pytest.approx(getattr(result, split), nan_ok=True)
    attrs = single.attrs
    assert attrs["teacher"] == "run:A" and attrs["backbone"] == "resnet18" and attrs["random_init"] is False
    assert attrs["weights_sha256"] == hashlib.sha256((runs["A"] / "best.pt").read_bytes()).hexdigest()
    assert attrs["teacher_input_size"] == STUDENT_SIZE and attrs["mean"] == (0.5, 0.5, 0.5)
    member = attrs["ensemble"]["members"][0]
    assert attrs["ensemble"]["combine"] == "mean_logits" and len(attrs["ensemble"]["members"]) == 1
    assert member["run_dir"] == str(runs["A"]) and member["config_hash"] == result.config_hash
    assert single.features("train").shape == (96, 512)  # ResNet18's pooled penultimate layer
    assert single.head_attrs["best_epoch"] == 1 and single.head_attrs["test_auc"] == pytest.approx(
        result.test["auc"]
    )
    assert inspect_cache(single.path)["head_check"]["status"] == "ok"  # the run's fc is the head


def test_ensemble_of_two_identical_runs_equals_one_run(single, runs, synthetic_root, tmp_path):
    cfg = cache_config(synthetic_root, tmp_path / "ab.h5", [f"run:{runs['A']}", f"run:{runs['B']}"])
    pair = TeacherCache(cache_teacher(cfg))
    for split in SPLITS:
        torch.testing.assert_close(pair.logits[split], single.logits[split], rtol=0, atol=1e-6)
    assert pair.attrs["teacher"] == "run:A+run:B" and len(pair.attrs["ensemble"]["members"]) == 2
    assert pair.features("val").shape == (32, 1024)  # both members' features, side by side
    assert inspect_cache(pair.path)["head_check"]["status"] == "ok"


def test_ensemble_from_repeated_flags_is_the_mean_of_member_logits_and_distill_reads_it(
    runs, single, synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the cache goes to its default name under ./cache
    args = ["--dataset", "breastmnist", "--data-dir", str(synthetic_root), "--device", "cpu", "--quiet"]
    result = run_cli("cache-teacher", *args, "--teacher", f"run:{runs['A']}", "--teacher", f"run:{runs['C']}")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "cache/breastmnist_28_run-A+C.h5"
    pair = TeacherCache(tmp_path / "cache" / "breastmnist_28_run-A+C.h5")
    assert [m["run_dir"] for m in pair.attrs["ensemble"]["members"]] == [str(runs["A"]), str(runs["C"])]
    only_c = TeacherCache(cache_teacher(cache_config(synthetic_root, tmp_path / "c.h5", f"run:{runs['C']}")))
    for split in SPLITS:
        mean = (single.logits[split] + only_c.logits[split]) / 2
        torch.testing.assert_close(pair.logits[split], mean, rtol=0, atol=1e-6)
        assert not torch.equal(single.logits[split], only_c.logits[split])  # the members do differ
    assert pair.head_attrs["best_epoch"] == (1, 1) and pair.head_attrs["members"] == 2
    student = DistillConfig(
        cache=str(pair.path),
        alpha=0.5,
        student="resnet18",
        student_size=STUDENT_SIZE,
        epochs=1,
        data_dir=str(synthetic_root),
        out=str(tmp_path / "kd"),
        device="cpu",
        quiet=True,
    )
    result = distill(student)
    assert result.teacher["teacher"] == "run:A+run:C" and not result.baseline


def run_cli(*args):
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code in (1, 2) and len(errors) == 1, result.output  # 2: click's usage errors
    assert "Traceback" not in result.output
    return errors[0]


def break_missing(run, runs):
    pass  # best.pt is simply not copied


def break_garbage(run, runs):
    (run / "best.pt").write_bytes(b"not a checkpoint at all")


def break_other_run(run, runs):
    shutil.copy(runs["C"] / "best.pt", run / "best.pt")  # a real checkpoint, of another run


def break_other_architecture(run, runs):
    # A checkpoint that claims to be this run but holds another network (a resnet18 with 3 outputs).
    from medkd.students import build_student

    config = read_result(run).config
    model = build_student("resnet18", 3, STUDENT_SIZE)
    torch.save({"model": model.state_dict(), "epoch": 1, "config": config}, run / "best.pt")


@pytest.mark.parametrize(
    "spoil,message",
    [
        (break_missing, "has no best.pt; it did not finish"),
        (break_garbage, "cannot read"),
        (break_other_run, "was saved by another run than"),
        (break_other_architecture, "does not fit resnet18 with 2 outputs at 8 px (Error(s) in loading"),
    ],
)
def test_a_broken_run_folder_is_refused_in_one_line(runs, synthetic_root, tmp_path, spoil, message):
    run = tmp_path / "A"
    run.mkdir()
    shutil.copy(runs["A"] / "result.json", run / "result.json")  # best.pt is added by `spoil`, or not
    spoil(run, runs)
    out = tmp_path / "c.h5"
    result = run_cli(
        "cache-teacher",
        "--dataset",
        "breastmnist",
        "--teacher",
        f"run:{run}",
        "--data-dir",
        str(synthetic_root),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    line = one_error_line(result)
    assert f"teacher run {run}" in line and message in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--teacher", "run:nowhere/run"], "teacher run folder nowhere/run not found"),
        (["--teacher", "run:{A},tiny"], "'tiny' cannot join an ensemble of runs"),
        (["--teacher", "run:{A}", "--teacher", "run:{A}"], "is listed more than once"),
        (["--teacher", "run:{A}", "--dataset", "retinamnist"], "was trained on breastmnist (28 px)"),
        (["--teacher", "dinov3"], "unknown teacher 'dinov3'; valid: a name listed by `medkd teachers`"),
    ],
)
def test_cli_refuses_bad_teachers(runs, synthetic_root, tmp_path, args, message):
    args = [a.replace("{A}", str(runs["A"])) for a in args]
    dataset = [] if "--dataset" in args else ["--dataset", "breastmnist"]
    out = tmp_path / "c.h5"
    result = run_cli("cache-teacher", *dataset, *args, "--data-dir", str(synthetic_root), "--out", str(out))
    assert message in one_error_line(result)
    assert not out.exists()


def test_toml_list_of_runs_and_validation():
    cfg = make_config(
        CacheTeacherConfig, {"dataset": "breastmnist", "teacher": ["run:runs/x", "run:y/z"]}, {}
    )
    assert cfg.teacher == "run:runs/x,run:y/z"
    assert str(cfg.out_path()) == "cache/breastmnist_28_run-x+z.h5"
    with pytest.raises(MedkdError, match="'tiny' in 'run:a,tiny' is not run:PATH"):
        CacheTeacherConfig(dataset="breastmnist", teacher="run:a,tiny")
    with pytest.raises(MedkdError, match="unknown teacher 'resnet18'; valid: .* or run:PATH"):
        CacheTeacherConfig(dataset="breastmnist", teacher="resnet18")
