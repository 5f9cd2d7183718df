"""diffusers schedulers from a pipeline's ``scheduler/scheduler_config.json``, run as one jitted loop.

A user's Stable Diffusion folder names its sampler in ``scheduler/scheduler_config.json``
(``_class_name`` plus the class's constructor arguments). This module reads that file and
reproduces, in JAX, what diffusers 0.42 does with it in a pipeline's denoising loop:

* ``DDIMScheduler`` (η = 0, as the pipelines call it), ``"ddim"``;
* ``EulerDiscreteScheduler`` (``s_churn = 0``), ``"euler"``;
* ``EulerAncestralDiscreteScheduler``, ``"euler_ancestral"`` (stochastic every step);
* ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (solver order 1, 2
  or 3; order 2 with the defaults is "DPM++ 2M", Lu et al. 2022), ``"dpmsolver++"``;
* ``LCMScheduler`` (Luo et al. 2023), ``"lcm"`` (stochastic every step but the last).

Every constructor argument of those classes is known here. An argument whose value changes
diffusers' behaviour in a way this module does not reproduce (``use_exponential_sigmas``,
``interpolation_type="log_linear"``, ``algorithm_type="sde-dpmsolver++"`` ...) is refused with
an error naming the key and value; so is any key this module has never heard of. Keys that
diffusers itself ignores for the class (metadata such as ``_diffusers_version``, or another
scheduler's arguments left in a swapped config, e.g. ``skip_prk_steps``) are ignored; the list
is explicit (``IGNORED_KEYS``).

Usage (the caller builds ``model_fn``; it does classifier-free guidance itself)::

    sched = load_scheduler("path/to/pipeline")          # or .../scheduler, or a dict
    plan = sched.plan(25)                                # host-side, numpy-exact timesteps
    x = noise * plan.init_noise_sigma                    # diffusers' prepare_latents
    run = jax.jit(lambda plan, x, key: denoise(plan, model_fn, x, key=key))
    x0_latents = run(plan, x, key)                       # one compile per step count

The loop always starts at the plan's first timestep, as diffusers' SDXL pipelines do
(``set_begin_index(0)``). The SD 1.x/2.x pipelines do not call it, and a scheduler then starts
at the *second* copy of a repeated first timestep (possible with Karras sigmas and many steps)
and fails with an IndexError; every schedule without that repetition runs the same in both.

The plan is a pytree: only its ``kind`` and ``thresholding`` are static, so every config of
one kind with the same step count shares one compiled loop (prediction type, clipping and the
DPM order schedule are traced values).

The β/ᾱ tables, timestep spacings of DDIM/Euler, and the DDIM/Euler update arithmetic come
from ``meg_jax.backbone.schedules``; the tables are built in float64 and stored as float32, so
sigmas agree with diffusers' float32 torch tables to float32 rounding of a 1000-term
cumulative product (see ``tests/test_schedulers.py`` for the bound).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from meg_jax.backbone import schedules as S
from meg_jax.backbone.sampling_loop import SamplingPlan, denoise
from meg_jax.backbone.schedules import NoiseSchedule
from meg_jax.config import read_json_object

__all__ = [
    "SCHEDULER_CLASSES",
    "IGNORED_KEYS",
    "Scheduler",
    "SamplingPlan",
    "load_scheduler",
    "denoise",
]

# diffusers class name -> this module's kind.
SCHEDULER_CLASSES: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmsolver++",
    "LCMScheduler": "lcm",
}

_PREDICTION_INDEX = {"epsilon": 0, "v_prediction": 1, "sample": 2}
# diffusers' EulerDiscreteScheduler and friends set ᾱ_{T−1} to this instead of 0 under
# rescale_betas_zero_snr, so that σ_max = sqrt((1 − ᾱ)/ᾱ) stays finite (≈ 4096).
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

# Keys that carry no meaning for the denoising arithmetic of the loaded class: metadata written
# by save_pretrained, and the constructor arguments of diffusers 0.42's *other* scheduler
# classes (PNDM, DDPM, UniPC, DEIS, Heun, KDPM2, EDM, flow matching ...), which a config keeps
# when a user swaps ``_class_name``. diffusers' from_config ignores a key its class does not
# take (it only logs it), so ignoring them here is what diffusers does. An argument of one of
# our kinds that the loaded kind does not take (``clip_sample`` in an Euler config) is ignored
# the same way. Any other key is refused as unknown (a typo would otherwise pass silently).
IGNORED_KEYS: frozenset[str] = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
    | set(
        "alpha_cum_end alpha_cum_start base_image_seq_len base_shift block_length clip_denoised "
        "correct_steps corrector_k corrector_order corrector_selection corrector_selection_tau "
        "corrector_steps disable_corrector editing_threshold entropy_bound eps eta "
        "final_step_size_scale gamma gamma_cum_end gamma_cum_start invert_sigmas mask_token_id "
        "masking_schedule max_image_seq_len max_shift minimal_topk n_grid noise_mode "
        "num_inference_steps num_policy_substeps num_vec_classes predict_x0 predictor_order rho "
        "s s_churn s_max s_min s_noise sampling_eps scale_factors scaler schedule_mode "
        "scheduler_type shift shift_terminal sigma_data sigma_schedule skip_prk_steps snr "
        "snr_shift_scale solver_p stage_range stages stochastic_sampling t_lim_ode "
        "t_lim_ode_below t_max t_min tail_step_multiplier tail_steps tau_func threshold tsr_k "
        "tsr_sigma upscale_mode".split()
    )
)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_number(v: Any) -> bool:
    return v is None or (_is_number(v) and float(v) > 0)


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x and type(v) is type(x) for x in values)


def _any(_: Any) -> bool:
    return True


def _betas_ok(v: Any) -> bool:
    return v is None or (
        isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_number(b) and 0.0 <= b <= 1.0 for b in v)
    )


_SPACING = _one_of("leading", "trailing", "linspace")
_PREDICTION = _one_of("epsilon", "v_prediction", "sample")
_BETA_SCHEDULE = _one_of("linear", "scaled_linear", "squaredcos_cap_v2")

# Per kind: every constructor argument of the diffusers class -> (diffusers' default, accepted
# values). A value outside the accepted set is refused naming the key. Defaults are checked
# against diffusers' signatures in the tests.
_COMMON: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "num_train_timesteps": (1000, lambda v: _is_int(v) and v >= 1),
    "beta_start": (0.0001, _is_number),
    "beta_end": (0.02, _is_number),
    "beta_schedule": ("linear", _BETA_SCHEDULE),
    "trained_betas": (None, _betas_ok),
    "steps_offset": (0, lambda v: _is_int(v) and v >= 0),
    "rescale_betas_zero_snr": (False, _is_bool),
}
_THRESHOLDING: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "thresholding": (False, _is_bool),
    "dynamic_thresholding_ratio": (0.995, lambda v: _is_number(v) and 0.0 <= v <= 1.0),
    "sample_max_value": (1.0, lambda v: _is_number(v) and v > 0),
}
_SPECS: dict[str, dict[str, tuple[Any, Callable[[Any], bool]]]] = {
    "ddim": {
        **_COMMON,
        **_THRESHOLDING,
        "clip_sample": (True, _is_bool),
        "clip_sample_range": (1.0, lambda v: _is_number(v) and v > 0),
        "set_alpha_to_one": (True, _is_bool),
        "prediction_type": ("epsilon", _PREDICTION),
        "timestep_spacing": ("leading", _SPACING),
    },
    "euler": {
        **_COMMON,
        "prediction_type": ("epsilon", _PREDICTION),
        "interpolation_type": ("linear", _one_of("linear")),
        "use_karras_sigmas": (False, lambda v: v is None or _is_bool(v)),
        "use_exponential_sigmas": (False, lambda v: v in (None, False)),
        "use_beta_sigmas": (False, lambda v: v in (None, False)),
        "sigma_min": (None, _opt_number),
        "sigma_max": (None, _opt_number),
        "timestep_spacing": ("linspace", _SPACING),
        "timestep_type": ("discrete", _one_of("discrete", "continuous")),
        "final_sigmas_type": ("zero", _one_of("zero", "sigma_min")),
    },
    "euler_ancestral": {
        **_COMMON,
        # diffusers raises NotImplementedError for "sample" in EulerAncestral's step.
        "prediction_type": ("epsilon", _one_of("epsilon", "v_prediction")),
        "timestep_spacing": ("linspace", _SPACING),
    },
    "dpmsolver++": {
        **_COMMON,
        **_THRESHOLDING,
        "solver_order": (2, _one_of(1, 2, 3)),
        "prediction_type": ("epsilon", _PREDICTION),
        # "deis" is rewritten to "dpmsolver++" by diffusers' constructor.
        "algorithm_type": ("dpmsolver++", _one_of("dpmsolver++", "deis")),
        # "logrho", "bh1", "bh2" are rewritten to "midpoint" by diffusers' constructor.
        "solver_type": ("midpoint", _one_of("midpoint", "heun", "logrho", "bh1", "bh2")),
        "lower_order_final": (True, _is_bool),
        "euler_at_final": (False, _is_bool),
        "use_karras_sigmas": (False, lambda v: v is None or _is_bool(v)),
        "use_exponential_sigmas": (False, lambda v: v in (None, False)),
        "use_beta_sigmas": (False, lambda v: v in (None, False)),
        "use_lu_lambdas": (False, lambda v: v in (None, False)),
        "use_flow_sigmas": (False, lambda v: v in (None, False)),
        "flow_shift": (1.0, _any),  # only read with use_flow_sigmas (refused)
        "final_sigmas_type": ("zero", _one_of("zero", "sigma_min")),
        "lambda_min_clipped": (-math.inf, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
        "variance_type": (None, lambda v: v is None),
        "timestep_spacing": ("linspace", _SPACING),
        # only read by set_timesteps(mu=...), which the SD pipelines never pass
        "use_dynamic_shifting": (False, lambda v: v in (None, False)),
        "time_shift_type": ("exponential", _any),
        # not constructor arguments, but read through hasattr(self.config, ...) by Karras sigmas
        "sigma_min": (None, _opt_number),
        "sigma_max": (None, _opt_number),
    },
    "lcm": {
        **_COMMON,
        **_THRESHOLDING,
        "beta_start": (0.00085, _is_number),
        "beta_end": (0.012, _is_number),
        "beta_schedule": ("scaled_linear", _BETA_SCHEDULE),
        "original_inference_steps": (50, lambda v: _is_int(v) and v >= 1),
        "clip_sample": (False, _is_bool),
        "clip_sample_range": (1.0, lambda v: _is_number(v) and v > 0),
        "set_alpha_to_one": (True, _is_bool),
        "prediction_type": ("epsilon", _PREDICTION),
        # LCMScheduler.set_timesteps reads neither: any value behaves as diffusers does.
        "timestep_spacing": ("leading", _SPACING),
        "timestep_scaling": (10.0, _is_number),
    },
}
# A key that some kind here takes but the loaded kind does not is ignored (diffusers ignores it).
_ALL_KIND_KEYS = frozenset(k for spec in _SPECS.values() for k in spec)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A validated diffusers scheduler config; ``plan(N)`` gives the arrays for N steps.

    Attributes:
      class_name: diffusers' class name (``_class_name``).
      kind: "ddim", "euler", "euler_ancestral", "dpmsolver++" or "lcm".
      config: every argument of the class, the file's values over diffusers' defaults
        (plus ``sigma_min``/``sigma_max`` for DPM, which diffusers reads when present).
      schedule: the β/ᾱ tables (``rescale_betas_zero_snr`` applied; ᾱ_{T−1} = 0 when rescaled).
    """

    class_name: str
    kind: str
    config: Mapping[str, Any]
    schedule: NoiseSchedule

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        """Host-side ``set_timesteps(num_inference_steps)``: timesteps, sigmas and per-step scalars.

        Args:
          num_inference_steps: N ≥ 1.

        Returns:
          The plan; ``plan.timesteps`` equals diffusers' ``scheduler.timesteps`` after
          ``set_timesteps(N)`` (dtype int32 or float32 instead of int64 / float32).
        """
        if not _is_int(num_inference_steps) and not isinstance(num_inference_steps, np.integer):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        T = int(self.config["num_train_timesteps"])
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {n}")
        build = {
            "ddim": _plan_ddim,
            "euler": _plan_euler,
            "euler_ancestral": _plan_euler,
            "dpmsolver++": _plan_dpm,
            "lcm": _plan_lcm,
        }[self.kind]
        fields = build(self, n)
        return _finish_plan(self, fields)


