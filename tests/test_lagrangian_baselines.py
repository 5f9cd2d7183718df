"""DDPG-Lagrangian, SAC-Lagrangian and the PID multiplier rule.

The PID rule against hand-computed P / I / D sequences; each off-policy agent learns on the
synthetic tiny environment (beats the best fixed feasible (K, r) within the limits) while its
multipliers follow the block costs by hand (up when a limit is broken, down when slack); a
killed SAC-Lagrangian job resumes bit-identical; the comparison table's arithmetic.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _policy_eval import episode_averages

import meg_jax.env as menv
from meg_jax.env import oracle as env_oracle
from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import baselines, ddpg_lagrangian, sac_lagrangian
from meg_jax.rl import dual as dual_lib
from meg_jax.rl.config import DDPGConfig, SACConfig


# ------------------------------------------------------------------ the PID rule
def test_pid_terms_follow_a_hand_computed_sequence():
    # Kp = 1, Ki = 0.5, Kd = 2, no smoothing, target 1; J = 1.2, 1.5, 0.7, 0.4 (J_-1 = 0):
    # k0: e = 0.2, I = 0.2, rise = 1.2 -> P 0.2, I 0.1, D 2.4, lam = 2.7
    # k1: e = 0.5, I = 0.7, rise = 0.3 -> P 0.5, I 0.35, D 0.6, lam = 1.45
    # k2: e = -0.3, I = 0.4, rise = 0  -> P -0.3, I 0.2, D 0, lam = max(-0.1, 0) = 0
    # k3: e = -0.6, I = max(-0.2, 0) = 0, rise = 0 -> P -0.6, I 0, D 0, lam = 0
    want = [(0.2, 0.1, 2.4, 2.7), (0.5, 0.35, 0.6, 1.45), (-0.3, 0.2, 0.0, 0.0), (-0.6, 0.0, 0.0, 0.0)]
    pid = dual_lib.pid_init(1)
    for cost, (p, i, d, lam_want) in zip((1.2, 1.5, 0.7, 0.4), want):
        lam, pid, terms = dual_lib.pid_lagrange_update(pid, jnp.asarray([cost]), 1.0, 1.0, 0.5, 2.0)
        # float32 sums of <= 3 terms of size ~1: rtol 1e-6 / atol 1e-6
        np.testing.assert_allclose([terms["p"][0], terms["i"][0], terms["d"][0], lam[0]], [p, i, d, lam_want],
                                   rtol=1e-6, atol=1e-6)
    # smoothing a_p = a_d = 0.5, Kp = Kd = 1, Ki = 0, J = 2, 2:
    # k0: P = 0.5 * 1 = 0.5, D = 0.5 * 2 = 1.0, rise 1.0 -> lam 1.5
    # k1: P = 0.25 + 0.5 = 0.75, D = 0.5 + 1.0 = 1.5, rise 0.5 -> lam 1.25; lam_max 1.3 does not bind, 1.0 does
    pid = dual_lib.pid_init(2)
    for lam_want in (1.5, 1.25):
        lam, pid, _ = dual_lib.pid_lagrange_update(pid, jnp.asarray([2.0, 2.0]), 1.0, 1.0, 0.0, 1.0, 0.5, 0.5,
                                                   lam_max=1.3)
        np.testing.assert_allclose(lam, [min(lam_want, 1.3)] * 2, rtol=1e-6)


def test_pid_with_only_the_integral_is_the_gradient_rule():
    rng = np.random.default_rng(0)
    costs = rng.uniform(0.5, 1.5, size=(40, 2)).astype(np.float32)
    lam_g = jnp.asarray([0.3, 0.0])
    pid = dual_lib.pid_init(2, 0.0, 0.1)
    pid = pid.replace(integral=jnp.asarray([3.0, 0.0]))  # Ki I = 0.3, 0: the same start
    for c in costs:
        lam_g = dual_lib.gradient_lagrange_update(lam_g, jnp.asarray(c), 1.0, 0.1, 100.0)
        lam_p, pid, _ = dual_lib.pid_lagrange_update(pid, jnp.asarray(c), 1.0, 0.0, 0.1, 0.0, lam_max=100.0)
        # float32: Ki (I + e) vs lam + Ki e differ by a few roundings of ~1 per step, 40 steps
        np.testing.assert_allclose(lam_p, lam_g, rtol=1e-5, atol=2e-6)
    assert float(pid.integral.min()) >= 0.0
    # the initial multiplier is the integral's
    np.testing.assert_allclose(dual_lib.pid_init(2, 0.4, 0.05).integral, [8.0, 8.0], rtol=1e-6)


# ------------------------------------------------------------------ learning
# Synthetic tiny env, 16 envs x 16 requests, 400 blocks of one step (6400 transitions, 1536
# updates of B = 64 after a 256-transition warm-up). Measured (seed 0, 256 fresh episodes):
# DDPG-Lag quality ~0.57 and SAC-Lag ~0.57 near 1.0 x the latency limit; the best fixed
# feasible (K, r) is 0.506 (tests/test_ppo_lagrangian.py).
BLOCKS, EPISODE_LENGTH, EVAL_EPISODES, LR = 400, 16, 256, 0.05
COMMON = dict(hidden=(32, 32), batch_size=64, min_replay=256, replay_capacity=4096, lagrange_lr=LR)
AGENTS = {
    "ddpg_lag": lambda env: ddpg_lagrangian.make_ddpg(DDPGConfig(**COMMON), env),
    "sac_lag": lambda env: sac_lagrangian.make_sac(SACConfig(**COMMON), env),
}


@pytest.fixture(scope="module")
def artifact():
    return synthetic_artifact()


@pytest.fixture(scope="module")
def eval_setup(artifact):
    """The eval env, its key, and the best fixed feasible action's average quality there."""
    env = menv.make("tiny", num_envs=EVAL_EPISODES, episode_length=EPISODE_LENGTH, artifact=artifact)
    key = jax.random.PRNGKey(123)
    denv = menv.make("tiny", num_envs=EVAL_EPISODES, episode_length=EPISODE_LENGTH, artifact=artifact, discrete=True)
    quality, costs = baselines.request_tables(denv, key)
    a = quality.shape[-1]
    fixed = env_oracle.best_fixed_action(
        denv.params, quality.reshape(-1, a), costs.reshape(-1, a, 2), np.asarray(denv.params.limits))
    return env, key, fixed.avg_quality


