"""Noise schedules, timestep spacings and few-step samplers (DDIM, Euler) in JAX.

This module is the arithmetic every diffusion component shares: the forward process
(``add_noise``, ``get_velocity``), the conversions between what a network predicts
(ε, v or x₀) and the clean sample, and two deterministic samplers that run a whole
denoising loop on device with ``lax.scan`` over a static step count.

Everything matches diffusers (0.42) so that a diffusers user recognises the numbers:

* betas: ``DDIMScheduler`` / ``EulerDiscreteScheduler`` ``beta_schedule`` "scaled_linear"
  (SD/SDXL: ``linspace(sqrt(0.00085), sqrt(0.012), 1000)**2``) and "linear";
* timesteps: ``set_timesteps`` of each scheduler, for "leading", "trailing" and "linspace"
  spacing (``timesteps(..., scheduler="ddim"|"euler")``). The two schedulers differ:
  DDIM rounds linspace spacing to integers, Euler keeps it float (e.g. N = 3 gives
  ``[999, 499.5, 0]``), and Euler returns float32 timesteps for every spacing;
* ``ddim_step``: ``DDIMScheduler.step`` with η = 0, no clipping or thresholding (SD configs
  set ``clip_sample=False``), including its choice ``prev_t = t − T // N`` and
  ``final_alpha_cumprod`` for ``prev_t < 0``;
* ``euler_step``: ``EulerDiscreteScheduler.step`` with ``s_churn = 0``, linear sigma
  interpolation and a final sigma of 0.

Who scales what (Euler): ``sample`` takes unit-variance noise ``x_T`` and multiplies it by
``init_noise_sigma`` itself (σ_max for "trailing"/"linspace", sqrt(σ_max² + 1) for
"leading", as diffusers' property), and divides the model input by sqrt(σ² + 1)
(diffusers' ``scale_model_input``) before every call to ``model_fn``. The caller never
scales. The returned sample is x₀ in the same units as DDIM's output.

Typical use inside a jitted generator (the step count is static, everything else traced)::

    @functools.partial(jax.jit, static_argnames="num_steps")
    def generate(params, schedule, x_T, context, num_steps):
        model_fn = lambda x, t: unet.apply(params, x, t, context)
        return sample(model_fn, schedule, x_T, num_steps=num_steps)

Classifier-free guidance: ``cfg_model_fn(apply, cond, uncond, scale)`` (or
``sample(..., guidance_scale=s)`` with a ``model_fn`` that already takes the doubled batch)
runs the network once on the batch ``[uncond; cond]`` and returns
``uncond + s · (cond − uncond)``, as diffusers' pipelines do.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NoiseSchedule",
    "ModelFn",
    "make_betas",
    "rescale_zero_terminal_snr",
    "schedule_from_betas",
    "make_schedule",
    "timesteps",
    "ddim_prev_timesteps",
    "add_noise",
    "get_velocity",
    "pred_x0_and_eps",
    "ddim_step",
    "euler_sigmas",
    "euler_init_noise_sigma",
    "euler_scale_model_input",
    "euler_step",
    "guided",
    "cfg_model_fn",
    "sample",
]

Spacing = Literal["leading", "trailing", "linspace"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
BetaSchedule = Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
SchedulerName = Literal["ddim", "euler"]

_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
_SCHEDULERS = ("ddim", "euler")


class ModelFn(Protocol):
    """A denoiser called by the samplers.

    Args:
      x_t: ``[B, ...]`` noisy sample (for Euler already divided by sqrt(σ² + 1)).
      t: ``[B]`` timesteps: int32 under DDIM; float32 under Euler (diffusers passes
        Euler's float timesteps, fractional for "linspace" spacing, to the network).

    Returns:
      ``[B, ...]`` the network output (ε, v or x₀ as the ``prediction_type`` says).
    """

    def __call__(self, x_t: jax.Array, t: jax.Array) -> jax.Array: ...


@flax.struct.dataclass
class NoiseSchedule:
    """Discrete-time variance-preserving noise schedule (diffusers' scheduler tables).

    ``x_t = sqrt(ᾱ_t) · x₀ + sqrt(1 − ᾱ_t) · ε`` for integer ``t`` in ``[0, T)``.
    """

    betas: jax.Array  # [T] float32, β_t
    alphas: jax.Array  # [T] float32, α_t = 1 − β_t
    alphas_cumprod: jax.Array  # [T] float32, ᾱ_t = ∏_{s ≤ t} α_s
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)  # T


def make_betas(
    beta_schedule: BetaSchedule = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
) -> np.ndarray:
    """The β table of diffusers' schedulers (``beta_schedule``), host-side in float64.

    Args:
      beta_schedule: "scaled_linear" (betas = linspace(sqrt(start), sqrt(end), T)², the
        latent-diffusion schedule of SD/SDXL), "linear" (linspace(start, end, T)) or
        "squaredcos_cap_v2" (the cosine schedule of Nichol & Dhariwal 2021,
        ``β_i = min(1 − ᾱ(t_{i+1}) / ᾱ(t_i), 0.999)`` with ``ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2)``,
        ``t_i = i / T``; ``beta_start``/``beta_end`` are not used).
      beta_start: β_0.
      beta_end: β_{T−1}.
      num_train_timesteps: T.

    Returns:
      ``[T]`` float64 betas.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    T = num_train_timesteps
    if beta_schedule == "squaredcos_cap_v2":
        # diffusers' betas_for_alpha_bar(T, max_beta=0.999, alpha_transform_type="cosine").
        i = np.arange(T, dtype=np.float64)
        alpha_bar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        return np.minimum(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    raise ValueError(
        f"beta_schedule must be one of {_BETA_SCHEDULES}, got {beta_schedule!r}"
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so that ᾱ_{T−1} = 0 (Lin et al. 2024, "Common diffusion noise schedules
    and sample steps are flawed", Algorithm 1; diffusers' ``rescale_betas_zero_snr``).

    sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first value is kept.

    Args:
      betas: ``[T]`` betas.

    Returns:
      ``[T]`` float64 betas with ``betas[-1] = 1`` (so ᾱ_{T−1} = 0 exactly).
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def schedule_from_betas(betas: np.ndarray) -> NoiseSchedule:
    """Builds the α and ᾱ tables from ``[T]`` betas (products in float64, stored as float32)."""
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not (np.all(betas >= 0.0) and np.all(betas <= 1.0)):
        raise ValueError("betas must lie in [0, 1]")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas=jnp.asarray(alphas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        num_train_timesteps=int(betas.shape[0]),
    )


def make_schedule(
    beta_schedule: BetaSchedule = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    rescale_betas_zero_snr: bool = False,
) -> NoiseSchedule:
    """Builds the beta/alpha tables as diffusers' schedulers do.

    The tables are computed in float64 and stored as float32; they agree with diffusers'
    float32 torch computation to about 1e-6 relative.

    Args:
      beta_schedule: "scaled_linear", "linear" or "squaredcos_cap_v2" (see ``make_betas``).
      beta_start: β_0.
      beta_end: β_{T−1}.
      num_train_timesteps: T.
      rescale_betas_zero_snr: rescale to zero terminal SNR (``rescale_zero_terminal_snr``).

    Returns:
      The schedule; ``alphas_cumprod[0] = 0.99915``, ``[999] = 0.00466`` for SD's defaults.
    """
    betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def timesteps(
    num_steps: int,
    spacing: Spacing = "leading",
    num_train_timesteps: int = 1000,
    steps_offset: int = 1,
    scheduler: SchedulerName = "ddim",
) -> np.ndarray:
    """The inference timesteps of diffusers' ``set_timesteps``, highest first.

    Host-side numpy (the step count is static): use it to build constants for jitted code.

    * leading: ``arange(N) · (T // N)``, reversed, ``+ steps_offset``;
    * trailing: ``round(arange(T, 0, −T / N)) − 1`` (steps_offset ignored, as diffusers);
    * linspace: ``linspace(0, T − 1, N)`` reversed, rounded for DDIM, float for Euler
      (steps_offset ignored).

    Args:
      num_steps: N, in ``[1, T]``.
      spacing: "leading", "trailing" or "linspace".
      num_train_timesteps: T.
      steps_offset: added to "leading" timesteps (SD configs use 1; diffusers' default 0).
      scheduler: "ddim" (``DDIMScheduler``: int64 result) or "euler"
        (``EulerDiscreteScheduler``: float32 result).

    Returns:
      ``[N]`` timesteps, int64 for DDIM, float32 for Euler.
    """
    _check_choice("spacing", spacing, _SPACINGS)
    _check_choice("scheduler", scheduler, _SCHEDULERS)
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_steps}"
        )
    T, N = num_train_timesteps, num_steps
    if scheduler == "ddim":
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.int64)
            ts += steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64)
            ts -= 1
        return ts
    # Euler: the same formulas, but float32 and no rounding for linspace.
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.float32)
        ts += steps_offset
    else:
        ts = np.arange(T, 0, -T / N).round().copy().astype(np.float32)
        ts -= 1
    return ts


