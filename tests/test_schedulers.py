"""Tests for meg_jax.backbone.schedulers: parity with diffusers' schedulers built from the same config.

For each config, diffusers' scheduler (``Cls.from_config``, as a pipeline loads it) runs its
own step loop in torch float32 on a deterministic analytic fake network; ours runs ``denoise``
on the same initial latents and the same step noise (drawn from a torch generator seeded as
diffusers' is, in diffusers' order). Timesteps must be equal; sigmas and final latents agree to
float32 tolerances derived below.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from meg_jax.backbone import schedulers as SC
from meg_jax.backbone.schedulers import SCHEDULER_CLASSES, denoise, load_scheduler

diffusers_logging.set_verbosity_error()

SHAPE = (1, 4, 4, 4)  # tiny latents; the schedulers are elementwise so the layout is irrelevant
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SD_DDIM = dict(clip_sample=False, set_alpha_to_one=False)  # the SD 1.x/2.x/XL DDIM config
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
STEPS = (1, 2, 4, 25)
STOCHASTIC = ("euler_ancestral", "lcm")

# Final latents: |ours − diffusers| ≤ LATENT_RTOL · scale, scale = max(1, max|x_T|, max|ref|).
# Two float32 sources: (1) our ᾱ table is a float64 cumulative product rounded to float32,
# diffusers' a float32 cumulative product of 1000 factors, which drifts up to ~4e-5 relative
# (3.8e-5 measured on the rescaled SD table); with ε̂ = (x − sqrt(ᾱ)x̂₀)/sqrt(1 − ᾱ) near t = 1
# the drift is amplified to ~1e-5 of the output (measured: DDIM, N = 1, "leading",
# prediction "sample"). (2) rounding, ~1e-7 per op against the largest intermediate: under
# zero-SNR Euler the state starts at σ_max ≈ 4096 and is cancelled down to O(1), so errors scale
# with |x_T|, not with the O(1) result. Measured worst over the whole grid: 1.04e-5·scale.
LATENT_RTOL = 5e-5

PHASE = np.linspace(0.0, 3.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)


def _fake_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic 'network': linear in x, smooth in t, varying over positions."""
    return 0.1 * x + 0.05 * torch.sin(t.to(torch.float32) / 100.0 + torch.from_numpy(PHASE))


def _fake_jax(x: jax.Array, t: jax.Array) -> jax.Array:
    return 0.1 * x + 0.05 * jnp.sin(t.astype(jnp.float32)[:, None, None, None] / 100.0 + PHASE)


_TRACES = {"n": 0}


def _counting_fake(x: jax.Array, t: jax.Array) -> jax.Array:
    _TRACES["n"] += 1  # runs once per trace, not per call
    return _fake_jax(x, t)


@jax.jit
def _run(plan: SC.SamplingPlan, x_T: jax.Array, step_noise: jax.Array | None) -> jax.Array:
    # Only the plan's kind (and thresholding) is static: one compile per (kind, N).
    return denoise(plan, _counting_fake, x_T, step_noise=step_noise)


def _config(cls: str, spacing: str, prediction: str, rescale: bool, **extra) -> dict:
    cfg = dict(_class_name=cls, **SD_BETAS, timestep_spacing=spacing, prediction_type=prediction)
    cfg["rescale_betas_zero_snr"] = rescale
    if cls == "DDIMScheduler":
        cfg.update(SD_DDIM)
    cfg.update(extra)
    return cfg


def _diffusers(cfg: dict):
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _reference_loop(
    sched, n: int, latents: torch.Tensor, noise_seed: int, begin_at_zero: bool = False
) -> np.ndarray:
    """diffusers' pipeline loop: scale by init_noise_sigma, scale_model_input, model, step."""
    sched.set_timesteps(n)  # also resets the step counter
    if begin_at_zero:
        sched.set_begin_index(0)  # as StableDiffusionXLPipeline does
    x = latents * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(noise_seed)
    kind = SCHEDULER_CLASSES[type(sched).__name__]
    for t in sched.timesteps:
        out = _fake_torch(sched.scale_model_input(x, t), t)
        kwargs = {"generator": gen} if kind in STOCHASTIC else {}
        x = sched.step(out, t, x, return_dict=False, **kwargs)[0]
    return x.numpy()


