"""What ``meg-jax demo --smoke`` reports, read from its output files (report.md, metrics.json):
numbers parse and agree with each other, the limits are the artifact's, the oracle row is
feasible, and the orderings that must hold on the same episodes hold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _report_tables import row, scheme_table, section, tables
from train.demo import COMPARISON_PRESETS, DEFAULT_PRESET

FEASIBILITY_TOLERANCE = 1.02  # a policy meets a limit if its episode-average cost is <= 1.02 x the limit
# The report prints 3-4 significant digits: each printed number is within 5e-4 relative of its
# value at 4 digits and 5e-3 at 3 (0.5 in the last digit of the smallest mantissa, 100).
PRINT_RTOL = 5e-3


def _main(metrics):
    """The comparison of the trained preset (the demo's default, ``sd15-mobile``): the first one."""
    comp = metrics["comparisons"][0]
    assert comp["preset"] == DEFAULT_PRESET, [c["preset"] for c in metrics["comparisons"]]
    return comp


@pytest.fixture(scope="module")
def table(demo_smoke_run):
    _, _, report, _ = demo_smoke_run
    return scheme_table(report, DEFAULT_PRESET)


def test_every_row_parses_and_its_ratios_match_its_costs(table):
    assert {"MEG-CVPO", "PPO-Lagrangian"} <= set(table)
    for prefix in ("oracle", "always max quality", "centralised", "MEG uncompressed", "on-device"):
        row(table, prefix)
    for label, r in table.items():
        lat_limit, en_limit = r["limits"]
        for v in (r["quality"], r["latency_ms"], r["energy_mj"], r["latency_ratio"], r["energy_ratio"]):
            assert math.isfinite(v) and v > 0, (label, r)
        assert 0 < r["quality"] <= 1, (label, r)
        # cost / limit as printed = printed cost / printed limit, up to the three roundings
        np.testing.assert_allclose(r["latency_ratio"], r["latency_ms"] / lat_limit, rtol=3 * PRINT_RTOL, err_msg=label)
        np.testing.assert_allclose(r["energy_ratio"], r["energy_mj"] / en_limit, rtol=3 * PRINT_RTOL, err_msg=label)
        # "meets limits" is the tolerance rule applied to the ratios (skip ratios printed within
        # rounding of the threshold, where the printed digits cannot decide)
        worst = max(r["latency_ratio"], r["energy_ratio"])
        if abs(worst - FEASIBILITY_TOLERANCE) > PRINT_RTOL * FEASIBILITY_TOLERANCE:
            assert r["meets"] == (worst <= FEASIBILITY_TOLERANCE), (label, r)


def test_report_agrees_with_metrics_json(table, demo_smoke_run):
    _, _, _, metrics = demo_smoke_run
    comp = _main(metrics)
    lat_limit, en_limit = next(iter(table.values()))["limits"]
    # limits: the shipped sd15-512 artifact's under system energy (README: 1.491 s, 11.34 J),
    # printed from the json's; the table names the energy scope
    np.testing.assert_allclose([lat_limit, en_limit], [1491.0, 11339.0], rtol=PRINT_RTOL)
    assert comp["energy_scope"] == "system" and next(iter(table.values()))["scope"] == "system"
    np.testing.assert_allclose([lat_limit * 1e-3, en_limit * 1e-3], comp["limits"], rtol=PRINT_RTOL)
    pairs = [(row(table, "oracle"), comp["references"]["oracle"]), (row(table, "always max quality"),
             comp["references"]["max_quality"])]
    pairs += [(table[name], comp["learned"][name]) for name in comp["learned"]]
    pairs += [(table[s["label"]], s) for s in comp["schemes"].values()]
    for printed, stored in pairs:
        np.testing.assert_allclose(printed["quality"], stored["quality"], rtol=5e-4)  # 4 digits
        np.testing.assert_allclose(printed["latency_ms"], 1e3 * stored["latency_s"], rtol=PRINT_RTOL)
        np.testing.assert_allclose(printed["energy_mj"], 1e3 * stored["energy_j"], rtol=PRINT_RTOL)
        assert printed["meets"] == stored["feasible"]


def test_oracle_is_feasible_and_the_orderings_hold(table, demo_smoke_run):
    _, _, _, metrics = demo_smoke_run
    comp = _main(metrics)
    oracle, greedy = row(table, "oracle"), row(table, "always max quality")
    # the oracle's multipliers are fitted to meet the limits on these very episodes
    assert oracle["meets"] and max(oracle["latency_ratio"], oracle["energy_ratio"]) <= 1.0 + PRINT_RTOL
    # "always max quality" takes each request's best action: no MEG policy on the same requests
    # has more quality (exact; only the 4-digit printing separates equal numbers)
    for label, r in table.items():
        if not label.startswith(("centralised", "on-device", "MEG uncompressed")):  # other pipelines
            assert r["quality"] <= greedy["quality"] + 5e-5, (label, r, greedy)
    assert greedy["latency_ratio"] > oracle["latency_ratio"]  # it pays for that in latency
    # Weak duality on the same episodes: the oracle's LP ceiling bounds every fixed (K, r) that
    # meets both limits exactly, and the fitted oracle sits at its ceiling (Boltzmann policy at
    # temperature ~1e-4: measured 3e-6 below). Float64 sums of ~1e3 terms: 1e-9 slack.
    ceiling = comp["references"]["oracle"]["ceiling_quality"]
    assert abs(comp["references"]["oracle"]["quality"] - ceiling) < 1e-3
    for f in comp["fixed"]:
        if f["latency_over_limit"] <= 1.0 and f["energy_over_limit"] <= 1.0:
            assert f["quality"] <= ceiling + 1e-9, (f, ceiling)
    # conventional schemes: on-device pays the full UE compute, far over both limits
    on_device = row(table, "on-device")
    assert not on_device["meets"] and on_device["energy_ratio"] > 5 and on_device["latency_ratio"] > 5


def test_best_fixed_row_follows_the_feasibility_rule(table, demo_smoke_run):
    _, _, _, metrics = demo_smoke_run
    comp = _main(metrics)
    feasible = [f for f in comp["fixed"] if f["feasible"]]
    best = [k for k in table if k.startswith("best fixed")]
    assert bool(feasible) == bool(best), (len(feasible), best)
    if best:
        np.testing.assert_allclose(table[best[0]]["quality"], max(f["quality"] for f in feasible), rtol=5e-4)


def test_the_other_presets_tables_are_there_with_their_own_units_and_scope(demo_smoke_run):
    """The report adds the conventional schemes at the other presets' costs: the tiny model's own
    scale in ms / mJ of UE energy, SDXL's in s / J."""
    _, _, report, metrics = demo_smoke_run
    assert [c["preset"] for c in metrics["comparisons"]] == [DEFAULT_PRESET] + [
        p for p in COMPARISON_PRESETS if p != DEFAULT_PRESET]
    tiny, sdxl = scheme_table(report, "tiny"), scheme_table(report, "sdxl-mobile")
    assert next(iter(tiny.values()))["scope"] == "UE" and next(iter(sdxl.values()))["scope"] == "UE"
    # the limits, converted from each table's printed units to ms / mJ, are the json's
    for name, t in (("tiny", tiny), ("sdxl-mobile", sdxl)):
        comp = next(c for c in metrics["comparisons"] if c["preset"] == name)
        np.testing.assert_allclose(np.asarray(next(iter(t.values()))["limits"]) * 1e-3, comp["limits"],
                                   rtol=PRINT_RTOL, err_msg=name)
    # tiny costs are sub-millisecond, SDXL's seconds: the same (K, r) grid at two scales
    assert row(tiny, "oracle")["latency_ms"] < 1.0 < 1e3 < row(sdxl, "oracle")["latency_ms"]


def _number_or_none(cell: str):
    return None if cell.strip().lower().startswith("none") else float(cell)


def test_training_and_sweep_sections_have_consistent_numbers(demo_smoke_run):
    _, _, report, _ = demo_smoke_run
    # section 2: one row per agent; ratios and final multipliers are non-negative numbers
    rows = [r for h, rs in tables(section(report, 2)) if h and h[0] == "run" for r in rs]
    assert {r[0] for r in rows} == {"MEG-CVPO", "PPO-Lagrangian"}, rows
    for r in rows:
        values = [float(x) for x in r[1:]]
        assert all(math.isfinite(v) and v >= 0 for v in values), r
    # section 3: over growing latency limits the oracle's quality does not fall (a looser limit
    # keeps every policy feasible: exact for the LP, the fitted oracle sits within 1e-3 of it),
    # and it is at least the best fixed action where one exists
    sweep = [rs for h, rs in tables(section(report, 3)) if h and h[0].startswith("latency limit")]
    assert sweep, "section 3 has no sweep table"
    limits = [float(r[0]) for r in sweep[0]]
    oracle_q = [float(r[1]) for r in sweep[0]]
    fixed_q = [_number_or_none(r[2]) for r in sweep[0]]
    assert limits == sorted(limits) and len(limits) >= 2
    assert all(b >= a - 1e-3 for a, b in zip(oracle_q, oracle_q[1:])), oracle_q
    assert all(f is None or o >= f - 1e-3 for o, f in zip(oracle_q, fixed_q)), (oracle_q, fixed_q)
