"""The meg-jax console script: help, and clear errors for commands it does not know."""

from __future__ import annotations

import pytest

from train import cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "demo" in err
