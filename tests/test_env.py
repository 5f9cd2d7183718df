"""Tests for the MEG environment (meg_jax.env): pricing, dynamics, episodes, parity, tracing, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meg_jax.env as menv
from meg_jax.env import meg_env as M
from meg_jax.env import numpy_reference as R
from meg_jax.env import wireless as W
from meg_jax.env.wrappers import replace_params
from meg_jax.meg.artifact import synthetic_artifact

N_ENVS, T = 8, 6


@pytest.fixture(scope="module")
def artifact():
    return synthetic_artifact(link_mode="digital")


@pytest.fixture(scope="module")
def env(artifact):
    return menv.make("tiny", num_envs=N_ENVS, episode_length=T, artifact=artifact)


@pytest.fixture(scope="module")
def jitted(env):
    """Compiled once per module: reset(key), step(params, state, action) with no retrace allowed."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, action):
        return replace_params(env, params).step(state, action)

    return jax.jit(env.reset), step


def _actions(key, n=N_ENVS):
    return jax.random.uniform(key, (n, 2), minval=-1.0, maxval=1.0)


# ------------------------------------------------------------------------ pricing
def test_price_action_interpolates_bilinearly(env, artifact):
    p = env.params
    # K option 2 (K=4), r = 0.25 (between 0.2 and 0.3, weight 0.5), SNR 4.0 dB
    # (grid step 3.5 dB: between 2.0 and 5.5, weight 2/3.5), class 1.
    out = M.price_action(p, jnp.float32(4.0), jnp.int32(1), jnp.int32(2), jnp.float32(0.25))
    a = artifact.accuracy[2, 2:4, 2:4, 1]  # [r in {0.2, 0.3}, snr in {2.0, 5.5}]
    ws = 2.0 / 3.5
    expected = 0.5 * ((1 - ws) * a[0, 0] + ws * a[0, 1]) + 0.5 * ((1 - ws) * a[1, 0] + ws * a[1, 1])
    assert float(out["accuracy"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["quality"]) == pytest.approx(expected, rel=1e-5)  # reward_psnr_weight = 0
    # Costs: payload halfway between r = 0.2 and 0.3, priced at the true SNR (digital link).
    payload = 0.5 * (artifact.payload[2] + artifact.payload[3])
    side = 0.5 * (artifact.side_info_bits[2] + artifact.side_info_bits[3])
    tx = (payload + side) / (artifact.bandwidth_hz * np.log2(1 + 10 ** 0.4))
    latency = artifact.es_compute_time_s[2] + tx + 0.5 * (artifact.ue_compute_time_s[2] + artifact.ue_compute_time_s[3])
    energy = 0.5 * (artifact.ue_compute_energy_j[2] + artifact.ue_compute_energy_j[3]) + artifact.ue_receive_power_w * tx
    assert float(out["latency_s"]) == pytest.approx(latency, rel=1e-5)
    assert float(out["energy_j"]) == pytest.approx(energy, rel=1e-5)


def test_price_action_clamps_snr_for_quality_and_floors_rate(env, artifact):
    p = env.params
    # Quality above the grid equals the top of the grid; rate keeps improving.
    hi = M.price_action(p, jnp.float32(45.0), jnp.int32(0), jnp.int32(3), jnp.float32(0.0))
    top = M.price_action(p, jnp.float32(30.0), jnp.int32(0), jnp.int32(3), jnp.float32(0.0))
    assert float(hi["accuracy"]) == pytest.approx(artifact.accuracy[3, 0, -1, 0], rel=1e-6)
    assert float(hi["accuracy"]) == pytest.approx(float(top["accuracy"]), rel=1e-6)
    assert float(hi["tx_time_s"]) < float(top["tx_time_s"])
    # Below the -10 dB floor the link runs at the floor's rate.
    deep = M.price_action(p, jnp.float32(-40.0), jnp.int32(0), jnp.int32(3), jnp.float32(0.0))
    floor = M.price_action(p, jnp.float32(-10.0), jnp.int32(0), jnp.int32(3), jnp.float32(0.0))
    assert float(deep["tx_time_s"]) == pytest.approx(float(floor["tx_time_s"]), rel=1e-6)


def test_action_mappings(env):
    p = env.params
    # [-1, -1] -> K option 0, r = 0; [1, 1] -> K option 3 (K = 8), r = r_max = 0.7;
    # a0 = 0.1 -> 0.55 * 3 = 1.65 -> nearest option 2 (K = 4); a1 = 0 -> r = 0.35.
    k, r = M.continuous_to_choice(p, jnp.asarray([-1.0, -1.0]))
    assert (int(k), float(r)) == (0, 0.0)
    k, r = M.continuous_to_choice(p, jnp.asarray([1.0, 1.0]))
    assert (int(k), float(r)) == (3, pytest.approx(0.7))
    k, r = M.continuous_to_choice(p, jnp.asarray([0.1, 0.0]))
    assert (int(k), float(r)) == (2, pytest.approx(0.35))
    # Discrete index k_idx * R + r_idx: 2 * 8 + 5 = 21 -> (K option 2, r = 0.5).
    k, r = M.discrete_to_choice(p, jnp.asarray(21))
    assert (int(k), float(r)) == (2, pytest.approx(0.5))
    assert p.num_actions == 32


# ------------------------------------------------------------------- observation
def test_observation_layout(env, jitted):
    reset, _ = jitted
    state = reset(jax.random.PRNGKey(0))
    fields = M.observation_fields(env.params)
    assert sum(s.stop - s.start for s in fields.values()) == env.observation_size == state.obs.shape[-1] == 13
    obs = np.asarray(state.obs)
    np.testing.assert_array_equal(obs[:, fields["task"]].sum(-1), 1.0)
    np.testing.assert_array_equal(obs[:, fields["progress"]], 0.0)
    np.testing.assert_array_equal(obs[:, fields["budget"]], 0.0)
    core = state.pipeline_state
    speed = np.asarray(core.channel.speed)
    np.testing.assert_allclose(obs[:, fields["speed"]][:, 0], speed / 3.0, rtol=1e-6)
    assert np.all((speed >= 0.5) & (speed <= 3.0))
    # est_snr newest first: (snr - 12.5) / 17.5 for the grid -5..30 dB.
    np.testing.assert_allclose(obs[:, 0], (np.asarray(core.channel.est_snr_db[:, 0]) - 12.5) / 17.5, rtol=1e-5)


# ----------------------------------------------------------------------- episodes
def test_episode_boundaries_and_fresh_resets(env, jitted):
    reset, step = jitted
    state = reset(jax.random.PRNGKey(1))
    first_obs = np.asarray(state.obs)
    first_pos = np.asarray(state.pipeline_state.channel.pos)
    # Fresh across slots: every slot starts somewhere else.
    assert len({tuple(p) for p in first_pos.round(3)}) == N_ENVS
    fields = M.observation_fields(env.params)
    rewards, costs = [], []
    for t in range(1, T + 1):
        state = step(env.params, state, _actions(jax.random.PRNGKey(100 + t)))
        rewards.append(np.asarray(state.reward))
        costs.append(np.asarray(state.info["costs"]))
        expect_done = 1.0 if t == T else 0.0
        np.testing.assert_array_equal(np.asarray(state.done), expect_done)
        np.testing.assert_array_equal(np.asarray(state.info["truncation"]), expect_done)
        np.testing.assert_array_equal(np.asarray(state.info["steps"]), 0 if t == T else t)
        if t < T:
            np.testing.assert_allclose(np.asarray(state.obs[:, fields["progress"]])[:, 0], t / T, rtol=1e-6)
    # At the boundary: metrics hold the finished episode's averages ...
    np.testing.assert_allclose(np.asarray(state.metrics["avg_quality"]), np.mean(rewards, axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.metrics["avg_latency_s"]), np.mean(costs, axis=0)[:, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.metrics["avg_energy_j"]), np.mean(costs, axis=0)[:, 1], rtol=1e-5)
    # ... final_obs is the last observation (progress 1, budget spent = average / limit) ...
    final = np.asarray(state.info["final_obs"])
    np.testing.assert_allclose(final[:, fields["progress"]][:, 0], 1.0, rtol=1e-6)  # t / T in float32: <= 1 ulp
    np.testing.assert_allclose(
        final[:, fields["budget"]], np.mean(costs, axis=0) / np.asarray(env.params.limits), rtol=1e-5
    )
    # ... and obs is a *fresh* episode's first observation: progress 0, new position, and
    # not the cached first state (brax's AutoResetWrapper would give back first_obs).
    obs = np.asarray(state.obs)
    np.testing.assert_array_equal(obs[:, fields["progress"]], 0.0)
    np.testing.assert_array_equal(np.asarray(state.pipeline_state.t), 0)
    new_pos = np.asarray(state.pipeline_state.channel.pos)
    assert np.all(np.abs(new_pos - first_pos).max(axis=1) > 1e-3)
    assert not np.allclose(obs, first_obs)
    assert len({tuple(p) for p in new_pos.round(3)}) == N_ENVS
    # The next episode runs its full length again.
    for t in range(1, T + 1):
        state = step(env.params, state, _actions(jax.random.PRNGKey(200 + t)))
        assert float(state.done.max()) == (1.0 if t == T else 0.0)


def test_info_and_metric_keys_and_dtypes_never_change(env, jitted):
    reset, step = jitted
    state = reset(jax.random.PRNGKey(2))
    spec = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), (s.info, s.metrics, s.obs, s.reward, s.done))  # noqa: E731
    before = spec(state)
    for t in range(T + 1):
        state = step(env.params, state, _actions(jax.random.PRNGKey(t)))
        assert spec(state) == before
    assert set(state.info) == {"cost", "costs", "steps", "truncation", "rng", "final_obs"}
    assert set(state.metrics) == set(M.METRIC_KEYS)
    # info["cost"] = Σ costs_i / limit_i by default.
    np.testing.assert_allclose(
        np.asarray(state.info["cost"]),
        np.asarray(state.info["costs"] / env.params.limits).sum(-1),
        rtol=1e-5,
    )


