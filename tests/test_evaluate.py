"""Evaluation and report: hand-worked summaries and pricing, and ``eval.evaluate`` on a tiny training run."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import runs as runs_lib
from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import baselines, comparison
from meg_jax.rl import evaluate as rl_eval


# ------------------------------------------------------------------------- hand-worked
def test_summarise_hand_case():
    # two episodes of two requests: episode qualities (0.5+0.7)/2 = 0.6 and (0.9+0.9)/2 = 0.9;
    # mean 0.75, std (ddof 1) = 0.2121, se = 0.2121/sqrt(2) = 0.15.
    # latency mean (1+3+1+3)/4 = 2 -> 2/4 = 0.5 of the limit; energy mean 0.5 -> 0.5/0.49 = 1.0204 <= 1.02? no.
    q = np.array([[0.5, 0.7], [0.9, 0.9]])
    lat = np.array([[1.0, 3.0], [1.0, 3.0]])
    en = np.full((2, 2), 0.5)
    s = rl_eval.summarise(q, np.stack([lat, en], -1), np.array([4.0, 0.49])).named()
    assert s["quality"] == pytest.approx(0.75)
    assert s["quality_se"] == pytest.approx(0.15)
    assert s["latency_s"] == pytest.approx(2.0) and s["latency_over_limit"] == pytest.approx(0.5)
    assert s["energy_over_limit"] == pytest.approx(0.5 / 0.49)
    assert not s["feasible"]  # 1.0204 > 1.02
    assert rl_eval.summarise(q, np.stack([lat, en], -1), np.array([4.0, 0.5])).feasible
    # per-episode averages give the same scores as the per-request records
    same = rl_eval.summarise(q.mean(1), np.stack([lat, en], -1).mean(1), np.array([4.0, 0.49]))
    assert same.named() == pytest.approx(s)


def test_conventional_schemes_priced_like_actions():
    art = synthetic_artifact()  # 1 MHz, receive power 1 W, analog link
    params = type("P", (), {"bandwidth_hz": 1e6, "snr_floor_db": -10.0, "reward_psnr_weight": 0.0,
                            "psnr_scale_db": 40.0, "reward_offset": 0.0, "energy_scope": "ue",
                            "system": "mobility"})()
    out = comparison.conventional_schemes(art, params, np.array([10.0, 30.0]), np.array([0, 1]))
    # on-device: nothing sent: latency 2.5 s, energy 1.5 J, whatever the SNR. Costs are priced in
    # float32 (meg.pricing), a sum of three terms: rtol 1e-6 ~ a few float32 ulps (eps 1.19e-7).
    np.testing.assert_allclose(out["on_device"]["latency_s"], [2.5, 2.5], rtol=1e-6)
    np.testing.assert_allclose(out["on_device"]["energy_j"], [1.5, 1.5], rtol=1e-6)
    # MEG uncompressed (analog): 64*64*4/2 = 8192 symbols / 1e6 = 8.192 ms, plus 32 side bits at
    # 1e6 log2(1 + 10) = 3.459 Mbit/s -> 9.25 us; ES 0.01 + 0.025*50 = 1.26 s; UE 0.03 s.
    t_tx = 8192 / 1e6 + 32 / (1e6 * np.log2(11.0))
    assert out["mec_uncompressed"]["latency_s"][0] == pytest.approx(1.26 + t_tx + 0.03)
    assert out["mec_uncompressed"]["energy_j"][0] == pytest.approx(0.01 + 1.0 * t_tx)
    np.testing.assert_allclose(out["mec_uncompressed"]["quality"], [0.97, 0.97])


def _two_action_rollout() -> rl_eval.Rollout:
    # one episode, two requests, actions: a0 = (quality 0.5, 1 s), a1 = (quality 1.0, 3 s)
    q = np.array([[[0.5, 1.0], [0.5, 1.0]]])
    c = np.zeros((1, 2, 2, 2))
    c[..., 0] = [1.0, 3.0]
    c[..., 1] = [0.1, 0.1]
    z = np.zeros((1, 2))
    return rl_eval.Rollout(
        snr_db=z, est_snr_db=z, task_class=z.astype(int), steps=z + 1, merge_ratio=z, quality=z + 0.5,
        latency_s=z + 1, energy_j=z + 0.1, table_quality=q, table_costs=c, limits=np.array([2.0, 1.0]),
        grid_steps=np.array([1.0, 8.0]), grid_ratios=np.array([0.0]),
    )


def test_matched_quality_and_frontier_hand_case():
    ro = _two_action_rollout()
    # quality >= 0.5 is met by always a0: latency 1 s; >= 0.75 needs a1 on both requests with
    # the deterministic per-request rule (both requests are alike): latency 3 s; 1.01 is out of reach.
    assert comparison.matched_quality_meg(ro, 0.5)["latency_s"] == pytest.approx(1.0)
    m = comparison.matched_quality_meg(ro, 0.75)
    assert m["quality"] == pytest.approx(1.0) and m["latency_s"] == pytest.approx(3.0)
    assert comparison.matched_quality_meg(ro, 1.01) is None
    fr = comparison.meg_frontier(ro)
    assert fr["quality"][0] == pytest.approx(0.5) and fr["quality"][-1] == pytest.approx(1.0)
    assert set(np.round(fr["latency_s"], 6)) == {1.0, 3.0}


def test_reference_policies_hand_case():
    ro = _two_action_rollout()
    refs = baselines.reference_policies(ro)
    # best fixed meeting a 2 s limit: a0 (a1 costs 3 s); max quality: a1 everywhere, 1.5x the limit
    assert refs["best_fixed"]["steps"] == 1 and refs["best_fixed"]["quality"] == pytest.approx(0.5)
    assert refs["max_quality"]["latency_over_limit"] == pytest.approx(1.5)
    # LP optimum: a1 with probability 1/2: quality 0.75 at exactly 2 s; the oracle's Boltzmann
    # choice (temperature 1e-4) gets there within a few 1e-4, and the dual bound sits just above.
    assert refs["oracle"]["quality"] == pytest.approx(0.75, abs=2e-3)
    assert refs["oracle"]["latency_over_limit"] == pytest.approx(1.0, abs=2e-3)
    assert refs["oracle"]["ceiling_quality"] >= refs["oracle"]["quality"] - 1e-6


def test_shift_params_arithmetic():
    import meg_jax.env as menv

    env = menv.make("tiny", num_envs=2, episode_length=4, artifact=synthetic_artifact())
    p = env.params
    s = rl_eval.shift_params(p, rl_eval.ChannelShift("x", speed_factor=2.0, path_loss_offset_db=10.0,
                                                           csi_error_factor=2.0))
    # synthetic artifact: 10 dBm -> 0 dBm; speeds 0.5..3 m/s -> 1..6; CSI error 0.1 -> 0.2
    assert float(s.tx_power_dbm) == pytest.approx(float(p.tx_power_dbm) - 10.0)
    assert float(s.speed_max_mps) == pytest.approx(2 * float(p.speed_max_mps))
    assert float(s.csi_error_std) == pytest.approx(2 * float(p.csi_error_std))
    np.testing.assert_array_equal(np.asarray(s.limits), np.asarray(p.limits))


# ---------------------------------------------- one compilation per environment shape and policy
def _linear_act(params, obs, key, deterministic):
    mean = jnp.tanh(obs @ params["w"])
    return mean if deterministic else jnp.clip(mean + 0.3 * jax.random.normal(key, mean.shape), -1.0, 1.0)


def _tiny_env():
    import meg_jax.env as menv

    return menv.make("tiny", num_envs=8, episode_length=4, artifact=synthetic_artifact())


def test_evaluation_traces_once_for_every_seed_and_parameter_set():
    chex.clear_trace_counter()
    policy = rl_eval.LearnedPolicy(chex.assert_max_traces(_linear_act, n=1))
    scores = []
    for seed in range(3):
        env = _tiny_env()  # a new env object per seed, as train.cvpo's per-seed evaluation builds
        w = {"w": jax.random.normal(jax.random.PRNGKey(seed), (env.observation_size, 2))}
        scores.append(rl_eval.evaluate_policy(env, policy, jax.random.PRNGKey(seed), policy_params=w).quality)
    assert len(set(scores)) == 3  # other weights and keys, other scores: the arguments do reach the program


def test_recorded_rollouts_trace_once_over_channel_shifts_and_limits():
    from eval import orchestrate

    chex.clear_trace_counter()
    env = _tiny_env()
    policy = rl_eval.LearnedPolicy(chex.assert_max_traces(_linear_act, n=1))
    w = {"w": jax.random.normal(jax.random.PRNGKey(0), (env.observation_size, 2))}
    key = jax.random.PRNGKey(1)
    rows = orchestrate.robustness(env, policy, w, key)  # five channel shifts
    assert rows[2]["mean_snr_db"] == pytest.approx(rows[0]["mean_snr_db"] - 10.0, abs=1e-3)
    limits = np.asarray(env.params.limits, np.float64)
    sweep = orchestrate.limit_sweep(env, policy, np.stack([limits * 0.9, limits * 1.1]), None, key, fallback_params=w)
    assert [r["latency_limit_s"] for r in sweep["rows"]] == pytest.approx([0.9 * limits[0], 1.1 * limits[0]])


def test_train_cvpo_evaluation_adds_no_program_for_another_seed():
    # baselines.evaluate_all per seed (train.cvpo's multi-seed evaluation): the second seed
    # finds every rollout program compiled (same env shape, same policy objects).
    import types

    from meg_jax.rl.config import EnvSpec, EvalConfig, RunConfig

    chex.clear_trace_counter()
    act = chex.assert_max_traces(_linear_act, n=1)
    agent = types.SimpleNamespace(act=act)
    config = RunConfig(algo="cvpo", env=EnvSpec(num_envs=8, episode_length=8), eval=EvalConfig(num_episodes=64))
    obs_dim = rl_eval.make_env(config.env, artifact=synthetic_artifact()).observation_size

    def compiled() -> int:
        return sum(p._cache_size() for p in rl_eval._PROGRAMS.values())

    outs = []
    for seed in (0, 1):
        w = {"w": jax.random.normal(jax.random.PRNGKey(seed), (obs_dim, 2))}
        outs.append(baselines.evaluate_all(dataclasses.replace(config, seed=seed), agent, w, synthetic_artifact()))
        if seed == 0:
            after_first = (len(rl_eval._PROGRAMS), compiled())
    assert (len(rl_eval._PROGRAMS), compiled()) == after_first
    assert outs[0]["policy"]["quality"] != outs[1]["policy"]["quality"]


def test_find_runs_and_missing_run(tmp_path):
    assert runs_lib.find_runs(str(tmp_path)) == []
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        runs_lib.load_run(str(tmp_path))


# --------------------------------------------------------------- end to end on a run dir
@pytest.fixture(scope="module")
def run_root(tiny_cvpo_runs):
    """The session's tiny CVPO run (``conftest.tiny_cvpo_runs``; also read by test_notebook)."""
    return tiny_cvpo_runs


