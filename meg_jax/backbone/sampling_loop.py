"""The denoising loop of ``meg_jax.backbone.schedulers``: the ``SamplingPlan`` pytree and
``denoise``, one ``lax.scan`` over the N steps of any supported diffusers scheduler.

Plans are built on the host by ``Scheduler.plan(N)`` (``meg_jax.backbone.schedulers``); this
module holds only what runs under ``jit``.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from meg_jax.backbone import schedules as S
from meg_jax.backbone.schedules import ModelFn

# Kinds that draw fresh noise inside the loop (``step_noise`` or ``key``).
_STOCHASTIC_KINDS = ("euler_ancestral", "lcm")

@flax.struct.dataclass
class SamplingPlan:
    """Everything one denoising loop needs for N steps, as arrays (a pytree; only ``kind`` and
    ``thresholding`` are static, so configs of one kind share a compiled loop per N).

    Per-step arrays have leading size N (the number of model calls); fields a kind does not use
    hold neutral values (documented per field).
    """

    timesteps: jax.Array  # [N] what the network sees: int32 (ddim, dpmsolver++, lcm) or float32 (euler kinds)
    sigmas: jax.Array  # [N + 1] float32: euler kinds / dpmsolver++: diffusers' scheduler.sigmas;
    #   ddim / lcm: the equivalent sqrt((1 − ᾱ_t)/ᾱ_t) at each timestep, then 0 (informative only)
    alpha_t: jax.Array  # [N + 1] float32 α = 1/sqrt(σ² + 1) = sqrt(ᾱ) at each of ``sigmas``
    sigma_t: jax.Array  # [N + 1] float32 σ·α = sqrt(1 − ᾱ): x_t = alpha_t·x₀ + sigma_t·ε
    lambda_t: jax.Array  # [N + 1] float32 log α − log(σ·α), the half log-SNR (+inf where σ = 0)
    alpha_prod: jax.Array  # [N] float32 ᾱ at each timestep (ddim, lcm; informative for the others)
    alpha_prod_prev: jax.Array  # [N] float32 ᾱ of each step's target (ddim: t − T//N or the final ᾱ;
    #   lcm: the next timestep's; others: ones)
    c_skip: jax.Array  # [N] float32 LCM boundary-condition scalings (others: zeros)
    c_out: jax.Array  # [N] float32 (others: ones)
    order: jax.Array  # [N] int32 DPM-Solver order used at each step (others: ones)
    init_noise_sigma: jax.Array  # [] float32 std of the initial latents (diffusers' property)
    prediction: jax.Array  # [] int32 0 epsilon, 1 v_prediction, 2 sample
    clip_range: jax.Array  # [] float32 x̂₀ clipped to ±clip_range (inf: no clipping)
    threshold_ratio: jax.Array  # [] float32 dynamic thresholding's quantile
    threshold_max: jax.Array  # [] float32 its upper clamp of s
    heun: jax.Array  # [] bool DPM-Solver++ second-order "heun" form (else "midpoint")
    kind: str = flax.struct.field(pytree_node=False, default="ddim")
    # Static (a per-sample sort when on, rarely used): dynamic thresholding of x̂₀
    # (Saharia et al. 2022) instead of clipping.
    thresholding: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def num_steps(self) -> int:
        """N, the number of network evaluations."""
        return int(self.timesteps.shape[0])


def _threshold(x0: jax.Array, ratio: jax.Array, max_value: jax.Array) -> jax.Array:
    """Dynamic thresholding (Imagen, Saharia et al. 2022): per sample, s = clamp(quantile(|x̂₀|,
    ratio), 1, max_value); x̂₀ ← clip(x̂₀, −s, s) / s. Over all non-batch axes (layout-free)."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)  # linear interpolation, as torch.quantile
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def _postprocess_x0(plan: SamplingPlan, x0: jax.Array) -> jax.Array:
    """diffusers' order: thresholding if set, else clip_sample (clip_range = inf when off)."""
    if plan.thresholding:
        return _threshold(x0, plan.threshold_ratio, plan.threshold_max)
    return jnp.clip(x0, -plan.clip_range, plan.clip_range)


def _select(index: jax.Array, values: list[jax.Array]) -> jax.Array:
    """``values[index]`` for a traced scalar index, by elementwise selects.

    Every candidate is computed (a few elementwise ops on the latents, nothing next to a
    network call) and XLA compiles this several times faster than ``lax.switch``. Candidates
    that are not selected may hold inf/NaN (a DPM order not yet usable); selects drop them.
    """
    out = values[-1]
    for k in range(len(values) - 2, -1, -1):
        out = jnp.where(index == k, values[k], out)
    return out