def ddim_prev_timesteps(ts: np.ndarray, num_train_timesteps: int = 1000) -> np.ndarray:
    """DDIM's previous timestep for each of ``ts``: ``t − T // N`` (diffusers' rule).

    Note this is not always the next entry of ``ts`` (e.g. linspace N = 3 gives
    ``[999, 500, 0]`` but previous steps ``[666, 167, −333]``); diffusers steps this way and
    so does this module. Negative values select ``final_alpha_cumprod``.
    """
    return np.asarray(ts, np.int64) - num_train_timesteps // len(ts)


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a scalar or ``[B]`` per-sample factor to broadcast against ``x [B, ...]``."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _alpha_at(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    return schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]


def add_noise(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """Forward process ``x_t = sqrt(ᾱ_t) x₀ + sqrt(1 − ᾱ_t) ε``.

    Args:
      schedule: the noise schedule.
      x0: ``[B, ...]`` clean samples.
      noise: ``[B, ...]`` ε.
      t: scalar or ``[B]`` integer timesteps.

    Returns:
      ``[B, ...]`` noisy samples.
    """
    a = _bcast(_alpha_at(schedule, t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def get_velocity(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """v-prediction target ``v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x₀`` (Salimans & Ho 2022).

    Args as ``add_noise``; returns ``[B, ...]``.
    """
    a = _bcast(_alpha_at(schedule, t), x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def _x0_eps_from_alpha(
    alpha_prod: jax.Array, model_output: jax.Array, x_t: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    beta_prod = 1.0 - alpha_prod
    if prediction_type == "epsilon":
        x0 = (x_t - jnp.sqrt(beta_prod) * model_output) / jnp.sqrt(alpha_prod)
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - jnp.sqrt(alpha_prod) * x0) / jnp.sqrt(beta_prod)
    elif prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_prod) * x_t - jnp.sqrt(beta_prod) * model_output
        eps = jnp.sqrt(alpha_prod) * model_output + jnp.sqrt(beta_prod) * x_t
    else:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    return x0, eps


def pred_x0_and_eps(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prediction_type: PredictionType = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Converts a network output at timestep ``t`` into (x̂₀, ε̂).

    Args:
      schedule: the noise schedule.
      model_output: ``[B, ...]`` ε, v or x₀ prediction.
      x_t: ``[B, ...]`` the noisy input the network saw.
      t: scalar or ``[B]`` integer timesteps.
      prediction_type: "epsilon", "v_prediction" or "sample".

    Returns:
      ``(x0, eps)``, each ``[B, ...]``.
    """
    a = _bcast(_alpha_at(schedule, t), x_t)
    return _x0_eps_from_alpha(a, model_output, x_t, prediction_type)


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    sample: jax.Array,
    prediction_type: PredictionType = "epsilon",
    set_alpha_to_one: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One deterministic DDIM step (η = 0), eq. 12 of Song et al. 2021 / ``DDIMScheduler.step``.

    Args:
      schedule: the noise schedule.
      model_output: ``[B, ...]`` network output at ``(sample, t)``.
      t: scalar or ``[B]`` current integer timestep.
      prev_t: scalar or ``[B]`` target timestep; ``prev_t < 0`` uses the final ᾱ: 1 if
        ``set_alpha_to_one`` else ᾱ_0 (SD configs: ``set_alpha_to_one=False``).
      sample: ``[B, ...]`` x_t.
      prediction_type: "epsilon", "v_prediction" or "sample".
      set_alpha_to_one: see ``prev_t``.

    Returns:
      ``(x_prev, x0_pred)``, each ``[B, ...]``.
    """
    alpha_prod_t = _bcast(_alpha_at(schedule, t), sample)
    prev_t = jnp.asarray(prev_t, jnp.int32)
    final = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
    alpha_prev = jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)], final)
    alpha_prev = _bcast(alpha_prev, sample)
    x0, eps = _x0_eps_from_alpha(alpha_prod_t, model_output, sample, prediction_type)
    x_prev = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev) * eps
    return x_prev, x0


def euler_sigmas(schedule: NoiseSchedule, ts: np.ndarray | jax.Array) -> jax.Array:
    """Euler's sigmas σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t) at ``ts``, linearly interpolated, plus a final 0.

    Args:
      schedule: the noise schedule.
      ts: ``[N]`` (possibly fractional) timesteps from ``timesteps(..., scheduler="euler")``.

    Returns:
      ``[N + 1]`` float32 sigmas, last one 0 (diffusers' ``final_sigmas_type="zero"``).
    """
    ac = schedule.alphas_cumprod
    table = jnp.sqrt((1.0 - ac) / ac)
    sig = jnp.interp(jnp.asarray(ts, jnp.float32), jnp.arange(ac.shape[0], dtype=jnp.float32), table)
    return jnp.concatenate([sig, jnp.zeros((1,), sig.dtype)]).astype(jnp.float32)


def euler_init_noise_sigma(sigmas: jax.Array, spacing: Spacing) -> jax.Array:
    """Std of Euler's initial sample: max σ for trailing/linspace, sqrt(max σ² + 1) for leading."""
    _check_choice("spacing", spacing, _SPACINGS)
    s = jnp.max(sigmas)
    return s if spacing in ("linspace", "trailing") else jnp.sqrt(s**2 + 1.0)


def euler_scale_model_input(sample: jax.Array, sigma: jax.Array) -> jax.Array:
    """Divides the Euler state x_σ by sqrt(σ² + 1) to give the network its x_t."""
    return sample / jnp.sqrt(_bcast(sigma, sample) ** 2 + 1.0)


def euler_step(
    model_output: jax.Array,
    sigma: jax.Array,
    sigma_next: jax.Array,
    sample: jax.Array,
    prediction_type: PredictionType = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """One Euler step of the probability-flow ODE in σ (``EulerDiscreteScheduler.step``, s_churn 0).

    Args:
      model_output: ``[B, ...]`` network output at ``euler_scale_model_input(sample, sigma)``.
      sigma: scalar or ``[B]`` current σ.
      sigma_next: scalar or ``[B]`` next σ (0 on the last step).
      sample: ``[B, ...]`` the unscaled Euler state x_σ = x_t / sqrt(ᾱ_t).
      prediction_type: "epsilon", "v_prediction" or "sample".

    Returns:
      ``(x_next, x0_pred)``, each ``[B, ...]``.
    """
    s = _bcast(sigma, sample)
    s_next = _bcast(sigma_next, sample)
    if prediction_type == "epsilon":
        x0 = sample - s * model_output
    elif prediction_type == "v_prediction":
        # diffusers: c_out = −σ / sqrt(σ² + 1), c_skip = 1 / (σ² + 1).
        x0 = model_output * (-s / jnp.sqrt(s**2 + 1.0)) + sample / (s**2 + 1.0)
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    derivative = (sample - x0) / s
    return sample + derivative * (s_next - s), x0


def guided(model_fn_doubled: ModelFn, guidance_scale: float | jax.Array) -> ModelFn:
    """Classifier-free guidance over a network that takes a doubled batch.

    Args:
      model_fn_doubled: called with ``x [2B, ...]`` and ``t [2B]``; its first half of the
        batch must be the unconditional branch, the second half the conditional one.
      guidance_scale: s; 1 gives the conditional output, 0 the unconditional one.

    Returns:
      ``model_fn(x [B, ...], t [B]) -> uncond + s · (cond − uncond)``.
    """

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn_doubled(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        uncond, cond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)

    return model_fn


def cfg_model_fn(
    apply: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    uncond: Any,
    guidance_scale: float | jax.Array,
) -> ModelFn:
    """Builds a guided ``ModelFn`` from a network that takes a conditioning pytree.

    Args:
      apply: ``apply(x [2B, ...], t [2B], context) -> [2B, ...]``, e.g.
        ``lambda x, t, c: unet.apply(params, x, t, c)``.
      cond: conditioning pytree with leaves ``[B, ...]`` (e.g. text embeddings ``[B, L, D]``).
      uncond: the unconditional pytree, same structure and shapes (e.g. empty-prompt embeddings).
      guidance_scale: s.

    Returns:
      ``model_fn(x, t)`` that runs ``apply`` once on ``[uncond; cond]`` and combines.
    """
    context = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    return guided(lambda x, t: apply(x, t, context), guidance_scale)


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    *,
    num_steps: int,
    spacing: Spacing = "trailing",
    sampler: SchedulerName = "ddim",
    prediction_type: PredictionType = "epsilon",
    guidance_scale: float | jax.Array | None = None,
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
) -> jax.Array:
    """Runs the full deterministic sampling loop with ``lax.scan`` over ``num_steps`` steps.

    Traceable; jit it from a caller that marks ``num_steps`` (and the string options) static:
    one compile per step count.

    Args:
      model_fn: the denoiser, ``model_fn(x [B, ...], t [B]) -> [B, ...]`` (see ``ModelFn``).
        With ``guidance_scale`` set it is called on the doubled batch ``[2B, ...]``, first
        half unconditional, second half conditional (see ``guided``).
      schedule: the noise schedule.
      x_T: ``[B, ...]`` unit-variance Gaussian noise. Euler scales it by ``init_noise_sigma``
        here; DDIM uses it as is.
      num_steps: N (static).
      spacing: timestep spacing; "trailing" is the one that starts at t = T − 1 for few steps.
      sampler: "ddim" (η = 0) or "euler".
      prediction_type: "epsilon", "v_prediction" or "sample".
      guidance_scale: None for no guidance, else the classifier-free guidance scale s.
      steps_offset: added to "leading" timesteps (SD configs: 1).
      set_alpha_to_one: DDIM's final ᾱ (see ``ddim_step``).

    Returns:
      ``[B, ...]`` the final sample x₀ (same units for both samplers).
    """
    _check_choice("sampler", sampler, _SCHEDULERS)
    _check_choice("prediction_type", prediction_type, _PREDICTION_TYPES)
    T = schedule.num_train_timesteps
    ts = timesteps(num_steps, spacing, T, steps_offset, scheduler=sampler)
    fn = model_fn if guidance_scale is None else guided(model_fn, guidance_scale)
    batch = x_T.shape[0]

    def call(x: jax.Array, t: jax.Array, dtype: Any) -> jax.Array:
        out = fn(x, jnp.full((batch,), t, dtype))
        if out.shape != x.shape:
            raise ValueError(
                f"model_fn returned shape {out.shape} for input {x.shape}; it must return the input shape"
            )
        return out

    if sampler == "ddim":
        prev = ddim_prev_timesteps(ts, T)
        xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(prev, jnp.int32))

        def ddim_body(x: jax.Array, step: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            t, prev_t = step
            out = call(x, t, jnp.int32)
            x, _ = ddim_step(schedule, out, t, prev_t, x, prediction_type, set_alpha_to_one)
            return x, None

        x, _ = jax.lax.scan(ddim_body, x_T, xs)
        return x

    sigmas = euler_sigmas(schedule, ts)
    x = x_T * euler_init_noise_sigma(sigmas, spacing).astype(x_T.dtype)
    xs = (jnp.asarray(ts, jnp.float32), sigmas[:-1], sigmas[1:])

    def euler_body(x: jax.Array, step: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        t, sigma, sigma_next = step
        out = call(euler_scale_model_input(x, sigma), t, jnp.float32)
        x, _ = euler_step(out, sigma, sigma_next, x, prediction_type)
        return x, None

    x, _ = jax.lax.scan(euler_body, x, xs)
    return x