def _step_noise(kind: str, n: int, noise_seed: int) -> jax.Array | None:
    """The noises diffusers' steps draw from the generator, in order (randn_tensor on CPU is
    torch.randn with the generator): Euler-ancestral every step, LCM all steps but the last."""
    if kind not in STOCHASTIC:
        return None
    gen = torch.Generator().manual_seed(noise_seed)
    draws = n if kind == "euler_ancestral" else n - 1
    rows = [torch.randn(SHAPE, generator=gen).numpy() for _ in range(draws)]
    rows += [np.zeros(SHAPE, np.float32)] * (n - draws)
    return jnp.asarray(np.stack(rows))


def _assert_sigmas_close(ours: np.ndarray, ref: np.ndarray, ctx: str) -> None:
    """σ tolerance per element. ᾱ's relative drift (≤ ~4e-5, see LATENT_RTOL) reaches σ =
    sqrt((1 − ᾱ)/ᾱ) halved for ᾱ → 0; for ᾱ → 1 an absolute ᾱ difference of a few ulp(1)
    (≤ 4e-7) becomes ½·4e-7/(1 − ᾱ) relative, with 1 − ᾱ = σ²/(1 + σ²)."""
    assert ours.shape == ref.shape, ctx
    zero = ref == 0
    np.testing.assert_array_equal(ours[zero], 0.0, err_msg=ctx)
    r = ref[~zero].astype(np.float64)
    tol = 5e-5 + 2e-7 * (1.0 + r**2) / r**2
    rel = np.abs(ours[~zero] - r) / r
    assert np.all(rel <= tol), f"{ctx}: sigma rel err {rel.max():.3g} (tol {tol[np.argmax(rel / tol)]:.3g})"


