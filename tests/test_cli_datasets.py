"""`medkd datasets`, `--help` and error handling of the command group, through click's CliRunner."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from medkd.cli import main
from medkd.data import flags_2d, make_synthetic_like

# rich wraps a table to the terminal width; give it room so every cell stays on one line
ENV = {"COLUMNS": "200"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ENV)


def row(output: str, flag: str) -> list[str]:
    """The cells of `flag`'s table row."""
    lines = [line for line in output.splitlines() if re.search(rf"\b{flag}\b", line)]
    assert len(lines) == 1, f"{flag}: {lines}"
    return [cell.strip() for cell in re.split(r"[│┃|]", lines[0]) if cell.strip()]


def test_datasets_lists_every_2d_flag_and_local_sizes(synthetic_root: Path, tmp_path: Path) -> None:
    make_synthetic_like(tmp_path, "breastmnist", size=64, n_train=4, n_val=2, n_test=2)
    result = invoke("datasets", "--data-dir", str(synthetic_root))
    assert result.exit_code == 0, result.output
    assert len(flags_2d()) == 12
    for flag in flags_2d():
        assert row(result.output, flag)[0] == flag
    assert "mnist3d" not in result.output
    # the synthetic folder holds the four task-type flags at 28 px, nothing else
    for flag in ("breastmnist", "pathmnist", "retinamnist", "chestmnist"):
        assert row(result.output, flag)[-1] == "28"
    assert row(result.output, "dermamnist")[-1] == "-"
    breast = row(result.output, "breastmnist")
    assert breast[1:6] == ["binary-class", "2", "546", "78", "156"]
    assert row(result.output, "chestmnist")[1:3] == ["multi-label, binary-class", "14"]

    result = invoke("datasets", "--data-dir", str(tmp_path))  # breastmnist at 64 px only
    assert result.exit_code == 0, result.output
    assert row(result.output, "breastmnist")[-1] == "64"
    assert row(result.output, "pathmnist")[-1] == "-"


def test_datasets_reads_the_env_var(synthetic_root: Path) -> None:
    result = CliRunner().invoke(main, ["datasets"], env={**ENV, "MEDKD_DATA": str(synthetic_root)})
    assert result.exit_code == 0, result.output
    assert str(synthetic_root) in result.output.replace("\n", "")
    assert row(result.output, "pathmnist")[-1] == "28"


@pytest.mark.realdata
def test_datasets_verify_real_files(real_data: Path) -> None:
    result = invoke("datasets", "--data-dir", str(real_data), "--verify")
    assert result.exit_code == 0, result.output
    assert row(result.output, "breastmnist")[3:] == ["546", "78", "156", "28 (md5 ok)"]
    assert row(result.output, "pneumoniamnist")[3:] == ["4708", "524", "624", "28 (md5 ok)"]
    assert row(result.output, "pathmnist")[-1] == "-"
    assert "MISMATCH" not in result.output


def test_datasets_verify_flags_a_wrong_file(tmp_path: Path) -> None:
    make_synthetic_like(tmp_path, "breastmnist", n_train=4, n_val=2, n_test=2)
    result = invoke("datasets", "--data-dir", str(tmp_path), "--verify")
    assert result.exit_code == 0, result.output
    assert row(result.output, "breastmnist")[-1] == "28 (MD5 MISMATCH)"
    # without --verify the file is only reported present
    result = invoke("datasets", "--data-dir", str(tmp_path))
    assert row(result.output, "breastmnist")[-1] == "28"
    assert "MISMATCH" not in result.output


def test_help() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output
    for command in ("datasets", "cache-teacher", "distill", "inspect"):
        assert command in result.output
    result = invoke("datasets", "-h")
    assert result.exit_code == 0
    assert "--data-dir" in result.output and "--verify" in result.output and "MEDKD_DATA" in result.output


def test_version() -> None:
    from medkd import __version__

    result = invoke("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_unknown_command_errors() -> None:
    result = invoke("frobnicate")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output
    assert "Traceback" not in result.output


def test_unknown_option_errors() -> None:
    result = invoke("datasets", "--verfy")
    assert result.exit_code == 2
    assert "--verfy" in result.output


def test_user_error_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import medkd.datasets
    from medkd.errors import MedkdError

    def broken(*args, **kwargs):
        raise MedkdError("something is wrong with breastmnist; pass --data-dir DIR")

    monkeypatch.setattr(medkd.datasets, "local_status", broken)
    result = CliRunner().invoke(main, ["datasets", "--data-dir", str(tmp_path)], env=ENV)
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: something is wrong with breastmnist; pass --data-dir DIR"
    assert "Traceback" not in result.output
    # --debug keeps the exception (and so its traceback)
    result = CliRunner().invoke(main, ["--debug", "datasets", "--data-dir", str(tmp_path)], env=ENV)
    assert isinstance(result.exception, MedkdError)


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import medkd.datasets

    def buggy(*args, **kwargs):
        raise KeyError("not a user error")

    monkeypatch.setattr(medkd.datasets, "local_status", buggy)
    result = CliRunner().invoke(main, ["datasets", "--data-dir", str(tmp_path)], env=ENV)
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyError)
