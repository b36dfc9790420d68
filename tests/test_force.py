"""Never touch a file medkd did not create: `report --plot` and `demo --out` refuse what is not theirs,
a result.json of the wrong shape is a broken run (not a crash), and bracketed paths print as they are.

Every test reads handwritten run folders, or runs the demo with its training steps replaced by fakes, so
each takes well under a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import medkd.demo
from medkd.cli import main
from medkd.report import collect_runs
from medkd.runs import RunResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEACHER = {
    "cache": "c.h5", "teacher": "tiny", "teacher_input_size": 28, "weights_sha256": "",
    "fingerprint": "f" * 64, "test_auc": 0.61, "test_acc": 0.55,
}  # fmt: skip


def result_data(folder: Path, alpha: float, temperature: float, seed: int = 0, student: str = "resnet18"):
    """What `medkd distill` writes to result.json, by hand; the metrics rise with alpha, seed and T."""
    config = {
        "cache": "c.h5", "dataset": None, "size": 28, "alpha": alpha, "temperature": temperature,
        "student": student, "student_size": 16, "student_weights": None, "interpolation": "bicubic",
        "epochs": 1, "batch_size": 64, "lr": 1e-3, "milestones": None, "patience": None, "out": str(folder),
        "seed": seed,
    }  # fmt: skip
    score = 0.6 + alpha / 10 + seed / 100 + temperature / 100
    return {
        "medkd_result": 2, "run_dir": str(folder), "config": config, "dataset": "breastmnist", "size": 28,
        "task": "binary-class", "n_outputs": 2, "student_size": 16, "baseline": alpha == 1.0,
        "teacher": TEACHER, "data_sha256": {"test": "c"}, "epochs_run": 1, "best_epoch": 1,
        "val": {"auc": score, "acc": score}, "test": {"auc": score, "acc": score - 0.05},
        "wall_seconds": 2.0,
    }  # fmt: skip


def write_run(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(data))
    (folder / "best.pt").write_bytes(b"")
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two seeds of a baseline and two KD settings: enough for the table and the ablation plot."""
    out = tmp_path / "runs"
    for alpha, temperature in ((1.0, 2.0), (0.2, 2.0), (0.5, 2.0)):
        for seed in (0, 1):
            folder = out / f"a{alpha:g}_t{temperature:g}_s{seed}"
            write_run(folder, result_data(folder, alpha, temperature, seed))
    return out


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def refused(result, message: str) -> None:
    """Exit 1 with one line naming the problem, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a MedkdError, not a traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


# ---------------------------------------------------------------- report --plot


@pytest.mark.parametrize("name", ["data/breastmnist.npz", "cache.h5"])
@pytest.mark.parametrize("force", [False, True])
def test_report_plot_never_overwrites_a_data_file_or_cache(runs, tmp_path, name, force):
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"the user's data")
    result = invoke("report", str(runs), "--plot", str(target), *(["--force"] if force else []))
    refused(result, "must end in .png")
    assert target.read_bytes() == b"the user's data"
    assert {p.name for p in target.parent.iterdir()} - {"runs"} == {target.name}  # nothing new beside it


def test_report_plot_of_a_new_name_must_end_in_png(runs, tmp_path):
    refused(
        invoke("report", str(runs), "--plot", str(tmp_path / "figs" / "ablation.pdf")), "must end in .png"
    )
    assert not (tmp_path / "figs").exists()  # refused before anything is made


def test_report_plot_refuses_an_existing_png_without_force_and_replaces_it_with(runs, tmp_path):
    png = tmp_path / "ablation.png"
    png.write_bytes(PNG_SIGNATURE + b"an earlier figure")
    refused(invoke("report", str(runs), "--plot", str(png)), "already exists; pass --force")
    assert png.read_bytes() == PNG_SIGNATURE + b"an earlier figure"
    result = invoke("report", str(runs), "--plot", str(png), "--force")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000


def test_report_force_replaces_only_a_png(runs, tmp_path):
    fake = tmp_path / "weights.png"  # a .png name, but not a PNG: maybe the user's file, renamed
    fake.write_bytes(b"not a png at all")
    refused(invoke("report", str(runs), "--plot", str(fake), "--force"), "is not a PNG image")
    assert fake.read_bytes() == b"not a png at all"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ---------------------------------------------------------------- broken result.json shapes


def _with(path: str, value):
    """A change to a good result: `path` (`a.b`) set to `value`."""

    def change(data: dict) -> dict:
        *parents, key = path.split(".")
        inner = data
        for parent in parents:
            inner = inner[parent]
        inner[key] = value
        return data

    return change


SHAPES = {
    "config is a number": _with("config", 5),
    "config is a list": _with("config", [1]),
    "only format and config": lambda data: {"medkd_result": 2, "config": 5},
    "test is a string": _with("test", "x"),
    "a metric is a string": _with("test", {"auc": "x", "acc": 1}),
    "alpha is a string": _with("config.alpha", "x"),
    "student is a number": _with("config.student", 5),
    "epochs is a string": _with("config.epochs", "x"),
    "milestones is a number": _with("config.milestones", 5),
    "milestones hold lists": _with("config.milestones", [[1]]),
    "student weights is a list": _with("config.student_weights", [1]),
    "dataset is a number": _with("dataset", 5),
    "data_sha256 is a list": _with("data_sha256", [1]),
    "data_sha256 holds lists": _with("data_sha256", {"test": [1]}),
    "teacher is a number": _with("teacher", 5),
    "teachers hold numbers": _with("teachers", [5]),
    "teacher test_auc without test_acc": _with("teacher", {"teacher": "tiny", "test_auc": 0.5}),
    "augment is a number": _with("augment", 5),
    "augment preset is a number": _with("augment", {"preset": 5}),
    "wall_seconds is a string": _with("wall_seconds", "x"),
    "best_epoch is a string": _with("best_epoch", "x"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_result_of_the_wrong_shape_is_listed_as_broken_and_the_others_reported(runs, shape):
    folder = runs / "a0.2_t2_s1"
    data = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps(SHAPES[shape](data)))
    results, problems = collect_runs(runs)
    assert len(results) == 5
    assert [(Path(p["run_dir"]).name, p["status"]) for p in problems] == [("a0.2_t2_s1", "broken")]
    assert "result.json" in problems[0]["reason"] and "\n" not in problems[0]["reason"]
    result = invoke("report", str(runs), "--format", "csv")
    assert result.exit_code == 0, result.output
    assert f"broken: {folder} (" in result.stderr
    rows = result.stdout.strip().splitlines()[1:]
    assert len(rows) == 4 and sum(row.startswith("kd,") for row in rows) == 2  # teacher, baseline, 2 KD


def test_every_shape_is_broken_in_the_same_report(runs):
    for i, change in enumerate(SHAPES.values()):
        folder = runs / f"broken{i}"
        write_run(folder, change(result_data(folder, 0.2, 2.0)))
    results, problems = collect_runs(runs)
    assert len(results) == 6 and len(problems) == len(SHAPES)
    assert {p["status"] for p in problems} == {"broken"}
    assert invoke("report", str(runs)).exit_code == 0


# ---------------------------------------------------------------- demo --out


def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the demo's data, training and cache steps by fakes that write handwritten results into the
    run folders the demo asks for; returns the list of run folders they were asked for."""
    asked: list[str] = []

    def result(out: str, alpha: float, temperature: float) -> RunResult:
        asked.append(out)
        folder = write_run(Path(out), result_data(Path(out), alpha, temperature))
        return RunResult.from_json(json.loads((folder / "result.json").read_text()), folder)

    def distill(cfg, console=None, cache=None):
        return result(cfg.out, cfg.alpha, cfg.temperature)

    def run_sweep(sweep, console=None):
        return [result(t["out"], t["alpha"], t["temperature"]) for t in medkd.demo.expand(sweep)]

    monkeypatch.setattr(
        medkd.demo, "make_synthetic_like", lambda folder, *a, **k: Path(folder).mkdir(exist_ok=True)
    )
    monkeypatch.setattr(medkd.demo, "distill", distill)
    monkeypatch.setattr(medkd.demo, "cache_teacher", lambda cfg, console=None: Path(cfg.out))
    monkeypatch.setattr(medkd.demo, "TeacherCache", lambda path: None)
    monkeypatch.setattr(medkd.demo, "run_trial", lambda config, cache=None, console=None: None)
    monkeypatch.setattr(medkd.demo, "run_sweep", run_sweep)
    return asked