def test_same_key_same_episode_different_key_different_episode(env, jitted):
    reset, step = jitted
    a = reset(jax.random.PRNGKey(5))
    b = reset(jax.random.PRNGKey(5))
    c = reset(jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(a.obs), np.asarray(b.obs))
    assert not np.allclose(np.asarray(a.obs), np.asarray(c.obs))
    act = _actions(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(step(env.params, a, act).reward), np.asarray(step(env.params, b, act).reward))


def test_no_retrace_across_steps_and_params(env, jitted):
    reset, step = jitted
    state = reset(jax.random.PRNGKey(3))
    other = env.params.replace(cost_weights=env.params.cost_weights * 0.5, tx_power_dbm=env.params.tx_power_dbm + 3.0)
    for t in range(2 * T + 1):
        state = step(env.params if t % 2 else other, state, _actions(jax.random.PRNGKey(t)))
    # The step function above is wrapped in chex.assert_max_traces(n=1): reaching here
    # means 13 calls, two parameter sets and two episode boundaries compiled once.
    s_a = step(env.params, state, _actions(jax.random.PRNGKey(0)))
    s_b = step(other, state, _actions(jax.random.PRNGKey(0)))
    np.testing.assert_allclose(np.asarray(s_b.info["cost"]), 0.5 * np.asarray(s_a.info["cost"]), rtol=1e-6)
    # +3 dB transmit power shows in the next request's SNR.
    np.testing.assert_allclose(
        np.asarray(s_b.pipeline_state.channel.snr_db - s_a.pipeline_state.channel.snr_db), 3.0, atol=1e-3
    )


