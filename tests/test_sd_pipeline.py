"""Whole pipelines: tiny SD-1.x-, SDXL- and LCM-like diffusers folders vs meg-jax's load_pipeline.

Each pipeline is built by diffusers + transformers from small configs with random weights
(perturbed so every norm and bias matters), saved with ``save_pretrained`` into a temp
folder, and run by both sides on the same prompt, the same initial latents and (for the
stochastic schedulers) the same per-step noise, drawn from the torch generator exactly as
diffusers draws it. Tolerance 1e-3 on images in [0, 1] (done-when 2): float32 on both sides,
different summation orders in convs/attention (~1e-6 relative per op) compounded over up to
25 steps stay orders of magnitude below it.

Compile time dominates (one denoise program per UNet x scheduler kind x N x CFG flag x
batch), so the grid is chosen, not full: every scheduler at least once, N = 1, 4 and 25 for
each pipeline kind, CFG off on both guided kinds, SDXL with zeros and with an encoded
negative; the other tests reuse those programs (same shapes and kinds).
"""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from sd_fixtures import random_clip_text_model, clip_text_config, save_clip_tokenizer
from transformers import CLIPTokenizer

from meg_jax.backbone import load_pipeline
from meg_jax.backbone.sd_pipeline import compiled_programs, export_student
from meg_jax.backbone.weights import WeightsError

TOL = 1e-3
PROMPTS = ["a red circle at the top left", "a photo of an astronaut riding a horse"]
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}
# SD 1.5's scheduler settings (its scheduler_config.json), the base every swap starts from.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
torch.set_num_threads(1)  # one core, as the JAX side (XLA_FLAGS in the test instructions)
MAX_LEN = 16  # tokenizer model_max_length = text positions (SD uses 77; 16 keeps the tests fast)


def perturb(module, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def tiny_unet(cross, **extra):
    return UNet2DConditionModel(
        # One resolution level: XLA's CPU compile time grows with the blocks and dominates
        # these tests; the multi-level layout is checked against diffusers in test_unet.py.
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        norm_num_groups=4, cross_attention_dim=cross, attention_head_dim=2, **extra,
    )


def tiny_vae():
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                         sample_size=16, scaling_factor=0.5)


def tokenizer(folder):
    save_clip_tokenizer(folder, model_max_length=MAX_LEN)
    return CLIPTokenizer.from_pretrained(folder)


def build(kind, root):
    """A tiny diffusers pipeline of ``kind`` saved under ``root``; returns (torch pipeline, folder)."""
    torch.manual_seed(0)
    tok = tokenizer(os.path.join(root, "_tok"))
    vae = perturb(tiny_vae(), 1)
    te = random_clip_text_model(clip_text_config(hidden_size=32, max_position_embeddings=MAX_LEN), seed=2)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if kind == "sd":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=perturb(tiny_unet(32), 3),
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "lcm":
        pipe = LatentConsistencyModelPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=perturb(tiny_unet(32, time_cond_proj_dim=8), 3),
            scheduler=LCMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        te1 = random_clip_text_model(clip_text_config(hidden_size=16, hidden_act="gelu",
                                                      max_position_embeddings=MAX_LEN), seed=4)
        te2 = random_clip_text_model(clip_text_config(hidden_size=16, hidden_act="gelu", projection_dim=16,
                                                      max_position_embeddings=MAX_LEN), with_projection=True, seed=5)
        unet = perturb(tiny_unet(32, use_linear_projection=True, addition_embed_type="text_time",
                                 addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4), 6)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=copy.deepcopy(tok), unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
        assert pipe.watermark is None  # invisible_watermark is not installed: diffusers adds none
    folder = os.path.join(root, kind)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipelines"))
    return {kind: build(kind, root) for kind in ("sd", "sdxl", "lcm")}


@pytest.fixture(scope="module")
def jax_pipelines(pipelines):
    return {kind: load_pipeline(folder) for kind, (_, folder) in pipelines.items()}


def with_scheduler(torch_pipe, jax_pipe, name):
    """Both pipelines with scheduler ``name`` built from the folder's config, as from_config does."""
    sched = SCHEDULERS[name].from_config(torch_pipe.scheduler.config)
    cfg = {**dict(sched.config), "_class_name": type(sched).__name__}
    torch_pipe = copy.copy(torch_pipe)
    torch_pipe.scheduler = sched
    return torch_pipe, jax_pipe.with_scheduler(cfg)


