"""Whole diffusers Stable Diffusion pipelines in JAX: SD 1.x/2.x, SDXL and LCM folders.

``pipe = load_pipeline(path)`` reads the folder ``save_pretrained`` writes
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` [``text_encoder_2/``],
``tokenizer/`` [``tokenizer_2/``], ``scheduler/``) and ``pipe(prompts, num_inference_steps=N,
guidance_scale=g, latents=...)`` is a drop-in for diffusers' ``pipeline(...,
output_type="np")``: same prompt encoding, negative prompt, classifier-free guidance,
scheduler arithmetic (``meg_jax.backbone.schedulers``) and VAE decode, images
``[B, H, W, 3]`` float32 in [0, 1].

What diffusers does, per pipeline class (0.42), and what is done here the same way:

* ``StableDiffusionPipeline``: the prompt is tokenized to the tokenizer's
  ``model_max_length`` and encoded to the text encoder's ``last_hidden_state``; with CFG
  (``guidance_scale > 1`` and the UNet has no ``time_cond_proj_dim``) the negative prompt
  (default ``""``) is encoded the same way and the UNet runs on ``[negative; prompt]``,
  ``uncond + g (cond - uncond)``. A UNet with ``time_cond_proj_dim`` (an LCM-distilled one)
  gets ``timestep_cond = guidance_scale_embedding(g - 1)`` and no CFG.
* ``LatentConsistencyModelPipeline``: as above without CFG ever (and no negative prompt).
* ``StableDiffusionXLPipeline``: both tokenizers/encoders; ``hidden_states[-2]`` of each,
  concatenated on the feature axis; the pooled ``text_embeds`` of encoder 2; ``add_time_ids
  = original_size + crops_coords_top_left + target_size`` (default: the output size and
  (0, 0)); the negative prompt embedding is zeros when ``negative_prompt`` is None and
  ``force_zeros_for_empty_prompt`` is true in ``model_index.json``, else the encoded
  negative (default ``""``); VAE decode uses ``latents_mean``/``latents_std`` when the VAE
  config has them.
* latents: user latents ``[B, C, h, w]`` (diffusers' layout) are multiplied by the
  scheduler's ``init_noise_sigma``; the decoded image is ``clip(x / 2 + 0.5, 0, 1)``.

Not done (differences a user may meet): the safety checker and SDXL's invisible watermark
(only applied by diffusers when ``invisible_watermark`` is installed) are not run;
``num_images_per_prompt``, ``guidance_rescale``, ``clip_skip``, LoRA and IP-adapters are not
accepted. Without ``latents`` the initial noise is drawn from a JAX key, so it is not the
noise a ``torch.Generator`` would draw; pass ``latents`` (and ``step_noise`` for the
stochastic schedulers) to reproduce a diffusers image.

``__call__`` is three jitted programs, also public for the MEG path (edge server: encode
and K steps; device: decode): :meth:`~StableDiffusionPipeline.encode_prompt`,
:meth:`~StableDiffusionPipeline.denoise` (the whole scheduler loop, one ``lax.scan``; one
compile per N, scheduler kind, batch, size and CFG on/off) and
:meth:`~StableDiffusionPipeline.decode`. The programs are module-level and keyed on the
modules (configs) and shapes, so pipelines of the same architecture, or the same pipeline
with another scheduler of the same kind, share them; changing N recompiles only ``denoise``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.backbone.config import UNetConfig, VAEConfig
from meg_jax.backbone.unet import UNet
from meg_jax.backbone.vae import AutoencoderKL

__all__ = [
    "PIPELINE_CLASSES",
    "PromptEmbeds",
    "StableDiffusionPipeline",
    "load_pipeline",
    "guidance_scale_embedding",
    "compiled_programs",
    "fold_step_conditioning",
    "export_student",
]

# model_index.json _class_name -> (kind, CFG allowed). LCM is the SD pipeline without CFG.
PIPELINE_CLASSES: dict[str, tuple[str, bool]] = {
    "StableDiffusionPipeline": ("sd", True),
    "LatentConsistencyModelPipeline": ("sd", False),
    "StableDiffusionXLPipeline": ("sdxl", True),
}
# Components read, the classes each may be, and which kinds need them.
_COMPONENT_CLASSES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (),  # any class meg_jax.backbone.schedulers reads (it refuses the others)
}
def guidance_scale_embedding(w: jax.Array, dim: int) -> jax.Array:
    """diffusers' ``get_guidance_scale_embedding`` (VDM): ``[B]`` -> ``[B, dim]`` float32.

    ``1000 w`` times ``exp(-i log(10000) / (dim/2 - 1))``, sin half then cos half (zero
    padded for odd ``dim``). The LCM pipelines feed it, with ``w = guidance_scale - 1``, to
    the UNet's ``timestep_cond``.
    """
    w = jnp.asarray(w, jnp.float32) * 1000.0
    half = dim // 2
    scale = jnp.log(jnp.float32(10000.0)) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
    args = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


@flax.struct.dataclass
class PromptEmbeds:
    """Encoded prompts: what the UNet cross-attends to (and SDXL's pooled embedding).

    Attributes:
      cond: ``[B, L, D]`` prompt embedding.
      uncond: ``[B, L, D]`` negative-prompt embedding (None when CFG is off).
      pooled: ``[B, E]`` SDXL pooled ``text_embeds`` of the prompt (None for SD).
      uncond_pooled: ``[B, E]`` the negative's (None for SD or without CFG).
    """

    cond: jax.Array
    uncond: jax.Array | None = None
    pooled: jax.Array | None = None
    uncond_pooled: jax.Array | None = None


def _sample_size(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusionPipeline:
    """A loaded diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, LCM); build with :func:`load_pipeline`.

    Attributes:
      path: the folder it was read from (provenance).
      class_name: ``model_index.json``'s ``_class_name``.
      kind: ``"sd"`` (SD 1.x/2.x and LCM) or ``"sdxl"``.
      cfg_allowed: False for ``LatentConsistencyModelPipeline`` (never guided by CFG).
      unet, vae: the Flax modules; ``params["unet"]``, ``params["vae"]`` their params.
      text_encoders: one (SD) or two (SDXL) CLIP text modules; params in
        ``params["text_encoders"]``; ``text_configs`` their configs.
      tokenizers: the matching ``meg_jax.backbone.clip.CLIPTokenizer`` objects.
      scheduler: ``meg_jax.backbone.schedulers.Scheduler``.
      force_zeros_for_empty_prompt: SDXL's option (zeros as the default negative).
      dtype: compute dtype of the UNet and text encoders (float32 or bfloat16).
    """

    path: str
    class_name: str
    kind: str
    cfg_allowed: bool
    unet: UNet
    vae: AutoencoderKL
    text_encoders: tuple[Any, ...]
    text_configs: tuple[Any, ...]
    tokenizers: tuple[Any, ...]
    scheduler: Any
    params: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    dtype: Any

    # ---- configuration views ---------------------------------------------------------
    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.config

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae.config

    @property
    def vae_scale_factor(self) -> int:
        """Image size / latent size (diffusers: 2 ** (len(vae block_out_channels) - 1))."""
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels when the caller gives none: UNet sample_size x vae_scale_factor."""
        h, w = _sample_size(self.unet_config.sample_size or 64)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.unet_config.in_channels

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """NHWC latent shape ``[B, h, w, C]`` for an image of ``height x width`` pixels."""
        height, width = self._size(height, width)
        f = self.vae_scale_factor
        return batch, height // f, width // f, self.latent_channels

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether diffusers runs classifier-free guidance at this scale for this pipeline."""
        return bool(self.cfg_allowed and guidance_scale > 1.0 and self.unet_config.time_cond_proj_dim is None)

    def with_scheduler(self, scheduler: Any) -> "StableDiffusionPipeline":
        """The same pipeline with another scheduler (as ``pipe.scheduler = X.from_config(...)``).

        Args:
          scheduler: a ``schedulers.Scheduler``, a scheduler config dict (diffusers'
            ``scheduler.config`` plus ``_class_name``) or a folder/JSON file.
        """
        from meg_jax.backbone import schedulers

        if not isinstance(scheduler, schedulers.Scheduler):
            scheduler = schedulers.load_scheduler(scheduler)
        return dataclasses.replace(self, scheduler=scheduler)

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        dh, dw = self.default_size
        height, width = height or dh, width or dw
        step = self.vae_scale_factor * self.unet_config.downsample_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % step:
                raise ValueError(
                    f"{name}={v!r} must be a positive multiple of {step} (VAE factor {self.vae_scale_factor} x "
                    f"UNet downsampling {self.unet_config.downsample_factor})"
                )
        return int(height), int(width)

    # ---- tokens and prompt encoding ----------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, ...]:
        """Token ids per tokenizer: one (SD) or two (SDXL) int32 ``[B, L]`` arrays (with masks)."""
        out = []
        for tok in self.tokenizers:
            ids, mask = tok.encode(prompts)
            out.append((ids, mask))
        return tuple(out)

    def _prompt_list(self, prompts: str | Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        return prompts

    def _negative_list(self, negative_prompt: str | Sequence[str] | None, batch: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch
        negative_prompt = list(negative_prompt)
        if len(negative_prompt) != batch:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts"
            )
        return negative_prompt

    def _token_inputs(
        self, prompts: list[str], negative_prompt: Any, do_cfg: bool
    ) -> tuple[tuple[Any, ...], tuple[Any, ...] | None, bool]:
        """(prompt tokens, negative tokens or None, zero_negative) for the jitted encoder."""
        toks = self.tokenize(prompts)
        zero_negative = bool(self.kind == "sdxl" and negative_prompt is None and self.force_zeros_for_empty_prompt)
        neg = None
        if do_cfg and not zero_negative:
            neg = self.tokenize(self._negative_list(negative_prompt, len(prompts)))
        return toks, neg, zero_negative

    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        guidance_scale: float = 7.5,
    ) -> PromptEmbeds:
        """Encodes prompts, and the negative prompt when CFG is on at ``guidance_scale``.

        Args:
          prompts: one prompt or B prompts.
          negative_prompt: None (diffusers' default: ``""``, or zeros for SDXL with
            ``force_zeros_for_empty_prompt``), one string for all, or B strings.
          guidance_scale: decides whether a negative embedding is made (see :meth:`uses_cfg`).

        Returns:
          :class:`PromptEmbeds` (``uncond`` None when CFG is off).
        """
        prompts = self._prompt_list(prompts)
        do_cfg = self.uses_cfg(guidance_scale)
        toks, neg, zero_negative = self._token_inputs(prompts, negative_prompt, do_cfg)
        zero_negative = zero_negative and do_cfg
        return _encode(self.params["text_encoders"], toks, neg, encoders=self.text_encoders, kind=self.kind,
                       use_masks=self._use_masks(), zero_negative=zero_negative)

    def _use_masks(self) -> tuple[bool, ...]:
        # diffusers' SD pipeline passes the attention mask when the encoder config asks; SDXL never.
        return tuple(self.kind == "sd" and bool(c.use_attention_mask) for c in self.text_configs)

    # ---- conditioning ------------------------------------------------------------------
    def time_ids(
        self,
        batch: int,
        height: int | None = None,
        width: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> np.ndarray | None:
        """SDXL ``add_time_ids`` ``[B, 6]`` float32 (None for SD): original size, crop, target size."""
        if self.kind != "sdxl":
            return None
        height, width = self._size(height, width)
        ids = list(original_size or (height, width)) + list(crops_coords_top_left) + list(target_size or (height, width))
        if len(ids) != 6:
            raise ValueError(
                f"original_size, crops_coords_top_left and target_size must be pairs, got {original_size!r}, "
                f"{crops_coords_top_left!r}, {target_size!r}"
            )
        return np.tile(np.asarray(ids, np.float32), (batch, 1))

    # ---- denoising -----------------------------------------------------------------------
    def denoise(
        self,
        embeds: PromptEmbeds,
        latents: jax.Array,
        num_inference_steps: int,
        *,
        guidance_scale: float = 7.5,
        step_noise: jax.Array | None = None,
        key: jax.Array | None = None,
        time_ids: Any = None,
    ) -> jax.Array:
        """Runs the scheduler's N steps: unit-variance noise ``[B, h, w, C]`` -> final latents (NHWC).

        Args:
          embeds: from :meth:`encode_prompt` at the same ``guidance_scale``.
          latents: ``[B, h, w, C]`` NHWC initial noise *before* ``init_noise_sigma`` (as a
            user passes it to diffusers; multiplied here).
          num_inference_steps: N (one compile per N).
          guidance_scale: CFG scale (or LCM's embedded w + 1).
          step_noise: ``[N, B, h, w, C]`` noise of the stochastic schedulers (Euler-a, LCM).
          key: PRNG key for that noise when ``step_noise`` is None.
          time_ids: SDXL ``[B, 6]`` (default from :meth:`time_ids` at the latent size).

        Returns:
          ``[B, h, w, C]`` float32 latents in the UNet's units (divide by the VAE's
          ``scaling_factor`` to decode; :meth:`decode` does).
        """
        do_cfg = self.uses_cfg(guidance_scale)
        if do_cfg and embeds.uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} runs CFG: encode the prompt at the same guidance_scale")
        b, h, w, _ = latents.shape
        if self.kind == "sdxl" and time_ids is None:
            time_ids = self.time_ids(b, h * self.vae_scale_factor, w * self.vae_scale_factor)
        plan = self.scheduler.plan(num_inference_steps)
        if self.scheduler.kind in ("euler_ancestral", "lcm") and step_noise is None and key is None:
            key = jax.random.key(0)
        return _denoise(self.params["unet"], embeds, jnp.asarray(latents, jnp.float32), plan, step_noise, key,
                        time_ids, jnp.float32(guidance_scale), unet=self.unet, kind=self.kind, do_cfg=do_cfg)

    # ---- decoding ------------------------------------------------------------------------
    def decode(self, latents: jax.Array) -> jax.Array:
        """Final latents ``[B, h, w, C]`` -> images ``[B, H, W, 3]`` float32 in [0, 1] (diffusers' "np")."""
        return _decode(self.params["vae"], jnp.asarray(latents, jnp.float32), vae=self.vae, kind=self.kind)

    # ---- the whole call ------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        *,
        key: jax.Array | None = None,
        step_noise: np.ndarray | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Text -> images, as diffusers' ``pipeline(prompt, ..., output_type="np").images``.

        Args:
          prompt: one prompt or B prompts.
          num_inference_steps: N scheduler steps (static: one compile per N).
          guidance_scale: CFG scale; CFG runs when > 1 (and the UNet has no
            ``time_cond_proj_dim``, and the pipeline is not an LCM pipeline).
          negative_prompt: see :meth:`encode_prompt`.
          latents: ``[B, C, h, w]`` float initial noise in diffusers' layout (multiplied by
            the scheduler's ``init_noise_sigma`` here, as diffusers does); None: drawn from ``key``.
          height, width: image size in pixels (default: UNet ``sample_size`` x VAE factor).
          key: PRNG key for the latents (``fold_in(key, 0)``) and the stochastic schedulers'
            step noise (``fold_in(key, 1)``); default ``jax.random.key(0)``.
          step_noise: ``[N, B, C, h, w]`` the stochastic schedulers' per-step noise in
            diffusers' layout (row i: the i-th draw of diffusers' generator).
          original_size, crops_coords_top_left, target_size: SDXL micro-conditioning
            (``(height, width)`` pairs, ``(top, left)``); default the output size and (0, 0).

        Returns:
          ``[B, H, W, 3]`` float32 images in [0, 1] (NumPy).
        """
        prompts = self._prompt_list(prompt)
        batch = len(prompts)
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if negative_prompt is not None and not self.cfg_allowed:
            raise ValueError(f"{self.class_name} does not take a negative_prompt (it never runs CFG)")
        shape = self.latent_shape(batch, height, width)
        key = jax.random.key(0) if key is None else key
        if latents is None:
            x = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        else:
            latents = np.asarray(latents)
            want = (shape[0], shape[3], shape[1], shape[2])
            if latents.shape != want:
                raise ValueError(f"latents must have diffusers' shape [B, C, h, w] = {want}, got {latents.shape}")
            x = jnp.asarray(latents.transpose(0, 2, 3, 1), jnp.float32)
        noise = None
        if step_noise is not None:
            step_noise = np.asarray(step_noise)
            want = (num_inference_steps, shape[0], shape[3], shape[1], shape[2])
            if step_noise.shape != want:
                raise ValueError(f"step_noise must have shape [N, B, C, h, w] = {want}, got {step_noise.shape}")
            noise = jnp.asarray(step_noise.transpose(0, 1, 3, 4, 2), jnp.float32)
        embeds = self.encode_prompt(prompts, negative_prompt, guidance_scale=guidance_scale)
        time_ids = self.time_ids(batch, height, width, original_size, crops_coords_top_left, target_size)
        final = self.denoise(embeds, x, int(num_inference_steps), guidance_scale=guidance_scale, step_noise=noise,
                             key=jax.random.fold_in(key, 1), time_ids=time_ids)
        return np.asarray(self.decode(final))


# ---- the jitted programs (module level: keyed on the static modules, shared by pipelines) ----


def _encode_tokens(params: Any, toks: Any, encoders: tuple[Any, ...], kind: str, use_masks: tuple[bool, ...]):
    """(embedding [B, L, D], pooled [B, E] or None) as diffusers' encode_prompt."""
    outs = [enc.apply({"params": params[i]}, ids, mask if use_masks[i] else None)
            for i, (enc, (ids, mask)) in enumerate(zip(encoders, toks))]
    if kind == "sd":
        return outs[0].last_hidden_state, None
    # SDXL: penultimate hidden states of each encoder side by side; the pooled output of the
    # encoder that has a projection (encoder 2), as diffusers takes prompt_embeds[0] when 2-D.
    pooled = [o.text_embeds for o in outs if o.text_embeds is not None][-1]
    return jnp.concatenate([o.hidden_states[-2] for o in outs], axis=-1), pooled