# ----------------------------------------------------------------------------- loading


def _read_config(folder_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(folder_or_dict, Mapping):
        return dict(folder_or_dict), "<dict>"
    path = os.fspath(folder_or_dict)
    candidates = (
        [path]
        if path.endswith(".json")
        else [os.path.join(path, "scheduler", "scheduler_config.json"), os.path.join(path, "scheduler_config.json")]
    )
    for c in candidates:
        if os.path.isfile(c):
            return read_json_object(c, "the scheduler's config"), c
    raise FileNotFoundError(
        f"no scheduler config at {path!r}: looked for {', '.join(repr(c) for c in candidates)}"
    )


def load_scheduler(folder_or_dict: str | os.PathLike | Mapping[str, Any]) -> Scheduler:
    """Reads a diffusers scheduler config and validates every key.

    Args:
      folder_or_dict: a pipeline folder (reads ``scheduler/scheduler_config.json``), a
        scheduler folder (``scheduler_config.json``), the JSON file itself, or the config as a
        dict (diffusers' ``scheduler.config`` works).

    Returns:
      The scheduler.

    Raises:
      ValueError: unknown ``_class_name``; a key this module does not know; a value it does not
        reproduce (the message names the key, the value and the file).
      FileNotFoundError: no config file where ``folder_or_dict`` points.
    """
    cfg, source = _read_config(folder_or_dict)
    class_name = cfg.get("_class_name")
    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"{source}: _class_name={class_name!r} is not supported; supported: {sorted(SCHEDULER_CLASSES)}"
        )
    kind = SCHEDULER_CLASSES[class_name]
    spec = _SPECS[kind]
    resolved = {k: default for k, (default, _) in spec.items()}
    for key, value in cfg.items():
        if key in spec:
            if not spec[key][1](value):
                raise ValueError(
                    f"{source}: {class_name} config key {key!r} = {value!r} is not supported by meg_jax"
                )
            resolved[key] = value
        elif key in IGNORED_KEYS or key in _ALL_KIND_KEYS:
            continue
        else:
            raise ValueError(f"{source}: unknown {class_name} config key {key!r} (value {value!r})")
    if kind == "dpmsolver++":
        # diffusers' constructor rewrites these aliases before anything reads them.
        if resolved["algorithm_type"] == "deis":
            if resolved["final_sigmas_type"] == "zero":  # diffusers' constructor refuses this too
                raise ValueError(
                    f"{source}: DPMSolverMultistepScheduler config key 'algorithm_type' = 'deis' needs "
                    "final_sigmas_type='sigma_min' (diffusers refuses 'zero')"
                )
            resolved["algorithm_type"] = "dpmsolver++"
        if resolved["solver_type"] in ("logrho", "bh1", "bh2"):
            resolved["solver_type"] = "midpoint"
    if kind == "euler" and resolved["use_karras_sigmas"] is None:
        resolved["use_karras_sigmas"] = False
    if kind == "dpmsolver++" and resolved["use_karras_sigmas"] is None:
        resolved["use_karras_sigmas"] = False
    return Scheduler(class_name, kind, resolved, _schedule_from_config(resolved, source))


