"""The merging-aware UE decoder: its training path is the pipeline's, it ships as an optional
component that ``load_backbone`` picks up, and the UE side decodes with it.

The stage's train step (a run, and its loss falling on a fixed batch) is covered with the
other stages in ``test_distill`` (``STAGES`` includes ``ue_decoder``); here the stage runs
from a shipped backbone folder (``train.run_ue_decoder_from_backbone``), which reuses that
compiled step when both modules run in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import checkpoint as ckpt
from meg_jax import parallel
from meg_jax.distill import config as dconfig
from meg_jax.distill import objectives, train
from meg_jax.meg import pipeline
from meg_jax.meg.link import LinkConfig

SHIPPED = "checkpoints/tiny"
needs_shipped = pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED, "backbone.json")),
                                   reason="shipped checkpoints not exported yet")


def test_per_sample_transmission_is_the_pipelines():
    """Sample b of ``transmit_latents_per_sample`` is the pipeline's ``transmit_latents`` output
    for that sample at its own ratio, with the same SNR vector and key."""
    k_lat, k_chan = jax.random.split(jax.random.PRNGKey(3))
    latents = jax.random.normal(k_lat, (5, 8, 8, 4))
    ratios = (0.0, 0.3, 0.7)
    index = jnp.asarray([2, 0, 1, 2, 1])
    snr = jnp.asarray([-5.0, 0.0, 7.5, 20.0, 3.0])
    link = LinkConfig()
    per_sample = jax.jit(pipeline.transmit_latents_per_sample, static_argnums=(2, 3))
    one = jax.jit(pipeline.transmit_latents, static_argnums=(1, 2))
    got = np.asarray(per_sample(latents, index, ratios, link, snr, k_chan))
    each = [np.asarray(one(latents, r, link, snr, k_chan)) for r in ratios]
    for b, i in enumerate(np.asarray(index)):
        # The same ops on the same values, selected by an exact 0/1 mask; only XLA's fusion of
        # the stacked calls may round differently (float32 eps ~1.2e-7 on values of order 1).
        np.testing.assert_allclose(got[b], each[i][b], rtol=1e-6, atol=1e-6)
        # and it is not what another ratio would have delivered (the selection matters)
        assert np.abs(got[b] - each[(i + 1) % 3][b]).max() > 1e-2


def test_training_sends_latents_through_the_pipeline(monkeypatch):
    """The stage's loss passes the frozen encoder's scaled latents through
    ``pipeline.transmit_latents_per_sample`` with the stage's ratios and link, each sample's
    ratio index and SNR drawn over the stage's grid and range."""
    config = dconfig.preset("test")
    cfg = config.ue_decoder
    calls, seen = [], []
    real = pipeline.transmit_latents_per_sample

    def spy(latents, ratio_index, merge_ratios, link, snr_db, key):
        calls.append((tuple(merge_ratios), link, latents.shape))
        jax.debug.callback(lambda i, s: seen.append((np.asarray(i), np.asarray(s))), ratio_index, snr_db)
        return real(latents, ratio_index, merge_ratios, link, snr_db, key)

    monkeypatch.setattr(pipeline, "transmit_latents_per_sample", spy)
    from meg_jax.backbone.vae import init_vae

    encoder, decoder = objectives.split_vae(init_vae(config.backbone.vae, jax.random.PRNGKey(0)))
    inputs = {"encoder": encoder, "latent_scale": jnp.float32(0.55)}
    loss_fn = objectives.ue_decoder_loss_fn(train.build_models(config), config, parallel.make_mesh())
    loss, _ = jax.jit(loss_fn)(decoder, inputs, jax.random.PRNGKey(1))
    jax.block_until_ready(loss)
    assert calls == [(tuple(cfg.merge_ratios), cfg.link(), (cfg.batch_size, 8, 8, 4))]
    (index, snr), = seen
    assert index.shape == (cfg.batch_size,) and set(index.tolist()) <= set(range(len(cfg.merge_ratios)))
    assert np.all((snr >= cfg.snr_db_range[0]) & (snr <= cfg.snr_db_range[1])) and np.ptp(snr) > 0


@pytest.fixture(scope="module")
def shipped_with_ue(tmp_path_factory):
    """A copy of the shipped backbone plus a ue_decoder trained 4 steps (test preset) from it."""
    root = tmp_path_factory.mktemp("ue")
    folder = str(root / "tiny")
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("ue_decoder"))
    before = _hashes(folder)
    config = dconfig.preset("test")
    workdir = str(root / "work")
    assert train.run_ue_decoder_from_backbone(config, folder, workdir, progress=False)
    train.export_ue_decoder(workdir, folder, config)
    return folder, workdir, config, before