@pytest.mark.parametrize("force", [False, True])
def test_demo_refuses_a_users_folder_with_or_without_force(tmp_path, monkeypatch, force):
    asked = fake_pipeline(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes")
    result = invoke("demo", "--out", str(mine), "--quiet", *(["--force"] if force else []))
    refused(result, "is not a medkd demo folder")
    assert [p.name for p in mine.iterdir()] == ["report.md"] and (
        mine / "report.md"
    ).read_text() == "my own notes"
    assert asked == []


def test_demo_force_redoes_its_own_folder_with_its_own_runs_only(tmp_path, monkeypatch):
    asked = fake_pipeline(monkeypatch)
    out = tmp_path / "demo"
    assert invoke("demo", "--out", str(out), "--quiet").exit_code == 0
    assert (out / ".medkd-demo").is_file()
    refused(invoke("demo", "--out", str(out), "--quiet"), "already holds a medkd demo; pass --force")
    # The user keeps a run of their own in the demo's runs/: the demo's report must not show it.
    user = out / "runs" / "mine"
    write_run(user, result_data(user, 0.3, 3.0, student="users-student"))
    before = (user / "result.json").read_text()
    asked.clear()
    result = invoke("demo", "--out", str(out), "--quiet", "--force")
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "users-student" not in report
    assert len(report.strip().splitlines()) == 2 + 6  # teacher, baseline, 2 × 2 sweep
    assert (user / "result.json").read_text() == before and str(user) not in asked
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- bracketed paths print as they are


def test_report_prints_a_bracketed_folder_and_plot_literally(runs, tmp_path):
    folder = runs.rename(tmp_path / "r[bold]s")
    broken = write_run(folder / "x[red]y", {"medkd_result": 2, "config": 5})
    plot = tmp_path / "fig[bold].png"
    result = invoke("report", str(folder), "--plot", str(plot))
    assert result.exit_code == 0, result.output
    assert f"{folder}:" in " ".join(result.stdout.split())  # the table's title
    assert f"broken: {broken} (" in result.stderr
    assert f"ablation plot: {plot}" in result.stderr and plot.is_file()


def test_demo_prints_a_bracketed_out_literally(tmp_path, monkeypatch):
    fake_pipeline(monkeypatch)
    out = tmp_path / "demo[bold]x"
    result = invoke("demo", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert text.endswith(f"report.png in {out}/")
    assert f"→ {out}/runs/sweep/a0.2_t2_s0" in text  # the KD step names its run folder
    assert f"{out}/runs (synthetic" in text  # the table's title
