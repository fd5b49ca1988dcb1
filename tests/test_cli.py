"""The CLI shell: help is instant and complete, bad input gives a message, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spinefrac.cli import build_parser, main

STAGES = ("synth", "inspect", "prepare-detector", "train-detector", "detect", "export", "prepare-locator",
          "train-locator", "train", "predict", "evaluate", "demo")


def test_every_stage_has_a_subcommand_with_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(STAGES) <= set(sub.choices)
    for name in STAGES:
        assert "example:" in sub.choices[name].format_help(), name


def test_help_does_not_import_torch():
    code = ("import sys; from spinefrac.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'ultralytics' not in sys.modules, 'heavy import'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "spinefrac synth" in result.stdout


def test_unknown_config_key_is_a_clean_error(tmp_path, caplog):
    rc = main(["synth", str(tmp_path / "x"), "--studies", "1", "--set", "image.sise=64"])
    assert rc == 2
    assert "did you mean 'size'" in caplog.text


def test_typo_in_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synht"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