def _compare(cfg: dict, n: int, *, timestep_atol: float = 0.0, seed: int = 0) -> None:
    ref_sched = _diffusers(cfg)
    ours = load_scheduler(cfg)
    ref_sched.set_timesteps(n)
    ctx = f"{cfg} N={n}"
    ref_ts = ref_sched.timesteps.numpy()
    # A repeated first timestep (Karras, many steps) makes a scheduler without a begin index
    # start at its second copy and run off its sigmas (IndexError); pipelines that call
    # set_begin_index(0) (SDXL) run it from step 0, as denoise always does.
    begin_at_zero = bool(np.sum(ref_ts == ref_ts[0]) > 1)
    plan = ours.plan(n)
    if timestep_atol == 0.0:
        np.testing.assert_array_equal(np.asarray(plan.timesteps), ref_ts, err_msg=ctx)
    else:  # timesteps computed from σ (see TIMESTEP_ATOL)
        np.testing.assert_allclose(np.asarray(plan.timesteps), ref_ts, rtol=0, atol=timestep_atol, err_msg=ctx)
    assert plan.timesteps.dtype == (jnp.float32 if ref_ts.dtype == np.float32 else jnp.int32), ctx
    if ours.kind in ("euler", "euler_ancestral", "dpmsolver++"):
        _assert_sigmas_close(np.asarray(plan.sigmas), ref_sched.sigmas.numpy(), ctx)
    np.testing.assert_allclose(
        float(plan.init_noise_sigma), float(ref_sched.init_noise_sigma), rtol=5e-5, err_msg=ctx
    )

    latents = _latents(seed)
    ref = _reference_loop(ref_sched, n, latents, noise_seed=seed + 1, begin_at_zero=begin_at_zero)
    x_T = latents.numpy() * np.float32(plan.init_noise_sigma)
    got = np.asarray(_run(plan, x_T, _step_noise(ours.kind, n, seed + 1)))
    assert np.all(np.isfinite(ref)), ctx
    scale = max(1.0, float(np.abs(x_T).max()), float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= LATENT_RTOL * scale, f"{ctx}: max abs err {err:.3g} > {LATENT_RTOL} * {scale:.3g}"


def _undefined_epsilon(cls: str, prediction: str, rescale: bool, n: int, spacing: str) -> bool:
    """DDIM/LCM + zero terminal SNR + ε-prediction visiting t = T − 1 (ᾱ = 0): NaN in diffusers."""
    if not (rescale and prediction == "epsilon" and cls in ("DDIMScheduler", "LCMScheduler")):
        return False
    sched = _diffusers(_config(cls, spacing, prediction, rescale))
    sched.set_timesteps(n)
    return bool((sched.timesteps == 999).any())


GRID = [
    (cls, spacing, prediction, rescale, n)
    for cls, spacing, prediction, rescale, n in itertools.product(
        SCHEDULER_CLASSES, SPACINGS, PREDICTIONS, (False, True), STEPS
    )
    # diffusers' EulerAncestral step raises NotImplementedError for "sample" (refused here too).
    if not (cls == "EulerAncestralDiscreteScheduler" and prediction == "sample")
]


@pytest.mark.parametrize("cls,spacing,prediction,rescale,n", GRID)
def test_matches_diffusers_grid(cls, spacing, prediction, rescale, n):
    cfg = _config(cls, spacing, prediction, rescale)
    if _undefined_epsilon(cls, prediction, rescale, n, spacing):
        ref = _reference_loop(_diffusers(cfg), n, _latents(), noise_seed=1)
        assert not np.all(np.isfinite(ref))  # diffusers: NaN/inf latents
        with pytest.raises(ValueError, match="epsilon"):
            load_scheduler(cfg).plan(n)
        return
    _compare(cfg, n)


# Options beyond the grid, each on the SD betas unless it says otherwise.
EXTRA = {
    "ddim_clip": ("DDIMScheduler", dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")),
    "ddim_class_defaults": ("DDIMScheduler", dict()),  # linear betas, clip 1.0, set_alpha_to_one, offset 0
    "ddim_cosine": ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True)),
    "ddim_linear_betas": ("DDIMScheduler", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    "ddim_trained_betas": (
        "DDIMScheduler",
        dict(trained_betas=np.linspace(0.0002, 0.015, 1000).tolist(), timestep_spacing="linspace"),
    ),
    "euler_karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading")),
    "euler_karras_bounds": (
        "EulerDiscreteScheduler",
        dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0, timestep_spacing="trailing"),
    ),
    "euler_karras_zero_snr": (
        "EulerDiscreteScheduler",
        dict(use_karras_sigmas=True, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    ),
    "euler_final_sigma_min": ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min")),
    "euler_continuous_v": (
        "EulerDiscreteScheduler",
        dict(timestep_type="continuous", prediction_type="v_prediction", timestep_spacing="trailing"),
    ),
    "euler_continuous_eps": ("EulerDiscreteScheduler", dict(timestep_type="continuous")),
    "euler_a_linear_betas": (
        "EulerAncestralDiscreteScheduler",
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing"),
    ),
    "dpm_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    # (Karras on the cosine schedule is left out: diffusers truncates a fractional first
    # timestep of 998.99999 to 998 and then repeats it, and its own step loop raises IndexError.)
    "dpm_karras_zero_snr": (
        "DPMSolverMultistepScheduler",
        dict(use_karras_sigmas=True, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    ),
    "dpm_karras_bounds": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=8.0)),
    "dpm_order1": ("DPMSolverMultistepScheduler", dict(solver_order=1)),
    "dpm_order3": ("DPMSolverMultistepScheduler", dict(solver_order=3, timestep_spacing="trailing")),
    "dpm_order3_sigma_min": ("DPMSolverMultistepScheduler", dict(solver_order=3, final_sigmas_type="sigma_min")),
    "dpm_heun": ("DPMSolverMultistepScheduler", dict(solver_type="heun", prediction_type="v_prediction")),
    "dpm_sigma_min_final": ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min")),
    "dpm_no_lower_order_final": (
        "DPMSolverMultistepScheduler",
        dict(final_sigmas_type="sigma_min", lower_order_final=False),
    ),
    "dpm_euler_at_final": (
        "DPMSolverMultistepScheduler",
        dict(final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=True),
    ),
    "dpm_lambda_clipped": (
        "DPMSolverMultistepScheduler",
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="leading"),
    ),
    "dpm_deis_aliases": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min"),
    ),
    "lcm_class_defaults": ("LCMScheduler", dict()),
    "lcm_original_steps_scaling": (
        "LCMScheduler",
        dict(original_inference_steps=40, timestep_scaling=5.0, set_alpha_to_one=False),
    ),
    # At the default timestep_scaling 10, c_skip ≤ 0.25/190² ≈ 7e-6 (invisible in the output);
    # a small scaling makes both boundary scalings matter (t = 9: c_skip = 0.25/(0.45² + 0.25) = 0.55).
    "lcm_small_timestep_scaling": ("LCMScheduler", dict(original_inference_steps=100, timestep_scaling=0.05)),
    "lcm_clip": ("LCMScheduler", dict(clip_sample=True, clip_sample_range=0.8, prediction_type="sample")),
}
# Dynamic thresholding is a static plan field (one more compile each): one step count, and
# not LCM, whose x̂₀ post-processing is DDIM's code at the same place.
THRESHOLDED = {
    "ddim_threshold": ("DDIMScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)),
    "dpm_threshold": (
        "DPMSolverMultistepScheduler",
        dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0, prediction_type="sample"),
    ),
}


