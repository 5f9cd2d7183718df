"""Parity of the Flax UNet with diffusers' PyTorch UNet2DConditionModel on random tiny configs.

Each config builds a diffusers model from ``UNetConfig.to_diffusers()``, perturbs every
parameter (norm scales and biases included, so none sits at its trivial init), converts the
state dict, and compares outputs on the same random inputs (NCHW <-> NHWC).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from meg_jax.backbone import UNet, UNetConfig, init_unet, params_from_torch_state_dict
from meg_jax.backbone.tome import ToMeConfig
from meg_jax.backbone.unet import example_inputs

TOL = 1e-4  # max abs, float32

CONFIGS = {
    # SD1.x-like: conv proj_in/out, int head count, cross-attention at the high-res level.
    "sd1x": UNetConfig(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=12,
        attention_head_dim=2,
    ),
    # SDXL-like: linear projections, per-block heads / transformer depth / resnets, text_time.
    "sdxl": UNetConfig(
        sample_size=8,
        block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=(1, 2, 1),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(1, 2, 4),
        use_linear_projection=True,
        norm_num_groups=4,
        cross_attention_dim=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=10 + 6 * 4,
    ),
    # LCM-like step conditioning plus the other supported knobs away from their defaults.
    "cond": UNetConfig(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        norm_eps=1e-6,
        cross_attention_dim=8,
        attention_head_dim=(2, 4),
        time_cond_proj_dim=6,
        time_embedding_dim=48,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        mid_block_scale_factor=1.5,
        center_input_sample=True,
        out_channels=3,
    ),
}


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Adds noise to every parameter: ~0.5/sqrt(fan_in) to weights, 0.1 to 1-D params."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            scale = 0.5 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.1
            p.add_(noise * scale)


def torch_inputs(cfg: UNetConfig, seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, 8, 8, generator=gen),
        # int timesteps for one config, fractional for the others (diffusers takes both)
        "timestep": torch.tensor([3, 999]) if seed == 0 else torch.tensor([0.5, 250.25]),
        "encoder_hidden_states": torch.randn(batch, 5, cfg.cross_attention_dim_tuple[0], generator=gen),
    }
    if cfg.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=gen)
    if cfg.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, cfg.text_embeds_dim, generator=gen),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [64.0, 48.0, 4.0, 2.0, 32.0, 32.0]]),
        }
    return inputs


def to_jax(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, dict):
            out[k] = to_jax(v)
        elif k == "sample":
            out[k] = jnp.asarray(v.numpy().transpose(0, 2, 3, 1))
        else:
            out[k] = jnp.asarray(v.numpy())
    return out


@functools.cache
def apply_fn(name: str):
    """One jitted apply per config, shared by the tests of this module."""
    return jax.jit(UNet(CONFIGS[name]).apply)


@functools.cache
def build_case(name: str) -> dict:
    """A perturbed diffusers model, its output on random inputs, and the converted params."""
    cfg = CONFIGS[name]
    seed = sorted(CONFIGS).index(name)
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    perturb_(model, seed)
    inputs = torch_inputs(cfg, seed)
    with torch.no_grad():
        ref = model(**inputs).sample.numpy().transpose(0, 2, 3, 1)
    params = params_from_torch_state_dict(cfg, model.state_dict())
    return {"cfg": cfg, "model": model, "inputs": inputs, "ref": ref, "params": params}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers(name):
    case = build_case(name)
    out = np.asarray(apply_fn(name)(case["params"], **to_jax(case["inputs"])))
    assert out.shape == case["ref"].shape
    # outputs are O(1), so the tolerance is meaningful
    assert np.abs(case["ref"]).max() > 0.1
    err = np.abs(out - case["ref"]).max()
    assert err < TOL, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_matches_diffusers(name):
    case = build_case(name)
    n_torch = sum(p.numel() for p in case["model"].parameters())
    n_flax = sum(x.size for x in jax.tree_util.tree_leaves(case["params"]))
    assert n_flax == n_torch


def test_scalar_timestep_equals_broadcast_vector():
    case = build_case("sd1x")
    inputs = to_jax(case["inputs"])
    vec = apply_fn("sd1x")(case["params"], **{**inputs, "timestep": jnp.array([500, 500])})
    scalar = jax.jit(UNet(case["cfg"]).apply)(case["params"], **{**inputs, "timestep": 500})
    np.testing.assert_allclose(np.asarray(scalar), np.asarray(vec), atol=1e-6)


def test_timestep_cond_none_equals_zeros():
    """diffusers skips cond_proj when timestep_cond is None; a bias-free projection of zeros is the same."""
    case = build_case("cond")
    inputs = to_jax(case["inputs"])
    zeros = apply_fn("cond")(case["params"], **{**inputs, "timestep_cond": jnp.zeros_like(inputs["timestep_cond"])})
    none = jax.jit(UNet(case["cfg"]).apply)(case["params"], **{k: v for k, v in inputs.items() if k != "timestep_cond"})
    np.testing.assert_allclose(np.asarray(none), np.asarray(zeros), atol=1e-6)
    # and the conditioning matters when it is not zero
    given = apply_fn("cond")(case["params"], **inputs)
    assert np.abs(np.asarray(given) - np.asarray(zeros)).max() > 1e-3


def test_bad_inputs_say_what_to_change():
    cfg = CONFIGS["sd1x"]
    module = UNet(cfg)
    inputs = example_inputs(cfg, batch=1, height=8, seq_len=3)
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(module.init, jax.random.key(0), **{**inputs, "sample": jnp.zeros((1, 7, 8, 4))})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        jax.eval_shape(
            module.init, jax.random.key(0), **{**inputs, "encoder_hidden_states": jnp.zeros((1, 3, 5))}
        )
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        jax.eval_shape(module.init, jax.random.key(0), **inputs, timestep_cond=jnp.zeros((1, 4)))
    sdxl = CONFIGS["sdxl"]
    with pytest.raises(ValueError, match="text_embeds"):
        jax.eval_shape(
            UNet(sdxl).init, jax.random.key(0),
            **{k: v for k, v in example_inputs(sdxl).items() if k != "added_cond_kwargs"},
        )


def test_tome_ratio_zero_is_the_plain_path_and_ratio_half_runs():
    case = build_case("sd1x")
    inputs = to_jax(case["inputs"])
    plain = np.asarray(apply_fn("sd1x")(case["params"], **inputs))

    off = dataclasses.replace(case["cfg"], tome=ToMeConfig(ratio=0.0))
    np.testing.assert_array_equal(np.asarray(jax.jit(UNet(off).apply)(case["params"], **inputs)), plain)

    # ratio 0.5 at the 8x8 level (64 tokens -> 32) and, with max_downsample 2, in the 4x4 blocks.
    on = dataclasses.replace(case["cfg"], tome=ToMeConfig(ratio=0.5, max_downsample=2))
    run = jax.jit(lambda p, key: UNet(on).apply(p, **inputs, rngs={"tome": key}))
    a = np.asarray(run(case["params"], jax.random.key(0)))
    b = np.asarray(run(case["params"], jax.random.key(0)))
    c = np.asarray(run(case["params"], jax.random.key(1)))
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # same key, same merge
    assert np.abs(a - plain).max() > 1e-4  # merging changes the output
    assert np.abs(a - c).max() > 0  # the key picks the destinations

    det = dataclasses.replace(case["cfg"], tome=ToMeConfig(ratio=0.5, use_rand=False))
    d = np.asarray(jax.jit(UNet(det).apply)(case["params"], **inputs))  # no "tome" rng needed
    assert np.isfinite(d).all() and np.abs(d - plain).max() > 1e-4


def test_init_unet_matches_module_init_shapes_and_scales():
    cfg = CONFIGS["sdxl"]
    params = init_unet(cfg, jax.random.key(0))
    shapes = jax.eval_shape(
        lambda: UNet(cfg).init({"params": jax.random.key(0), "tome": jax.random.key(0)}, **example_inputs(cfg))
    )
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
    assert jax.tree_util.tree_map(lambda a: a.shape, params) == jax.tree_util.tree_map(lambda a: a.shape, shapes)
    flat = flax.traverse_util.flatten_dict(params["params"])
    for path, value in flat.items():
        value = np.asarray(value)
        if path[-1] == "kernel":
            # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = all axes but the last
            bound = 1 / math.sqrt(np.prod(value.shape[:-1]))
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound, path
        else:
            assert np.all(value == (1.0 if path[-1] == "scale" else 0.0)), path
    again = init_unet(cfg, jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)))


def _count_tiled(monkeypatch, tile_bytes: int) -> list[int]:
    """Forces ``layers``' CPU-tiled attention on every "reference" call; returns a call counter."""
    from meg_jax.backbone import layers

    calls = []
    tiled = layers._tiled_attention
    monkeypatch.setattr(layers, "CPU_TILE_ABOVE", 0)
    monkeypatch.setattr(layers, "CPU_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(layers, "_tiled_attention", lambda *a: calls.append(1) or tiled(*a))
    return calls


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tiled path is the CPU backend's")
@pytest.mark.parametrize("dv", [6, 16])
def test_cpu_tiled_attention_matches_untiled_and_torch(dv, monkeypatch):
    """Value width 6: the row sums come out of the second matmul (a ones column, padded to 16);
    16: a separate sum."""
    from meg_jax.backbone import layers

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    q, kk, v = (jax.random.normal(k[i], s) for i, s in enumerate([(2, 50, 32), (2, 70, 32), (2, 70, 4 * dv)]))
    ref = np.asarray(layers.multi_head_attention(q, kk, v, 4))  # 2*4*50*70 logits: untiled
    # 600 logits per block: 50 queries of 70 keys -> 6 blocks of 9 queries, 4 of them padding.
    calls = _count_tiled(monkeypatch, 4 * 600)
    out = np.asarray(layers.multi_head_attention(q, kk, v, 4))
    assert calls, "the tiled path did not run"
    # Same float32 softmax per query row; the matmul blocking, where the division by the row
    # sum happens and exp(x) as exp2(x * log2 e) (argument rounding ~|x| 2^-24, x within ~-20
    # where weights count: relative ~1e-6 on the weights) differ: rounding of O(1) values.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    to_t = lambda a, d: torch.from_numpy(np.array(a)).reshape(2, -1, 4, d).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        expect = torch.nn.functional.scaled_dot_product_attention(to_t(q, 8), to_t(kk, 8), to_t(v, dv))
    np.testing.assert_allclose(out, expect.transpose(1, 2).reshape(2, 50, 4 * dv).numpy(), rtol=1e-5, atol=1e-6)
    out16 = layers.multi_head_attention(q.astype(jnp.bfloat16), kk.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 4)
    assert out16.dtype == jnp.bfloat16
    # bf16 inputs and weights (8-bit mantissa, relative rounding 2^-9) on O(1) outputs.
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.05)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tiled path is the CPU backend's")
def test_parity_with_diffusers_cpu_tiled_attention(monkeypatch):
    case = build_case("sd1x")
    calls = _count_tiled(monkeypatch, 4 * 64 * 24)  # 64-token self-attention in 3 blocks of 22 queries
    out = np.asarray(jax.jit(UNet(CONFIGS["sd1x"]).apply)(case["params"], **to_jax(case["inputs"])))
    assert calls, "the tiled path did not run"
    err = np.abs(out - case["ref"]).max()
    assert err < TOL, f"max abs error {err:.2e}"