# ------------------------------------------------------------------------ dynamics
def test_fading_correlation_matches_rho_over_a_long_run(artifact):
    # Fixed speed 1 m/s, slot 20 ms at 3.5 GHz: f_d = 11.675 Hz, ρ = J0(2π 11.675 0.02) = J0(1.4671) = 0.5301.
    base, _ = menv.make_unbatched(
        "tiny", episode_length=10_000, artifact=artifact, speed_min_mps=1.0, speed_max_mps=1.0, slot_s=0.02
    )
    p = base.params
    rho = float(W.fading_correlation(jnp.float32(1.0), 3.5e9, 0.02))
    assert rho == pytest.approx(0.5301, abs=1e-3)

    @jax.jit
    def run(key):
        core = jax.vmap(lambda k: M.reset_env(p, k).pipeline_state)(jax.random.split(key, 64))

        def body(c, k):
            noise = jax.vmap(M.sample_step_noise)(jax.random.split(k, 64))
            c = jax.vmap(lambda cc, nn: cc.replace(channel=M._evolve_channel(p, cc.channel, nn)))(c, noise)
            return c, (c.channel.fading, c.channel.z_shadow)

        return jax.lax.scan(body, core, jax.random.split(key, 1500))[1]

    fading, shadow = run(jax.random.PRNGKey(0))
    h = np.asarray(fading[..., 0] + 1j * fading[..., 1])  # [1500, 64]
    # E[h_{t+1} conj(h_t)] / E|h|^2 over 1499 * 64 = 95 936 pairs: std error ≈ 0.003.
    corr = np.mean(h[1:] * np.conj(h[:-1])) / np.mean(np.abs(h) ** 2)
    assert corr.real == pytest.approx(rho, abs=0.015)
    assert abs(corr.imag) < 0.015
    assert np.mean(np.abs(h) ** 2) == pytest.approx(1.0, abs=0.02)
    # Shadowing latent: Gudmundson exp(-0.02 m / 10 m) = 0.998.
    z = np.asarray(shadow)
    z_corr = np.mean(z[1:] * z[:-1]) / np.mean(z**2)
    assert z_corr == pytest.approx(np.exp(-0.002), abs=0.01)


