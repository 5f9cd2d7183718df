"""Wrappers that turn the single-UE ``MEGEnv`` into batched, self-resetting episodes.

Stack built by :func:`meg_jax.env.make` (innermost first)::

    MEGEnv -> brax VmapWrapper -> EpisodeLimitWrapper(T) -> FreshAutoResetWrapper(N)

* ``EpisodeLimitWrapper`` counts requests in ``info["steps"]`` and ends the episode after T
  with ``done = 1`` and a separate ``info["truncation"] = 1`` (the time limit, not a
  terminal state of the MDP; the observation carries the progress t/T, so a learner may
  treat it either way).
* ``FreshAutoResetWrapper`` replaces brax's ``AutoResetWrapper``, which restarts every slot
  from one cached initial state: here each finished slot is reset with a **new** key
  (per-slot keys in ``info["rng"]``), selected with ``jnp.where``; the reset runs only
  when some slot is done (``lax.cond`` on the batch). The returned state of a step that
  ends an episode carries that step's reward, costs, metrics and ``done``, the *next*
  episode's first observation in ``obs``, and the true last observation in
  ``info["final_obs"]`` (for bootstrapping).

All constants are built with ``zeros_like(state.done)`` so they inherit the batch sharding.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State, Wrapper
from jax import Array

from meg_jax.env.state import observation_fields

__all__ = ["EpisodeLimitWrapper", "FreshAutoResetWrapper", "ObservationFieldsWrapper", "replace_params",
           "TRANSITION_INFO_KEYS"]

# info entries that describe the transition just taken (kept through a reset); every other
# info entry is per-episode state and is taken from the fresh reset for finished slots.
TRANSITION_INFO_KEYS = frozenset({"cost", "costs", "truncation", "final_obs", "rng"})


class ObservationFieldsWrapper(Wrapper):
    """Keeps the named fields of the observation (``observation_fields``), in the order given.

    Wraps the unbatched ``MEGEnv`` (innermost), so every outer wrapper, the replay and the
    agents see the shorter vector. An ablation of what the agent observes: the environment's
    dynamics, rewards and costs are unchanged.

    Raises:
      ValueError: a field the environment's observation does not have (the known ones are named),
        a repeated field, or no field.
    """

    def __init__(self, env: Env, fields: tuple[str, ...]):
        super().__init__(env)
        layout = observation_fields(env.params)
        fields = tuple(fields)
        unknown = [f for f in fields if f not in layout]
        if unknown or not fields or len(set(fields)) != len(fields):
            raise ValueError(f"observe={fields!r}: each field once, from {tuple(layout)} "
                             f"({'unknown: ' + ', '.join(unknown) if unknown else 'empty or repeated'})")
        self.fields = fields
        # host constants: the slice is folded into the traced program, no device buffer at construction
        self._index = np.asarray([i for f in fields for i in range(layout[f].start, layout[f].stop)], np.int32)

    @property
    def observation_size(self) -> int:
        return len(self._index)

    def reset(self, rng: Array) -> State:
        state = self.env.reset(rng)
        return state.replace(obs=state.obs[..., self._index])

    def step(self, state: State, action: Array) -> State:
        nstate = self.env.step(state, action)
        return nstate.replace(obs=nstate.obs[..., self._index])


class EpisodeLimitWrapper(Wrapper):
    """Ends episodes after ``episode_length`` steps with a truncation flag (batched or not)."""

    def __init__(self, env: Env, episode_length: int):
        super().__init__(env)
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        self.episode_length = int(episode_length)

    def reset(self, rng: Array) -> State:
        state = self.env.reset(rng)
        zero = jnp.zeros_like(state.done)
        return state.replace(info={**state.info, "steps": zero.astype(jnp.int32), "truncation": zero})

    def step(self, state: State, action: Array) -> State:
        nstate = self.env.step(state, action)
        steps = state.info["steps"] + 1
        at_limit = steps >= self.episode_length
        done = jnp.where(at_limit, jnp.ones_like(nstate.done), nstate.done)
        truncation = jnp.where(at_limit, 1.0 - nstate.done, jnp.zeros_like(nstate.done))
        return nstate.replace(done=done, info={**nstate.info, "steps": steps, "truncation": truncation})


class FreshAutoResetWrapper(Wrapper):
    """Resets each finished slot of a batched env with a fresh key (see module docstring).

    Args:
      env: a batched env (e.g. ``EpisodeLimitWrapper(VmapWrapper(MEGEnv))``).
      num_envs: batch size N; ``reset`` accepts one key [2] (split into N) or N keys [N, 2].
    """

    def __init__(self, env: Env, num_envs: int):
        super().__init__(env)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = int(num_envs)

    def _split_keys(self, rng: Array) -> tuple[Array, Array]:
        if rng.ndim == 1:
            k_reset, k_carry = jax.random.split(rng)
            return jax.random.split(k_reset, self.num_envs), jax.random.split(k_carry, self.num_envs)
        if rng.shape[0] != self.num_envs:
            raise ValueError(f"expected one key or {self.num_envs} keys, got shape {rng.shape}")
        pairs = jax.vmap(jax.random.split)(rng)
        return pairs[:, 0], pairs[:, 1]

    def reset(self, rng: Array) -> State:
        reset_keys, carry = self._split_keys(rng)
        state = self.env.reset(reset_keys)
        return state.replace(info={**state.info, "rng": carry, "final_obs": state.obs})

    def step(self, state: State, action: Array) -> State:
        nstate = self.env.step(state, action)
        nstate = nstate.replace(info={**nstate.info, "final_obs": nstate.obs})

        def reset_done(s: State) -> State:
            done = s.done > 0.5
            pairs = jax.vmap(jax.random.split)(s.info["rng"])
            carry, reset_keys = pairs[:, 0], pairs[:, 1]
            fresh = self.env.reset(reset_keys)

            def select(new: Array, old: Array) -> Array:
                mask = jnp.reshape(done, done.shape + (1,) * (old.ndim - done.ndim))
                return jnp.where(mask, new, old)

            info = {
                k: (v if k in TRANSITION_INFO_KEYS else jax.tree.map(select, fresh.info[k], v))
                for k, v in s.info.items()
            }
            info["rng"] = select(carry, s.info["rng"])
            return s.replace(
                pipeline_state=jax.tree.map(select, fresh.pipeline_state, s.pipeline_state),
                obs=jax.tree.map(select, fresh.obs, s.obs),
                info=info,
            )

        return jax.lax.cond(jnp.any(nstate.done > 0.5), reset_done, lambda s: s, nstate)


def replace_params(env: Env, params) -> Env:
    """A copy of a wrapped env stack whose innermost ``MEGEnv`` uses ``params``.

    Cheap (shallow copies); call it inside a jitted function that takes ``params`` as an
    argument to sweep environment parameters without retracing.
    """
    if isinstance(env, Wrapper):
        outer = copy.copy(env)
        outer.env = replace_params(env.env, params)
        return outer
    if not hasattr(env, "with_params"):
        raise TypeError(f"{type(env).__name__} has no with_params(); expected a MEGEnv at the bottom of the stack")
    return env.with_params(params)
