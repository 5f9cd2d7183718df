"""Tests of meg_jax.meg.devices and meg_jax.meg.costs: hand-worked costs and their properties."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.meg import costs, devices
from meg_jax.meg.link import LinkConfig

RATIOS = tuple(round(0.1 * i, 1) for i in range(8))
STEPS = (1, 2, 4, 8)
SNRS = np.linspace(-5.0, 30.0, 11)


def test_every_profile_is_valid_and_cited():
    for name, p in devices.DEVICES.items():
        assert p.name == name
        assert p.peak_flops > 0 and 0 < p.utilisation <= 1
        assert p.source
    with pytest.raises(ValueError, match="phone_npu"):
        devices.device("toaster")
    with pytest.raises(ValueError, match="utilisation"):
        devices.DeviceProfile("x", 1e12, 1.5, 0.0, 0.0, "none")


def test_compute_time_and_energy_hand_worked():
    npu = devices.device("phone_npu")
    # 1e12 FLOP at 17.5e12 FLOP/s x 0.1 = 1.75e12 FLOP/s -> 0.571428 s.
    np.testing.assert_allclose(float(devices.compute_time(1e12, npu)), 1 / 1.75, rtol=1e-6)
    # Energy per FLOP = 5 W / 1.75e12 FLOP/s = 2.857e-12 J -> 2.857 J for 1e12 FLOP.
    np.testing.assert_allclose(float(devices.compute_energy(1e12, npu)), 5 / 1.75, rtol=1e-6)
    # Receiving for 10 ms at 1.288 W = 12.88 mJ.
    np.testing.assert_allclose(float(devices.reception_energy(0.01, npu)), 0.01288, rtol=1e-6)
    gpu = devices.device("edge_gpu_l4")
    # 121e12 x 0.35 = 42.35e12 FLOP/s -> 1e12 FLOP in 23.61 ms.
    np.testing.assert_allclose(float(devices.compute_time(1e12, gpu)), 1 / 42.35, rtol=1e-6)


def test_meg_costs_hand_worked_tiny():
    # Made-up round FLOP counts so the arithmetic is checkable by hand.
    preset = dataclasses.replace(
        costs.cost_preset("tiny"), text_encoder_flops=1e9, unet_flops=2e10, vae_decoder_flops=3.5e11
    )
    link = LinkConfig(mode="digital", bits=8, bandwidth_hz=1e6)
    c = costs.meg_costs(preset, link, 4, 0.5, 10 * np.log10(3.0))
    # ES: (1e9 + 4 x 2e10) / 42.35e12 = 8.1e10 / 42.35e12 = 1.91263 ms.
    np.testing.assert_allclose(float(c.es_time_s), 8.1e10 / 42.35e12, rtol=1e-6)
    # Air: 1258 bits (tests/test_link.py) at 2 Mbit/s = 629 us.
    np.testing.assert_allclose(float(c.payload_bits), 1258, rtol=1e-6)  # float32 count
    np.testing.assert_allclose(float(c.tx_time_s), 629e-6, rtol=1e-5)
    # UE: 3.5e11 / 1.75e12 = 0.2 s; energy 3.5e11 x 2.857e-12 = 1.0 J, + 629e-6 x 1.288 W.
    np.testing.assert_allclose(float(c.ue_time_s), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(c.ue_compute_energy_j), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(c.ue_rx_energy_j), 629e-6 * 1.288, rtol=1e-5)
    np.testing.assert_allclose(float(c.ue_energy_j), 1.0 + 629e-6 * 1.288, rtol=1e-6)
    np.testing.assert_allclose(float(c.latency_s), 8.1e10 / 42.35e12 + 629e-6 + 0.2, rtol=1e-6)


def _latency(preset, link, k, r):
    return np.asarray(costs.meg_costs(preset, link, k, r, SNRS).latency_s)


@pytest.mark.parametrize("name", sorted(costs.COST_PRESETS))
@pytest.mark.parametrize("mode,bits", [("analog", 8), ("digital", 4), ("digital", 8)])
def test_latency_non_increasing_as_steps_fall(name, mode, bits):
    preset = costs.cost_preset(name)
    link = LinkConfig(mode=mode, bits=bits)
    for r in RATIOS:
        lat = np.stack([_latency(preset, link, k, r) for k in STEPS])  # [K, S]
        assert np.all(np.diff(lat, axis=0) >= 0), (name, mode, r)


@pytest.mark.parametrize("name", sorted(costs.COST_PRESETS))
@pytest.mark.parametrize("bits", [6, 8])
def test_latency_non_increasing_as_merge_rises_digital(name, bits):
    # Every merged token saves C·b = 24 or 32 bits and costs at most about
    # log2(N_dst) + log2(e·N_src/r) map bits (16.4 at sdxl-1024, r = 0.1): a net saving at
    # every SNR, since both go at the same Shannon rate.
    preset = costs.cost_preset(name)
    link = LinkConfig(mode="digital", bits=bits)
    for k in STEPS:
        lat = np.stack([_latency(preset, link, k, r) for r in RATIOS])  # [R, S]
        assert np.all(np.diff(lat, axis=0) <= 0), (name, bits, k)


@pytest.mark.parametrize("name", sorted(costs.COST_PRESETS))
def test_latency_non_increasing_as_merge_rises_analog_high_snr(name):
    # Analog: a merged token saves C/2 = 2 symbols (2/B s) but adds ~8.4 (tiny) to ~16.4
    # (sdxl) map bits sent at B·log2(1 + SNR): merging pays only when log2(1 + SNR) exceeds
    # about 8.2, i.e. above ~25 dB at sdxl-1024 (see docs/meg_system.md). At 30 dB it must.
    preset = costs.cost_preset(name)
    link = LinkConfig(mode="analog")
    lat = np.stack([np.asarray(costs.meg_costs(preset, link, 4, r, 30.0).latency_s) for r in RATIOS])
    assert np.all(np.diff(lat) <= 0), name
    # The feature symbols themselves always fall with r.
    sym = [float(costs.latent_payload(preset, link, r).data_symbols) for r in RATIOS]
    assert all(a > b for a, b in zip(sym, sym[1:]))


def test_analog_low_snr_merging_costs_air_time():
    # The flip side, asserted so a change in the map accounting shows up: at -5 dB the
    # 48-bit map of r = 0.1 on the tiny grid (tests/test_link.py arithmetic: log2(C(48, 6)
    # · 16^6) = 47.5 -> 48 bits) takes 48 / log2(1.316) = 121 symbol times, more than the
    # 12 symbols that 6 merged tokens save.
    preset = costs.cost_preset("tiny")
    link = LinkConfig(mode="analog", bandwidth_hz=1e6)
    assert costs.merge_map_bits(preset, 0.1) == 48
    t0 = float(costs.meg_costs(preset, link, 1, 0.0, -5.0).tx_time_s)
    t1 = float(costs.meg_costs(preset, link, 1, 0.1, -5.0).tx_time_s)
    assert t1 > t0


@pytest.mark.parametrize("name", sorted(costs.COST_PRESETS))
@pytest.mark.parametrize("mode", ["analog", "digital"])
def test_ue_energy_never_negative(name, mode):
    preset = costs.cost_preset(name)
    link = LinkConfig(mode=mode)
    snrs = jnp.array([-30.0, -5.0, 0.0, 30.0, jnp.inf])
    for k in STEPS:
        for r in RATIOS:
            c = costs.meg_costs(preset, link, k, r, snrs)
            assert bool(jnp.all(c.ue_energy_j >= 0)) and bool(jnp.all(c.ue_rx_energy_j >= 0))
            assert bool(jnp.all(jnp.isfinite(c.latency_s)))
    for c in (
        costs.uncompressed_costs(preset, link, snrs),
        costs.centralised_costs(preset, link, snrs, image_bits=1e5),
        costs.on_device_costs(preset, snrs),
    ):
        assert bool(jnp.all(c.ue_energy_j >= 0))


def test_conventional_schemes_structure():
    preset = costs.cost_preset("sdxl-1024")
    link = LinkConfig()
    on_device = costs.on_device_costs(preset)
    assert float(on_device.es_time_s) == 0 and float(on_device.tx_time_s) == 0
    central = costs.centralised_costs(preset, link, 10.0, image_bits=8e6)
    assert float(central.ue_time_s) == 0 and float(central.ue_compute_energy_j) == 0
    # 8e6 bits at 20 MHz x log2(11) = 69.19 Mbit/s -> 0.11562 s.
    np.testing.assert_allclose(float(central.tx_time_s), 8e6 / (20e6 * np.log2(11.0)), rtol=1e-5)
    unc = costs.uncompressed_costs(preset, link, 10.0)
    meg = costs.meg_costs(preset, link, 8, 0.5, 10.0)
    assert float(meg.es_time_s) < float(unc.es_time_s)


def test_presets_scale_with_resolution():
    tiny, sd15, sdxl = (costs.cost_preset(n) for n in ("tiny", "sd15-512", "sdxl-1024"))
    assert tiny.unet_flops < sd15.unet_flops < sdxl.unet_flops
    assert tiny.vae_decoder_flops < sd15.vae_decoder_flops < sdxl.vae_decoder_flops
    assert (tiny.num_tokens, sd15.num_tokens, sdxl.num_tokens) == (64, 4096, 16384)
    with pytest.raises(ValueError, match="sdxl-1024"):
        costs.cost_preset("sd3")
