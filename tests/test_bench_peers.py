"""Tests of eval/bench_peers.py's pure parts: argument checks, thresholds, speed-ups, table, FSRL actor forward.

The benchmark itself (two trainings) is not run here; its FSRL side needs the peer venv.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from eval import bench_peers as bp


def _args(**kw) -> argparse.Namespace:
    base = dict(budget_s=60.0, eval_every=15.0, episodes=256, chunk_blocks=50, threads=1,
                agents=["megjax", "fsrl"], peer_set=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_check_args_accepts_defaults():
    bp.check_args(_args())


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(budget_s=0.0), "--budget-s"),
        (dict(eval_every=-1.0), "--eval-every"),
        (dict(eval_every=120.0), "exceeds --budget-s"),
        (dict(episodes=1), "--episodes"),
        (dict(chunk_blocks=0), "--chunk-blocks"),
        (dict(threads=0), "--threads"),
        (dict(agents=["megjax", "omnisafe"]), "--agents"),
        (dict(agents=[]), "--agents"),
        (dict(peer_set=["gamma"]), "key=value"),
        (dict(peer_set=["learning_rate=0.1"]), "unknown FSRL setting"),
    ],
)
def test_check_args_names_the_flag(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        bp.check_args(_args(**kw))


def test_check_args_lists_every_problem():
    with pytest.raises(ValueError) as e:
        bp.check_args(_args(budget_s=-1.0, episodes=0, threads=0))
    msg = str(e.value)
    assert "--budget-s" in msg and "--episodes" in msg and "--threads" in msg


def test_parse_peer_settings_defaults_gamma_and_json_values():
    s = bp.parse_peer_settings(["hidden_sizes=[64, 64]", "training_num=4", "action_bound_method=tanh"], gamma=0.5)
    assert s["gamma"] == 0.5
    assert s["hidden_sizes"] == [64, 64]
    assert s["training_num"] == 4
    assert s["action_bound_method"] == "tanh"  # not JSON: kept as the string
    assert s["sample_act_num"] == 16  # FSRL's default untouched
    s = bp.parse_peer_settings(["gamma=0.97"], gamma=0.5)  # an explicit setting wins over meg-jax's gamma
    assert s["gamma"] == 0.97


def test_binding_constraints_and_cost_weights():
    # oracle multipliers: latency 0.24 > 0 binds, energy 0 is slack at the optimum
    assert bp.binding_constraints([0.24, 0.0]) == [0]
    assert bp.binding_constraints([0.24, 0.5]) == [0, 1]
    assert bp.binding_constraints([0.0, 0.0]) == [0, 1]  # none binds: keep both
    # weights 1/limit on binding costs: a request at (0.10 s, 0.01 J) costs 0.10 / 0.10 = 1.0
    w = bp.peer_cost_weights([0.10, 0.02], [0])
    np.testing.assert_allclose(w, [10.0, 0.0])
    assert float(np.array([0.10, 0.01]) @ w) == pytest.approx(1.0)


def _rec(t, feasible, gap):
    return {"wall_s": t, "feasible": feasible, "gap_closed": gap}


def test_time_to_thresholds_first_feasible_and_first_feasible_gap():
    records = [
        _rec(30.0, False, 1.5),  # infeasible: its gap does not count
        _rec(10.0, False, 0.2),
        _rec(60.0, True, 0.5),  # first feasible
        _rec(90.0, True, 0.95),  # first feasible with gap >= 0.9
        _rec(120.0, True, 0.92),
    ]
    assert bp.time_to_thresholds(records) == (60.0, 90.0)


def test_time_to_thresholds_exactly_at_target_counts_and_nan_does_not():
    assert bp.time_to_thresholds([_rec(5.0, True, float("nan")), _rec(7.0, True, 0.9)]) == (5.0, 7.0)
    assert bp.time_to_thresholds([_rec(5.0, True, 0.899)]) == (5.0, None)
    assert bp.time_to_thresholds([_rec(5.0, False, 0.99)]) == (None, None)
    assert bp.time_to_thresholds([]) == (None, None)


def test_format_time():
    assert bp.format_time(12.345, 600) == "12.3 s"
    assert bp.format_time(None, 600) == "not reached in 600 s"


def test_speedup_kinds():
    assert bp.speedup(10.0, 250.0, 600.0) == (25.0, "exact")  # 250 / 10
    assert bp.speedup(20.0, None, 600.0) == (30.0, "at least")  # 600 / 20: FSRL's budget bounds it
    assert bp.speedup(None, 100.0, 600.0) == (None, "peer only")
    assert bp.speedup(None, None, 600.0) == (None, "neither")


@pytest.mark.parametrize(
    "ratio, kind, verdict",
    [
        (25.0, "exact", "met"),
        (5.0, "exact", "NOT met"),
        (30.0, "at least", "met (lower bound)"),
        (3.0, "at least", "undecided (lower bound below target; raise --budget-s)"),
        (None, "peer only", "NOT met"),
        (None, "neither", "undecided (neither reached it)"),
    ],
)
def test_target_verdict(ratio, kind, verdict):
    assert bp.target_verdict(ratio, kind) == verdict


def test_format_speedup():
    assert bp.format_speedup(25.0, "exact") == "25.0x"
    assert bp.format_speedup(30.0, "at least") == ">= 30.0x (FSRL did not reach it)"
    assert bp.format_speedup(None, "neither") == "neither reached it"


def test_summarize_and_render_table():
    records = [
        {"wall_s": 20.0, "env_steps": 1000, "updates": 100, "feasible": False, "gap_closed": 0.1,
         "quality": 0.5, "costs_over_limit": [1.1, 0.9]},
        {"wall_s": 40.0, "env_steps": 2000, "updates": 300, "feasible": True, "gap_closed": 0.95,
         "quality": 0.58, "costs_over_limit": [1.0, 0.9]},
    ]
    s = bp.summarize("meg-jax", records, train_s=40.0, load_before=2.0, load_after=3.0, compile_s=4.0)
    assert (s["t_feasible"], s["t_gap"]) == (40.0, 40.0)
    assert s["env_steps_per_s"] == pytest.approx(50.0)  # 2000 steps / 40 s
    assert s["updates_per_s"] == pytest.approx(7.5)  # 300 updates / 40 s
    peer = bp.summarize("FSRL", records[:1], train_s=20.0, load_before=3.0, load_after=3.0)
    table = bp.render_table([s, peer], budget_s=60.0)
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") and line.endswith("|") for line in lines)
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|")
    assert "| meg-jax | 40.0 s | 40.0 s | 95.0% | yes | 1.000 / 0.900 | 50 | 7.5 | 2,000 | 300 | 4.0 | 2.0 / 3.0 |" in table
    assert "| FSRL | not reached in 60 s | not reached in 60 s | 10.0% | no |" in table


def test_summarize_without_checkpoints():
    s = bp.summarize("FSRL", [], train_s=0.0, load_before=1.0, load_after=1.0)
    assert s["final"] is None and s["env_steps_per_s"] is None
    assert "| FSRL | not reached in 60 s | not reached in 60 s | - | - | - | - | - | 0 | 0 | - |" in bp.render_table([s], 60.0)


def _weights(conditioned: bool = True, unbounded: bool = False):
    # trunk: one 2 -> 2 ReLU layer; heads 2 -> 2
    w = {
        "trunk_w0": np.array([[1.0, -1.0], [2.0, 0.5]]), "trunk_b0": np.array([0.0, 0.25]),
        "mu_w": np.array([[1.0, 0.0], [0.0, 2.0]]), "mu_b": np.array([0.0, -0.5]),
        "max_action": np.asarray(1.0), "unbounded": np.asarray(unbounded),
    }
    if conditioned:
        w.update(sigma_w=np.array([[0.0, 10.0], [1.0, 0.0]]), sigma_b=np.array([-1.0, 0.0]))
    else:
        w["sigma_param"] = np.array([-0.5, 0.3])
    return w


def test_fsrl_actor_forward_hand_computed():
    obs = np.array([[1.0, 1.0]])
    # trunk: [1, 1] @ [[1, -1], [2, 0.5]] + [0, 0.25] = [3, -0.25] -> relu [3, 0]
    # mu: [3, 0] @ diag(1, 2) + [0, -0.5] = [3, -0.5] -> tanh
    # log-std: [3, 0] @ [[0, 10], [1, 0]] + [-1, 0] = [-1, 30] -> clip to [-1, 2]
    mu, std = bp.fsrl_actor_forward(_weights(), obs)
    np.testing.assert_allclose(mu, np.tanh([[3.0, -0.5]]))
    np.testing.assert_allclose(std, np.exp([[-1.0, 2.0]]))
    mu, std = bp.fsrl_actor_forward(_weights(conditioned=False, unbounded=True), obs)
    np.testing.assert_allclose(mu, [[3.0, -0.5]])  # unbounded: no tanh
    np.testing.assert_allclose(std, np.exp([[-0.5, 0.3]]))  # free log-std, same for every state


def test_check_fsrl_export_refuses_a_mismatch():
    w = _weights()
    probe = np.array([[1.0, 1.0], [0.0, -1.0]])
    mu, std = bp.fsrl_actor_forward(w, probe)
    record = {"probe_mean": mu.tolist(), "probe_std": std.tolist(), "weights": "actor_0000.npz"}
    bp.check_fsrl_export(w, record, probe)
    record["probe_mean"] = (mu + 1e-3).tolist()
    with pytest.raises(RuntimeError, match="differs from torch"):
        bp.check_fsrl_export(w, record, probe)


def test_reference_gym_env_matches_numpy_reference_episode():
    """The worker's gymnasium env is the NumPy reference: spaces, truncation at T, costs/limits."""
    gymnasium = pytest.importorskip("gymnasium")
    from meg_jax.env import numpy_reference
    from meg_jax.meg.artifact import synthetic_artifact
    import meg_jax.env as menv

    env_jax, report = menv.make_unbatched("tiny", 4, synthetic_artifact(), limit_samples=256)
    p = numpy_reference.params_to_numpy(env_jax.params, np.float32)
    limits = np.asarray(env_jax.params.limits, np.float64)
    weights = bp.peer_cost_weights(limits, [0])
    env = bp.make_reference_env_class(bp._load_numpy_reference())(p, weights)
    assert isinstance(env, gymnasium.Env)
    obs, _ = env.reset(seed=3)
    assert obs.shape == env.observation_space.shape == (int(env_jax.params.obs_dim),)
    truncs = []
    for _ in range(4):
        obs, reward, terminated, truncated, info = env.step(np.array([1.0, -1.0], np.float32))
        assert not terminated and math.isfinite(reward)
        assert info["cost"] == pytest.approx(info["costs"][0] / limits[0])
        truncs.append(truncated)
    assert truncs == [False, False, False, True]