def test_ue_stays_in_area_and_moves_at_its_speed(artifact):
    base, _ = menv.make_unbatched("tiny", episode_length=100, artifact=artifact, area_half_width_m=30.0, speed_max_mps=3.0)
    p = base.params
    core = jax.vmap(lambda k: M.reset_env(p, k).pipeline_state)(jax.random.split(jax.random.PRNGKey(0), 32))
    noise = jax.vmap(M.sample_step_noise)(jax.random.split(jax.random.PRNGKey(1), 32))
    evolve = jax.jit(jax.vmap(lambda c, n: M._evolve_channel(p, c, n)))
    ch = core.channel
    for i in range(200):
        nxt = evolve(ch, jax.tree.map(lambda x: jnp.roll(x, i, axis=0), noise))
        assert float(jnp.max(jnp.abs(nxt.pos))) <= 30.0 + 1e-4
        # Without a wall hit the UE moves exactly speed * slot; with one, less.
        moved = np.linalg.norm(np.asarray(nxt.pos - ch.pos), axis=-1)
        assert np.all(moved <= np.asarray(ch.speed) * 0.1 + 1e-4)
        ch = nxt


# ----------------------------------------------------------------- NumPy parity
@pytest.fixture(scope="module")
def replay_system_env():
    """Replay (8 prompts per class, analog: quality varies with SNR), -ln MSE reward, system energy."""
    art = synthetic_artifact(link_mode="analog", prompts_per_class=8)
    return menv.make("tiny", num_envs=N_ENVS, episode_length=T, artifact=art, quality_source="replay",
                     reward_metric="neg_log_mse", energy_scope="system", es_device="edge_gpu_l4", limit_samples=1024)


