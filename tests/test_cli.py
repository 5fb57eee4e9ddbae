"""The `glm5` command line: `glm5 info` output, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glm5.cli import build_parser, main
from glm5.config import GLM5Config


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # rich reads it; keeps table cells from wrapping under pytest


def test_info_glm5_prints_the_headline_figures(capsys):
    assert main(["info", "--preset", "glm-5"]) == 0
    out = capsys.readouterr().out
    for needle in [
        "743,911,199,232",
        "753,864,119,552",
        "753.9B",
        "39.9B",
        "40.8B",
        "1,488 GB",
        "746 GB",
        "GiB",
        "109,824 B",
        "202,752 tokens",
        "routed experts",
        "97.43%",
    ]:
        assert needle in out, needle


def test_info_reads_a_config_json_file_and_a_folder(tmp_path, capsys):
    GLM5Config.from_preset("tiny").save(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    from_folder = capsys.readouterr().out
    assert main(["info", str(tmp_path / "config.json")]) == 0
    from_file = capsys.readouterr().out
    assert "10,226,944" in from_folder  # tiny main-model parameters
    body = lambda text: text[text.index("routed experts") :]  # the title names the source and wraps
    assert body(from_folder) == body(from_file)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_preset_is_one_line_naming_the_choices(capsys):
    assert main(["info", "--preset", "glm-6"]) == 2
    line = _error_line(capsys)
    assert "glm-6" in line and "glm-5" in line and "tiny" in line


def test_missing_config_is_one_line_with_the_fix(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "config.json" in _error_line(capsys)
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "no file or folder" in _error_line(capsys)


def test_a_preset_name_given_as_path_suggests_the_flag(capsys):
    assert main(["info", "glm-5"]) == 2
    assert "--preset glm-5" in _error_line(capsys)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"hidden_size": -1}), "hidden_size"),
        (json.dumps({"model_type": "llama"}), "model_type"),
    ],
)
def test_invalid_config_is_one_line_naming_the_problem(tmp_path, capsys, content, expected):
    (tmp_path / "config.json").write_text(content)
    assert main(["info", str(tmp_path)]) == 2
    assert expected in _error_line(capsys)


def test_info_without_a_source_says_what_to_give(capsys):
    assert main(["info"]) == 2
    assert "--preset NAME" in _error_line(capsys)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().err


def test_argparse_usage_errors_return_2_instead_of_exiting(capsys):
    assert main(["info", "--preset", "tiny", "some/path"]) == 2
    assert main(["--version"]) == 0


def test_every_subcommand_returns_through_func():
    parser = build_parser()
    args = parser.parse_args(["info", "--preset", "tiny"])
    assert callable(args.func)


def test_glm5_info_runs_as_a_module_subprocess():
    env = {**os.environ, "COLUMNS": "120"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "glm5.cli", "info", "--preset", "glm-5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "743,911,199,232" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "glm5.cli", "info", "--preset", "nope"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown preset" in bad.stderr and "Traceback" not in bad.stderr