def _schedule_from_config(cfg: Mapping[str, Any], source: str) -> NoiseSchedule:
    T = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32).astype(np.float64)
        if betas.shape[0] != T:
            raise ValueError(
                f"{source}: trained_betas has {betas.shape[0]} entries but num_train_timesteps={T}"
            )
    else:
        try:
            betas = S.make_betas(cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], T)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
    if cfg["rescale_betas_zero_snr"]:
        betas = S.rescale_zero_terminal_snr(betas)
    return S.schedule_from_betas(betas)


# ----------------------------------------------------------------------------- plans


def _alphas_cumprod(sched: Scheduler, zero_snr_floor: bool) -> np.ndarray:
    """ᾱ as float32 numpy; the sigma-based kinds replace a rescaled ᾱ_{T−1} = 0 by 2⁻²⁴."""
    ac = np.asarray(sched.schedule.alphas_cumprod, np.float32).copy()
    if zero_snr_floor and sched.config["rescale_betas_zero_snr"]:
        ac[-1] = _ZERO_SNR_ALPHA_CUMPROD
    return ac


def _sigma_table(ac: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) in float32, as diffusers computes it from its float32 ᾱ."""
    ac = np.asarray(ac, np.float32)
    with np.errstate(divide="ignore"):  # ᾱ = 0 (zero terminal SNR, DDIM/LCM) gives σ = inf
        return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ by linear interpolation in log σ (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, M]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def _karras_bounds(sched: Scheduler, descending_sigmas: np.ndarray) -> tuple[float, float]:
    smin, smax = sched.config["sigma_min"], sched.config["sigma_max"]
    smin = float(descending_sigmas[-1]) if smin is None else float(smin)
    smax = float(descending_sigmas[0]) if smax is None else float(smax)
    return smin, smax


def _final_sigma(sched: Scheduler, ac: np.ndarray) -> np.float32:
    if sched.config["final_sigmas_type"] == "sigma_min":
        return _sigma_table(ac[:1])[0]
    return np.float32(0.0)


def _check_epsilon_defined(sched: Scheduler, ts: np.ndarray, alpha_prod: np.ndarray) -> None:
    # x̂₀ = (x − sqrt(1 − ᾱ)·ε̂) / sqrt(ᾱ) is undefined at ᾱ = 0 (zero terminal SNR): diffusers
    # returns NaN/inf latents there; refuse instead.
    if sched.config["prediction_type"] == "epsilon" and np.any(alpha_prod <= 0.0):
        bad = ts[alpha_prod <= 0.0]
        raise ValueError(
            f"{sched.class_name}: prediction_type='epsilon' with rescale_betas_zero_snr=True visits "
            f"timestep {bad[0]} where ᾱ = 0, so x̂₀ is undefined (diffusers yields NaN); use "
            "prediction_type='v_prediction' (what zero-SNR models are trained with) or fewer/other steps"
        )


def _plan_ddim(sched: Scheduler, n: int) -> dict[str, Any]:
    cfg = sched.config
    T = int(cfg["num_train_timesteps"])
    ts = S.timesteps(n, cfg["timestep_spacing"], T, cfg["steps_offset"], scheduler="ddim")
    if ts.max() >= T:
        raise ValueError(f"DDIMScheduler: steps_offset={cfg['steps_offset']} gives timestep {ts.max()} >= {T}")
    prev = S.ddim_prev_timesteps(ts, T)
    ac = _alphas_cumprod(sched, zero_snr_floor=False)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
    _check_epsilon_defined(sched, ts, ac[ts])
    return dict(
        timesteps=ts.astype(np.int32),
        alpha_prod=ac[ts],
        alpha_prod_prev=alpha_prev,
        sigmas=np.concatenate([_sigma_table(ac[ts]), [0.0]]),
        init_noise_sigma=np.float32(1.0),
    )


def _plan_euler(sched: Scheduler, n: int) -> dict[str, Any]:
    cfg = sched.config
    T = int(cfg["num_train_timesteps"])
    ts = S.timesteps(n, cfg["timestep_spacing"], T, cfg["steps_offset"], scheduler="euler")
    ac = _alphas_cumprod(sched, zero_snr_floor=True)
    # As S.euler_sigmas, but host-side and in float64 like diffusers' np.interp (plans are
    # built on the host; the jnp version serves traced timesteps).
    table = _sigma_table(ac)
    sig = np.interp(ts.astype(np.float64), np.arange(len(table)), table.astype(np.float64))
    if sched.kind == "euler" and cfg["use_karras_sigmas"]:
        sig = _karras(*_karras_bounds(sched, sig), n)
        ts = _sigma_to_t(sig, np.log(_sigma_table(ac).astype(np.float64))).astype(np.float32)
    last = _final_sigma(sched, ac) if sched.kind == "euler" else np.float32(0.0)
    sigmas = np.concatenate([sig, [last]]).astype(np.float32)
    if sched.kind == "euler" and cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        ts = (np.float32(0.25) * np.log(sigmas[:-1])).astype(np.float32)
    return dict(
        timesteps=ts.astype(np.float32),
        sigmas=sigmas,
        alpha_prod=(1.0 / (sigmas[:-1].astype(np.float64) ** 2 + 1.0)).astype(np.float32),
        # diffusers' init_noise_sigma property (S.euler_init_noise_sigma, host-side)
        init_noise_sigma=(
            sigmas.max() if cfg["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(sigmas.max() ** 2 + 1)
        ),
    )


def _dpm_timesteps(cfg: Mapping[str, Any], n: int, last_timestep: int) -> np.ndarray:
    """``DPMSolverMultistepScheduler.set_timesteps`` spacing: N + 1 points, the last dropped."""
    T = int(cfg["num_train_timesteps"])
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + cfg["steps_offset"]
    ts = np.arange(last_timestep, 0, -T / n).round().copy().astype(np.int64)
    return ts - 1


def _dpm_orders(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """The solver order diffusers' ``step`` uses at each of the N steps (its warm-up and
    ``lower_order_final`` / ``euler_at_final`` / ``final_sigmas_type="zero"`` rules)."""
    order = int(cfg["solver_order"])
    out = np.ones(n, np.int32)
    for i in range(n):
        lower_final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        lower_second = i == n - 2 and cfg["lower_order_final"] and n < 15
        warm = min(i, order)  # diffusers' lower_order_nums before this step
        if order == 1 or warm < 1 or lower_final:
            out[i] = 1
        elif order == 2 or warm < 2 or lower_second:
            out[i] = 2
        else:
            out[i] = 3
    return out


def _plan_dpm(sched: Scheduler, n: int) -> dict[str, Any]:
    cfg = sched.config
    T = int(cfg["num_train_timesteps"])
    ac = _alphas_cumprod(sched, zero_snr_floor=True)
    lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))).astype(np.float32)
    clipped = int(np.searchsorted(lam[::-1], np.float32(cfg["lambda_min_clipped"]), side="left"))
    ts = _dpm_timesteps(cfg, n, T - clipped)
    if ts.size == 0:
        raise ValueError(f"DPMSolverMultistepScheduler: no timesteps left for N={n} (lambda_min_clipped)")
    table = _sigma_table(ac)
    if cfg["use_karras_sigmas"]:
        sig = _karras(*_karras_bounds(sched, table[::-1]), n)
        t_frac = _sigma_to_t(sig, np.log(table.astype(np.float64)))
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            t_frac = t_frac.round()
        ts = t_frac.astype(np.int64)
    else:
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(f"DPMSolverMultistepScheduler: timesteps {ts} leave [0, {T})")
        sig = table[ts].astype(np.float64)
    sigmas = np.concatenate([sig, [_final_sigma(sched, ac)]]).astype(np.float32)
    m = len(ts)
    return dict(
        timesteps=ts.astype(np.int32),
        sigmas=sigmas,
        alpha_prod=(1.0 / (sigmas[:-1].astype(np.float64) ** 2 + 1.0)).astype(np.float32),
        order=_dpm_orders(cfg, m),
        init_noise_sigma=np.float32(1.0),
    )


def _plan_lcm(sched: Scheduler, n: int) -> dict[str, Any]:
    cfg = sched.config
    T = int(cfg["num_train_timesteps"])
    original = int(cfg["original_inference_steps"])
    if original > T:
        raise ValueError(f"LCMScheduler: original_inference_steps={original} > num_train_timesteps={T}")
    k = T // original
    origin = np.arange(1, original + 1) * k - 1  # the distillation's timesteps (strength 1)
    if n > original:
        raise ValueError(
            f"LCMScheduler: num_inference_steps={n} > original_inference_steps={original} "
            "(the schedule is a subset of the original one)"
        )
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    ts = origin[idx].astype(np.int64)
    prev = np.concatenate([ts[1:], ts[-1:]])  # the last step returns the denoised sample
    ac = _alphas_cumprod(sched, zero_snr_floor=False)
    _check_epsilon_defined(sched, ts, ac[ts])
    # Consistency-model boundary scalings (Song et al. 2023) at t·timestep_scaling, σ_data = 0.5,
    # in float32 as diffusers evaluates them on a float32 tensor.
    scaled = ts.astype(np.float32) * np.float32(cfg["timestep_scaling"])
    c_skip = np.float32(0.25) / (scaled**2 + np.float32(0.25))
    c_out = scaled / np.sqrt(scaled**2 + np.float32(0.25))
    return dict(
        timesteps=ts.astype(np.int32),
        alpha_prod=ac[ts],
        alpha_prod_prev=ac[prev],
        c_skip=c_skip.astype(np.float32),
        c_out=c_out.astype(np.float32),
        sigmas=np.concatenate([_sigma_table(ac[ts]), [0.0]]),
        init_noise_sigma=np.float32(1.0),
    )


def _finish_plan(sched: Scheduler, f: dict[str, Any]) -> SamplingPlan:
    cfg = sched.config
    n = len(f["timesteps"])
    clip = cfg.get("clip_sample", False)
    sigmas = np.asarray(f["sigmas"], np.float32)
    # DPM-Solver's VP coefficients, in float32 with diffusers' formulas (_sigma_to_alpha_sigma_t).
    alpha_t = np.float32(1.0) / np.sqrt(sigmas**2 + np.float32(1.0))
    with np.errstate(divide="ignore", invalid="ignore"):  # σ = inf (DDIM/LCM at ᾱ = 0), σ = 0
        sigma_t = np.where(np.isinf(sigmas), np.float32(1.0), sigmas * alpha_t)
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    arrays = dict(
        timesteps=np.asarray(f["timesteps"]),
        sigmas=sigmas,
        alpha_t=np.asarray(alpha_t, np.float32),
        sigma_t=np.asarray(sigma_t, np.float32),
        lambda_t=np.asarray(lambda_t, np.float32),
        alpha_prod=np.asarray(f["alpha_prod"], np.float32),
        alpha_prod_prev=np.asarray(f.get("alpha_prod_prev", np.ones(n)), np.float32),
        c_skip=np.asarray(f.get("c_skip", np.zeros(n)), np.float32),
        c_out=np.asarray(f.get("c_out", np.ones(n)), np.float32),
        order=np.asarray(f.get("order", np.ones(n)), np.int32),
        init_noise_sigma=np.asarray(f["init_noise_sigma"], np.float32).reshape(()),
        prediction=np.asarray(_PREDICTION_INDEX[cfg["prediction_type"]], np.int32),
        clip_range=np.asarray(float(cfg["clip_sample_range"]) if clip else math.inf, np.float32),
        threshold_ratio=np.asarray(float(cfg.get("dynamic_thresholding_ratio", 0.995)), np.float32),
        threshold_max=np.asarray(float(cfg.get("sample_max_value", 1.0)), np.float32),
        heun=np.asarray(cfg.get("solver_type") == "heun"),
    )
    return SamplingPlan(
        **jax.device_put(arrays),  # one transfer for all leaves
        kind=sched.kind,
        thresholding=bool(cfg.get("thresholding", False)),
    )