@pytest.mark.parametrize("which", ["default", "replay_system"])
def test_jax_and_numpy_reference_give_the_same_trajectories(which, request):
    env = request.getfixturevalue("env" if which == "default" else "replay_system_env")
    p = env.params
    n, steps = 16, 20
    kr, ks, ka = jax.random.split(jax.random.PRNGKey(3), 3)
    reset_noise = jax.vmap(lambda k: M.sample_reset_noise(k, p.history_length))(jax.random.split(kr, n))
    step_noise = jax.vmap(jax.vmap(M.sample_step_noise))(jax.random.split(ks, n * steps).reshape(n, steps, 2))
    actions = jax.random.uniform(ka, (steps, n, 2), minval=-1.0, maxval=1.0)

    @jax.jit
    def run(reset_noise, step_noise, actions):
        core = jax.vmap(lambda nz: M.init_core(p, jnp.zeros(2, jnp.uint32), nz))(reset_noise)

        def body(c, x):
            a, nz = x
            k, r = jax.vmap(lambda aa: M.continuous_to_choice(p, aa))(a)
            c, out = jax.vmap(lambda cc, kk, rr, zz: M.transition(p, cc, kk, rr, zz))(c, k, r, nz)
            return c, ({**out, "prompt": c.prompt}, jax.vmap(lambda cc: M.observe(p, cc))(c))

        obs0 = jax.vmap(lambda cc: M.observe(p, cc))(core)
        return obs0, jax.lax.scan(body, core, (actions, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), step_noise)))[1]

    obs0, (outs, obs) = run(reset_noise, step_noise, actions)
    P = R.params_to_numpy(p)
    to_np = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)  # noqa: E731
    state = R.reset(P, to_np(reset_noise))
    np.testing.assert_allclose(R.observe(P, state), np.asarray(obs0), atol=1e-5)
    if which == "replay_system":  # the draws exercise the prompts: several per class
        assert len(np.unique(state["prompt"])) > 2
    for t in range(steps):
        k, r = R.continuous_to_choice(P, np.asarray(actions[t], np.float64))
        state, out = R.step(P, state, k, r, jax.tree.map(lambda x: x[:, t], to_np(step_noise)))
        # float32 (JAX) against float64 (NumPy): SNRs in dB to 1e-3 dB, the rest relative.
        np.testing.assert_allclose(np.asarray(outs["snr_db"][t]), out["snr_db"], atol=1e-3)
        for name in ("quality", "accuracy", "psnr_db", "latency_s", "energy_j"):
            np.testing.assert_allclose(np.asarray(outs[name][t]), out[name], rtol=1e-4, err_msg=f"{name} at t={t}")
        np.testing.assert_allclose(np.asarray(obs[t]), R.observe(P, state), atol=1e-4, err_msg=f"obs at t={t}")
        # the next request's prompt: a discrete draw from the same uniform (f32 vs f64 flips it
        # only within ~1e-7 of a prompt boundary: none in these 320 draws)
        np.testing.assert_array_equal(np.asarray(outs["prompt"][t]), state["prompt"], err_msg=f"prompt at t={t}")


# ------------------------------------------------------------------------- make()
def test_make_without_artifact_names_path_and_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        menv.make("tiny", num_envs=2, episode_length=4, artifact_path=str(tmp_path / "absent.npz"))
    assert str(tmp_path / "absent.npz") in str(err.value)
    assert "meg-jax calibrate" in str(err.value)


def test_make_default_artifact_path_error_when_missing(tmp_path, monkeypatch):
    # As on a fresh checkout before `meg-jax calibrate`: the preset's path resolves to nothing.
    monkeypatch.setattr(menv, "resolve_artifact_path", lambda path: str(tmp_path / path))
    with pytest.raises(FileNotFoundError, match="checkpoints/calibration/tiny.npz does not exist.*meg-jax calibrate"):
        menv.make("tiny")


def test_make_accepts_artifact_path(tmp_path, artifact):
    path = tmp_path / "cal.npz"
    artifact.save(path)
    env = menv.make("tiny", num_envs=2, episode_length=4, artifact=str(path))
    assert env.observation_size == 13 and env.action_size == 2


