"""The ``paper`` preset (system="paper") against a NumPy transcription of the authors' formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import meg_jax.env as menv
from meg_jax.env import meg_env as M
from meg_jax.env import oracle as O
from meg_jax.env import paper_reference as P
from meg_jax.env.config import PaperSystem
from meg_jax.meg import costs as costs_lib
from meg_jax.meg import devices

N_ENVS, STEPS = 128, 80  # 10240 requests


@pytest.fixture(scope="module")
def env_and_report():
    return menv.make_unbatched("paper", episode_length=64)


@pytest.fixture(scope="module")
def authors():
    """The authors' constants assembled from this project's numbers, apart from ``build_params``."""
    ps = PaperSystem()
    pre = costs_lib.COST_PRESETS[ps.cost_preset]
    es = devices.DEVICES[ps.es_device]
    return P.authors_constants(
        unet_flops=pre.unet_flops, unet_evals_per_step=ps.unet_evals_per_step, text_flops=pre.text_encoder_flops,
        vae_flops=pre.vae_decoder_flops, es_effective_flops=es.peak_flops * es.utilisation,
        es_energy_per_flop_j=es.energy_per_flop_j, base_delay_s=ps.base_delay_s, bias_energy_hj=ps.bias_energy_hj,
    )


def _quality_reference(artifact, steps: np.ndarray, ratio: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """PSNR of the preset's quality rule, written directly from the artifact (dB) [N].

    At the feature-noise SNR -20 log10(0.1) = 20 dB (a grid point): linear in log K between
    the measured K (held beyond them), linear in r, the segment 0.6..0.7 extended to the last
    distinct merge 3072/4096 = 0.75 and held beyond.
    """
    si = int(np.nonzero(np.isclose(artifact.snr_db, 20.0))[0][0])
    table = artifact.psnr[:, :, si, :]  # [K, R, C]
    rg = np.asarray(artifact.merge_ratios)
    r = np.minimum(ratio, 0.75)
    i = np.clip(np.searchsorted(rg, r, side="right") - 1, 0, len(rg) - 2)
    w = (r - rg[i]) / (rg[i + 1] - rg[i])  # > 1 on the extension 0.7..0.75
    in_r = (1 - w)[None] * table[:, i, cls] + w[None] * table[:, i + 1, cls]  # [K, N]
    lk = np.log(np.asarray(artifact.steps, np.float64))
    q = np.log(np.clip(steps, artifact.steps[0], artifact.steps[-1]))
    j = np.clip(np.searchsorted(lk, q, side="right") - 1, 0, len(lk) - 2)
    v = (q - lk[j]) / (lk[j + 1] - lk[j])
    n = np.arange(len(ratio))
    return (1 - v) * in_r[j, n] + v * in_r[j + 1, n]


def test_jax_env_matches_the_authors_formulas_step_by_step(env_and_report, authors):
    """Every cost term and the observation of 10240 requests (random actions, every K) vs the transcription."""
    env, _ = env_and_report
    p = env.params
    artifact = menv.load_artifact(env.config)
    kr, ks, ka = jax.random.split(jax.random.PRNGKey(11), 3)
    reset_noise = jax.vmap(lambda k: M.sample_reset_noise(k, p.history_length))(jax.random.split(kr, N_ENVS))
    step_noise = jax.vmap(jax.vmap(M.sample_step_noise))(jax.random.split(ks, N_ENVS * STEPS).reshape(N_ENVS, STEPS, 2))
    actions = np.array(jax.random.uniform(ka, (STEPS, N_ENVS, 2), minval=-1.0, maxval=1.0))
    actions[0, :8] = [[1, 1], [1, -1], [-1, -1], [-1, 1], [0.99, 0.5], [0.75, 0.5], [-0.75, -0.999], [1.5, 2.0]]

    @jax.jit
    def run(reset_noise, step_noise, actions):
        core = jax.vmap(lambda nz: M.init_core(p, jnp.zeros(2, jnp.uint32), nz))(reset_noise)

        def body(c, x):
            a, nz = x
            obs = jax.vmap(lambda cc: M.observe(p, cc))(c)
            k, r = jax.vmap(lambda aa: M.continuous_to_choice(p, aa))(a)
            cls = c.task_class
            c, out = jax.vmap(lambda cc, kk, rr, zz: M.transition(p, cc, kk, rr, zz))(c, k, r, nz)
            return c, (obs, out, cls)

        return jax.lax.scan(body, core, (actions, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), step_noise)))[1]

    obs, outs, classes = jax.device_get(run(reset_noise, step_noise, jnp.asarray(actions)))
    # Distances of every request, from the same draws: the first from pos_u[0], then
    # u = Φ(z_shadow) of each transition's noise (the draw of request t + 1 is in step t's noise).
    u0 = np.asarray(reset_noise.pos_u[:, 0], np.float64)
    u_next = special.ndtr(np.asarray(step_noise.z_shadow, np.float64))  # [N, T]
    u = np.concatenate([u0[:, None], u_next[:, :-1]], axis=1).T  # [T, N]
    distance = authors["radius_min"] + u * (authors["radius_max"] - authors["radius_min"])
    # Their policy acts in [0, 1]²; the env's action is [-1, 1]², mapped by (a + 1) / 2 in float32.
    theirs = (np.float32(0.5) * (np.clip(actions, -1, 1).astype(np.float32) + np.float32(1.0))).astype(np.float64)
    # Tolerance: float32 against float64. The path loss (~122 dB) carries ~1e-5 dB of float32
    # rounding, i.e. 2.3e-6 relative in g = 10^(SNR/10), and a few more roundings follow (log2,
    # one division, sums of positive terms): < 1e-5 relative on every term.
    rtol = 1e-5
    previous = None
    for t in range(STEPS):
        steps, ratio = P.action_to_k_r(theirs[t])
        ref = P.price(authors, distance[t], steps, ratio)
        out = {k: np.asarray(v[t], np.float64) for k, v in outs.items()}
        np.testing.assert_array_equal(out["steps"], steps, err_msg=f"K at t={t}")
        np.testing.assert_array_equal(out["merge_ratio"], ratio, err_msg=f"r at t={t}")
        # Integers and multiples of 1/16 below 2^24: exact in float32.
        np.testing.assert_array_equal(out["payload_bits"], ref["bits"], err_msg=f"bits at t={t}")
        pairs = {
            "rate_bps": ref["rate_mbps"] * 1e6, "tx_time_s": ref["air_s"], "es_time_s": ref["es_s"],
            "ue_time_s": ref["ue_s"], "latency_s": ref["latency_s"], "es_energy": ref["es_hj"],
            "ue_energy": ref["ue_hj"], "tx_energy": ref["tx_energy"], "energy_j": ref["energy"],
        }
        for name, want in pairs.items():
            np.testing.assert_allclose(out[name], want, rtol=rtol, err_msg=f"{name} at t={t}")
        np.testing.assert_allclose(obs[t], P.observation(authors, distance[t], previous), rtol=rtol, atol=0,
                                   err_msg=f"observation at t={t}")
        # Quality is this project's (the artifact's tables resampled), not the authors'.
        psnr = _quality_reference(artifact, steps.astype(np.float64), ratio, np.asarray(classes[t], np.int64))
        np.testing.assert_allclose(out["psnr_db"], psnr, rtol=1e-5, err_msg=f"psnr at t={t}")
        previous = ref
    # The run covered the action space: every K, merges past the last distinct one, both ends.
    all_k = np.concatenate([P.action_to_k_r(theirs[t])[0] for t in range(STEPS)])
    assert set(all_k.tolist()) == set(range(4, 13))
    assert np.any(theirs[..., 1] > 0.75) and np.any(theirs[..., 1] == 0.0)



def test_energy_limit_binds_and_steps_cost_energy(env_and_report):
    env, report = env_and_report
    p = env.params
    assert report.limits == (3.0, 1.8)
    # The unconstrained best-quality action breaks both limits; some fixed (K, r) meets both.
    assert report.max_quality_costs[0] > 3.0 and report.max_quality_costs[1] > 1.8
    assert report.feasible_fixed_actions >= 1
    # At one request, every extra step costs energy (ES compute) and merging saves it (air time).
    price = jax.jit(jax.vmap(lambda k, r: M.price_action(p, jnp.float32(-1.0), jnp.int32(0), k, r)))
    ks = jnp.arange(9, dtype=jnp.int32)
    for r in (0.0, 0.5):
        energy = np.asarray(price(ks, jnp.full(9, r, jnp.float32))["energy_j"])
        # (ES hJ per step) / 10 = 13.54 TFLOP x 0.0170 hJ/TFLOP / 10 = 0.0230 per step
        np.testing.assert_allclose(np.diff(energy), 0.0230, rtol=2e-3)
    merged = np.asarray(price(jnp.zeros(3, jnp.int32), jnp.asarray([0.0, 0.5, 0.75], jnp.float32))["energy_j"])
    assert np.all(np.diff(merged) < 0)


def test_bias_puts_the_energy_limit_where_the_latency_limit_sits(env_and_report):
    # PaperSystem.bias_energy_hj is the one free constant of the energy level (their fit is
    # unpublished): it places 1.8 at the fraction of the fixed-action energy range at which
    # the authors' 3 s sits in the latency range.
    _, report = env_and_report
    frac = [(lim - lo) / (hi - lo) for lim, lo, hi in zip(report.limits, report.cheapest, report.dearest)]
    assert 0.1 < frac[0] < 0.5
    assert abs(frac[1] - frac[0]) < 0.01


def test_action_map_is_theirs_and_discrete_actions_round_trip(env_and_report):
    env, _ = env_and_report
    p = env.params
    to_choice = jax.jit(jax.vmap(lambda a: M.continuous_to_choice(p, a)))
    a = jnp.asarray([[1.0, 1.0], [0.999, 0.0], [-1.0, -1.0], [0.0, 0.5]], jnp.float32)
    k, r = jax.device_get(to_choice(a))
    # u0 = 1 -> K = 12; u0 = 0.9995 -> int(7.996) + 4 = 11; u0 = 0 -> 4; u0 = 0.5 -> 8. r = u1.
    np.testing.assert_array_equal(np.asarray(p.steps)[k], [12, 11, 4, 8])
    np.testing.assert_allclose(r, [1.0, 0.5, 0.0, 0.75])
    idx = jnp.arange(p.num_actions)
    k2, r2 = jax.device_get(to_choice(O.discrete_to_continuous(p, idx)))
    kd, rd = jax.device_get(jax.vmap(lambda i: M.discrete_to_choice(p, i))(idx))
    np.testing.assert_array_equal(k2, kd)
    np.testing.assert_allclose(r2, rd, rtol=1e-6)
    assert env.observation_size == 3 and p.num_actions == 9 * 9


def test_conventional_schemes_are_priced_by_the_papers_formulas(env_and_report):
    from meg_jax.rl.comparison import conventional_schemes

    env, _ = env_and_report
    artifact = menv.load_artifact(env.config)
    out = conventional_schemes(artifact, env.params, np.asarray([0.0]), np.asarray([0]))
    # On-device: (50 x 13.5423 + 0.2511 + 10.4620) TFLOP x 0.047226 s/TFLOP = 32.483 s, nothing sent;
    # energy (687.83 x 0.021251 hJ + 15.79 hJ) / 10 = 3.0407.
    np.testing.assert_allclose(out["on_device"]["latency_s"], 32.483, rtol=1e-4)
    np.testing.assert_allclose(out["on_device"]["energy_j"], 3.0407, rtol=1e-4)
    # MEG uncompressed at g = 0 dB (rate 1 Mbit/s): 1,048,576 bits take 1.048576 s on the air,
    # on top of the teacher (677.37 TFLOP x 0.023613 = 15.994 s) and the decoder (0.4941 s).
    np.testing.assert_allclose(out["meg_uncompressed"]["latency_s"], 1.048576 + 15.9947 + 0.49408, rtol=1e-4)


def test_observe_keeps_the_named_fields_and_nothing_else_changes():
    """``observe`` slices the observation (also the auto-reset's ``final_obs``) by field name, in
    the order given; rewards, costs and the next channel are those of the full observation's env."""
    kw = dict(num_envs=16, episode_length=4, discrete=True)
    full = menv.make("paper", **kw)
    part = menv.make("paper", observe=("prev_energy", "gain_to_noise"), **kw)
    assert (full.observation_size, part.observation_size) == (3, 2)
    step_f, step_p = jax.jit(full.step), jax.jit(part.step)
    sf, sp = jax.jit(full.reset)(jax.random.PRNGKey(1)), jax.jit(part.reset)(jax.random.PRNGKey(1))
    for t in range(6):  # through an episode end (T = 4): the reset slots too
        a = jax.random.randint(jax.random.PRNGKey(10 + t), (16,), 0, full.num_actions)
        sf, sp = step_f(sf, a), step_p(sp, a)
        # two compiled programs (their outputs differ in shape, so XLA may fuse the same float32 ops
        # differently): agreement to a few roundings, ~1e-7 relative, not bit for bit
        for key in ("obs", "final_obs"):
            whole = np.asarray(sf.obs if key == "obs" else sf.info[key])
            np.testing.assert_allclose(np.asarray(sp.obs if key == "obs" else sp.info[key]), whole[:, [2, 0]],
                                       rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(sp.reward), np.asarray(sf.reward), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(sp.info["costs"]), np.asarray(sf.info["costs"]), rtol=1e-6, atol=1e-7)
    for bad in (("snr",), (), ("gain_to_noise", "gain_to_noise")):
        with pytest.raises(ValueError, match="observe="):
            menv.make("paper", observe=bad, **kw)
