"""PPO-Lagrangian: GAE, clipped loss and multiplier updates by hand; a short finite run."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meg_jax.env as menv
from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import ppo_lagrangian as ppo
from meg_jax.rl.config import PPOConfig

TINY = PPOConfig(hidden=(16, 16), rollout_length=8, epochs=2, num_minibatches=2, lagrange_lr=0.5)


def test_gae_hand_case():
    # gamma = lam = 0.5; deltas: t0 = 1 + 0.5 * 1 * 1.0 - 0.5 = 1.0, t1 = 2 + 0 - 1.0 = 1.0 (termination)
    # adv t1 = 1.0; adv t0 = 1.0 + 0.5 * 0.5 * 1 * 1.0 = 1.25; returns = adv + V = (1.75, 2.0)
    adv, ret = ppo.gae(
        jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 1.0]), jnp.asarray([1.0, 3.0]), jnp.asarray([1.0, 0.0]), 0.5, 0.5
    )
    np.testing.assert_allclose(adv, [1.25, 1.0])
    np.testing.assert_allclose(ret, [1.75, 2.0])


def test_clip_loss_and_multipliers_hand_case():
    # ratio 1.5, A = +1: min(1.5, clip 1.2) = 1.2 -> loss -1.2; A = -1: min(-1.5, -1.2) = -1.5 -> loss 1.5
    lp, old = jnp.log(jnp.asarray([1.5])), jnp.zeros(1)
    np.testing.assert_allclose(ppo.ppo_clip_loss(lp, old, jnp.asarray([1.0]), 0.2), -1.2, rtol=1e-6)
    np.testing.assert_allclose(ppo.ppo_clip_loss(lp, old, jnp.asarray([-1.0]), 0.2), 1.5, rtol=1e-6)
    # 0.5 + 0.5 (1.2 - 1) = 0.6;  0.05 + 0.5 (0.5 - 1) = -0.2 -> clipped to 0
    np.testing.assert_allclose(
        ppo.update_multipliers(jnp.asarray([0.5, 0.05]), jnp.asarray([1.2, 0.5]), 1.0, 0.5, 10.0), [0.6, 0.0]
    )


@pytest.fixture(scope="module")
def env():
    return menv.make("tiny", num_envs=8, episode_length=8, artifact=synthetic_artifact())


@pytest.mark.parametrize("lagrangian", [True, False])
def test_short_run_is_finite_and_multipliers_follow_costs(env, lagrangian):
    chex.clear_trace_counter()  # the parametrized cases share the wrapped function's footprint
    agent = ppo.make_ppo(dataclasses.replace(TINY, lagrangian=lagrangian), env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    step = jax.jit(chex.assert_max_traces(agent.train_step, n=1))
    lam = np.zeros(2)
    for i in range(3):
        state, metrics = step(state, jax.random.PRNGKey(i))
        if lagrangian:  # lam <- clip(lam + lr (avg normalised cost - 1), 0, max)
            lam = np.clip(lam + TINY.lagrange_lr * (np.asarray(metrics["rollout_costs_over_limit"]) - 1.0), 0, 100)
        np.testing.assert_allclose(np.asarray(state.lam), lam, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite((state.actor, state.critic))
    assert int(state.env_steps) == 3 * 8 * 8