def _hashes(folder: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@needs_shipped
def test_export_writes_only_the_ue_decoder_and_load_backbone_picks_it_up(shipped_with_ue):
    folder, workdir, config, before = shipped_with_ue
    after = _hashes(folder)
    assert sorted(set(after) - set(before)) == ["ue_decoder/config.json", "ue_decoder/decoder.safetensors"]
    assert {k: after[k] for k in before} == before  # every other component byte for byte
    with open(os.path.join(folder, "ue_decoder", "config.json")) as f:
        meta = json.load(f)
    assert meta["stage"] == {"ue_decoder": {"steps": config.ue_decoder.steps, "seed": config.ue_decoder.seed}}
    assert meta["stage_config"]["merge_ratios"] == list(config.ue_decoder.merge_ratios)
    assert meta["init_from"]["vae_sha256"] == before["vae/vae.safetensors"]

    bb = ckpt.load_backbone(folder)
    final = train.load_final(workdir, "ue_decoder", ("decoder",))["decoder"]
    assert sorted(bb.ue_decoder) == ["decoder", "post_quant_conv"]
    for x, y in zip(jax.tree.leaves(bb.ue_decoder), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # trained: not the shipped VAE's decoder any more
    shipped_dec = objectives.split_vae(bb.vae)[1]
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(bb.ue_decoder), jax.tree.leaves(shipped_dec)))
    assert ckpt.load_backbone(folder, ue_decoder=False).ue_decoder is None


@needs_shipped
def test_ue_side_decodes_with_the_ue_decoder(shipped_with_ue):
    folder, _, _, _ = shipped_with_ue
    bb = ckpt.load_backbone(folder)
    plain = pipeline.plain_decoder(bb)
    assert plain.ue_decoder is None and pipeline.plain_decoder(plain) is plain
    latents = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    ue = np.asarray(pipeline.ue_decode_latents(bb, latents))
    swapped = bb.replace(vae={"params": {**bb.vae["params"], **bb.ue_decoder}})
    np.testing.assert_array_equal(ue, np.asarray(pipeline.decode_latents(swapped, latents)))  # same program, same input
    np.testing.assert_array_equal(np.asarray(pipeline.ue_decode_latents(plain, latents)),
                                  np.asarray(pipeline.decode_latents(bb, latents)))
    assert np.abs(ue - np.asarray(pipeline.decode_latents(bb, latents))).max() > 1e-3
    # generate: the UE decoder by default, the plain one with ue_decoder=False
    key = jax.random.PRNGKey(1)
    tokens = jnp.ones((2, bb.config.text_encoder.max_length), jnp.int32)
    with_ue, _ = pipeline.generate(bb, tokens, 1, 0.5, LinkConfig(), key, snr_db=10.0)
    without, _ = pipeline.generate(bb, tokens, 1, 0.5, LinkConfig(), key, snr_db=10.0, ue_decoder=False)
    reference, _ = pipeline.generate(plain, tokens, 1, 0.5, LinkConfig(), key, snr_db=10.0)
    np.testing.assert_array_equal(np.asarray(without), np.asarray(reference))  # the same compiled program
    assert np.abs(np.asarray(with_ue) - np.asarray(without)).max() > 1e-3


def test_load_backbone_refuses_a_ue_decoder_that_is_not_decoder_groups(tmp_path):
    if not os.path.exists(os.path.join(SHIPPED, "backbone.json")):
        pytest.skip("shipped checkpoints not exported yet")
    folder = str(tmp_path / "tiny")
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("ue_decoder"))
    vae = ckpt.load_params(os.path.join(folder, "vae", "vae.safetensors"))
    ckpt.export_component(folder, "ue_decoder", None, {"decoder": {"encoder": vae["params"]["encoder"]}})
    with pytest.raises(ckpt.CorruptCheckpointError, match="decoder.safetensors"):
        ckpt.load_backbone(folder)


def test_stage_config_validation():
    with pytest.raises(ValueError, match="merge_ratios"):
        dconfig.UEDecoderStageConfig(merge_ratios=(0.5, 0.2))
    with pytest.raises(ValueError, match="merge_ratios"):
        dconfig.UEDecoderStageConfig(merge_ratios=(0.0, 0.8))
    with pytest.raises(ValueError, match="snr_db_range"):
        dconfig.UEDecoderStageConfig(snr_db_range=(10.0, 0.0))
    off = dataclasses.replace(dconfig.preset("test"), ue_decoder=None)
    with pytest.raises(ValueError, match="ue_decoder"):
        train.run_ue_decoder_from_backbone(off, SHIPPED, "/nonexistent", progress=False)