@pytest.mark.parametrize("mode", ["plain", "matmul_convs", "split_convs", "eigen_convs"])
def test_parity_with_diffusers_conv_paths(mode, monkeypatch):
    """Each conv form: lax.conv throughout ("plain": no CPU rewrites) and, on the CPU backend,
    every 3x3 conv as an im2col matmul, as a sum of convs over input-channel chunks of 3
    (ragged: 8 channels -> 3 + 3 + 2), or every stride-1 3x3 conv with one output row more
    (the Eigen conv); these tiny maps have too few channels for any by default."""
    import contextlib

    from meg_jax.backbone import layers

    if mode != "plain" and jax.default_backend() != "cpu":
        pytest.skip("the matmul and split convs are the CPU backend's")
    if mode == "matmul_convs":
        monkeypatch.setattr(layers, "MATMUL_CONV_MIN_CHANNELS", 0)
    if mode == "split_convs":
        monkeypatch.setattr(layers, "CONV_SPLIT_ABOVE", 0)
        monkeypatch.setattr(layers, "CONV_SPLIT_CHANNELS", 3)
    if mode == "eigen_convs":
        monkeypatch.setattr(layers, "EIGEN_CONV_MIN_CHANNELS", 0)
    case = build_case("sd1x")
    with layers.plain_kernels() if mode == "plain" else contextlib.nullcontext():
        out = np.asarray(jax.jit(UNet(CONFIGS["sd1x"]).apply)(case["params"], **to_jax(case["inputs"])))
    err = np.abs(out - case["ref"]).max()
    assert err < TOL, f"max abs error {err:.2e}"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Eigen-conv path is the CPU backend's")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [1, "VALID", ((0, 2), (2, 1)), ((2, 2), (0, 1))])
