"""Tests of meg_jax.partition: the per-parameter rules on hand-made shapes, the optimiser state
following the params by structure, and the bytes a device holds under each layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from meg_jax import partition
from meg_jax.partition import ParallelConfig

FSDP = ParallelConfig(params="fsdp", min_shard_size=64)


def test_fsdp_shards_the_largest_divisible_dimension():
    # [3, 3, 320, 640] conv kernel over 8: 640 is the largest and divisible -> last axis.
    assert partition.param_spec("/conv/kernel", (3, 3, 320, 640), FSDP, 8) == P(None, None, None, "data")
    # [1000, 64] over 8: 1000 = 8 x 125 is the largest -> axis 0.
    assert partition.param_spec("/emb", (1000, 64), FSDP, 8) == P("data")
    # [1001, 64] over 8: 1001 is not divisible, 64 is -> axis 1.
    assert partition.param_spec("/emb", (1001, 64), FSDP, 8) == P(None, "data")
    # Nothing divisible by 8 -> replicated.
    assert partition.param_spec("/w", (1001, 63), FSDP, 8) == P()
    # Below min_shard_size (63 < 64 elements) -> replicated; scalars too.
    assert partition.param_spec("/b", (56,), FSDP, 8) == P()
    assert partition.param_spec("/count", (), FSDP, 8) == P()
    # Replicated layout, or one device on the data axis: nothing is split.
    assert partition.param_spec("/conv/kernel", (3, 3, 320, 640), ParallelConfig(), 8) == P()
    assert partition.param_spec("/conv/kernel", (3, 3, 320, 640), FSDP, 1) == P()


def test_model_axis_rules_split_attention_and_mlp():
    cfg = ParallelConfig(params="fsdp", model_axis=2, min_shard_size=64)
    attn = "/params/down_blocks_0/attentions_0/transformer_blocks_0/attn1"
    # q/k/v column parallel: output features on "model"; FSDP takes the other axis.
    assert partition.param_spec(f"{attn}/to_q/kernel", (320, 320), cfg, 4, 2) == P("data", "model")
    # out projection row parallel: input features on "model".
    assert partition.param_spec(f"{attn}/to_out_0/kernel", (320, 320), cfg, 4, 2) == P("model", "data")
    ff = "/params/mid_block/attentions_0/transformer_blocks_0/ff"
    assert partition.param_spec(f"{ff}/net_0/proj/kernel", (1280, 10240), cfg, 4, 2) == P("data", "model")
    assert partition.param_spec(f"{ff}/net_2/kernel", (5120, 1280), cfg, 4, 2) == P("model", "data")
    # The out projection's bias is whole after the row-parallel reduction: no model split.
    assert partition.param_spec(f"{attn}/to_out_0/bias", (320,), ParallelConfig(model_axis=2), 1, 2) == P()
    # Text encoder (CLIP names) and a conv (no rule): the model axis leaves the conv alone.
    assert partition.param_spec("/layers_0/q_proj/kernel", (768, 768), ParallelConfig(model_axis=2), 1, 2) \
        == P(None, "model")
    assert partition.param_spec("/conv_in/kernel", (3, 3, 4, 320), ParallelConfig(model_axis=2), 1, 2) == P()


def test_opt_state_follows_params_by_structure_and_bytes_fall_by_n():
    import optax

    params = {"a": {"kernel": jnp.zeros((64, 32))}, "b": {"bias": jnp.zeros((8,))}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt = tx.init(params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    # A fake 8-device data axis for the rules (the specs do not need real devices).
    specs = jax.tree_util.tree_map_with_path(
        lambda p, x: partition.param_spec(partition.path_name(p), x.shape, FSDP, 8), params)
    assert specs["a"]["kernel"] == P("data") and specs["b"]["bias"] == P()
    opt_specs = partition.opt_state_specs(tx, opt, specs)
    adam = opt_specs[1][0]
    assert adam.mu == specs and adam.nu == specs and adam.count == P()
    # The path/shape rules applied to the optimiser state directly give the same specs.
    direct = jax.tree_util.tree_map_with_path(
        lambda p, x: partition.param_spec(partition.path_name(p), x.shape, FSDP, 8), opt)
    assert jax.tree.leaves(direct, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree.leaves(opt_specs, is_leaf=lambda x: isinstance(x, P))
    del mesh


def test_bytes_per_device_and_abstract_shardings():
    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    tree = {"w": jnp.zeros((64, 32)), "s": jnp.zeros((), jnp.int32)}
    specs = {"w": P("data"), "s": P()}
    # One device: everything whole: 64 * 32 * 4 + 4 bytes.
    assert partition.bytes_per_device(tree, mesh, specs) == 64 * 32 * 4 + 4
    fake = type("FakeMesh", (), {"shape": {"data": 8, "model": 1}})()
    # 8 on "data": the kernel's rows split 8 ways -> 8 * 32 * 4, the scalar stays whole.
    assert partition.bytes_per_device(tree, fake, specs) == 8 * 32 * 4 + 4
    abstract = partition.abstract(tree, mesh, specs)
    assert abstract["w"].shape == (64, 32) and abstract["w"].sharding.spec == P("data")
    placed = partition.shard(tree, mesh, specs)
    assert placed["w"].sharding.spec == P("data")


def test_config_validation_and_mesh():
    from meg_jax import parallel

    with pytest.raises(ValueError, match="ParallelConfig.params"):
        ParallelConfig(params="zero3")
    with pytest.raises(ValueError, match="model_axis"):
        ParallelConfig(model_axis=0)
    mesh = parallel.make_mesh(model=1)
    assert mesh.axis_names == ("data", "model") and parallel.data_size(mesh) == jax.device_count()
    with pytest.raises(ValueError, match="model_axis=2 must be >= 1 and divide the 1 devices"):
        parallel.make_mesh(jax.devices()[:1], model=2)
