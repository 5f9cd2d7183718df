"""Per-request prompt replay, reward metrics and the system energy scope of the MEG environment.

The NumPy twin's step-by-step parity with replay + system energy is in tests/test_env.py
(``test_jax_and_numpy_reference_give_the_same_trajectories[replay_system]``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meg_jax.env as menv
from meg_jax.env import channel as CH
from meg_jax.env import meg_env as M
from meg_jax.env import numpy_reference as R
from meg_jax.env import oracle as O
from meg_jax.env.params import _paper_params, quality_channels
from meg_jax.meg import devices
from meg_jax.meg.artifact import synthetic_artifact

P = 8  # prompts per class of the test artifacts
T = 8


@pytest.fixture(scope="module")
def digital():
    """Digital link: quality flat in SNR, so requests of one class and action share a cell."""
    return synthetic_artifact(link_mode="digital", prompts_per_class=P)


@pytest.fixture(scope="module")
def analog():
    return synthetic_artifact(link_mode="analog", prompts_per_class=P)


def _params(artifact, **overrides):
    return menv.make_unbatched("tiny", episode_length=T, artifact=artifact, limit_samples=256, **overrides)[0].params


def _class_mean(params, artifact, **overrides):
    """The class-mean env's params from a replay env's: only the quality table differs (the
    costs, hence the derived limits, do not depend on the prompt); saves a limits compile."""
    config = dataclasses.replace(menv.get_preset("tiny"), **overrides)
    return params.replace(quality_table=jnp.asarray(quality_channels(config, artifact), jnp.float32))


_price = jax.jit(jax.vmap(M.price_action, in_axes=(None, 0, 0, 0, 0, 0)))


def _price_np(params, snr, cls, k, r, prompt=None):
    """Vectorised price_action on host arrays (prompt None: a class-mean env)."""
    n = len(snr)
    prompt = np.zeros(n, np.int32) if prompt is None else prompt
    out = _price(params, jnp.asarray(snr, jnp.float32), jnp.asarray(cls, jnp.int32), jnp.asarray(k, jnp.int32),
                 jnp.asarray(r, jnp.float32), jnp.asarray(prompt, jnp.int32))
    return {key: np.asarray(v, np.float64) for key, v in out.items()}


# --------------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def replay_env(digital):
    """512 replay episodes, discrete actions, digital link (shared by the env-level tests)."""
    return menv.make("tiny", num_envs=512, episode_length=T, artifact=digital, discrete=True,
                     quality_source="replay", limit_samples=256)


def test_env_rewards_differ_across_prompts_exactly_as_the_artifact_says(replay_env, digital):
    # 512 episodes x 8 requests, one fixed action (K option 2, r = 0.3, a grid point: w_r = 0).
    # Digital link: every SNR column of the table holds the same value, so each request's
    # reward must be the artifact's per-prompt accuracy of its (class, prompt) cell.
    env = replay_env
    k_idx, r_idx = 2, 3
    action = jnp.full((512,), k_idx * 8 + r_idx, jnp.int32)

    @jax.jit
    def run(key):
        def body(s, _):
            core = s.pipeline_state
            s = env.step(s, action)
            return s, (core.channel.snr_db, core.task_class, core.prompt, s.reward)

        return jax.lax.scan(body, env.reset(key), None, length=T)[1]

    snr, cls, prompt, reward = (np.asarray(x).reshape(-1) for x in run(jax.random.PRNGKey(0)))
    table = digital.prompt_accuracy[k_idx, r_idx, 0]  # [C, P] (flat in SNR)
    # (1 - w_s) a + w_s a in float32 is a within 1 ulp (6e-8 relative)
    np.testing.assert_allclose(reward, table[cls, prompt], rtol=3e-7)
    # the variance shows: within every class, all prompts, with the rewards' spread the table's
    for c in range(4):
        assert len(np.unique(prompt[cls == c])) == P  # 4096 requests, ~128 per (class, prompt)
        assert np.ptp(reward[cls == c]) == pytest.approx(np.ptp(table[c]), rel=1e-6) and np.ptp(table[c]) > 0.01
    # the prompt comes from the class's own uniform: the class-mean env sees, under the same
    # keys, the same channels and classes (its first requests here)
    starts = lambda params: jax.jit(jax.vmap(lambda k: M.reset_env(params, k).pipeline_state))(  # noqa: E731
        jax.random.split(jax.random.PRNGKey(0), 512))
    a, b = starts(env.params), starts(_class_mean(env.params, digital))
    # two compiled programs (replay vs class-mean env): same draws, same ops, but XLA may fuse the
    # float32 arithmetic differently, so a few ulps (rtol 1e-6 ~ 8 float32 eps) rather than bits
    np.testing.assert_allclose(np.asarray(a.channel.snr_db), np.asarray(b.channel.snr_db), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a.task_class), np.asarray(b.task_class))
    assert len(np.unique(np.asarray(a.prompt))) == P and np.all(np.asarray(b.prompt) == 0)


def test_prompt_draw_is_uniform_within_each_class_and_leaves_the_class_alone():
    # One uniform draws the class (inverse CDF) and the prompt (its position within the
    # class's interval). Non-uniform classes; 400 000 draws.
    cdf = jnp.cumsum(jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32)).at[-1].set(1.0)
    u = jax.random.uniform(jax.random.PRNGKey(0), (400_000,))
    cls = np.asarray(jax.vmap(lambda x: CH._sample_class(cdf, x))(u))
    prompt = np.asarray(jax.vmap(lambda x: CH._sample_prompt(cdf, x, P))(u))
    counts = np.zeros((4, P))
    np.add.at(counts, (cls, prompt), 1)
    expected = 400_000 * np.array([0.1, 0.2, 0.3, 0.4])[:, None] / P
    z = (counts - expected) / np.sqrt(expected)  # binomial, n p (1 - p) ~ n p here
    assert np.max(np.abs(z)) < 5.0, z
    # the NumPy twin's own rule (float64) gives the same prompts, except within float32
    # rounding (~1e-7) of a prompt boundary
    p_np = {"task_cdf": np.asarray(cdf, np.float64), "quality_table": np.zeros((1, 1, 1, 4 * P, 2))}
    same = R._prompt(p_np, np.asarray(u, np.float64)) == prompt
    assert np.mean(same) > 1 - 1e-4
    # one prompt per class: always prompt 0
    assert int(jnp.max(jax.vmap(lambda x: CH._sample_prompt(cdf, x, 1))(u))) == 0


def test_prompt_pricing_matches_the_tables_and_averages_to_the_class_mean(analog):
    rep = _params(analog, quality_source="replay")
    mean = _params(analog)
    assert rep.quality_table.shape == (4, 8, 11, 4 * P, 2) and rep.prompts_per_class == P
    assert mean.prompts_per_class == 1
    # at grid points (SNR 9 dB = grid index 4, r = 0.5 = index 5) the reward is the table entry
    cls, prompt = np.repeat(np.arange(4), P), np.tile(np.arange(P), 4)
    n = len(cls)
    out = _price_np(rep, np.full(n, analog.snr_db[4]), cls, np.full(n, 1), np.full(n, 0.5), prompt)
    np.testing.assert_allclose(out["quality"], analog.prompt_accuracy[1, 5, 4, cls, prompt], rtol=1e-6)
    np.testing.assert_allclose(out["psnr_db"], analog.prompt_psnr[1, 5, 4, cls, prompt], rtol=1e-6)
    # off the grid, interpolation is linear: the mean over a class's prompts is the class-mean
    # env's reward (float32 sums of 8 values ~0.5: 1e-6 relative)
    rng = np.random.default_rng(0)
    snr, r, k = rng.uniform(-8.0, 33.0, 16), rng.uniform(0.0, 0.7, 16), rng.integers(0, 4, 16)
    c = rng.integers(0, 4, 16)
    rows = _price_np(rep, np.repeat(snr, P), np.repeat(c, P), np.repeat(k, P), np.repeat(r, P), np.tile(np.arange(P), 16))
    ref = _price_np(mean, snr, c, k, r)
    np.testing.assert_allclose(rows["quality"].reshape(16, P).mean(1), ref["quality"], rtol=2e-6)
    for name in ("latency_s", "energy_j"):  # costs do not depend on the prompt (two programs: a few float32 ulps)
        np.testing.assert_allclose(rows[name].reshape(16, P), np.repeat(ref[name][:, None], P, 1), rtol=1e-6)


@pytest.mark.parametrize("metric", ["psnr", "neg_log_mse", "pixel_accuracy"])
def test_reward_metrics(analog, metric):
    p = _params(analog, quality_source="replay", reward_metric=metric)
    cls, prompt = np.repeat(np.arange(4), P), np.tile(np.arange(P), 4)
    n = len(cls)
    out = _price_np(p, np.full(n, analog.snr_db[7]), cls, np.full(n, 3), np.full(n, 0.2), prompt)
    psnr = analog.prompt_psnr[3, 2, 7, cls, prompt].astype(np.float64)
    expected = {
        "psnr": psnr,
        # -ln MSE with MSE = 4 x 10^(-PSNR/10) (data range 2): e.g. PSNR 20 dB -> -ln 0.04 = 3.219
        "neg_log_mse": -np.log(4.0 * 10.0 ** (-psnr / 10.0)),
        "pixel_accuracy": analog.prompt_pixel_accuracy[3, 2, 7, cls, prompt],
    }[metric]
    np.testing.assert_allclose(out["quality"], expected, rtol=1e-5)  # float32 affine map of the table
    if metric == "pixel_accuracy":  # the accuracy reading is the pixel one
        np.testing.assert_allclose(out["accuracy"], expected, rtol=1e-6)


def test_replay_and_pixel_reading_need_the_tables_and_say_how_to_get_them():
    old = synthetic_artifact()  # no per-prompt tables, no pixel table (as a schema-1 file)
    with pytest.raises(ValueError, match=r"quality_source='replay'.*meg-jax calibrate"):
        menv.make_unbatched("tiny", artifact=old, quality_source="replay")
    with pytest.raises(ValueError, match=r"reward_metric='pixel_accuracy'.*meg-jax calibrate"):
        menv.make_unbatched("tiny", artifact=old, reward_metric="pixel_accuracy")
    with pytest.raises(ValueError, match="quality_source must be one of"):
        menv.make_unbatched("tiny", artifact=old, quality_source="per_prompt")
    with pytest.raises(ValueError, match="reward_metric must be one of"):
        menv.make_unbatched("tiny", artifact=old, reward_metric="mse")


def test_replay_tables_without_the_prompt_raise(analog):
    p = _params(analog, quality_source="replay")
    with pytest.raises(ValueError, match="prompt index"):
        M.grid_action_table(p, jnp.zeros(3), jnp.zeros(3, jnp.int32))


# --------------------------------------------------------------------------- oracle
def test_oracle_knows_the_prompt_and_beats_every_class_level_policy(replay_env, digital):
    # 512 episodes x 8 requests. The replay oracle knows each request's prompt quality; the
    # class-mean oracle's policy (a function of SNR and class only) run on the same requests
    # is feasible for the replay LP (costs do not depend on the prompt), so the replay
    # oracle's quality is at least its quality there (minus the smoothing slack
    # tau log A = 1e-4 ln 32 = 3.5e-4), and here clearly more: the artifact's prompt offsets
    # are shuffled per K, so the best K depends on the prompt.
    env, p = replay_env, replay_env.params
    snr, cls, prompt = jax.jit(lambda k: O.collect_env_requests(env, k, T, with_prompt=True))(jax.random.PRNGKey(1))
    tables = jax.jit(O.action_tables)
    q_rep, c = tables(p, snr, cls, prompt)
    q_mean, c_mean = tables(_class_mean(p, digital), snr, cls)
    np.testing.assert_allclose(np.asarray(c), np.asarray(c_mean), rtol=1e-6)  # two programs: float32 ulps
    sol_rep = O.fit_oracle(q_rep, c, p.limits)
    sol_mean = O.fit_oracle(q_mean, c, p.limits)
    probs_mean = O.oracle_probabilities(q_mean, c, p.limits, jnp.asarray(sol_mean.lambdas, jnp.float32),
                                        sol_mean.temperature)
    class_policy_on_replay = float(jnp.mean(jnp.sum(probs_mean * q_rep, -1)))
    assert sol_rep.avg_quality > class_policy_on_replay + 0.01, (sol_rep.avg_quality, class_policy_on_replay)
    assert np.all(sol_rep.avg_costs <= np.asarray(p.limits) * (1 + 1e-4))
    # the oracle policies read the prompt from the state: "always max quality" in the env
    # earns exactly the mean of the per-request maxima of the replay tables
    out = jax.jit(lambda k: O.rollout_policy(env, O.max_quality_policy(p), k, T))(jax.random.PRNGKey(1))
    assert float(out["avg_quality"].mean()) == pytest.approx(float(q_rep.max(-1).mean()), rel=1e-5)


# --------------------------------------------------------------------------- energy
def test_system_energy_adds_the_edge_server_term_by_term(analog):
    ue = _params(analog)
    system = _params(analog, energy_scope="system", es_device="edge_gpu_l4")
    l4 = devices.device("edge_gpu_l4")
    power = l4.energy_per_flop_j * l4.effective_flops  # 72 W: the L4's datasheet power
    assert power == pytest.approx(72.0)
    k, r, snr = np.repeat(np.arange(4), 6), np.tile([0.0, 0.15, 0.7, 0.0, 0.35, 0.5], 4), np.tile([-12, 0, 9, 25, 30, 3.3], 4)
    cls = np.zeros(len(k), int)
    a, b = _price_np(ue, snr, cls, k, r), _price_np(system, snr, cls, k, r)
    for name in ("quality", "latency_s", "tx_time_s", "ue_compute_energy_j", "ue_rx_energy_j"):
        # the energy scope is static: two compiled programs, equal up to float32 fusion (a few ulps)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(a["energy_j"], a["ue_compute_energy_j"] + a["ue_rx_energy_j"], rtol=1e-6)
    # ES compute: 72 W x (10 ms + 25 ms K); K = 1, 2, 4, 8 -> 2.52, 4.32, 7.92, 15.12 J
    steps = np.asarray(analog.steps)[k]
    np.testing.assert_allclose(b["es_compute_energy_j"], 72.0 * (0.01 + 0.025 * steps), rtol=1e-5)
    # ES transmit: the artifact's 10 dBm = 10 mW radiated for the air time
    np.testing.assert_allclose(b["es_tx_energy_j"], 0.01 * b["tx_time_s"], rtol=1e-5)
    terms = b["ue_compute_energy_j"] + b["ue_rx_energy_j"] + b["es_compute_energy_j"] + b["es_tx_energy_j"]
    np.testing.assert_allclose(b["energy_j"], terms, rtol=1e-6)
    assert np.all(b["es_compute_energy_j"] > 0) and np.all(b["es_tx_energy_j"] > 0)
    assert np.all(b["energy_j"] > a["energy_j"])
    # K costs energy only under the system scope (same r and SNR, K option 0..3)
    e_ue, e_sys = a["energy_j"].reshape(4, 6), b["energy_j"].reshape(4, 6)
    np.testing.assert_array_equal(e_ue, np.broadcast_to(e_ue[0], e_ue.shape))
    assert np.all(np.diff(e_sys, axis=0) > 0)


def test_system_energy_needs_an_es_device_and_the_mobility_system():
    art = synthetic_artifact()  # its provenance names no ES device
    with pytest.raises(ValueError, match="es_device"):
        menv.make_unbatched("tiny", artifact=art, energy_scope="system")
    with pytest.raises(ValueError, match="energy_scope must be one of"):
        menv.make_unbatched("tiny", artifact=art, energy_scope="es")
    with pytest.raises(ValueError, match="energy_scope applies to system='mobility'"):
        menv.make_unbatched("paper", artifact=art, energy_scope="system")


# ---------------------------------------------------------------------- paper system
def test_paper_system_replays_prompts_with_the_authors_reward(analog):
    # The paper's system reads the resampled tables at its feature-noise SNR (20 dB); replay
    # rows resample like the class rows, so the mean over prompts is the class-mean reward,
    # and reward_metric="neg_log_mse" is the authors' -ln MSE (= the preset's PSNR reward - ln 4).
    rep = menv.make_unbatched("paper", episode_length=T, artifact=analog, quality_source="replay",
                              reward_metric="neg_log_mse")[0].params
    base = _paper_params(menv.get_preset("paper"), analog, T, np.cumsum([0.25] * 4))  # no limits needed
    n = 6
    k, r, c = np.arange(n) % 9, np.linspace(0.0, 1.0, n), np.arange(n) % 4
    rows = _price_np(rep, np.repeat(np.full(n, 20.0), P), np.repeat(c, P), np.repeat(k, P), np.repeat(r, P),
                     np.tile(np.arange(P), n))
    ref = _price_np(base, np.full(n, 20.0), c, k, r)
    # base reward = PSNR ln(10)/10 (reward_psnr_weight 1, scale 10/ln 10): values ~5, float32
    np.testing.assert_allclose(rows["quality"].reshape(n, P).mean(1), ref["quality"] - np.log(4.0), rtol=1e-5)
    assert np.all(np.ptp(rows["quality"].reshape(n, P), axis=1) > 0.1)


def test_conventional_schemes_follow_the_reward_metric_and_the_energy_scope(analog):
    # The comparison prices the schemes like the env prices MEG: the reward's offset (-ln 4 of
    # neg_log_mse) and, under the system scope, ES compute energy + radiated energy.
    from meg_jax.rl.comparison import conventional_schemes

    snr, cls = np.array([-3.0, 4.0, 12.5, 30.0]), np.array([0, 1, 2, 3])
    base = _params(analog)
    system = _params(analog, energy_scope="system", es_device="edge_gpu_l4", reward_metric="neg_log_mse")
    a, b = conventional_schemes(analog, base, snr, cls), conventional_schemes(analog, system, snr, cls)
    for name, s in analog.conventional_schemes.items():
        # quality: PSNR ln10/10 - ln 4 of the scheme's class PSNR at the SNR (float64 on the host)
        psnr = np.array([np.interp(x, analog.snr_db, s.psnr[:, c]) for x, c in zip(snr, cls)])
        np.testing.assert_allclose(b[name]["quality"], psnr * np.log(10.0) / 10.0 - np.log(4.0), rtol=1e-6)
        np.testing.assert_array_equal(a[name]["latency_s"], b[name]["latency_s"])
        extra = b[name]["energy_j"] - a[name]["energy_j"]
        t_tx = a[name]["energy_j"] - s.ue_compute_energy_j  # = receive power (1 W) x air time
        np.testing.assert_allclose(extra, 72.0 * s.es_compute_time_s + 0.01 * t_tx, rtol=1e-6, atol=1e-12)
    assert np.all(b["on_device"]["energy_j"] == a["on_device"]["energy_j"])  # nothing sent, no ES work