def test_cpu_eigen_conv_matches_lax_conv(padding, stride):
    """At the default EIGEN_CONV_MIN_CHANNELS (256 in and out), a 3x3 float32 conv in its
    Eigen form (stride 1: one extra output row, dropped; stride 2: dilated input) gives
    lax.conv's outputs, for symmetric, VALID and asymmetric padding (the last, stride 1: 7
    output rows from 5 already, no extra row), on odd and even map sizes."""
    from meg_jax.backbone import layers

    c = layers.EIGEN_CONV_MIN_CHANNELS
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, c))
    conv = layers.Conv2d(c, 3, stride=stride, padding=padding)
    params = conv.init(jax.random.PRNGKey(1), x)
    out = np.asarray(jax.jit(conv.apply)(params, x))
    with layers.plain_kernels():
        ref = np.asarray(jax.jit(conv.apply)(params, x))
    pad = ((1, 1), (1, 1)) if padding == 1 else padding
    expect = jax.lax.conv_general_dilated(x, params["params"]["kernel"], (stride, stride), pad,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert out.shape == ref.shape == expect.shape
    # Sums of 9*256 products of N(0,1) inputs and U(+-1/48) weights (outputs ~N(0, 1/3)), in
    # another order (Eigen's GEMM blocking vs YNNPACK's): float32 rounding ~sqrt(2304)*6e-8
    # relative to the terms' magnitude, ~1e-6 here; 1e-5 leaves margin and still catches a
    # shifted or dropped row (O(1) differences).
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, np.asarray(expect), atol=1e-5, rtol=0)


