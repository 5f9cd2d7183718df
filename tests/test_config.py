"""Tests for the shared config plumbing (JSON round-trip, overrides, diffs)."""

from __future__ import annotations

import dataclasses

import pytest

from meg_jax import config as cfg


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
