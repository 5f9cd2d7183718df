"""Scoring a policy on fresh episodes in the tests (shared by the learned-agent tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def episode_averages(env, act, actor_params, key, episode_length: int):
    """Per-episode average quality [E] and costs / limits [E, 2] of ``act`` on fresh episodes.

    One episode per env slot, run for ``episode_length`` steps (asserted to end them all). The
    same channels for every policy given the same key; the params are an argument, so
    policies of one architecture share one compiled program.
    """

    @jax.jit
    def run(params, key):
        k_reset, k_run = jax.random.split(key)

        def body(s, k):
            return env.step(s, act(params, s.obs, k)), None

        s, _ = jax.lax.scan(body, env.reset(k_reset), jax.random.split(k_run, episode_length))
        m = s.metrics
        return m["avg_quality"], jnp.stack([m["avg_latency_s"], m["avg_energy_j"]], -1) / env.params.limits, s.done

    quality, costs, done = (np.asarray(x, np.float64) for x in run(actor_params, key))
    assert np.all(done > 0.5), "the episodes did not end within episode_length steps"
    return quality, costs