def test_cpu_eigen_conv_form_is_still_declined_by_ynnpack():
    """A canary for the speed of the Eigen form (not its values): it is fast only because
    XLA:CPU's YNNPACK fusion declines it (jax 0.10: taller outputs, dilated inputs). If a
    later XLA takes these forms, this fails, and ``layers.EIGEN_CONV_MIN_CHANNELS``'s rule
    should be re-measured with ``python -m eval.bench_blocks``. The plain conv is checked to
    be a YNNPACK fusion, so the test can tell which rule changed."""
    if jax.default_backend() != "cpu":
        pytest.skip("the Eigen form is a CPU-backend rewrite")
    from meg_jax.backbone import layers

    c = layers.EIGEN_CONV_MIN_CHANNELS
    x = jax.ShapeDtypeStruct((1, 8, 8, c), jnp.float32)
    for stride in (1, 2):
        conv = layers.Conv2d(c, 3, stride=stride)
        params = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
        fast = jax.jit(conv.apply).lower(params, x).compile().as_text()
        with layers.plain_kernels():
            plain = jax.jit(conv.apply).lower(params, x).compile().as_text()
        assert "__ynn_fusion" in plain, f"stride {stride}: XLA no longer runs the plain conv in YNNPACK"
        assert "__ynn_fusion" not in fast, f"stride {stride}: XLA now runs the Eigen form in YNNPACK too"
