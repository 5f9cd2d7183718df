"""The default matmul precision path: key jitted programs traced at ``"default"`` against
``"highest"`` (tests/conftest.py sets ``"highest"`` for the whole suite; this module switches it
back per call with ``jax.default_matmul_precision``).

What "default" means depends on the backend. On CPU, XLA runs DEFAULT dots and convolutions in
float32 exactly like HIGHEST (measured here: a 256x512 @ 512x256 product and the tiny UNet
are bit-identical at both settings). On GPU/TPU, DEFAULT may round the operands to TF32
(unit roundoff 2^-11 = 4.9e-4) or bfloat16 (2^-9 = 2.0e-3). The tolerances below are set for
the bfloat16 case, so the module holds on any backend: a dot of K terms whose operands are
each rounded to relative u has a relative error ~ sqrt(2) u (independent roundings; the K-term
sum in float32 adds ~ sqrt(K) 6e-8, negligible), and errors of L chained layers behind
normalisations add in quadrature: ~ sqrt(2 L) u.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meg_jax.env as menv
from meg_jax.backbone import UNet, example_inputs, init_unet
from meg_jax.backbone import preset as backbone_preset
from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import cvpo, dual, networks

BF16_U = 2.0**-9  # unit roundoff of bfloat16, the coarsest operand rounding a DEFAULT dot may use


def _at(precision: str, fn, *args):
    """``fn(*args)`` traced, compiled and run at ``precision`` (a fresh jit: the context is part
    of the trace)."""
    with jax.default_matmul_precision(precision):
        return jax.device_get(jax.jit(fn)(*args))


def _lowered_text(precision: str, fn, *args) -> str:
    with jax.default_matmul_precision(precision):
        return jax.jit(fn).lower(*args).as_text()


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def unet_case():
    config = backbone_preset("tiny").unet
    params = init_unet(config, jax.random.PRNGKey(0))
    inputs = example_inputs(config, batch=2, seq_len=4)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    inputs["sample"] = jax.random.normal(k1, inputs["sample"].shape)
    inputs["encoder_hidden_states"] = jax.random.normal(k2, inputs["encoder_hidden_states"].shape)
    inputs["timestep"] = jnp.full(inputs["timestep"].shape, 499, inputs["timestep"].dtype)
    model = UNet(config)

    def forward(params, inputs):
        return model.apply(params, **inputs)

    return forward, params, inputs


def test_precision_context_reaches_the_unet_dots(unet_case):
    """The context really switches the traced precision despite the suite-wide "highest"."""
    forward, params, inputs = unet_case
    default, highest = _lowered_text("default", forward, params, inputs), _lowered_text("highest", forward, params, inputs)
    # (a few dots pin HIGHEST themselves, e.g. the timestep embedding; the rest follow the context)
    assert "precision = [DEFAULT, DEFAULT]" in default
    assert "DEFAULT" not in highest and "precision = [HIGHEST, HIGHEST]" in highest


def test_unet_forward_default_matches_highest(unet_case):
    forward, params, inputs = unet_case
    default, highest = _at("default", forward, params, inputs), _at("highest", forward, params, inputs)
    assert np.all(np.isfinite(default))
    # tiny UNet: ~20 dots/convs on the longest path (resnets, attention, up/down blocks) behind
    # GroupNorm/LayerNorm: sqrt(2 x 20) x 2^-9 = 1.2e-2 in bf16; 3e-2 leaves 2.5x room.
    # Measured on CPU: 0 (DEFAULT is float32 there).
    assert _rel_l2(default, highest) < 3e-2


def test_env_step_default_matches_highest():
    env = menv.make("tiny", num_envs=8, episode_length=4, artifact=synthetic_artifact())

    def run(key):
        state = env.reset(key)
        actions = jax.random.uniform(jax.random.fold_in(key, 1), (8, 2), minval=-1.0, maxval=1.0)
        nxt = env.step(state, actions)
        return nxt.obs, nxt.reward, nxt.info["costs"]

    key = jax.random.PRNGKey(0)
    default, highest = _at("default", run, key), _at("highest", run, key)
    # the env step interpolates calibration tables and prices the link elementwise; a DEFAULT
    # dot there (if any) would be one dot deep: sqrt(2) x 2^-9 = 2.8e-3 relative; rtol 1e-2.
    for d, h in zip(default, highest):
        np.testing.assert_allclose(d, h, rtol=1e-2, atol=1e-6)


def test_cvpo_update_default_matches_highest():
    """One CVPO update's numerics: critic ensemble on M sampled actions, the E-step dual solve
    and its weights, the Gaussian M-step loss and its gradient (the pieces ``make_cvpo`` chains)."""
    b, m, obs_dim, d, heads = 32, 8, 13, 2, 4
    actor = networks.GaussianPolicy((32, 32), d, 0.5, 1e-3)
    critic = networks.CriticEnsemble((32, 32), heads, True)
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    obs = jax.random.normal(k[0], (b, obs_dim))
    actor_params = actor.init(k[1], obs)
    critic_params = critic.init(k[2], obs, jnp.zeros((b, d)))
    thresholds = dual.q_space_threshold(jnp.ones((2,)), 0.5, 8)

    def update(actor_params, critic_params, key):
        mean_old, std_old = actor.apply(actor_params, obs)
        a = jnp.swapaxes(networks.gaussian_sample(key, mean_old, std_old, m), 0, 1)  # [B, M, d]
        obs_b = jnp.broadcast_to(obs[:, None], a.shape[:-1] + obs.shape[-1:])
        q = critic.apply(critic_params, obs_b, jnp.clip(a, -1.0, 1.0))  # [B, M, heads]
        q_r, q_c = jnp.minimum(q[..., 0], q[..., 1]), q[..., 2:]
        log_prior = jnp.full((b, m), -jnp.log(m), jnp.float32)
        sol = dual.solve_estep_dual(q_r, q_c, log_prior, 0.02, thresholds, 1.0, jnp.zeros(2), max_iters=30, tol=2e-7)
        weights = dual.estep_weights(q_r, q_c, log_prior, sol.eta, sol.lam)

        def loss(p):
            mean, std = actor.apply(p, obs)
            return cvpo.gaussian_mstep_loss(mean, std, mean_old, std_old, a, weights, 1.0, 1.0)[0]

        value, grads = jax.value_and_grad(loss)(actor_params)
        return q, sol.eta, weights, value, grads

    default = _at("default", update, actor_params, critic_params, k[3])
    highest = _at("highest", update, actor_params, critic_params, k[3])
    q_d, eta_d, w_d, loss_d, g_d = default
    q_h, eta_h, w_h, loss_h, g_h = highest
    # Q: 3 dots deep (two hidden layers and the head, LayerNorm between): sqrt(6) 2^-9 = 4.8e-3
    assert _rel_l2(q_d, q_h) < 1.5e-2
    # eta solves a smooth 1-d convex dual whose gradient is linear in the Q spread; a relative
    # Q error r moves it by ~r: bound 5e-2 (3x the Q bound). The weights are a softmax of
    # (Q_r - lam Q_c) / eta, so their absolute error is <= w |dQ| / eta ~ r: atol 5e-2.
    np.testing.assert_allclose(eta_d, eta_h, rtol=5e-2)
    np.testing.assert_allclose(w_d, w_h, atol=5e-2)
    # the M-step loss and its gradient: 3 more dots on the actor side
    np.testing.assert_allclose(loss_d, loss_h, rtol=5e-2, atol=1e-3)
    for gd, gh in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_h)):
        assert _rel_l2(gd, gh) < 1e-1