def _extra_config(cls: str, extra: dict, class_defaults: bool = False) -> dict:
    """SD's betas (and SD's DDIM settings) under ``extra``; or the class's own defaults."""
    if class_defaults:
        return {"_class_name": cls, **extra}
    return {"_class_name": cls, **SD_BETAS, **(SD_DDIM if cls == "DDIMScheduler" else {}), **extra}


# The configs whose timesteps are fractions computed from σ rather than spaced on integers,
# and how far they may be from diffusers' (all other timesteps must be equal):
# * Euler with Karras sigmas: t interpolated in log σ between table entries, which differ from
#   diffusers' by ≲ 5e-5 relative (see _assert_sigmas_close); adjacent entries differ by
#   Δlog σ ≥ 1e-3 (SD betas), so t moves ≲ 5e-5 / 1e-3 = 0.05 at worst, ≲ 1e-3 where
#   σ ≫ 0.03 (measured ≤ 2e-4): allow 5e-2.
# * Euler "continuous" v-prediction: t = ¼ log σ, |Δt| ≤ ¼ · 5e-5 relative σ difference.
TIMESTEP_ATOL = {
    "euler_karras": 5e-2,
    "euler_karras_bounds": 5e-2,
    "euler_karras_zero_snr": 5e-2,
    "euler_continuous_v": 2e-5,
}


@pytest.mark.parametrize("n", (1, 4, 25))
@pytest.mark.parametrize("name", sorted(EXTRA))
def test_matches_diffusers_options(name, n):
    cls, extra = EXTRA[name]
    cfg = _extra_config(cls, extra, class_defaults=name.endswith("class_defaults"))
    _compare(cfg, n, timestep_atol=TIMESTEP_ATOL.get(name, 0.0))


@pytest.mark.parametrize("name", sorted(THRESHOLDED))
def test_matches_diffusers_thresholding(name):
    cls, extra = THRESHOLDED[name]
    _compare(_extra_config(cls, {**extra, "timestep_spacing": "trailing"}), 4)


