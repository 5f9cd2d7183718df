"""Placement of RL train states on the ``"data"`` mesh of ``meg_jax.parallel``.

The mesh, batch and replicated shardings are ``meg_jax.parallel``'s; this module only knows
which parts of an agent's state follow the environment batch: the environment state, the
replay buffer's storage (``[num_envs, capacity_per_env, ...]``) and anything else listed in
``BATCHED_FIELDS``. Those are split over ``"data"`` on their leading axis; parameters,
optimiser states, duals, counters and the replay's ring position are replicated. With the
state placed so, ``jax.jit(train_step)`` steps each device's environments locally, samples
the replay with a global gather and all-reduces the gradients, on one process or many.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding

from meg_jax.parallel import batch_sharding, make_mesh, replicated_sharding

__all__ = ["BATCHED_FIELDS", "state_shardings", "place_state", "jit_sharded", "make_mesh"]

# fields of an agent state whose array leaves carry the environment batch on axis 0
BATCHED_FIELDS = ("env_state", "replay", "rollout")


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` matching ``state`` (arrays or ``ShapeDtypeStruct``s).

    Args:
      state: a ``flax.struct`` agent state (``CVPOState``, ``PPOState``) or its abstract shape.
      mesh: the ``"data"`` mesh.
    """
    batched, replicated = batch_sharding(mesh), replicated_sharding(mesh)

    def batched_leaf(x: Any) -> NamedSharding:
        return batched if getattr(x, "ndim", 0) >= 1 else replicated

    if not dataclasses.is_dataclass(state):
        raise TypeError(f"expected an agent state dataclass, got {type(state).__name__}")
    parts = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        rule: Callable[[Any], NamedSharding] = batched_leaf if field.name in BATCHED_FIELDS else (lambda x: replicated)
        parts[field.name] = jax.tree.map(rule, value)
    return state.replace(**parts)


def place_state(state: Any, mesh: Mesh) -> Any:
    """``device_put`` of a (single-process) state onto the mesh with :func:`state_shardings`."""
    return jax.device_put(state, state_shardings(state, mesh))


def jit_sharded(init: Callable, train_step: Callable, mesh: Mesh, key: jax.Array) -> tuple[Callable, Callable]:
    """Jitted ``init(key)`` and ``train_step(state, key)`` with the state's shardings pinned.

    The state shardings are found from ``jax.eval_shape(init, key)``; ``init`` then builds
    each process's shards directly (no host copy of the global state), so the same call
    works under ``jax.distributed`` with many processes. The state argument of the step is
    donated.
    """
    shapes = jax.eval_shape(init, key)
    shardings = state_shardings(shapes, mesh)
    rep = replicated_sharding(mesh)
    init_jit = jax.jit(init, in_shardings=rep, out_shardings=shardings)
    step_jit = jax.jit(
        train_step, in_shardings=(shardings, rep), out_shardings=(shardings, rep), donate_argnums=0
    )
    return init_jit, step_jit