@functools.partial(jax.jit, static_argnames=("encoders", "kind", "use_masks", "zero_negative"))
def _encode(params, toks, neg, *, encoders, kind, use_masks, zero_negative) -> PromptEmbeds:
    cond, pooled = _encode_tokens(params, toks, encoders, kind, use_masks)
    if zero_negative:
        return PromptEmbeds(cond, jnp.zeros_like(cond), pooled, jnp.zeros_like(pooled))
    if neg is None:
        return PromptEmbeds(cond, None, pooled, None)
    uncond, uncond_pooled = _encode_tokens(params, neg, encoders, kind, use_masks)
    return PromptEmbeds(cond, uncond, pooled, uncond_pooled)


def _model_fn(unet: UNet, kind: str, params: Any, embeds: PromptEmbeds, time_ids: Any,
              guidance_scale: jax.Array, do_cfg: bool):
    """The UNet as the schedulers' ``model_fn(x, t)``, with CFG and the added conditioning."""
    cfg = unet.config
    batch = embeds.cond.shape[0]
    timestep_cond = None
    if cfg.time_cond_proj_dim is not None:
        timestep_cond = guidance_scale_embedding(jnp.broadcast_to(guidance_scale - 1.0, (batch,)),
                                                 cfg.time_cond_proj_dim)
    context = jnp.concatenate([embeds.uncond, embeds.cond]) if do_cfg else embeds.cond
    if do_cfg and timestep_cond is not None:
        timestep_cond = jnp.concatenate([timestep_cond, timestep_cond])
    added = None
    if kind == "sdxl":
        if do_cfg:
            added = {"text_embeds": jnp.concatenate([embeds.uncond_pooled, embeds.pooled]),
                     "time_ids": jnp.concatenate([time_ids, time_ids])}
        else:
            added = {"text_embeds": embeds.pooled, "time_ids": time_ids}

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        if not do_cfg:
            return unet.apply(params, x, t, context, timestep_cond=timestep_cond, added_cond_kwargs=added)
        # diffusers: one UNet call on [negative; prompt], then uncond + g (cond - uncond)
        out = unet.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), context,
                         timestep_cond=timestep_cond, added_cond_kwargs=added)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2)
        return uncond + guidance_scale * (cond - uncond)

    return model_fn