def draws(seed, n, shape):
    """The noise diffusers' step functions draw from ``torch.Generator().manual_seed(seed)``, in order."""
    gen = torch.Generator().manual_seed(seed)
    return np.stack([torch.randn(shape, generator=gen).numpy() for _ in range(n)])


def run_both(kind, pipelines, jax_pipelines, scheduler, steps, guidance, negative=None, batch=2, seed=0):
    torch_pipe, _ = pipelines[kind]
    torch_pipe, jax_pipe = with_scheduler(torch_pipe, jax_pipelines[kind], scheduler)
    prompts = PROMPTS[:batch]
    shape = (batch, 4, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed))
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    if negative is not None:
        kwargs["negative_prompt"] = negative
    with torch.no_grad():
        ref = torch_pipe(prompts, **kwargs).images
    step_noise = draws(seed, steps, shape)
    if scheduler == "lcm":
        step_noise[-1] = 0.0  # LCM draws no noise at its last step
    out = jax_pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents.numpy(),
                   negative_prompt=negative, step_noise=step_noise)
    assert out.shape == ref.shape == (batch, 16, 16, 3) and out.dtype == np.float32
    return out, ref, jax_pipe


def check(out, ref):
    err = np.abs(out - ref).max()
    assert np.std(ref) > 1e-2  # a real image, not a saturated or constant one
    assert err < TOL, f"max abs error {err:.2e}"
    return err


@pytest.mark.parametrize(
    "kind,scheduler,steps,guidance",
    [
        ("sd", "ddim", 1, 7.5), ("sd", "ddim", 4, 1.0), ("sd", "euler", 4, 7.5), ("sd", "euler_a", 4, 7.5),
        ("sd", "dpm++2m", 4, 7.5), ("sd", "dpm++2m", 25, 7.5),
        ("sdxl", "ddim", 4, 5.0), ("sdxl", "euler", 1, 1.0), ("sdxl", "euler_a", 25, 5.0),
        ("lcm", "lcm", 1, 8.5), ("lcm", "lcm", 4, 8.5), ("lcm", "lcm", 25, 1.0),
    ],
)
def test_images_match_diffusers(pipelines, jax_pipelines, kind, scheduler, steps, guidance):
    out, ref, _ = run_both(kind, pipelines, jax_pipelines, scheduler, steps, guidance)
    check(out, ref)


def test_sdxl_encoded_negative_prompt(pipelines, jax_pipelines):
    # a negative prompt is encoded (not zeros) even with force_zeros_for_empty_prompt
    out, ref, _ = run_both("sdxl", pipelines, jax_pipelines, "ddim", 4, 5.0, negative=["blurry", "ugly"])
    check(out, ref)
    zeros, _, _ = run_both("sdxl", pipelines, jax_pipelines, "ddim", 4, 5.0)
    assert np.abs(zeros - out).max() > 1e-2


def test_sd_negative_prompt_and_micro_conditioning(pipelines, jax_pipelines):
    out, ref, _ = run_both("sd", pipelines, jax_pipelines, "euler", 4, 7.5, negative=["low quality", "blurry"])
    check(out, ref)
    torch_pipe, _ = pipelines["sdxl"]  # the folder's scheduler: DDIM
    jax_pipe = jax_pipelines["sdxl"]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    kw = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 32))
    with torch.no_grad():
        ref = torch_pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                         output_type="np", **kw).images
    out = jax_pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=latents.numpy(), **kw)
    check(out, ref)
    plain = jax_pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=latents.numpy())
    assert np.abs(plain - out).max() > 1e-3  # the time ids reach the UNet


def test_one_compile_per_step_count(pipelines, jax_pipelines):
    pipe = jax_pipelines["sd"].with_scheduler({**SD_SCHEDULER, "_class_name": "DDIMScheduler"})
    latents = np.zeros((2, 4, 8, 8), np.float32)
    before = compiled_programs()
    a = pipe(PROMPTS, num_inference_steps=1, guidance_scale=7.5, latents=latents)
    after_first = compiled_programs()
    assert after_first["denoise"] - before["denoise"] <= 1
    b = pipe(PROMPTS[::-1], num_inference_steps=1, guidance_scale=6.0, latents=latents + 0.5)
    again = pipe.with_scheduler({**SD_SCHEDULER, "_class_name": "DDIMScheduler", "steps_offset": 0})
    again(PROMPTS, num_inference_steps=1, guidance_scale=7.5, latents=latents)
    # new prompts, scale, latents and scheduler values (same kind) reuse every program
    assert compiled_programs() == after_first
    assert np.abs(a - b).max() > 1e-3
    pipe(PROMPTS, num_inference_steps=3, guidance_scale=7.5, latents=latents)
    n2 = compiled_programs()
    assert n2["denoise"] == after_first["denoise"] + 1  # a new N compiles the loop only
    assert n2["encode"] == after_first["encode"] and n2["decode"] == after_first["decode"]