def test_checkpoint_scoring_traces_once_per_agent(tmp_path, monkeypatch):
    """Every checkpoint of one agent is scored by one compiled rollout (weights are arguments)."""
    import types

    import chex
    import jax

    from meg_jax.rl.config import EnvSpec, EvalConfig, RunConfig
    from meg_jax.rl.evaluate import make_env

    chex.clear_trace_counter()
    cfg = RunConfig(env=EnvSpec(num_envs=8, episode_length=4), eval=EvalConfig(num_episodes=8))
    obs_dim = make_env(cfg.env).observation_size

    def act(params, obs, key, deterministic):
        return jax.numpy.tanh(obs @ params["w"])

    agent = types.SimpleNamespace(act=chex.assert_max_traces(act, n=1))
    rng = np.random.default_rng(0)
    meg_ckpts = [{"params": {"w": rng.normal(size=(obs_dim, 2)).astype(np.float32)}, "wall_s": float(i),
                  "env_steps": i, "updates": i} for i in range(3)]
    # FSRL: a traced forward that must not be traced twice either; exported weights on disk
    monkeypatch.setattr(bp, "fsrl_actor_forward", chex.assert_max_traces(bp.fsrl_actor_forward, n=1))
    probe = rng.normal(size=(2, obs_dim))
    fsrl_ckpts = []
    for i in range(2):
        w = {"trunk_w0": rng.normal(size=(obs_dim, 4)), "trunk_b0": rng.normal(size=4),
             "mu_w": rng.normal(size=(4, 2)), "mu_b": rng.normal(size=2), "sigma_param": np.full(2, -1.0),
             "max_action": np.asarray(1.0), "unbounded": np.asarray(False)}
        path = str(tmp_path / f"actor_{i}.npz")
        np.savez(path, **w)
        mu, std = bp.fsrl_actor_forward(w, probe)
        fsrl_ckpts.append({"weights": path, "probe_mean": mu.tolist(), "probe_std": std.tolist(),
                           "wall_s": float(i), "env_steps": i, "updates": i})
    runs = {"megjax": {"agent": agent, "checkpoints": meg_ckpts},
            "fsrl": {"checkpoints": fsrl_ckpts, "probe": probe}}
    out = bp.evaluate_checkpoints(cfg, {"fixed": {"quality": 0.0}, "oracle": {"quality": 1.0}}, runs)
    assert [len(out[n]) for n in ("megjax", "fsrl")] == [3, 2]
    assert len({r["quality"] for r in out["megjax"]}) == 3  # each checkpoint's own weights were used
