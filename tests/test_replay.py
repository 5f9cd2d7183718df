"""The replay ring buffer's n-step transitions against hand-computed sums, across the ring's wrap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.rl.cvpo_losses import critic_targets
from meg_jax.rl.replay import (
    Transition,
    nstep_transition,
    replay_add,
    replay_init,
    replay_mean_reward,
    replay_sample,
    replay_sample_nstep,
)

GAMMA = 0.5  # powers of 1/2 are exact in float32, so the sums below are exact too


def _buffer(steps: int = 6, capacity: int = 4):
    """Two environments, ``steps`` writes into a ring of ``capacity`` (so it wraps when steps > capacity).

    Step t of env e: obs = [10 e + t], reward = t + 1 + 100 e, costs = [2 (t + 1), -(t + 1)],
    next_obs = [10 e + t + 1], discount 0 at env 0's step 3 (a termination), else 1.
    """
    example = Transition(obs=jnp.zeros((2, 1)), action=jnp.zeros((2, 1)), reward=jnp.zeros((2,)),
                         costs=jnp.zeros((2, 2)), next_obs=jnp.zeros((2, 1)), discount=jnp.zeros((2,)))
    buf = replay_init(example, capacity)
    for t in range(steps):
        e = jnp.arange(2, dtype=jnp.float32)
        buf = replay_add(buf, Transition(
            obs=(10 * e + t)[:, None], action=(10 * e + t)[:, None], reward=t + 1 + 100 * e,
            costs=jnp.stack([jnp.full((2,), 2.0 * (t + 1)), jnp.full((2,), -(t + 1.0))], -1),
            next_obs=(10 * e + t + 1)[:, None], discount=jnp.asarray([0.0 if t == 3 else 1.0, 1.0]),
        ))
    return buf


def test_nstep_transition_hand_case_across_the_wrap():
    # 6 writes into 4 slots: the ring holds steps 2, 3, 4, 5 (logical 0..3), physically [4, 5, 2, 3]
    buf = _buffer()
    env = jnp.asarray([1, 1, 0, 0], jnp.int32)
    start = jnp.asarray([0, 1, 0, 1], jnp.int32)
    tr = nstep_transition(buf, env, start, 3, GAMMA)
    # env 1 from step 2: rewards 103, 104, 105 -> 103 + 0.5 * 104 + 0.25 * 105 = 181.25, next_obs 10 + 4 + 1
    # env 1 from step 3: 104 + 52.5 + 26.5 = 183.0, next_obs 16
    # env 0 from step 2: 3 + 0.5 * 4 + 0.25 * 0 * 5 = 5.0 (step 3 terminates: nothing after it counts),
    #   discount d2 d3 d4 = 0
    # env 0 from step 3: 4 + 0 * (5 + 6) = 4.0, discount 0
    np.testing.assert_array_equal(np.asarray(tr.reward), [181.25, 183.0, 5.0, 4.0])
    np.testing.assert_array_equal(np.asarray(tr.discount), [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(tr.next_obs)[:, 0], [15.0, 16.0, 5.0, 6.0])
    np.testing.assert_array_equal(np.asarray(tr.obs)[:, 0], [12.0, 13.0, 2.0, 3.0])
    # costs of env 1 from step 2: 2 (3 + 0.5 * 4 + 0.25 * 5) = 12.5 and -6.25
    np.testing.assert_array_equal(np.asarray(tr.costs)[0], [12.5, -6.25])
    # the 3-step TD target bootstraps gamma^3 = 0.125 away: with next values 8 (every head),
    # y_r = 181.25 + 0.125 * 8 = 182.25, 183 + 1 = 184; terminated windows keep their sums
    y_r, y_c = critic_targets(tr.reward, tr.costs, tr.discount, jnp.full((4, 4), 8.0), GAMMA**3)
    np.testing.assert_array_equal(np.asarray(y_r), [182.25, 184.0, 5.0, 4.0])
    np.testing.assert_array_equal(np.asarray(y_c)[0], [13.5, -5.25])


def test_mean_reward_counts_only_the_written_slots():
    # rewards are small integers: every sum below is exact in float32
    assert float(replay_mean_reward(_buffer(steps=0))) == 0.0  # empty: no division by zero
    # 3 writes into 4 slots (slot 3 still zero): env 0 rewards 1, 2, 3; env 1 101, 102, 103
    assert float(replay_mean_reward(_buffer(steps=3))) == (1 + 2 + 3 + 101 + 102 + 103) / 6
    # 6 writes, wrapped: the ring holds steps 2..5, rewards 3..6 and 103..106
    assert float(replay_mean_reward(_buffer(steps=6))) == (3 + 4 + 5 + 6 + 103 + 104 + 105 + 106) / 8


def test_one_step_sampling_is_the_plain_sampler():
    buf = _buffer()
    key = jax.random.PRNGKey(3)
    a, b = replay_sample(buf, key, 64), replay_sample_nstep(buf, key, 64, 1, GAMMA)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("steps", [3, 6])  # ring not full / wrapped
def test_sampled_windows_are_consecutive_stored_steps(steps):
    buf = _buffer(steps)
    n = 2
    tr = replay_sample_nstep(buf, jax.random.PRNGKey(0), 256, n, GAMMA)
    obs = np.asarray(tr.obs)[:, 0]
    env, t0 = obs // 10, obs % 10
    oldest = max(0, steps - 4)
    # every window starts at a stored step with n - 1 stored successors, and all of them occur
    assert set(t0.astype(int)) == set(range(oldest, steps - n + 1))
    reward = t0 + 1 + 100 * env
    disc0 = np.where((env == 0) & (t0 == 3), 0.0, 1.0)
    np.testing.assert_array_equal(np.asarray(tr.reward), reward + GAMMA * disc0 * (reward + 1))
    np.testing.assert_array_equal(np.asarray(tr.next_obs)[:, 0], obs + n)
