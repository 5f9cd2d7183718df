"""Tests for meg_jax.backbone.schedules: parity with diffusers' DDIM/Euler schedulers."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from meg_jax.backbone import schedules as S

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")


def _ddim(spacing="trailing", prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False):
    return DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )


def _euler(spacing="trailing", prediction_type="epsilon", steps_offset=1):
    return EulerDiscreteScheduler(
        **SD_BETAS, steps_offset=steps_offset, prediction_type=prediction_type, timestep_spacing=spacing
    )


@pytest.fixture(scope="module")
def schedule():
    return S.make_schedule()


# ---------------------------------------------------------------- tables and timesteps


def test_reference_table_values(schedule):
    ac = np.asarray(schedule.alphas_cumprod)
    # ᾱ[0] = 1 − β_0 = 1 − 0.00085 = 0.99915 (β_0 = (sqrt(0.00085))² exactly).
    np.testing.assert_allclose(ac[0], 0.99915, atol=1e-6)
    # Values from reference/schedules.md (5 significant digits).
    np.testing.assert_allclose(ac[499], 0.27767, atol=1e-5)
    np.testing.assert_allclose(ac[999], 0.00466, atol=1e-5)
    # σ_max = sqrt((1 − ᾱ[999]) / ᾱ[999]) = sqrt(0.99534 / 0.00466) ≈ 14.6146.
    np.testing.assert_allclose(np.sqrt((1 - ac[999]) / ac[999]), 14.6146, atol=2e-3)
    # Trailing N = 4: round(arange(1000, 0, −250)) − 1 = [1000, 750, 500, 250] − 1.
    np.testing.assert_array_equal(S.timesteps(4, "trailing"), [999, 749, 499, 249])
    # Leading N = 4, offset 1: arange(4)·(1000 // 4) reversed + 1 = [750, 500, 250, 0] + 1.
    np.testing.assert_array_equal(S.timesteps(4, "leading", steps_offset=1), [751, 501, 251, 1])
    # Linspace N = 4: round(linspace(0, 999, 4)) = round([0, 333, 666, 999]) reversed.
    np.testing.assert_array_equal(S.timesteps(4, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(S.timesteps(1, "trailing"), [999])
    np.testing.assert_array_equal(S.timesteps(8, "trailing"), [999, 874, 749, 624, 499, 374, 249, 124])


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_tables_match_diffusers(beta_schedule):
    ours = S.make_schedule(beta_schedule, 0.00085, 0.012)
    ref = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    for name in ("betas", "alphas", "alphas_cumprod"):
        np.testing.assert_allclose(
            np.asarray(getattr(ours, name)), getattr(ref, name).numpy(), rtol=2e-6, atol=1e-7, err_msg=name
        )


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", range(1, 51))
def test_ddim_timesteps_match_diffusers(num_steps, spacing, steps_offset):
    ref = _ddim(spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = S.timesteps(num_steps, spacing, steps_offset=steps_offset, scheduler="ddim")
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", range(1, 51))
def test_euler_timesteps_match_diffusers(num_steps, spacing, steps_offset):
    ref = _euler(spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = S.timesteps(num_steps, spacing, steps_offset=steps_offset, scheduler="euler")
    assert ours.dtype == np.float32
    # both round a float64 linspace/arange to float32; two implementations of that may land
    # one float32 ulp apart (ulp(999) = 6.1e-5), which is harmless as a timestep
    np.testing.assert_array_max_ulp(ours, ref.timesteps.numpy(), maxulp=1)


def test_euler_linspace_is_fractional():
    # linspace(0, 999, 3) = [0, 499.5, 999]: Euler keeps 499.5, DDIM rounds half to even (500).
    np.testing.assert_array_equal(S.timesteps(3, "linspace", scheduler="euler"), [999.0, 499.5, 0.0])
    np.testing.assert_array_equal(S.timesteps(3, "linspace", scheduler="ddim"), [999, 500, 0])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 3, 4, 7, 50])
def test_euler_sigmas_match_diffusers(schedule, spacing, num_steps):
    ref = _euler(spacing)
    ref.set_timesteps(num_steps)
    ts = S.timesteps(num_steps, spacing, scheduler="euler")
    sig = S.euler_sigmas(schedule, ts)
    np.testing.assert_allclose(np.asarray(sig), ref.sigmas.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(S.euler_init_noise_sigma(sig, spacing)), float(ref.init_noise_sigma), rtol=1e-5
    )


def test_bad_input_raises():
    with pytest.raises(ValueError, match="spacing"):
        S.timesteps(4, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        S.timesteps(0)
    with pytest.raises(ValueError, match="num_steps"):
        S.timesteps(1001)
    with pytest.raises(ValueError, match="beta_schedule"):
        S.make_schedule("cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        S.pred_x0_and_eps(
            S.make_schedule(), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([3]), "x0"
        )


# ---------------------------------------------------------------- forward process


def test_add_noise_and_velocity_match_diffusers(schedule):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    t = np.array([0, 499, 999])
    ref = _ddim()
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(
        np.asarray(S.add_noise(schedule, x0, noise, t)),
        ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(),
        # the two tables agree to rtol 2e-6 (test_tables_match_diffusers), so sqrt(abar) and
        # sqrt(1 - abar) to 1e-6 and their weighted sum to ~2e-6 of |x| (|x| up to ~4)
        rtol=2e-6, atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(S.get_velocity(schedule, x0, noise, t)),
        ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(),
        rtol=2e-6, atol=1e-6,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pred_x0_and_eps_inverts_forward_process(schedule, prediction_type):
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    t = jnp.array([10, 500, 990])
    x_t = S.add_noise(schedule, x0, eps, t)
    target = {"epsilon": eps, "v_prediction": S.get_velocity(schedule, x0, eps, t), "sample": x0}[
        prediction_type
    ]
    x0_hat, eps_hat = S.pred_x0_and_eps(schedule, target, x_t, t, prediction_type)
    # ε → x₀ divides by sqrt(ᾱ_990) ≈ 0.07 and x₀ → ε by sqrt(1 − ᾱ_10) ≈ 0.12, so float32
    # rounding (~1e-7 on x_t) grows to ~1e-6 here.
    np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(eps_hat), eps, atol=1e-5)


# ---------------------------------------------------------------- single steps

STEP_CASES = [(1, 0), (2, 1), (4, 0), (4, 2), (4, 3), (7, 6), (50, 25), (50, 49)]


@pytest.fixture(scope="module")
def step_data():
    rng = np.random.default_rng(2)
    sample = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    return sample, out


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps,index", STEP_CASES)
def test_ddim_step_matches_diffusers(schedule, step_data, num_steps, index, prediction_type, spacing):
    sample, out = step_data
    ts = S.timesteps(num_steps, spacing)
    prev = S.ddim_prev_timesteps(ts)
    x_prev, x0 = S.ddim_step(schedule, out, ts[index], prev[index], sample, prediction_type)

    # (a) The step arithmetic, with diffusers running on our ᾱ table: within 1e-5 absolute.
    ref = _ddim(spacing, prediction_type)
    ref.alphas_cumprod = torch.from_numpy(np.asarray(schedule.alphas_cumprod))
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
    ref.set_timesteps(num_steps)
    t = int(ref.timesteps[index])
    assert ts[index] == t
    expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(sample))
    np.testing.assert_allclose(np.asarray(x_prev), expected.prev_sample.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0), expected.pred_original_sample.numpy(), atol=1e-5)

    # (b) Against diffusers' own float32 table, which differs from ours (float64-built) by
    # up to 7e-7 relative at ᾱ_999; x̂₀ = (x − sqrt(1 − ᾱ)ε) / sqrt(ᾱ) amplifies by
    # 1 / sqrt(ᾱ_999) ≈ 14.6 to |x̂₀| ≈ 50, so the bound is relative to the value there.
    native = _ddim(spacing, prediction_type)
    native.set_timesteps(num_steps)
    expected = native.step(torch.from_numpy(out), t, torch.from_numpy(sample))
    np.testing.assert_allclose(np.asarray(x_prev), expected.prev_sample.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0), expected.pred_original_sample.numpy(), rtol=1e-6, atol=1e-5)


def test_ddim_last_step_uses_final_alpha(schedule, step_data):
    sample, out = step_data
    # Trailing N = 4, last t = 249, prev_t = 249 − 250 = −1 → ᾱ_prev = ᾱ_0 (set_alpha_to_one=False)
    # or 1 (set_alpha_to_one=True, then x_prev = x̂₀ exactly).
    x_prev, _ = S.ddim_step(schedule, out, 249, -1, sample)
    x_prev_at_0, _ = S.ddim_step(schedule, out, 249, 0, sample)
    np.testing.assert_array_equal(np.asarray(x_prev), np.asarray(x_prev_at_0))
    x_one, x0 = S.ddim_step(schedule, out, 249, -1, sample, set_alpha_to_one=True)
    np.testing.assert_allclose(np.asarray(x_one), np.asarray(x0), atol=1e-6)
    ref = _ddim("trailing", set_alpha_to_one=True)
    ref.set_timesteps(4)
    expected = ref.step(torch.from_numpy(out), 249, torch.from_numpy(sample)).prev_sample.numpy()
    np.testing.assert_allclose(np.asarray(x_one), expected, atol=1e-5)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps,index", STEP_CASES)
def test_euler_step_matches_diffusers(schedule, step_data, num_steps, index, prediction_type, spacing):
    sample, out = step_data
    ref = _euler(spacing, prediction_type)
    ref.set_timesteps(num_steps)
    t = ref.timesteps[index]
    sample_t = torch.from_numpy(sample)
    ref_in = ref.scale_model_input(sample_t, t)
    expected = ref.step(torch.from_numpy(out), t, sample_t)
    sig = S.euler_sigmas(schedule, S.timesteps(num_steps, spacing, scheduler="euler"))
    np.testing.assert_allclose(
        # the sigmas agree to rtol 1e-5 (test_euler_sigmas_match_diffusers), and x / sqrt(s^2 + 1)
        # carries that relative error
        np.asarray(S.euler_scale_model_input(sample, sig[index])), ref_in.numpy(), rtol=1e-5, atol=1e-6
    )
    x_next, x0 = S.euler_step(out, sig[index], sig[index + 1], sample, prediction_type)
    np.testing.assert_allclose(np.asarray(x_next), expected.prev_sample.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0), expected.pred_original_sample.numpy(), atol=1e-5)


def test_steps_accept_per_sample_timesteps(schedule, step_data):
    sample, out = step_data
    t = jnp.array([999, 499])
    prev = jnp.array([749, -1])
    x_prev, _ = S.ddim_step(schedule, out, t, prev, sample)
    for b in range(2):
        xb, _ = S.ddim_step(schedule, out[b : b + 1], t[b], prev[b], sample[b : b + 1])
        np.testing.assert_allclose(np.asarray(x_prev[b : b + 1]), np.asarray(xb), atol=1e-6)


# ---------------------------------------------------------------- full sampling loops

A, B = 0.5, 1e-3


def _linear_model(x, t):
    """A fixed linear 'network': a·x + b·t (t broadcast over the sample dims)."""
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return A * x + B * t


def _diffusers_loop(scheduler, x_T, num_steps):
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = A * x_in + B * t.to(torch.float32)
        x = scheduler.step(out, t, x).prev_sample
    return x.numpy()


@functools.partial(
    jax.jit, static_argnames=("num_steps", "spacing", "sampler", "prediction_type", "guided_scale")
)
def _jit_sample(schedule, x_T, num_steps, spacing, sampler, prediction_type, guided_scale=None):
    return S.sample(
        _linear_model,
        schedule,
        x_T,
        num_steps=num_steps,
        spacing=spacing,
        sampler=sampler,
        prediction_type=prediction_type,
        guidance_scale=guided_scale,
    )


@pytest.fixture(scope="module")
def x_T():
    return np.random.default_rng(3).standard_normal((2, 4, 4, 3)).astype(np.float32)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sample_matches_diffusers_loop(schedule, x_T, sampler, prediction_type, spacing):
    make = _ddim if sampler == "ddim" else _euler
    expected = _diffusers_loop(make(spacing, prediction_type), x_T, 4)
    ours = _jit_sample(schedule, x_T, 4, spacing, sampler, prediction_type)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


def test_sample_euler_linspace_fractional_timesteps(schedule, x_T):
    # N = 3 linspace passes t = 499.5 to the model under Euler, as diffusers does.
    expected = _diffusers_loop(_euler("linspace"), x_T, 3)
    ours = _jit_sample(schedule, x_T, 3, "linspace", "euler", "epsilon")
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


def test_sample_compiles_once_per_num_steps(schedule, x_T):
    def run(schedule, x, num_steps):
        return S.sample(_linear_model, schedule, x, num_steps=num_steps)

    fn = jax.jit(chex.assert_max_traces(run, n=2), static_argnames="num_steps")
    for n in (2, 4, 2, 4):
        fn(schedule, x_T, num_steps=n)
    # New array values (same shapes) must not retrace either.
    fn(schedule, x_T + 1.0, num_steps=4)
    with pytest.raises(AssertionError):
        fn(schedule, x_T, num_steps=3)  # a third step count is a third trace


# ---------------------------------------------------------------- guidance


def _apply_with_context(x, t, c):
    return x * c[:, None, None, None] + 1e-3 * t.astype(jnp.float32)[:, None, None, None]


def test_guidance_scale_one_is_conditional(x_T):
    t = jnp.array([999, 499], jnp.int32)
    cond, uncond = jnp.array([2.0, -1.0]), jnp.array([0.3, 0.7])
    cond_out = _apply_with_context(x_T, t, cond)
    uncond_out = _apply_with_context(x_T, t, uncond)
    def guided_out(scale):
        return np.asarray(S.cfg_model_fn(_apply_with_context, cond, uncond, scale)(x_T, t))

    # uncond + s (cond - uncond) rounds twice (0.5 ulp each) at |x| up to ~10, where one ulp
    # is 9.5e-7: relative 1e-6 (8 ulps) on top of the absolute floor
    np.testing.assert_allclose(guided_out(1.0), np.asarray(cond_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guided_out(0.0), np.asarray(uncond_out), rtol=1e-6, atol=1e-6)
    # s = 7.5: uncond + 7.5·(cond − uncond).
    np.testing.assert_allclose(
        guided_out(7.5),
        np.asarray(uncond_out + 7.5 * (cond_out - uncond_out)),
        rtol=1e-6, atol=1e-5,
    )


def test_sample_with_guidance_scale_one_equals_conditional_sampling(schedule, x_T):
    cond, uncond = jnp.array([0.5, 0.2]), jnp.array([-0.4, 0.9])
    both = jnp.concatenate([uncond, cond])
    doubled = lambda x, t: _apply_with_context(x, t, both)  # noqa: E731
    conditional = lambda x, t: _apply_with_context(x, t, cond)  # noqa: E731
    for sampler in ("ddim", "euler"):
        guided = S.sample(doubled, schedule, x_T, num_steps=2, sampler=sampler, guidance_scale=1.0)
        plain = S.sample(conditional, schedule, x_T, num_steps=2, sampler=sampler)
        np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-5)


def test_sample_rejects_wrong_output_shape(schedule, x_T):
    with pytest.raises(ValueError, match="model_fn returned shape"):
        S.sample(lambda x, t: x[..., :1], schedule, x_T, num_steps=1)
