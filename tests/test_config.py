"""Tests for the shared config plumbing (JSON round-trip, overrides, diffs)."""

from __future__ import annotations

import dataclasses

import pytest

from meg_jax import config as cfg
from meg_jax.backbone.tome import ToMeConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3  # learning rate
    sizes: tuple[int, ...] = (32, 64)  # layer widths


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "tiny"  # preset name
    steps: int = 10  # number of train steps
    inner: Inner = Inner()  # nested config
    limit: float | None = None  # optional limit


def test_round_trip_preserves_types(tmp_path):
    c = Outer(name="x", steps=3, inner=Inner(lr=0.5, sizes=(1, 2, 3)), limit=2.0)
    path = tmp_path / "c.json"
    cfg.save_json(c, path)
    back = cfg.load_json(Outer, path)
    assert back == c
    assert isinstance(back.inner.sizes, tuple)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        cfg.from_dict(Outer, {"bogus": 1})


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match="Outer.steps: expected an integer"):
        cfg.from_dict(Outer, {"steps": "ten"})


def test_overrides_parse_json_values_and_nested_paths():
    c = cfg.apply_overrides(Outer(), ["steps=7", "inner.lr=0.1", "inner.sizes=[4,5]", "name=big", "limit=null"])
    assert c == Outer(name="big", steps=7, inner=Inner(lr=0.1, sizes=(4, 5)), limit=None)


def test_override_of_unknown_path_lists_valid_fields():
    with pytest.raises(ValueError, match=r"unknown config field 'inner.lrr'.*\['lr', 'sizes'\]"):
        cfg.apply_overrides(Outer(), ["inner.lrr=1"])


def test_diff_names_each_differing_leaf():
    a, b = Outer(), Outer(steps=11, inner=Inner(sizes=(32, 65)))
    assert cfg.diff(a, b) == ["inner.sizes: [32, 64] != [32, 65]", "steps: 10 != 11"]
    assert cfg.diff(a, a) == []


def test_load_json_of_truncated_file_names_it(tmp_path):
    path = tmp_path / "c.json"
    cfg.save_json(Outer(), path)
    path.write_text(path.read_text()[:15])
    with pytest.raises(ValueError, match=r"c\.json is not valid JSON \(truncated or corrupt\?\)"):
        cfg.load_json(Outer, path)
    path.write_text('{"steps": "ten"}')
    with pytest.raises(ValueError, match=r"c\.json does not hold a valid Outer: Outer\.steps: expected an integer"):
        cfg.load_json(Outer, path)


# --------------------------------------------------------------------------- command line
@dataclasses.dataclass(frozen=True)
class Section:
    width: int = 4  # section width


@dataclasses.dataclass(frozen=True)
class WithSection:
    base: Inner = Inner()  # nested config
    extra: Section | None = None  # optional section, off by default
    other: Section | None = Section(width=9)  # optional section, on by default


@dataclasses.dataclass(frozen=True)
class Job:
    workdir: str  # where the job writes
    progress: bool = True  # show a bar
    config: cfg.inline(Outer) = Outer()


@dataclasses.dataclass(frozen=True)
class SectionJob:
    config: cfg.inline(WithSection) = WithSection()


def test_parse_cli_types_nested_fields_and_tuples():
    job = cfg.parse_cli(Job, ["--workdir", "w", "--steps", "3", "--inner.lr=0.5", "--inner.sizes", "1", "2",
                              "--limit", "2.5", "--no_progress"], prog="job")
    assert job == Job(workdir="w", progress=False, config=Outer(steps=3, inner=Inner(lr=0.5, sizes=(1, 2)), limit=2.5))
    # the hyphenated spelling is the same flag
    assert cfg.parse_cli(Job, ["--workdir", "w", "--inner.sizes", "7", "--no-progress"], prog="job").config.inner.sizes == (7,)


def test_parse_cli_defaults_come_from_the_given_config():
    job = cfg.parse_cli(Job, ["--workdir", "w"], prog="job", config=Outer(name="preset", steps=99))
    assert job.config.name == "preset" and job.config.steps == 99


@pytest.mark.parametrize("argv, named", [
    (["--workdir", "w", "--inner.lrr", "1"], "--inner.lrr"),  # unknown field
    (["--workdir", "w", "--steps", "ten"], "--steps"),  # not an int
    (["--workdir", "w", "--inner.lr", "fast"], "--inner.lr"),  # not a float
    (["--steps", "3"], "--workdir"),  # required flag missing
])
def test_parse_cli_bad_field_or_value_exits_2_naming_it(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        cfg.parse_cli(Job, argv, prog="job")
    assert e.value.code == 2
    assert named in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class TomeJob:
    tome: cfg.inline(ToMeConfig) = ToMeConfig()  # a config whose __post_init__ checks its values


def test_parse_cli_invalid_config_exits_2_with_its_message(capsys):
    with pytest.raises(SystemExit) as e:
        cfg.parse_cli(TomeJob, ["--max_downsample", "0"], prog="job")
    assert e.value.code == 2 and "max_downsample" in capsys.readouterr().err


def test_parse_cli_help_lists_every_field_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside a flag's line
    with pytest.raises(SystemExit) as e:
        cfg.parse_cli(Job, ["--help"], prog="job")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag, default, text in [("--name", "tiny", "preset name"), ("--steps", "10", "number of train steps"),
                                ("--inner.lr", "0.001", "learning rate"), ("--inner.sizes", "32 64", "layer widths"),
                                ("--limit", "None", "optional limit"), ("--progress", "True", "show a bar")]:
        line = next((ln for ln in out.splitlines() if flag + " " in ln or flag + "," in ln), None)
        assert line is not None, flag
        assert f"{text} (default: {default})" in out, flag


def test_optional_sections_switch_on_and_off():
    assert cfg.parse_cli(SectionJob, [], prog="job").config == WithSection()
    job = cfg.parse_cli(SectionJob, ["--other", "None", "--extra.width", "5"], prog="job")
    assert job.config.other is None and job.config.extra == Section(width=5)
    assert cfg.parse_cli(SectionJob, ["--other.width=3"], prog="job").config.other == Section(width=3)
    with pytest.raises(SystemExit) as e:
        cfg.parse_cli(SectionJob, ["--other", "7"], prog="job")
    assert e.value.code == 2