def _x0_eps(plan: SamplingPlan, alpha: jax.Array, out: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x̂₀, ε̂) from the network output with ᾱ_t (DDIM / LCM arithmetic), by ``plan.prediction``."""
    pairs = [S._x0_eps_from_alpha(alpha, out, x, p) for p in ("epsilon", "v_prediction", "sample")]
    return _select(plan.prediction, [p[0] for p in pairs]), _select(plan.prediction, [p[1] for p in pairs])


# A step body: (plan, network call, step index, state x [B, ...], this step's noise, solver
# history) -> (next x, next history). ``call(x, t)`` applies model_fn with diffusers' t.
_Call = Callable[[jax.Array, jax.Array], jax.Array]
_Aux = tuple


def _ddim_body(
    plan: SamplingPlan, call: _Call, i: jax.Array, x: jax.Array, noise: jax.Array | None, aux: _Aux
) -> tuple[jax.Array, _Aux]:
    t = plan.timesteps[i]
    out = call(x, t)
    x0, eps = _x0_eps(plan, plan.alpha_prod[i], out, x)
    x0 = _postprocess_x0(plan, x0)
    a_prev = plan.alpha_prod_prev[i]
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, aux


def _euler_x_next(
    plan: SamplingPlan, out: jax.Array, sigma: jax.Array, sigma_next: jax.Array, x: jax.Array
) -> jax.Array:
    preds = ("epsilon", "v_prediction", "sample")
    return _select(plan.prediction, [S.euler_step(out, sigma, sigma_next, x, p)[0] for p in preds])


def _euler_body(
    plan: SamplingPlan, call: _Call, i: jax.Array, x: jax.Array, noise: jax.Array | None, aux: _Aux
) -> tuple[jax.Array, _Aux]:
    sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
    out = call(S.euler_scale_model_input(x, sigma), plan.timesteps[i])
    return _euler_x_next(plan, out, sigma, sigma_next, x), aux


def _euler_ancestral_body(
    plan: SamplingPlan, call: _Call, i: jax.Array, x: jax.Array, noise: jax.Array | None, aux: _Aux
) -> tuple[jax.Array, _Aux]:
    sigma, sigma_to = plan.sigmas[i], plan.sigmas[i + 1]
    out = call(S.euler_scale_model_input(x, sigma), plan.timesteps[i])
    # Split the step to σ_to into a deterministic move to σ_down and fresh noise of std σ_up
    # (Karras et al. 2022 / k-diffusion's ancestral sampler), as diffusers does.
    sigma_up = jnp.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_to**2 - sigma_up**2)
    x = _euler_x_next(plan, out, sigma, sigma_down, x)
    return x + noise * sigma_up, aux


def _dpm_body(
    plan: SamplingPlan, call: _Call, i: jax.Array, x: jax.Array, noise: jax.Array | None, aux: _Aux
) -> tuple[jax.Array, _Aux]:
    m1, m2 = aux  # the converted outputs (x̂₀) of steps i − 1 and i − 2
    out = call(x, plan.timesteps[i])
    alpha_s0, sigma_s0, lam_s0 = plan.alpha_t[i], plan.sigma_t[i], plan.lambda_t[i]
    x0_candidates = [(x - sigma_s0 * out) / alpha_s0, alpha_s0 * x - sigma_s0 * out, out]
    m0 = _postprocess_x0(plan, _select(plan.prediction, x0_candidates))
    alpha_t, sigma_t, lam_t = plan.alpha_t[i + 1], plan.sigma_t[i + 1], plan.lambda_t[i + 1]
    lam_s1 = plan.lambda_t[jnp.maximum(i - 1, 0)]
    lam_s2 = plan.lambda_t[jnp.maximum(i - 2, 0)]
    h = lam_t - lam_s0
    phi = jnp.exp(-h) - 1.0  # DPM-Solver++ (Lu et al. 2022), data-prediction form, eqs. 8-9

    def first() -> jax.Array:
        return (sigma_t / sigma_s0) * x - (alpha_t * phi) * m0

    def second() -> jax.Array:
        r0 = (lam_s0 - lam_s1) / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = (sigma_t / sigma_s0) * x - (alpha_t * phi) * d0 - 0.5 * (alpha_t * phi) * d1
        heun = (sigma_t / sigma_s0) * x - (alpha_t * phi) * d0 + (alpha_t * (phi / h + 1.0)) * d1
        return jnp.where(plan.heun, heun, midpoint)

    def third() -> jax.Array:
        h_0, h_1 = lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return (
            (sigma_t / sigma_s0) * x
            - (alpha_t * phi) * m0
            + (alpha_t * (phi / h + 1.0)) * d1
            - (alpha_t * ((phi + h) / h**2 - 0.5)) * d2
        )

    x = _select(plan.order[i] - 1, [first(), second(), third()])
    return x, (m0, m1)


def _lcm_body(
    plan: SamplingPlan, call: _Call, i: jax.Array, x: jax.Array, noise: jax.Array | None, aux: _Aux
) -> tuple[jax.Array, _Aux]:
    out = call(x, plan.timesteps[i])
    x0, _ = _x0_eps(plan, plan.alpha_prod[i], out, x)
    x0 = _postprocess_x0(plan, x0)
    denoised = plan.c_out[i] * x0 + plan.c_skip[i] * x
    a_prev = plan.alpha_prod_prev[i]
    renoised = jnp.sqrt(a_prev) * denoised + jnp.sqrt(1.0 - a_prev) * noise
    return jnp.where(i == plan.timesteps.shape[0] - 1, denoised, renoised), aux


_BODIES = {
    "ddim": _ddim_body,
    "euler": _euler_body,
    "euler_ancestral": _euler_ancestral_body,
    "dpmsolver++": _dpm_body,
    "lcm": _lcm_body,
}


def denoise(
    plan: SamplingPlan,
    model_fn: ModelFn,
    latents: jax.Array,
    *,
    step_noise: jax.Array | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Runs the scheduler's whole denoising loop (``lax.scan`` over the plan's N steps).

    Traceable: jit the caller with ``plan`` as an argument; one compile per (kind, N, shapes).
    The loop state is float32 whatever ``latents.dtype``; the network gets its input cast to
    ``latents.dtype`` and its output is cast back to float32.

    Args:
      plan: from ``Scheduler.plan(N)``.
      model_fn: ``model_fn(x_in [B, ...], t [B]) -> [B, ...]``: x_in already scaled as
        diffusers' ``scale_model_input`` does (Euler kinds divide by sqrt(σ² + 1)), ``t`` the
        timestep diffusers passes to the UNet (``plan.timesteps[i]`` broadcast to the batch:
        int32 for DDIM/DPM/LCM, float32 for the Euler kinds). It applies guidance itself.
      latents: ``[B, ...]`` the initial latents, *already multiplied by*
        ``plan.init_noise_sigma`` (diffusers' ``prepare_latents`` does this, also for
        user-given latents). Any layout: every operation is elementwise or per sample.
      step_noise: optional ``[N, B, ...]`` float noise for the stochastic kinds, row i used by
        step i (Euler-ancestral: every step; LCM: every step but the last; row order = the
        order diffusers' generator draws them). Ignored by the deterministic kinds.
      key: PRNG key used when ``step_noise`` is None (``fold_in(key, i)`` for step i).

    Returns:
      ``[B, ...]`` the final latents (LCM: the last step's denoised sample, which is what its
      pipeline decodes), in ``latents.dtype``.
    """
    kind = plan.kind
    if kind not in _BODIES:
        raise ValueError(f"unknown plan kind {kind!r}")
    n = plan.timesteps.shape[0]
    batch = latents.shape[0]
    if step_noise is not None and tuple(step_noise.shape) != (n, *latents.shape):
        raise ValueError(
            f"step_noise must have shape [N, *latents.shape] = {(n, *latents.shape)}, got {tuple(step_noise.shape)}"
        )
    stochastic = kind in _STOCHASTIC_KINDS
    if stochastic and step_noise is None and key is None:
        raise ValueError(f"the {kind} scheduler adds noise every step: pass step_noise or key")
    out_dtype = latents.dtype

    def call(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn(x.astype(out_dtype), jnp.full((batch,), t, plan.timesteps.dtype))
        if out.shape != x.shape:
            raise ValueError(
                f"model_fn returned shape {out.shape} for input {x.shape}; it must return the input shape"
            )
        return out.astype(jnp.float32)

    body = _BODIES[kind]
    x = latents.astype(jnp.float32)
    aux = (jnp.zeros_like(x), jnp.zeros_like(x)) if kind == "dpmsolver++" else ()

    def scan_step(carry, xs):
        x, aux = carry
        i, noise = xs
        if stochastic and step_noise is None:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        elif stochastic:
            noise = noise.astype(jnp.float32)
        x, aux = body(plan, call, i, x, noise, aux)
        return (x, aux), None

    steps = jnp.arange(n, dtype=jnp.int32)
    noises = step_noise if (stochastic and step_noise is not None) else None
    (x, _), _ = jax.lax.scan(scan_step, (x, aux), (steps, noises))
    return x.astype(out_dtype)
