"""``meg-jax calibrate --pipeline PATH`` on the tiny SD-1.x-like diffusers pipeline (done-when 3).

The pipeline is the one tests/test_sd_pipeline.py builds (diffusers + transformers, random
weights, ``save_pretrained`` into a temp folder); the scheduler is its DDIM with the spacing
overridden to ``trailing`` (K = 1 then starts at t = 999, as a few-step ES must). Quality is
PSNR/MSE against the pipeline's own N_ref = 4-step image (4 steps, batch 2, no CFG: the program test_sd_pipeline compiles too,
so the session's compile cache serves it). Then the environment trains on
the artifact (a tiny CVPO run, the settings of conftest.TINY_CVPO_RUN). With ``--clip_model``
(a tiny random ``CLIPModel`` folder, ``sd_fixtures.save_clip_model``) the same run also holds
the CLIP score table.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CVPO_RUN
from sd_fixtures import save_clip_model
from test_sd_pipeline import build

from meg_jax.meg import artifact as artifact_lib
from meg_jax.meg import calibrate, calibrate_pipeline, generator, pipeline
from meg_jax.meg.link import LinkConfig

ARGS = ["--cost_presets", "tiny", "--steps", "1", "2", "--merge_ratios", "0.0", "0.5",
        "--snr_db", "0.0", "40.0", "--prompts_per_class", "2", "--reference_steps", "4",
        "--timestep_spacing", "trailing", "--guidance_scale", "1.0", "--no-progress"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from train import calibrate as cli

    _, folder = build("sd", str(tmp_path_factory.mktemp("pipelines")))
    out = str(tmp_path_factory.mktemp("calibration"))
    assert cli.main(["--pipeline", folder, "--out_dir", out, *ARGS]) == 0
    return folder, os.path.join(out, "sd-tiny.npz")


@pytest.fixture(scope="module")
def calibrated_clip(calibrated, tmp_path_factory):
    """The same calibration with ``--clip_model`` (same shapes: the pipeline's programs are compiled)."""
    from train import calibrate as cli

    folder, _ = calibrated
    clip = str(tmp_path_factory.mktemp("clip") / "clip-model")
    save_clip_model(clip, seed=4)  # its cosines with the two built-in prompts are > 0 (measured ~0.2)
    out = str(tmp_path_factory.mktemp("calibration-clip"))
    assert cli.main(["--pipeline", folder, "--out_dir", out, "--clip_model", clip, *ARGS]) == 0
    return clip, os.path.join(out, "sd-tiny.npz")


def test_clip_score_table(calibrated, calibrated_clip):
    clip, path = calibrated_clip
    art = artifact_lib.load(path)  # validates the optional table (shape, finite, [0, 100])
    assert art.clip_score is not None and art.clip_score.shape == art.psnr.shape == (2, 2, 2, 1)
    assert np.all(np.isfinite(art.clip_score)) and np.all((art.clip_score >= 0) & (art.clip_score <= 100))
    prov = art.provenance
    assert prov["clip_model"] == os.path.abspath(clip) and prov["clip_model_hash"] == calibrate.checkpoint_hash(clip)
    assert "CLIPScore" in prov["clip_score_definition"]
    assert np.asarray(prov["clip_score_uncompressed"]).shape == (2, 1) and len(prov["clip_score_reference"]) == 1
    # The CLIP score is measured beside PSNR, not instead: the other tables are the run without it.
    plain = artifact_lib.load(calibrated[1])
    assert plain.clip_score is None and "clip_model" not in plain.provenance
    # exact: PSNR comes from the same jitted programs (decode, _scores) on the same inputs in both
    # runs; the CLIP score is a separate program called after them
    np.testing.assert_array_equal(art.psnr, plain.psnr)
    # Not all zero (this random CLIP model's cosines with these prompts are positive): a table of
    # clamped zeros would not show a wrong image path.
    assert float(art.clip_score.max()) > 0.0
    # The reference's score, recomputed here from its images: the calibration's noise (the second
    # key of split(PRNGKey(seed), 3)), the 8-bit image in [0, 1], each image with its own prompt.
    # Same jitted programs on the same inputs: 1e-4 of a score point covers the float32 mean.
    from meg_jax.backbone.clip_score import load_clip_scorer
    from meg_jax.meg import schemes

    config = calibrate.CalibrationConfig(pipeline=calibrated[0], reference_steps=4, guidance_scale=1.0,
                                         timestep_spacing="trailing")
    gen = calibrate_pipeline.load_generator(config)
    prompts = calibrate_pipeline.read_prompts(None, 2)
    noise = jax.random.normal(jax.random.split(jax.random.PRNGKey(0), 3)[1], gen.latent_shape(2))
    reference = gen.decode(gen.reference_latents(gen.encode(prompts), noise))
    scores = np.asarray(load_clip_scorer(clip)((schemes.to_display(reference) + 1.0) / 2.0, prompts))
    assert prov["clip_score_reference"][0] == pytest.approx(float(scores.mean()), abs=1e-4)
    # K = 2 of the reference's 4 steps at 40 dB, r = 0 is 42 dB PSNR from it: nearly the same images,
    # so nearly the same mean score (measured 32.01 vs 32.36), each image scored with its own prompt.
    # The two prompts' scores differ by 10.9 points (26.9, 37.8): images scored against the wrong
    # prompt would move the mean by ~5 points; 2 points is the bound.
    assert abs(art.clip_score[1, 0, 1, 0] - scores.mean()) < 2.0


def test_artifact_is_valid_and_names_the_pipeline(calibrated):
    folder, path = calibrated
    art = artifact_lib.load(path)  # validates
    assert art.shape == (2, 2, 2, 1) and art.task_classes == ("all",)
    assert np.all(art.num_samples == 2)
    prov = art.provenance
    assert prov["backbone_checkpoint_hash"] == calibrate.checkpoint_hash(folder)
    assert prov["backbone_preset"] == "pipeline:StableDiffusionPipeline"
    assert prov["pipeline"]["path"] == folder and prov["pipeline"]["class_name"] == "StableDiffusionPipeline"
    assert prov["pipeline"]["scheduler"] == "DDIMScheduler" and prov["pipeline"]["reference_steps"] == 4
    assert prov["pipeline"]["timestep_spacing"] == "trailing"
    assert prov["command"].startswith("meg-jax calibrate --pipeline")
    assert "PSNR" in prov["accuracy_definition"]
    # accuracy = mean over images of clip(PSNR / 40, 0, 1): never above the score of the
    # mean PSNR (the clip is concave in PSNR), and in [0, 1]. Both means are of the stored
    # float32 per-prompt values (relative rounding 6e-8 each), hence 1e-7 of slack.
    assert np.all((art.accuracy >= 0) & (art.accuracy <= 1))
    assert np.all(art.accuracy <= np.clip(art.psnr / 40.0, 0, 1) + 1e-7)
    # one entry per prompt (the env's per-request replay): P = 2 images per cell
    assert art.prompts_per_class == 2 and art.prompt_psnr.shape == (2, 2, 2, 1, 2)
    mse = np.asarray(prov["mse"])
    assert mse.shape == art.psnr.shape and np.all(np.isfinite(mse)) and np.all(mse > 0)


def test_quality_follows_the_physics(calibrated):
    _, path = calibrated
    art = artifact_lib.load(path)
    psnr, mse = art.psnr[..., 0], np.asarray(art.provenance["mse"])[..., 0]  # [K, R, S]
    # Same trailing-DDIM trajectory: 2 of the reference's 4 steps land closer to its image
    # than 1 step (measured 41.8 vs 37.3 dB at 40 dB SNR, r = 0; 1 dB asserted).
    assert psnr[1, 0, 1] > psnr[0, 0, 1] + 1.0 and mse[1, 0, 1] < mse[0, 0, 1]
    # Merging half the tokens loses detail, at every K (measured 14-18 dB at 40 dB SNR).
    assert np.all(psnr[:, 1, 1] < psnr[:, 0, 1] - 3.0)
    # The analog link at 0 dB SNR is worse than at 40 dB for every (K, r) (~17 vs >= 23.5 dB).
    assert np.all(psnr[:, :, 0] < psnr[:, :, 1] - 3.0)
    unc = art.conventional_schemes["meg_uncompressed"].psnr[:, 0]
    # The reference's own latents at 40 dB: only channel noise (53 dB); better than any K < N_ref.
    assert unc[1] > psnr[:, 0, 1].max() and unc[1] > unc[0] + 10.0


def test_generate_accepts_the_pipeline(calibrated):
    from meg_jax.backbone import load_pipeline

    folder, _ = calibrated
    gen = calibrate_pipeline.load_generator(
        calibrate.CalibrationConfig(pipeline=folder, reference_steps=4, guidance_scale=1.0,
                                    timestep_spacing="trailing"))
    prompts = list(calibrate_pipeline.DEFAULT_PROMPTS[:2])
    noise = jax.random.normal(jax.random.PRNGKey(3), gen.latent_shape(2))
    link = LinkConfig(mode="analog")
    images, costs = pipeline.generate(gen, prompts, 1, 0.0, link, jax.random.PRNGKey(0), snr_db=jnp.inf,
                                      noise=noise)
    assert images.shape == (2, 16, 16, 3) and float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    # the project's [-1, 1] convention, not diffusers' [0, 1]: a random image has dark pixels
    assert float(images.min()) < -0.1
    assert costs.latency_s.shape == (2,) and np.all(np.isfinite(np.asarray(costs.latency_s)))
    # r = 0 over a noiseless analog link is the identity: the ES latents decoded as they are
    # (the same jitted programs, so only the transmit program's float32 pass-through differs: none).
    direct = gen.decode(gen.es_latents(gen.encode(prompts), noise, 1))
    np.testing.assert_allclose(np.asarray(images), np.asarray(direct), atol=1e-6)
    # A loaded pipeline object is accepted as it is (wrapped with the default options).
    assert isinstance(generator.as_generator(load_pipeline(folder)), generator.PipelineGenerator)


def test_env_trains_on_the_pipeline_artifact(calibrated, tmp_path):
    from meg_jax import run_log
    from train import cvpo

    _, path = calibrated
    argv = [a if a != "synthetic" else path for a in TINY_CVPO_RUN]
    args, config = cvpo.parse_args(["--workdir", str(tmp_path / "run"), *argv])
    result = cvpo.run(config, args.workdir, progress=False, evaluate=False)
    assert result.iterations >= 1
    records = run_log.read_metrics(args.workdir)
    assert records
    values = [v for r in records for v in r.values() if isinstance(v, (int, float))]
    assert values and np.all(np.isfinite(values))


def test_prompts_file_and_bad_input(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog \n")
    assert calibrate_pipeline.read_prompts(str(f), 3) == ["a cat", "a dog", "a cat"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt"):
        calibrate_pipeline.read_prompts(str(tmp_path / "empty.txt"), 1)
    with pytest.raises(ValueError, match="reference_steps"):
        calibrate.CalibrationConfig(pipeline="x", reference_steps=0).validate()
    with pytest.raises(ValueError, match="prompts"):
        calibrate.CalibrationConfig(prompts=str(f)).validate()
    with pytest.raises(ValueError, match="clip_model: the CLIP score is measured for --pipeline"):
        calibrate.CalibrationConfig(clip_model=str(tmp_path)).validate()
    # A CLIP folder without a vision tower fails before anything is measured, naming the file.
    from sd_fixtures import save_clip_text_encoder

    save_clip_text_encoder(tmp_path / "text_only")
    config = calibrate.CalibrationConfig(pipeline=str(tmp_path / "unused"), clip_model=str(tmp_path / "text_only"),
                                         out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"text_only/config.json: model_type='clip_text_model' has no CLIP vision"):
        calibrate.run(config, command="test", progress=False, log=lambda _: None)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(TypeError, match="MEG generator"):
        generator.as_generator(object())
