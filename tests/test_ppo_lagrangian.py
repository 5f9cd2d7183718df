"""PPO-Lagrangian: GAE and the clipped loss against NumPy references, multiplier updates by
hand, and a short learning run: PPO-Lagrangian beats the best fixed feasible (K, r) within the
limits, plain PPO on the same budget breaks the latency limit."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _policy_eval import episode_averages

import meg_jax.env as menv
from meg_jax.env import oracle as env_oracle
from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import baselines
from meg_jax.rl import ppo_lagrangian as ppo
from meg_jax.rl.config import PPOConfig


def _gae_reference(rewards, values, discount, gamma, lam):
    """Textbook GAE in float64, one step at a time (values [L + 1, ...])."""
    rewards, values, discount = (np.asarray(x, np.float64) for x in (rewards, values, discount))
    adv = np.zeros_like(rewards)
    carry = np.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * discount[t] * values[t + 1] - values[t]
        carry = delta + gamma * lam * discount[t] * carry
        adv[t] = carry
    return adv, adv + values[:-1]


def test_gae_hand_case():
    # gamma = lam = 0.5, V = (0.5, 1.0, 3.0); deltas: t0 = 1 + 0.5 * 1 * 1.0 - 0.5 = 1.0,
    # t1 = 2 + 0 - 1.0 = 1.0 (termination: V(s_2) = 3 is not read)
    # adv t1 = 1.0; adv t0 = 1.0 + 0.5 * 0.5 * 1 * 1.0 = 1.25; returns = adv + V = (1.75, 2.0)
    adv, ret = ppo.gae(jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 1.0, 3.0]), jnp.asarray([1.0, 0.0]), 0.5, 0.5)
    # float32, <= 4 rounded ops per entry vs exact decimals: rtol 1e-6 (~8 ulps)
    np.testing.assert_allclose(adv, [1.25, 1.0], rtol=1e-6)
    np.testing.assert_allclose(ret, [1.75, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"values must be \[L \+ 1"):
        ppo.gae(jnp.ones(2), jnp.ones(2), jnp.ones(2), 0.5, 0.5)


def test_gae_matches_a_numpy_reference_over_heads_and_envs():
    rng = np.random.default_rng(0)
    length, n, heads = 12, 5, 3
    rewards = rng.normal(size=(length, n, heads)).astype(np.float32)
    values = rng.normal(size=(length + 1, n, heads)).astype(np.float32)
    discount = (rng.random((length, n, 1)) > 0.2).astype(np.float32)  # terminations, one per env and step
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(discount), 0.9, 0.95)
    want_adv, want_ret = _gae_reference(rewards, values, np.broadcast_to(discount, rewards.shape), 0.9, 0.95)
    # float32 recursion over <= 12 steps, ~3 roundings each on |x| ~ a few: <= 36 x 0.5 ulp of
    # the running sum (~2e-6 relative); atol for advantages that cancel to ~0
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_clip_loss_and_multipliers_hand_case():
    # ratio 1.5, A = +1: min(1.5, clip 1.2) = 1.2 -> loss -1.2; A = -1: min(-1.5, -1.2) = -1.5 -> loss 1.5
    lp, old = jnp.log(jnp.asarray([1.5])), jnp.zeros(1)
    np.testing.assert_allclose(ppo.ppo_clip_loss(lp, old, jnp.asarray([1.0]), 0.2), -1.2, rtol=1e-6)
    np.testing.assert_allclose(ppo.ppo_clip_loss(lp, old, jnp.asarray([-1.0]), 0.2), 1.5, rtol=1e-6)
    # random batch vs the formula in float64 (exp of a float32 log-ratio: ~1 ulp each, rtol 1e-6)
    rng = np.random.default_rng(1)
    lp, old, adv = (rng.normal(scale=0.3, size=64).astype(np.float32) for _ in range(3))
    ratio = np.exp(lp.astype(np.float64) - old)
    want = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    np.testing.assert_allclose(ppo.ppo_clip_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), 0.2),
                               want, rtol=1e-5, atol=1e-7)
    # 0.5 + 0.5 (1.2 - 1) = 0.6;  0.05 + 0.5 (0.5 - 1) = -0.2 -> clipped to 0
    np.testing.assert_allclose(
        ppo.update_multipliers(jnp.asarray([0.5, 0.05]), jnp.asarray([1.2, 0.5]), 1.0, 0.5, 10.0), [0.6, 0.0], rtol=1e-6
    )


# ------------------------------------------------------------------ learning
# Discrete head on the synthetic tiny env, 16 envs x 16 requests; 32 blocks of 8 steps =
# 4096 transitions (0.2 s of training after compilation). Measured (seeds 0 and 1, 256 fresh
# episodes): PPO-Lagrangian quality 0.576 / 0.577 (se 0.009) at latency 0.97 x limit and
# energy 0.93-0.95 x limit; plain PPO 0.691 / 0.694 at latency 1.95 x limit; the best fixed
# feasible (K, r) 0.506; every fixed action at random 0.533.
LEARN = PPOConfig(discrete=True, hidden=(32, 32), rollout_length=8, epochs=4, num_minibatches=4, lr=3e-3, lagrange_lr=0.5)
BLOCKS, EPISODE_LENGTH, EVAL_EPISODES = 32, 16, 256


@pytest.fixture(scope="module")
def artifact():
    return synthetic_artifact()


@pytest.fixture(scope="module")
def eval_setup(artifact):
    """The eval env, its key, and the best fixed feasible action's average quality there."""
    env = menv.make("tiny", num_envs=EVAL_EPISODES, episode_length=EPISODE_LENGTH, artifact=artifact, discrete=True)
    key = jax.random.PRNGKey(123)
    quality, costs = baselines.request_tables(env, key)
    a = quality.shape[-1]
    fixed = env_oracle.best_fixed_action(
        env.params, quality.reshape(-1, a), costs.reshape(-1, a, 2), np.asarray(env.params.limits)
    )
    return env, key, fixed.avg_quality