@pytest.fixture(scope="module")
def evaluated(run_root, tmp_path_factory):
    from eval import evaluate

    out = str(tmp_path_factory.mktemp("report"))
    rc = evaluate.main([run_root, "--episodes", "16", "--backbone", "none", "--artifact", "synthetic",
                        "--out", out, "--sweep_blocks", "2", "--sweep_fractions", "0.3", "1.0", "--no_grid"])
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    return out, metrics, report


def test_evaluate_finds_and_restores_the_run(run_root, evaluated):
    _, metrics, _ = evaluated
    assert [r["algo"] for r in metrics["runs"]] == ["cvpo"]
    assert metrics["runs"][0]["checkpoint_step"] >= 1
    learned = metrics["comparisons"][0]["learned"]["MEG-CVPO"]
    assert 0.0 <= learned["quality"] <= 1.0 and learned["latency_s"] > 0


def test_evaluate_writes_every_item(evaluated):
    out, metrics, report = evaluated
    comp = metrics["comparisons"][0]
    # (1) the schemes of the artifact, each with a matched-quality entry or None
    assert set(comp["schemes"]) == {"mec_uncompressed", "on_device"}
    assert comp["references"]["oracle"]["quality"] >= comp["references"]["best_fixed"]["quality"] - 1e-9
    # (2) training curves from metrics.jsonl
    curves = metrics["training"]["MEG-CVPO"]
    assert len(curves["env_steps"]) >= 1 and len(curves["lam_0"]) == len(curves["lam_steps"])
    # (3) retrained at two limits
    assert metrics["sweep"]["trained"] and len(metrics["sweep"]["rows"]) == 2
    assert metrics["sweep"]["rows"][0]["latency_limit_s"] < metrics["sweep"]["rows"][1]["latency_limit_s"]
    # (4) behaviour per class
    beh = metrics["behaviour"]["MEG-CVPO"]
    assert len(beh["class_steps"]) == 4
    # (6) five channels, the shifted SNR 10 dB lower on average for path loss +10 dB
    rob = metrics["robustness"]["MEG-CVPO"]
    assert [r["shift"] for r in rob][:3] == ["nominal", "UE speed x2", "path loss +10 dB"]
    assert rob[2]["mean_snr_db"] == pytest.approx(rob[0]["mean_snr_db"] - 10.0, abs=1e-3)
    for n in (1, 2, 3, 4, 6):
        assert re.search(rf"^## {n}\. .*\n(?:.*\n)*?\|.*\d", report, re.M), f"section {n} has no table with numbers"
    for png in ("schemes_tiny.png", "training.png", "limit_sweep.png", "behaviour.png", "robustness.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