def test_grid_exercises_options():
    # The option tests must reach the code they name: clipping and thresholding change x̂₀ in
    # these configs (|x̂₀| exceeds the range at t = 999), and DPM's orders are mixed.
    ours = load_scheduler(_extra_config(*EXTRA["dpm_order3"])).plan(25)
    assert set(np.asarray(ours.order).tolist()) == {1, 2, 3}
    # Karras + zero SNR at N = 25 repeats the first timestep ([999, 999, 998, ...]): the
    # begin-at-zero path of _compare is exercised.
    ts = np.asarray(load_scheduler(_extra_config(*EXTRA["dpm_karras_zero_snr"])).plan(25).timesteps)
    assert ts[0] == ts[1] == 999
    plan = load_scheduler(_extra_config(*EXTRA["ddim_clip"])).plan(4)
    assert float(plan.clip_range) == 0.5
    # x̂₀ at t = 999 from ε-prediction: (x − sqrt(1 − ᾱ)·ε̂)/sqrt(ᾱ), ᾱ_999 = 0.00466 → ×14.6.
    assert float(1.0 / np.sqrt(plan.alpha_prod[0])) > 10.0


# ----------------------------------------------------------------------------- config handling


@pytest.mark.parametrize("cls", sorted(SCHEDULER_CLASSES))
def test_every_constructor_argument_known_with_diffusers_default(cls):
    params = {
        k: v.default
        for k, v in inspect.signature(getattr(diffusers, cls).__init__).parameters.items()
        if k not in ("self", "kwargs")
    }
    spec = SC._SPECS[SCHEDULER_CLASSES[cls]]
    extra = set(spec) - set(params)
    assert extra <= {"sigma_min", "sigma_max"}, extra  # DPM reads these through hasattr(config)
    assert set(params) <= set(spec), set(params) - set(spec)
    for k, default in params.items():
        ours = spec[k][0]
        assert ours == default or (isinstance(ours, float) and math.isinf(ours) and ours == default), (k, ours, default)