def test_pieces_compose_to_the_call(pipelines, jax_pipelines):
    """encode_prompt -> denoise -> decode (the MEG path) gives the images of __call__; SDXL's zeros negative."""
    pipe = jax_pipelines["sdxl"].with_scheduler({**SD_SCHEDULER, "_class_name": "DDIMScheduler"})
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    whole = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=latents)
    embeds = pipe.encode_prompt(PROMPTS, guidance_scale=5.0)
    assert embeds.cond.shape == (2, MAX_LEN, 32) and embeds.pooled.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(embeds.uncond), 0.0)  # force_zeros_for_empty_prompt
    final = pipe.denoise(embeds, latents.transpose(0, 2, 3, 1), 4, guidance_scale=5.0)
    images = np.asarray(pipe.decode(final))
    np.testing.assert_array_equal(images, whole)  # __call__ runs exactly these three programs


def test_bfloat16_error_is_small(pipelines, record_property):
    torch_pipe, folder = pipelines["sd"]  # the folder's scheduler: DDIM
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        ref = torch_pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(),
                         output_type="np").images
    pipe16 = load_pipeline(folder, dtype=jnp.bfloat16)
    out16 = pipe16(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=latents.numpy())
    assert jax.tree_util.tree_leaves(pipe16.params["unet"])[0].dtype == jnp.bfloat16
    assert out16.dtype == np.float32 and np.isfinite(out16).all()
    err = float(np.abs(out16 - ref).max())
    record_property("bf16_max_abs_error", err)
    print(f"bf16 max abs error vs diffusers fp32 (SD, DDIM-4, CFG 7.5): {err:.3e}")
    # bf16 keeps 8 mantissa bits (relative rounding 2**-9 ~ 2e-3 per op); a few percent after
    # 4 guided steps is expected, an error near 1 would mean a wrong cast or layout, and an
    # error below 1e-4 that the weights were not cast at all.
    assert 1e-4 < err < 0.1


def test_refuses_what_it_does_not_read(pipelines, tmp_path):
    _, folder = pipelines["sd"]
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    bad = tmp_path / "img2img"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline.*is not supported"):
        load_pipeline(bad)
    with pytest.raises(WeightsError, match="single-file checkpoints"):
        load_pipeline(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    noscheduler = tmp_path / "sched"
    noscheduler.mkdir()
    (noscheduler / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderTiny"]}))
    with pytest.raises(ValueError, match="vae is a 'AutoencoderTiny'"):
        load_pipeline(noscheduler)


def test_exported_student_runs_in_diffusers(tmp_path):
    """Done-when 4: the shipped student at K steps, exported, reproduces meg-jax's images in diffusers."""
    from meg_jax.checkpoint import load_backbone
    from meg_jax.meg import pipeline as meg

    backbone = load_backbone("checkpoints/tiny")
    steps = 2
    export_student(backbone, tmp_path / "student", steps)
    prompts = ["a red circle at the top left on a blue background", "a small green square at the center"]
    tokens = meg.tokenize(backbone, prompts)
    noise = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))

    @jax.jit
    def student_images(backbone, tokens, noise):
        context = meg.encode_text(backbone, tokens)
        return context, meg.decode_latents(backbone, meg.es_latents(backbone, context, noise, steps))

    context, images = student_images(backbone, tokens, noise)
    ours = np.clip(np.asarray(images) / 2 + 0.5, 0.0, 1.0)  # diffusers' "np" postprocessing

    # diffusers needs the empty text components named: they are listed as [null, null]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student", text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and isinstance(pipe.scheduler, DDIMScheduler)
    with torch.no_grad():
        ref = pipe(prompt_embeds=torch.from_numpy(np.asarray(context)), num_inference_steps=steps,
                   guidance_scale=7.5,  # ignored: time_cond_proj_dim turns CFG off, as the student runs
                   latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2)), output_type="np").images
    check(ours, ref)
    # the folded conditioning is K's: the same folder run for another K is a different image
    with torch.no_grad():
        other = pipe(prompt_embeds=torch.from_numpy(np.asarray(context)), num_inference_steps=steps + 2,
                     latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2)), output_type="np").images
    assert np.abs(other - ref).max() > 1e-2