def test_limits_bind_yet_are_feasible(env):
    report = env.limit_report
    lim = np.asarray(report.limits)
    # Derived limits lie strictly between cheapest and dearest fixed action ...
    assert np.all(lim > np.asarray(report.cheapest)) and np.all(lim < np.asarray(report.dearest))
    # ... "always max quality" violates them, and some fixed action meets both.
    assert np.any(np.asarray(report.max_quality_costs) > lim)
    assert report.feasible_fixed_actions >= 1
    np.testing.assert_allclose(np.asarray(env.params.limits), lim, rtol=1e-6)


def test_infeasible_and_unknown_overrides_raise(artifact):
    with pytest.raises(ValueError, match="infeasible latency"):
        menv.make("tiny", num_envs=2, episode_length=4, artifact=artifact, limits=(1e-3, 10.0))
    with pytest.raises(ValueError, match="infeasible energy"):
        menv.make("tiny", num_envs=2, episode_length=4, artifact=artifact, limits=(10.0, 1e-4))
    with pytest.raises(ValueError, match="unknown environment config field"):
        menv.make("tiny", num_envs=2, episode_length=4, artifact=artifact, speeed=3.0)
    with pytest.raises(ValueError, match="unknown environment preset"):
        menv.make("huge", artifact=artifact)
    with pytest.raises(ValueError, match="task_class_probs has 2 entries"):
        menv.make("tiny", artifact=artifact, task_class_probs=(0.5, 0.5))


def test_discrete_variant(artifact):
    base, _ = menv.make_unbatched("tiny", episode_length=4, artifact=artifact, discrete=True)
    assert base.action_size == 1 and base.num_actions == 32
    state = base.reset(jax.random.PRNGKey(0))
    # Index 31 = (K option 3, r = 0.7) equals the continuous action [1, 1].
    disc = base.step(state, jnp.asarray(31))
    cont = base.with_params(base.params)
    cont.discrete = False
    ref = cont.step(state, jnp.asarray([1.0, 1.0]))
    # Two routes to the same (K, r): an index lookup vs the affine map of [1, 1] onto the
    # grid, then the same table interpolation; the maps differ by a few float32 roundings of r
    # (<= ~2 ulp, 2.4e-7 relative), which the interpolation's slope can scale up by ~10.
    assert float(disc.reward) == pytest.approx(float(ref.reward), rel=1e-5)
    np.testing.assert_allclose(np.asarray(disc.info["costs"]), np.asarray(ref.info["costs"]), rtol=1e-5)
    assert float(disc.metrics["steps"]) == 8.0 and float(disc.metrics["merge_ratio"]) == pytest.approx(0.7)


# ------------------------------------------------------------------------ sharding
def test_runs_sharded_over_eight_fake_devices(tmp_path):
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import meg_jax.env as menv
        from meg_jax.meg.artifact import synthetic_artifact
        assert jax.device_count() == 8, jax.devices()
        env = menv.make("tiny", num_envs=16, episode_length=3, artifact=synthetic_artifact(), limit_samples=256)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        batch = NamedSharding(mesh, P("data"))
        keys = jax.device_put(jax.random.split(jax.random.PRNGKey(0), 16), batch)

        def rollout(keys, actions):
            state = env.reset(keys)
            def body(s, a):
                s = env.step(s, a)
                return s, (s.reward, s.info["costs"], s.done)
            return jax.lax.scan(body, state, actions)

        actions = jax.device_put(jax.random.uniform(jax.random.PRNGKey(1), (7, 16, 2), minval=-1, maxval=1),
                                 NamedSharding(mesh, P(None, "data")))
        state, (rew, costs, done) = jax.jit(rollout)(keys, actions)
        assert state.obs.sharding.spec == P("data"), state.obs.sharding
        assert len(state.obs.sharding.device_set) == 8
        assert float(done[2].min()) == 1.0 and float(done[5].min()) == 1.0
        # Same numbers as the unsharded run.
        ref_state, (ref_rew, ref_costs, _) = jax.jit(rollout)(np.asarray(keys), np.asarray(actions))
        np.testing.assert_allclose(np.asarray(rew), np.asarray(ref_rew), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(costs), np.asarray(ref_costs), rtol=1e-5)
        print("OK", state.obs.sharding.spec)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK" in out.stdout