@pytest.mark.parametrize("algo", sorted(AGENTS))
def test_learns_within_the_limits_and_multipliers_follow_block_costs(artifact, eval_setup, algo):
    chex.clear_trace_counter()  # the parametrized cases share the wrapped function's footprint
    env = menv.make("tiny", num_envs=16, episode_length=EPISODE_LENGTH, artifact=artifact)
    agent = AGENTS[algo](env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    step = jax.jit(chex.assert_max_traces(agent.train_step, n=1))
    lam_before, lam_after, block_costs, updated = [], [], [], []
    for i in range(BLOCKS):
        lam_before.append(np.asarray(state.lam))
        state, metrics = step(state, jax.random.PRNGKey(i))
        lam_after.append(np.asarray(metrics["lam"]))
        block_costs.append(np.asarray(metrics["block_costs_over_limit"]))
        updated.append(float(np.asarray(metrics["updated"]).max()))
    lam_before, lam_after, block_costs = map(np.asarray, (lam_before, lam_after, block_costs))
    chex.assert_tree_all_finite((state.actor, state.critic))
    assert int(state.env_steps) == BLOCKS * 16
    # warm-up: 256 / 16 = 16 blocks of random actions; the updates start in the block that
    # fills the replay to 256 (block 15), the multipliers once the policy collected a whole
    # block (block 16)
    warm = 256 // 16
    np.testing.assert_array_equal(lam_after[:warm], 0.0)
    assert updated[warm - 2] == 0.0 and updated[warm - 1] == 1.0
    assert int(state.updates) == (BLOCKS - warm + 1) * 4
    # by hand: lam <- clip(lam + lr (block cost - 1), 0, 100); float32, rtol 1e-5 / atol 1e-6
    want = np.clip(lam_before[warm:] + LR * (block_costs[warm:] - 1.0), 0.0, 100.0)
    np.testing.assert_allclose(lam_after[warm:], want, rtol=1e-5, atol=1e-6)
    # up whenever a limit was broken, down whenever slack while positive (and both happened)
    diff = lam_after[warm:] - lam_before[warm:]
    broken = block_costs[warm:] > 1.0
    slack = (block_costs[warm:] < 1.0) & (lam_before[warm:] > LR)
    assert broken.sum() >= 10 and slack.sum() >= 10, (broken.sum(), slack.sum())
    assert np.all(diff[broken] > 0) and np.all(diff[slack] < 0)
    assert float(state.lam[0]) > 0  # the latency limit binds at the end

    eval_env, key, fixed_quality = eval_setup
    quality, costs = episode_averages(eval_env, agent.act, state.actor, key, EPISODE_LENGTH)
    q, se = quality.mean(), quality.std(ddof=1) / np.sqrt(quality.size)
    mean_costs, cost_se = costs.mean(0), costs.std(0, ddof=1) / np.sqrt(quality.size)
    # The multipliers hold the constraint on average: over the last quarter of training the
    # block costs average within the harness's 2 % tolerance (each block averages 16
    # transitions; 100 blocks, so the noise of that mean is ~0.01). The final iterate of a
    # Lagrangian method oscillates around the limit (measured up to 1.06 x for SAC-Lag here,
    # PPO-Lag reaches 1.03 x in docs/results.md), so it gets a wider bar; without the
    # multipliers the latency is ~1.9 x the limit. Quality: above the best fixed feasible
    # action by 3 standard errors (paired: the same channels).
    tail = block_costs[-BLOCKS // 4:].mean(0)
    assert np.all(tail <= 1.02 + 0.02), tail
    assert np.all(mean_costs <= 1.10 + 3 * cost_se), (mean_costs, cost_se)
    assert q > fixed_quality + 3 * se, (q, se, fixed_quality)


def test_sac_rejects_a_discrete_env_and_a_bad_dual(artifact):
    denv = menv.make("tiny", num_envs=4, episode_length=4, artifact=artifact, discrete=True)
    with pytest.raises(ValueError, match="sac acts on the continuous action"):
        sac_lagrangian.make_sac(SACConfig(), denv)
    env = menv.make("tiny", num_envs=4, episode_length=4, artifact=artifact)
    with pytest.raises(ValueError, match=r"ddpg.dual must be one of"):
        ddpg_lagrangian.make_ddpg(DDPGConfig(dual="pi"), env)


def test_squashed_log_prob_matches_a_change_of_variables():
    # log pi(tanh u) = log N(u) - sum log(1 - tanh(u)^2); at u = 0: log N(0; 0, 1) per dim
    # = -0.5 log(2 pi) = -0.918939; the Jacobian is 1 there
    u, mean, std = jnp.zeros(2), jnp.zeros(2), jnp.ones(2)
    np.testing.assert_allclose(sac_lagrangian.squashed_log_prob(u, mean, std), -np.log(2 * np.pi), rtol=1e-6)
    # far in the tail the stable form stays finite where the naive one overflows to inf
    big = jnp.asarray([12.0, -12.0])
    naive = -np.sum(np.log1p(-np.tanh(np.float64(12.0)) ** 2) * 2)
    got = float(sac_lagrangian.squashed_log_prob(big, big, std)) + np.log(2 * np.pi)
    # float64 naive vs float32 stable: |x| ~ 45, float32 ulp ~4e-6
    np.testing.assert_allclose(got, naive, rtol=1e-5)


# ------------------------------------------------------------------ the job
TINY_SAC = [
    "--algo", "sac_lag", "--sac.dual", "pid", "--env.artifact", "synthetic", "--env.num_envs", "8",
    "--env.episode_length", "8", "--blocks_per_log", "4", "--total_env_steps", "96", "--checkpoint_every_logs", "1",
    "--sac.hidden", "16", "16", "--sac.batch_size", "16", "--sac.min_replay", "16", "--sac.replay_capacity", "256",
    "--sac.updates_per_block", "2", "--eval.num_episodes", "0",
]


def test_killed_sac_run_resumes_bit_identical(tmp_path):
    from train import cvpo as job

    _, config = job.parse_args(["--workdir", "unused", *TINY_SAC])
    full = job.run(config, str(tmp_path / "full"), progress=False)
    part = job.run(config, str(tmp_path / "resumed"), progress=False, halt_after=1)
    assert (full.iterations, part.iterations) == (3, 1)
    resumed = job.run(config, str(tmp_path / "resumed"), progress=False)
    a, b = jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(resumed.state.updates) > 0 and float(np.abs(np.asarray(resumed.state.pid.cost_ema)).sum()) > 0


# ------------------------------------------------------------------ the comparison table
def test_compare_rows_and_table():
    from eval import compare

    rows = [
        {"seed": 0, "quality": 0.60, "costs_over_limit": [1.01, 0.9], "feasible": True, "gap_closed": 0.5,
         "fixed_quality": 0.50, "oracle_quality": 0.70},
        {"seed": 1, "quality": 0.58, "costs_over_limit": [1.03, 0.95], "feasible": False, "gap_closed": 0.4,
         "fixed_quality": 0.52, "oracle_quality": 0.67},
    ]
    ceiling = {0: {"quality": 0.70}, 1: {"quality": 0.62}}
    at_cost = {0: 0.65, 1: 0.685}  # the oracle at each seed's own costs
    table_at_cost = {0: 0.68, 1: 0.61}  # the observable table at each seed's own costs
    row = compare.summarise_agent("sac_lag", rows, ceiling, env_steps=1024, train_seconds=4.0, updates=100,
                                  equal_cost=at_cost, equal_cost_observable=table_at_cost)
    # observable gaps: (0.60 - 0.50) / (0.70 - 0.50) = 0.5; (0.58 - 0.52) / (0.62 - 0.52) = 0.6; median 0.55
    np.testing.assert_allclose(row["per_seed_gap_closed_observable"], [0.5, 0.6], rtol=1e-12)
    np.testing.assert_allclose(row["gap_closed_observable"], 0.55, rtol=1e-12)
    # equal-cost gaps: the shortfall at own cost over the gap at the limits, 1 - 0.05 / 0.20 = 0.75 and
    # 1 - 0.105 / 0.15 = 0.3 (not 0.06 / 0.165 = 0.36 of the gap to the oracle at seed 1's own, higher,
    # costs); median 0.525
    np.testing.assert_allclose(row["per_seed_gap_closed_equal_cost"], [0.75, 0.3], rtol=1e-9)
    # observable equal-cost gaps: the shortfall below the table at own cost over the fixed -> table gap
    # at the limits, 1 - 0.08 / 0.20 = 0.6 and 1 - 0.03 / 0.10 = 0.7; median 0.65
    np.testing.assert_allclose(row["per_seed_gap_closed_observable_equal_cost"], [0.6, 0.7], rtol=1e-9)
    assert row["feasible_seeds"] == 1 and row["worst_costs_over_limit"] == [1.03, 0.95]
    assert row["updates_per_second"] == 50.0  # 100 updates x 2 seeds / 4 s
    np.testing.assert_allclose(row["quality"], 0.59, rtol=1e-12)
    table = compare.format_table([row])
    assert "| SAC-Lagrangian | 0.5900 | 1.0300 | 0.9500 | 1/2 | 45.0% | 55.0% | 52.5% | 65.0% | 1,024 | 4 | 50 |" in table
    with pytest.raises(ValueError, match="needs the observable ceiling"):
        compare.summarise_agent("sac_lag", rows, None, 1024, 4.0, 100, equal_cost_observable=table_at_cost)
    # how exact the equal-cost columns can be: each limit lowered by 1e-4 of itself, the others kept
    np.testing.assert_allclose(compare.limit_probes([6.0, 30.0]), [[6.0, 30.0], [5.9994, 30.0], [6.0, 29.997]],
                               rtol=1e-15)
    # (F(limits) - F(lowered)) / (F(limits) - Q_fixed): seed 0 0.01 / 0.2, 0.1 / 0.2; seed 1 0, 0.05 / 0.1
    sens = compare.frontier_sensitivity({0: [0.70, 0.69, 0.60], 1: [0.62, 0.62, 0.57]}, {0: 0.50, 1: 0.52})
    np.testing.assert_allclose(sens["per_seed"][0], [0.05, 0.5], rtol=1e-9)
    np.testing.assert_allclose(sens["per_seed"][1], [0.0, 0.5], atol=1e-12, rtol=1e-9)
    np.testing.assert_allclose(sens["median"], [0.025, 0.5], rtol=1e-9)
    table = compare.format_table([row], {"frontier_sensitivity": {"step": 1e-4, "frontiers": ["oracle"], "oracle": sens}})
    assert "lowers the oracle frontier by (% of its fixed -> frontier gap, median over seeds): latency 2.5 %; " \
           "energy 50.0 %." in table
    assert "move by up to 50 points when an agent's spend moves by 0.0001 of a limit" in table
    flat = {"per_seed": {}, "median": [0.004, 0.009]}  # under a point each: no warning
    table = compare.format_table([row], {"frontier_sensitivity": {"step": 1e-4, "frontiers": ["oracle", "observable"],
                                                                  "oracle": flat, "observable": flat}})
    assert "oracle / observable frontier" in table and "latency 0.4 % / 0.4 %; energy 0.9 % / 0.9 %." in table
    assert "move by up to" not in table
    with pytest.raises(ValueError, match="not a learned agent"):
        compare.agent_run_config(compare.Args(), "oracle")


def test_compare_gamma_and_set_reach_the_agents_and_bad_entries_name_themselves(tmp_path):
    from eval import compare

    args = compare.Args(preset="paper", gamma=0.97, set=("cvpo.n_step=2", "cvpo.critic_lr=3e-4", "cvpo.discrete=false"))
    cvpo_cfg = compare.agent_run_config(args, "cvpo")
    assert (cvpo_cfg.cvpo.n_step, cvpo_cfg.cvpo.critic_lr, cvpo_cfg.cvpo.discrete) == (2, 3e-4, False)
    ppo_cfg = compare.agent_run_config(args, "ppo_lag")
    assert cvpo_cfg.cvpo.gamma == ppo_cfg.ppo.gamma == ppo_cfg.ddpg.gamma == ppo_cfg.sac.gamma == 0.97
    assert compare.agent_run_config(compare.Args(), "cvpo").cvpo.gamma == 0.5  # None keeps the default
    # the comparison's MEG-CVPO critic is the preset's measured best unless --cvpo_critic says otherwise
    critic = lambda **kw: compare.agent_run_config(compare.Args(**kw), "cvpo").cvpo.discrete_critic  # noqa: E731
    assert (critic(), critic(preset="paper"), critic(preset="paper", cvpo_critic="table")) == (
        "table", "coordinates", "table")
    for bad, msg in [("cvpo.nstep=2", "unknown config field 'cvpo.nstep'"), ("cvpo.n_step=two", "expected an integer"),
                     ("nets.n_step=1", "unknown config field 'nets.n_step'"), ("cvpo.actor_hidden=3", "expected a list"),
                     ("n_step=2", "unknown config field 'n_step'"), ("cvpo.discrete=maybe", "expected true/false")]:
        with pytest.raises(ValueError, match=bad.split("=")[0].replace(".", r"\.")) as e:
            compare.agent_run_config(compare.Args(set=(bad,)), "cvpo")
        assert msg in str(e.value) and str(e.value).startswith("--set")
    # an observation the observable table cannot read is refused before anything trains or is written
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="'mean_snr' only"):
        compare.compare(compare.Args(set=('env.observe=["mean_snr","task"]',), out=str(out)))
    assert not out.exists()
    # tuples go through too: the shared parser reads JSON values
    assert compare.agent_run_config(compare.Args(set=("cvpo.actor_hidden=[32,32]",)), "cvpo").cvpo.actor_hidden == (32, 32)