@pytest.mark.parametrize("lagrangian,dual", [(True, "gradient"), (True, "pid"), (False, "gradient")])
def test_learns_within_the_limits_and_multipliers_follow_costs(artifact, eval_setup, lagrangian, dual):
    chex.clear_trace_counter()  # the parametrized cases share the wrapped function's footprint
    env = menv.make("tiny", num_envs=16, episode_length=EPISODE_LENGTH, artifact=artifact, discrete=True)
    # PID-Lagrangian (Stooke et al. 2020): the integral gain is the gradient variant's step
    config = dataclasses.replace(LEARN, lagrangian=lagrangian, dual=dual, pid_ki=LEARN.lagrange_lr)
    agent = ppo.make_ppo(config, env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    step = jax.jit(chex.assert_max_traces(agent.train_step, n=1))
    lam, integral, prev_cost = np.zeros(2), np.zeros(2), np.zeros(2)
    for i in range(BLOCKS):
        state, metrics = step(state, jax.random.PRNGKey(i))
        if i < 3:
            cost = np.asarray(metrics["rollout_costs_over_limit"], np.float64)
            if lagrangian and dual == "gradient":  # lam <- clip(lam + lr (avg normalised cost - 1), 0, max)
                lam = np.clip(lam + LEARN.lagrange_lr * (cost - 1.0), 0, 100)
            elif lagrangian:  # I <- (I + e)+, lam = clip(Kp e + Ki I + Kd (J - J_prev)+, 0, max)
                integral = np.maximum(integral + cost - 1.0, 0.0)
                lam = np.clip(config.pid_kp * (cost - 1.0) + config.pid_ki * integral
                              + config.pid_kd * np.maximum(cost - prev_cost, 0.0), 0, 100)
                prev_cost = cost
            # a few float32 roundings on lam ~ 0.1-1: rtol 1e-5 / atol 1e-6
            np.testing.assert_allclose(np.asarray(state.lam), lam, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite((state.actor, state.critic))
    assert int(state.env_steps) == BLOCKS * LEARN.rollout_length * 16

    eval_env, key, fixed_quality = eval_setup
    quality, costs = episode_averages(eval_env, agent.act, state.actor, key, EPISODE_LENGTH)
    q, se = quality.mean(), quality.std(ddof=1) / np.sqrt(quality.size)
    mean_costs = costs.mean(0)
    cost_se = costs.std(0, ddof=1) / np.sqrt(quality.size)
    if lagrangian:
        # within the limits up to the harness's 2 % tolerance plus 3 standard errors of the
        # 256-episode mean, and clearly above the best fixed feasible action (paired: same
        # channels; 3 se of the learned mean covers the noise of the difference)
        assert np.all(mean_costs <= 1.02 + 3 * cost_se), (mean_costs, cost_se)
        assert q > fixed_quality + 3 * se, (q, se, fixed_quality)
        assert float(state.lam[0]) > 0  # the latency constraint binds
    else:
        # unconstrained: chases quality past the latency limit (measured 1.95 x limit)
        np.testing.assert_allclose(np.asarray(state.lam), 0.0)
        assert mean_costs[0] > 1.5, mean_costs
        assert q > fixed_quality + 3 * se, (q, se, fixed_quality)
