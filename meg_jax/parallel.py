"""Data parallelism over every device of every process, for both trainers.

(Parameter layouts beyond replication — FSDP and a tensor-parallel ``"model"`` axis — are
rules in ``meg_jax.partition`` over the two-axis mesh of ``make_mesh(model=M)``.)

One code path serves a laptop CPU (one device), a GPU box and a pod: a one-axis
``jax.sharding.Mesh`` named ``"data"`` (``AxisType.Auto``, so XLA's partitioner inserts the
collectives) spans all devices of all processes; batches are sharded on their leading
axis, parameters and optimizer state are replicated. A jitted train step that is given
replicated state and a batch-sharded batch (or that generates its batch on device and
constrains it with :func:`constrain_batch`) computes the mean loss over the global batch,
and its gradient is all-reduced by XLA, so the update equals the single-device one up to
float summation order.

Typical use::

    mesh = make_mesh()
    state = replicate(state, mesh)
    step = jax.jit(train_step, in_shardings=(replicated_sharding(mesh), replicated_sharding(mesh)),
                   out_shardings=(replicated_sharding(mesh), replicated_sharding(mesh)))
    state, metrics = step(state, key)   # inside: batch = constrain_batch(batch, mesh)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "data_size",
    "make_mesh",
    "batch_sharding",
    "replicated_sharding",
    "shard_batch",
    "replicate",
    "constrain_batch",
    "check_batch_size",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"  # tensor-parallel axis (meg_jax.partition.MODEL_AXIS_RULES)


def make_mesh(devices: Sequence[jax.Device] | None = None, model: int | None = None) -> Mesh:
    """A ``"data"`` mesh, or a ``("data", "model")`` mesh, over ``devices`` (``AxisType.Auto``).

    Args:
      devices: the devices to span; default ``jax.devices()``, i.e. every device of every
        process (after ``jax.distributed.initialize`` on a multi-host run).
      model: None for a one-axis ``"data"`` mesh; an int M for a two-axis mesh of shape
        ``[len(devices) / M, M]`` (M = 1 is plain data parallelism with a trivial model axis).
        Neighbouring devices share a ``"model"`` group (its collectives are the most frequent).

    Returns:
      ``Mesh`` of shape ``[len(devices)]`` or ``[len(devices) / M, M]``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    if model is None:
        return jax.make_mesh(
            (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
        )
    if model < 1 or len(devices) % model:
        raise ValueError(
            f"parallel.model_axis={model} must be >= 1 and divide the {len(devices)} devices"
        )
    return jax.make_mesh(
        (len(devices) // model, model), (DATA_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto), devices=devices,
    )


def data_size(mesh: Any) -> int:
    """Devices on the ``"data"`` axis (all devices of a one-axis mesh)."""
    shape = getattr(mesh, "shape", None)
    if shape is not None and DATA_AXIS in dict(shape):
        return int(dict(shape)[DATA_AXIS])
    return int(mesh.devices.size)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading axis split over ``"data"``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters, optimizer state, keys and scalars: a full copy per device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises ``ValueError`` unless ``batch_size`` splits evenly over the mesh's devices.

    Args:
      batch_size: the global leading-axis size (batch, number of environments, ...).
      mesh: the ``"data"`` mesh.
      what: how the error names the quantity (e.g. the config field to change).
    """
    n = data_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"{what} {batch_size} is not divisible by the {n} devices of the mesh's data axis; "
            f"use a multiple of {n}"
        )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host (or device) batch pytree on the mesh, leading axis split over ``"data"``.

    Args:
      batch: pytree of arrays ``[B, ...]``, B divisible by the number of devices. On a
        multi-process run each process passes the global batch (every process the same).

    Returns:
      The same pytree as global ``jax.Array``s sharded on the leading axis.
    """
    sharding = batch_sharding(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError("shard_batch got a scalar leaf; batch leaves need a leading batch axis")
        check_batch_size(x.shape[0], mesh)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` (params, optimizer state, keys) whole on every device."""
    return jax.device_put(tree, replicated_sharding(mesh))


def constrain_batch(batch: Any, mesh: Mesh) -> Any:
    """Inside jit: asks XLA to shard an on-device-generated batch on its leading axis.

    Data generated inside the step from a replicated key would otherwise be computed whole
    on every device; the constraint splits the work (threefry random bits are partitionable,
    so the values do not depend on the device count).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), batch)
