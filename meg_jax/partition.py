"""Sharding as data about parameters: rules that map a parameter's path and shape to a ``PartitionSpec``.

A train state is placed on a ``("data", "model")`` mesh (``meg_jax.parallel.make_mesh(model=M)``)
by three rules, applied per leaf:

* ``replicated`` (``ParallelConfig.params``): every device holds the whole leaf (data parallel).
* ``fsdp``: the leaf's largest dimension that the ``"data"`` axis size divides is split over
  ``"data"`` (ZeRO-3 / fully sharded data parallel: parameters, EMA and optimiser moments take
  1/N of the memory per device; XLA all-gathers a weight where a matmul needs it and turns the
  gradient all-reduce into a reduce-scatter). Leaves smaller than ``min_shard_size`` elements
  (norm scales, biases, scalars) stay replicated: splitting them saves nothing and costs a
  latency-bound collective each.
* ``model_axis > 1`` (tensor parallel, Megatron-style): the attention projections and MLP
  weights named in ``MODEL_AXIS_RULES`` split their output features (q/k/v, MLP in) or input
  features (attention out, MLP out) over ``"model"``; FSDP then picks among the remaining
  dimensions.

Optimiser state follows the parameters by structure (``optax.tree_map_params``): Adam's
moments get their parameter's spec, counters are replicated. Frozen inputs (a teacher's or
text encoder's params, cached latents) are placed by the same rules, so a cache ``[N, ...]``
is split on ``N`` under ``fsdp``.

Typical use::

    mesh = parallel.make_mesh(model=cfg.model_axis)
    specs = tree_specs(params, cfg, mesh)
    params = shard(params, mesh, specs)                        # outside jit
    params = constrain(params, mesh, specs)                    # inside jit
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meg_jax.parallel import DATA_AXIS, MODEL_AXIS

__all__ = [
    "ParallelConfig",
    "MODEL_AXIS_RULES",
    "path_name",
    "param_spec",
    "tree_specs",
    "opt_state_specs",
    "shardings",
    "shard",
    "constrain",
    "abstract",
    "bytes_per_device",
    "gather_for_compute",
]

# (regex searched in the "/"-joined parameter path, axis of the leaf split over "model").
# Column parallel (-1: output features) for the projections whose outputs are split per head
# or per hidden unit, row parallel (0: input features) for the projections that merge them
# back, so each block needs one reduction over "model" (Shoeybi et al. 2019, Megatron-LM).
# UNet / VAE attention and GEGLU (diffusers names) and the text encoders' (CLIP names).
MODEL_AXIS_RULES: tuple[tuple[str, int], ...] = (
    (r"/to_[qkv]/(kernel|bias)$", -1),
    (r"/to_out_0/kernel$", 0),
    (r"/ff/net_0/proj/(kernel|bias)$", -1),
    (r"/ff/net_2/kernel$", 0),
    (r"/[qkv]_proj/(kernel|bias)$", -1),
    (r"/out_proj/kernel$", 0),
    (r"/fc1/(kernel|bias)$", -1),
    (r"/fc2/kernel$", 0),
)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How parameters, optimiser state and frozen inputs are laid out on the device mesh."""

    params: Literal["replicated", "fsdp"] = "replicated"  # parameter layout over the "data" axis
    # Devices on the "model" (tensor-parallel) axis; the "data" axis gets devices / model_axis.
    model_axis: int = 1
    # Leaves with fewer elements stay replicated under fsdp (16 KB in float32).
    min_shard_size: int = 4096

    def __post_init__(self) -> None:
        if self.params not in ("replicated", "fsdp"):
            raise ValueError(f"ParallelConfig.params must be 'replicated' or 'fsdp', got {self.params!r}")
        if isinstance(self.model_axis, bool) or not isinstance(self.model_axis, int) or self.model_axis < 1:
            raise ValueError(f"ParallelConfig.model_axis must be an integer >= 1, got {self.model_axis!r}")
        if self.min_shard_size < 1:
            raise ValueError(f"ParallelConfig.min_shard_size must be >= 1, got {self.min_shard_size}")


