"""The meg-jax console script and the one command-line syntax of every job.

Every job (``meg-jax demo|distill|calibrate|train|evaluate``) parses ``--field value`` into a
typed dataclass: ``--help`` lists every field of its config with the default, and a bad field
or value exits with status 2 naming it, before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from meg_jax import config as config_lib
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


def _flags(config, prefix=""):
    """``--a.b`` of every leaf field of ``config`` (optional sections that are off have no flags)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _flags(value, f"{prefix}{f.name}.")
        elif value is None and any(dataclasses.is_dataclass(a) for a in typing.get_args(hints[f.name])):
            continue
        else:
            yield f"--{prefix}{f.name}"


def _job_configs():
    from meg_jax.distill.config import preset
    from meg_jax.meg.calibrate import CalibrationConfig
    from meg_jax.rl.config import RunConfig
    from train import calibrate, cvpo, demo, distill

    return {
        "train": (["--workdir", "w"], RunConfig(), cvpo.Args),
        "distill": (["--preset", "test", "--workdir", "w"], preset("test"), distill.Args),
        "calibrate": ([], CalibrationConfig(), calibrate.Args),
        "demo": ([], None, demo.Args),
    }


@pytest.mark.parametrize("command", ["train", "distill", "calibrate", "demo", "evaluate"])
def test_job_help_lists_every_field_with_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # one line per flag: no wrapping inside a name
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    flags = []
    if command != "evaluate":
        _, config, args_type = _job_configs()[command]
        if config is not None:
            flags += list(_flags(config))
        flags += [f"--{f.name}" for f in dataclasses.fields(args_type)
                  if not dataclasses.is_dataclass(f.default) and f.type != "bool"]
    else:
        flags += ["--episodes", "--sweep_fractions", "--artifact"]
    assert len(flags) >= 3
    shown = {word.rstrip(",") for line in out.splitlines() for word in line.split() if word.startswith("--")}
    missing = [f for f in flags if f not in shown]
    assert not missing, f"{command} --help lacks {missing}"
    # every option line ends its help with the default (booleans: their flag pair, e.g. --no_progress)
    assert out.count("(default:") >= len(flags)


@pytest.mark.parametrize("command, argv, named", [
    ("train", ["--workdir", "w", "--cvpo.batch_sise", "3"], "--cvpo.batch_sise"),
    ("train", ["--workdir", "w", "--cvpo.batch_size", "3.5"], "--cvpo.batch_size"),
    ("train", ["--workdir", "w", "--algo", "sac"], "--algo"),
    ("distill", ["--preset", "test", "--workdir", "w", "--student.step_counts", "1", "two"], "--student.step_counts"),
    ("distill", ["--preset", "nope", "--workdir", "w"], "--preset"),
    ("distill", ["--preset", "test", "--workdir", "w", "--stage", "teacher3"], "--stage"),
    ("calibrate", ["--snr_db", "0", "x"], "--snr_db"),
    ("calibrate", ["--steps", "4", "2"], "steps"),  # parsed, then refused by CalibrationConfig.validate
    ("demo", ["--budget", "many"], "--budget"),
    ("demo", ["--budget", "0"], "--budget"),
    ("demo", ["--smoke", "--set", "budget=1"], "--set"),  # the old override syntax is gone
    ("evaluate", ["runs/x", "--episodes", "1"], "--episodes"),
])
def test_bad_field_or_value_exits_2_naming_it(command, argv, named, capsys):
    assert cli.main([command, *argv]) == 2
    assert named in capsys.readouterr().err


def test_job_flags_reach_the_config():
    from train import calibrate, cvpo, distill

    args, config = cvpo.parse_args(["--workdir", "w", "--env.limits", "0.1", "0.2", "--eval.deterministic",
                                    "--cvpo.actor_hidden", "8", "8", "8", "--no_compile_cache"])
    assert config.env.limits == (0.1, 0.2) and config.eval.deterministic and config.cvpo.actor_hidden == (8, 8, 8)
    assert not args.compile_cache and args.progress
    d = distill.parse_args(["--preset", "test", "--workdir", "w", "--decoder", "None", "--student.steps", "7"])
    assert d.config.preset == "test" and d.config.decoder is None and d.config.student.steps == 7
    assert d.config.teacher_ft is not None  # the test preset's, untouched
    c = calibrate.parse(["--cost_presets", "tiny", "--snr_db", "-5", "10", "--link_mode", "digital"])
    assert c.cost_presets == ("tiny",) and c.snr_db == (-5.0, 10.0) and c.link_mode == "digital"


def test_base_config_file_then_flags(tmp_path, capsys):
    from meg_jax.rl.config import RunConfig
    from train import cvpo

    path = tmp_path / "config.json"
    config_lib.save_json(dataclasses.replace(RunConfig(), seed=7, total_env_steps=99), path)
    _, config = cvpo.parse_args(["--workdir", "w", "--config", str(path), "--seed", "8"])
    assert config.seed == 8 and config.total_env_steps == 99
    path.write_text('{"seed": 7, "total_env')
    assert cvpo.main(["--workdir", "w", "--config", str(path)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