@pytest.mark.parametrize(
    "cls,key,value",
    [
        ("EulerDiscreteScheduler", "use_exponential_sigmas", True),
        ("EulerDiscreteScheduler", "use_beta_sigmas", True),
        ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
        ("EulerAncestralDiscreteScheduler", "prediction_type", "sample"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"),
        ("DPMSolverMultistepScheduler", "use_lu_lambdas", True),
        ("DPMSolverMultistepScheduler", "use_flow_sigmas", True),
        ("DPMSolverMultistepScheduler", "variance_type", "learned_range"),
        ("DPMSolverMultistepScheduler", "prediction_type", "flow_prediction"),
        ("DPMSolverMultistepScheduler", "solver_order", 4),
        ("DDIMScheduler", "timestep_spacing", "karras"),
        ("DDIMScheduler", "beta_schedule", "sigmoid"),
        ("DDIMScheduler", "clip_sample", "yes"),
        ("LCMScheduler", "original_inference_steps", 0),
    ],
)
def test_refuses_unsupported_values(cls, key, value):
    with pytest.raises(ValueError, match=re.escape(f"'{key}' = {value!r}")):
        load_scheduler({"_class_name": cls, key: value})


def test_refuses_unknown_key_and_class():
    with pytest.raises(ValueError, match="unknown DDIMScheduler config key 'timestep_spacingg'"):
        load_scheduler({"_class_name": "DDIMScheduler", "timestep_spacingg": "trailing"})
    with pytest.raises(ValueError, match="PNDMScheduler"):
        load_scheduler({"_class_name": "PNDMScheduler"})
    with pytest.raises(ValueError, match="'deis' needs final_sigmas_type='sigma_min'"):
        load_scheduler({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis"})
    with pytest.raises(ValueError, match="trained_betas"):
        load_scheduler({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]})


def test_ignores_harmless_keys():
    base = _config("EulerDiscreteScheduler", "trailing", "epsilon", False)
    noisy = {
        **base,
        "_diffusers_version": "0.42.1",
        "skip_prk_steps": True,  # PNDM's, left in SD 1.x configs
        "clip_sample": False,  # DDIM's, ignored by Euler
        "set_alpha_to_one": False,
    }
    a, b = load_scheduler(base).plan(4), load_scheduler(noisy).plan(4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_loads_pipeline_and_scheduler_folders(tmp_path):
    cfg = _config("DPMSolverMultistepScheduler", "trailing", "v_prediction", True, use_karras_sigmas=True)
    _diffusers(cfg).save_pretrained(tmp_path / "scheduler")  # the layout pipelines write
    written = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    for where in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"):
        sched = load_scheduler(where)
        assert sched.kind == "dpmsolver++" and sched.config["use_karras_sigmas"] is True
    assert load_scheduler(written).config == load_scheduler(tmp_path).config
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "nothing")
    # a truncated config fails naming the file (not a bare JSONDecodeError)
    cut = tmp_path / "cut" / "scheduler_config.json"
    cut.parent.mkdir()
    cut.write_text(json.dumps(written)[:40])
    with pytest.raises(ValueError, match=re.escape(str(cut)) + r".*not valid JSON"):
        load_scheduler(cut.parent)


def test_plan_errors():
    with pytest.raises(ValueError, match="num_inference_steps"):
        load_scheduler({"_class_name": "DDIMScheduler"}).plan(0)
    with pytest.raises(ValueError, match="original_inference_steps"):
        load_scheduler({"_class_name": "LCMScheduler"}).plan(51)


# ----------------------------------------------------------------------------- the loop


def test_one_compile_per_kind_and_steps():
    # Configs of one kind differ only in traced plan leaves: a second config with the same N
    # must not retrace, a new N must.
    run = jax.jit(lambda plan, x: denoise(plan, _counting_fake, x))
    x = jnp.ones(SHAPE)
    start = _TRACES["n"]
    for spacing, prediction, rescale in itertools.product(SPACINGS, PREDICTIONS, (False, True)):
        run(load_scheduler(_config("EulerDiscreteScheduler", spacing, prediction, rescale)).plan(3), x)
    run(load_scheduler(_extra_config(*EXTRA["euler_karras"])).plan(3), x)
    assert _TRACES["n"] - start == 1
    run(load_scheduler({"_class_name": "EulerDiscreteScheduler"}).plan(5), x)
    assert _TRACES["n"] - start == 2


def test_model_sees_diffusers_timestep_dtype_and_latent_dtype():
    seen = []

    def spy(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return jnp.zeros_like(x)

    x = jnp.ones((2, 3, 3, 4), jnp.bfloat16)  # NHWC, batch 2, bf16 latents
    for cls, t_dtype in (
        ("DDIMScheduler", jnp.int32),
        ("DPMSolverMultistepScheduler", jnp.int32),
        ("LCMScheduler", jnp.int32),
        ("EulerDiscreteScheduler", jnp.float32),
        ("EulerAncestralDiscreteScheduler", jnp.float32),
    ):
        seen.clear()
        plan = load_scheduler({"_class_name": cls}).plan(2)
        out = jax.eval_shape(lambda x: denoise(plan, spy, x, key=jax.random.key(0)), x)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape
        assert seen == [(jnp.bfloat16, t_dtype, (2,))]  # traced once inside the scan


def test_stochastic_noise_from_key_and_errors():
    plan = load_scheduler(_config("EulerAncestralDiscreteScheduler", "trailing", "epsilon", False)).plan(4)
    x = jnp.ones(SHAPE) * plan.init_noise_sigma
    run = jax.jit(lambda key: denoise(plan, _fake_jax, x, key=key))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    with pytest.raises(ValueError, match="step_noise or key"):
        denoise(plan, _fake_jax, x)
    with pytest.raises(ValueError, match="step_noise must have shape"):
        denoise(plan, _fake_jax, x, step_noise=jnp.zeros((3, *SHAPE)))
    with pytest.raises(ValueError, match="must return the input shape"):
        jax.eval_shape(lambda x: denoise(plan, lambda x, t: x[..., :1], x, key=jax.random.key(0)), x)