def path_name(path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path as ``"/a/b/kernel"`` (dict keys, attributes, indices)."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/" + "/".join(parts)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(dict(mesh.shape).get(axis, 1))


def param_spec(path: str, shape: Sequence[int], cfg: ParallelConfig, data_size: int,
               model_size: int = 1) -> PartitionSpec:
    """The ``PartitionSpec`` of one leaf.

    Args:
      path: the leaf's ``"/"``-joined path (``path_name``), e.g.
        ``"/params/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"``.
      shape: its shape.
      cfg: the rules' settings.
      data_size: devices on the ``"data"`` axis.
      model_size: devices on the ``"model"`` axis.

    Returns:
      A spec with ``"data"`` on at most one axis and ``"model"`` on at most one other.
    """
    ndim = len(shape)
    axes: list[str | None] = [None] * ndim
    if model_size > 1 and ndim:
        for pattern, axis in MODEL_AXIS_RULES:
            if re.search(pattern, path):
                ax = axis % ndim
                if shape[ax] % model_size == 0:
                    axes[ax] = MODEL_AXIS
                break
    if cfg.params == "fsdp" and data_size > 1 and math.prod(shape) >= cfg.min_shard_size:
        free = [i for i in range(ndim) if axes[i] is None and shape[i] % data_size == 0]
        if free:
            # Largest dimension; the last among equals (the output features of a kernel).
            best = max(free, key=lambda i: (shape[i], i))
            axes[best] = DATA_AXIS
    while axes and axes[-1] is None:
        axes.pop()
    return PartitionSpec(*axes)


def tree_specs(tree: Any, cfg: ParallelConfig, mesh: Mesh) -> Any:
    """``param_spec`` of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s), same structure."""
    data, model = _axis_size(mesh, DATA_AXIS), _axis_size(mesh, MODEL_AXIS)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: param_spec(path_name(p), x.shape, cfg, data, model), tree
    )


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def opt_state_specs(tx: Any, opt_state: Any, param_specs: Any) -> Any:
    """Specs of an optax state whose parameter-shaped parts follow ``param_specs`` (by structure).

    Args:
      tx: the ``optax.GradientTransformation`` that made ``opt_state``.
      opt_state: its state (arrays or ``ShapeDtypeStruct``s).
      param_specs: the parameters' specs (``tree_specs``).

    Returns:
      A tree like ``opt_state``: each parameter-shaped subtree (Adam's mu, nu...) holds
      ``param_specs``; every other leaf (step counts) ``PartitionSpec()``.
    """
    import optax

    return optax.tree_map_params(
        tx, lambda _, spec: spec, opt_state, param_specs,
        transform_non_params=lambda _: PartitionSpec(), is_leaf=_is_spec,
    )


def shardings(mesh: Mesh, specs: Any) -> Any:
    """``NamedSharding`` per spec."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Places ``tree`` on ``mesh`` by ``specs`` (outside jit; every process passes the whole tree)."""
    return jax.device_put(tree, shardings(mesh, specs))


def constrain(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """Inside jit: ``with_sharding_constraint`` of every leaf to its spec."""
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)),
                        tree, specs, is_leaf=lambda x: x is None)


def abstract(tree: Any, mesh: Mesh | None = None, specs: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` of every leaf, carrying ``specs``' shardings when given (for lowering)."""
    if specs is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        tree, specs)


def bytes_per_device(tree: Any, mesh: Mesh, specs: Any) -> int:
    """Bytes of ``tree`` one device holds under ``specs`` (largest shard of each leaf)."""
    sizes = dict(mesh.shape)
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=_is_spec)):
        shape = list(x.shape)
        for i, ax in enumerate(s):
            for name in (ax if isinstance(ax, tuple) else (ax,)):
                if name is not None:
                    shape[i] = -(-shape[i] // sizes[name])
        total += math.prod(shape) * jax.numpy.dtype(x.dtype).itemsize
    return total


def gather_for_compute(params: Any, cfg: ParallelConfig, mesh: Mesh, dtype: Any = None) -> Any:
    """Inside jit: ``params`` whole along ``"data"`` (kept split on ``"model"``), cast to ``dtype``.

    FSDP's all-gather at use. Without it XLA's partitioner may keep a data-sharded kernel in
    place and all-gather the *activations* of the global batch instead (measured on SD-1.5:
    ``[64, 64, 64, 640]`` float32 buffers per device at batch 8 / device). Called at the top
    of a rematerialised network pass, the gathered copy lives for one pass and is gathered
    again in the backward; its gradient's transpose is a reduce-scatter onto the shards.
    Float leaves are cast to ``dtype`` (e.g. bfloat16) *before* the gather, halving its
    traffic and memory; Flax layers computing in ``dtype`` would cast them anyway.

    Args:
      params: the (sharded) parameter tree.
      cfg: the partition rules; with ``params="replicated"`` and no model axis nothing is done.
      mesh: the mesh.
      dtype: compute dtype of the floating leaves, or None to keep them.
    """
    if dtype is not None:
        params = jax.tree.map(
            lambda x: x.astype(dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, params)
    if cfg.params != "fsdp" or _axis_size(mesh, DATA_AXIS) == 1:
        return params
    specs = tree_specs(params, cfg, mesh)
    whole = jax.tree.map(
        lambda s: PartitionSpec(*[None if ax == DATA_AXIS else ax for ax in s]), specs, is_leaf=_is_spec)
    return constrain(params, mesh, whole)
