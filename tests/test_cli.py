"""The CLI surface: every command has --help; library errors become one line and exit code 2."""

from pathlib import Path

from typer.testing import CliRunner

from cli import app

COMMANDS = ("data", "train", "eval", "export", "triton", "segment", "stream", "demo")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    for command in (
        *COMMANDS,
        "data synth",
        "triton repo",
        "triton serve",
        "triton setup",
        "triton k8s",
    ):
        sub = CliRunner().invoke(app, [*command.split(), "--help"])
        assert sub.exit_code == 0, command
        assert "Usage" in sub.output


def test_export_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app,
        ["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x"), "--precision", "int8"],
    )
    assert res.exit_code == 2 and "--calib" in res.output
    res = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "nope.pt"),
            "--out",
            str(tmp_path / "x"),
            "--min-shape",
            "8x1024x1024",
            "--max-shape",
            "1x224x224",
        ],
    )
    assert res.exit_code == 2
    assert not (tmp_path / "x").exists()


def test_segment_and_eval_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "segment",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tmp_path / "missing"),
        ],
    )
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(
        app, ["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--backend", "triton"]
    )
    assert res.exit_code == 2 and "--url" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "c.pt"), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_export_bad_ort_fusion_is_a_usage_error(tmp_path: Path) -> None:
    args = ["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]
    res = CliRunner().invoke(app, [*args, "--ort-fusion", "bogus"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    message = " ".join(res.output.replace("│", " ").split())  # Typer boxes and wraps it
    assert "Invalid value for '--ort-fusion'" in message
    assert "'bogus' is not one of 'auto', 'on', 'off'" in message
    assert not (tmp_path / "x").exists()