@functools.partial(jax.jit, static_argnames=("unet", "kind", "do_cfg"))
def _denoise(params, embeds, latents, plan, step_noise, key, time_ids, guidance_scale, *, unet, kind, do_cfg):
    from meg_jax.backbone import schedulers

    model_fn = _model_fn(unet, kind, params, embeds, time_ids, guidance_scale, do_cfg)
    # diffusers' prepare_latents: latents * init_noise_sigma (also for user-given latents)
    return schedulers.denoise(plan, model_fn, latents * plan.init_noise_sigma, step_noise=step_noise, key=key)


@functools.partial(jax.jit, static_argnames=("vae", "kind"))
def _decode(params, latents, *, vae, kind):
    cfg = vae.config
    z = latents.astype(jnp.float32)
    if kind == "sdxl" and cfg.latents_mean is not None and cfg.latents_std is not None:
        mean = jnp.asarray(cfg.latents_mean, jnp.float32)[None, None, None, :]  # per channel, NHWC
        std = jnp.asarray(cfg.latents_std, jnp.float32)[None, None, None, :]
        z = z * std / cfg.scaling_factor + mean
    else:
        z = z / cfg.scaling_factor
    image = vae.apply(params, z.astype(vae.dtype), method="decode")
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def compiled_programs() -> dict[str, int]:
    """How many programs each jitted piece holds (all pipelines together; for compile checks)."""
    return {"encode": _encode._cache_size(), "denoise": _denoise._cache_size(), "decode": _decode._cache_size()}


# The student's export lives in sd_export (kept importable from here).
from meg_jax.backbone.sd_export import export_student, fold_step_conditioning  # noqa: E402
from meg_jax.backbone.sd_loading import load_pipeline  # noqa: E402  (needs the class above)
