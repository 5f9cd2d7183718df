"""Pieces every jitted trainer shares: optimiser, batch sharding, the gated update, the scan.

MEG-CVPO, PPO-Lagrangian and the off-policy baselines (DDPG-/SAC-Lagrangian) build their train
step from these, so a change to how a block gates its updates or how a run is scanned lands
in all of them at once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

__all__ = ["clipped_adam", "batch_constrainer", "update_when_ready", "scan_train", "num_row_chunks",
           "chunked_value_and_grad"]


def clipped_adam(learning_rate: float | optax.Schedule, max_grad_norm: float) -> optax.GradientTransformation:
    """Adam after global-norm gradient clipping (every RL optimiser of the project); the step
    a constant or an optax schedule of the update count."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))


def batch_constrainer(mesh: Optional[Mesh]) -> Callable[[Any], Any]:
    """``tree -> tree`` sharding the leading (batch) axis over ``mesh``'s data axis; identity without a mesh."""
    if mesh is None:
        return lambda tree: tree
    from meg_jax.parallel import constrain_batch

    return lambda tree: constrain_batch(tree, mesh)


def num_row_chunks(rows: int, rows_per_chunk: int) -> int:
    """The fewest chunks of equal size, each at most ``rows_per_chunk`` rows, that ``rows`` splits into.

    The smallest divisor n of ``rows`` with ``rows / n <= rows_per_chunk`` (``rows`` itself,
    chunks of one row, when nothing larger divides).
    """
    if rows_per_chunk >= rows:
        return 1
    return next(n for n in range(-(-rows // rows_per_chunk), rows + 1) if rows % n == 0)


def chunked_value_and_grad(
    fn: Callable[[Any, Any], tuple[jax.Array, Any]], params: Any, rows: Any, num_chunks: int
) -> tuple[tuple[jax.Array, Any], Any]:
    """``jax.value_and_grad(fn, has_aux=True)(params, rows)`` computed ``num_chunks`` row chunks at a time.

    For a loss that is a sum over the rows of ``rows`` (a mean is a sum scaled by 1 / rows):
    value, aux and gradient are then sums over chunks, accumulated in a ``lax.scan``, so
    each chunk's activations stay in cache instead of streaming [rows, width] tensors
    through memory between the layers (the critic's TD step at B = 4096: 4 heads x 4096
    x 128 float32 = 8 MiB per activation, four times a core's L2). Equal to the unchunked
    call up to float rounding (summation order). Chunk j holds rows j, j + n, j + 2n, ...
    (n = ``num_chunks``), so a batch sharded over its leading axis stays sharded inside
    every chunk.

    Args:
      fn: ``fn(params, rows) -> (loss, aux)``, both sums over the rows (any scaling fixed).
      params: differentiated pytree.
      rows: pytree of arrays with a shared leading axis R, R divisible by ``num_chunks``.
      num_chunks: chunks (1: a plain ``value_and_grad`` call).

    Returns:
      ((loss, aux), grads) as ``jax.value_and_grad(fn, has_aux=True)`` returns them.
    """
    value_and_grad = jax.value_and_grad(fn, has_aux=True)
    if num_chunks == 1:
        return value_and_grad(params, rows)
    chunks = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:]), 0, 1), rows
    )

    def body(total: Any, chunk: Any) -> tuple[Any, None]:
        return jax.tree.map(jnp.add, total, value_and_grad(params, chunk)), None

    first = value_and_grad(params, jax.tree.map(lambda x: x[0], chunks))
    total, _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], chunks))
    return total


def update_when_ready(update: Callable[[Any, jax.Array], tuple[Any, dict]],
                      min_replay_steps: int) -> Callable[[Any, jax.Array], tuple[Any, dict]]:
    """``update`` once the replay holds ``min_replay_steps`` transitions, else a no-op.

    Both branches return the same metric tree (zeros when skipped) plus ``"updated"`` (1.0 or
    0.0), so the gate sits inside a scan without a host round trip.
    """

    def gated(state: Any, key: jax.Array) -> tuple[Any, dict]:
        ready = state.replay.size >= min_replay_steps

        def skip(s, k):
            shapes = jax.eval_shape(update, s, k)[1]
            return s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

        state, metrics = jax.lax.cond(ready, update, skip, state, key)
        return state, {**metrics, "updated": ready.astype(jnp.float32)}

    return gated


def scan_train(init: Callable[[jax.Array], Any], train_step: Callable[[Any, jax.Array], tuple[Any, dict]],
               num_blocks: int) -> Callable[[jax.Array], tuple[Any, dict]]:
    """``train(key) -> (final state, stacked metrics)``: a whole run as one scan (vmappable over keys).

    Block b uses key ``fold_in(key_run, b)`` (``key_init, key_run = split(key)``), the keys of
    ``train/cvpo.py``'s host loop, so a vmapped ``train`` over seeds reproduces the job's runs.
    """

    def train(key: jax.Array):
        k_init, k_run = jax.random.split(key)

        def body(s, _):
            return train_step(s, jax.random.fold_in(k_run, s.block))

        return jax.lax.scan(body, init(k_init), None, length=num_blocks)

    return train
