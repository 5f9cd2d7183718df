"""Cost model of one generation request: compute, payload, air time, UE energy, latency.

A request is split as DESIGN.md section 5 says: the ES runs the text encoder and K UNet
steps, merges the ``h·w`` latent tokens with ratio r and sends them; the UE unmerges and runs
the VAE decoder. Every term of :class:`Costs` follows from

* the exact FLOP counts of the architecture (``meg_jax.backbone.flops``, XLA cost analysis
  on abstract shapes) stored in a :class:`CostPreset` (``tiny``, ``sd15-512``,
  ``sdxl-1024``; :func:`measure_cost_preset` recomputes them),
* the device profiles (``meg_jax.meg.devices``): time = FLOPs / (peak · utilisation), UE
  energy = FLOPs · J/FLOP + receive power · air time,
* the link (``meg_jax.meg.link``): payload bits / symbols including the merge map; air time,
  latency and energy by ``meg_jax.meg.pricing`` (Shannon rate at max(SNR, the link's floor)).

Not counted (said here so nobody has to guess): the ES's merge (one cosine-similarity matrix
of ``N_src × N_dst × C`` multiply-adds, < 0.1% of one UNet step at every preset), the UE's
unmerge (a gather), the uplink of the prompt (tens of bytes), and queueing.

The functions are jnp code: ``snr_db`` may be an array (any shape), the step count and the
merge ratio are Python numbers (they fix the payload size exactly, with integer bit counts).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from meg_jax.backbone import tome
from meg_jax.meg import devices as devices_lib
from meg_jax.meg import link as link_lib
from meg_jax.meg import pricing
from meg_jax.meg.link import LinkConfig

__all__ = [
    "Costs",
    "CostPreset",
    "COST_PRESETS",
    "cost_preset",
    "measure_cost_preset",
    "num_merged_tokens",
    "merge_map_bits",
    "latent_payload",
    "system_costs",
    "meg_costs",
    "uncompressed_costs",
    "centralised_costs",
    "on_device_costs",
]


@struct.dataclass
class Costs:
    """Every cost term of one request (arrays broadcast over the SNR's shape).

    Attributes:
      es_time_s: ES compute time (text encoder + UNet steps [+ decoder]), seconds.
      payload_bits: digitally sent bits (features in digital mode, side information always).
      payload_symbols: analog complex channel uses of the features (0 in digital mode).
      tx_time_s: air time of the payload, seconds.
      ue_time_s: UE compute time, seconds.
      ue_compute_energy_j: UE compute energy, joules.
      ue_rx_energy_j: UE radio energy while receiving, joules.
      ue_energy_j: ``ue_compute_energy_j + ue_rx_energy_j``.
      latency_s: ``es_time_s + tx_time_s + ue_time_s`` (the stages run one after another).
    """

    es_time_s: jax.Array
    payload_bits: jax.Array
    payload_symbols: jax.Array
    tx_time_s: jax.Array
    ue_time_s: jax.Array
    ue_compute_energy_j: jax.Array
    ue_rx_energy_j: jax.Array
    ue_energy_j: jax.Array
    latency_s: jax.Array


@dataclasses.dataclass(frozen=True)
class CostPreset:
    """Sizes and exact FLOP counts of one architecture at one resolution, and its devices."""

    name: str  # preset name ("tiny", "sd15-512", "sdxl-1024")
    backbone: str  # meg_jax.backbone.config preset the counts come from
    image_size: int  # generated image height = width, pixels
    latent_size: int  # latent height = width (tokens per side of the transmitted grid)
    latent_channels: int  # C, real values per latent token
    text_encoder_flops: float  # one prompt through the text encoder, FLOP
    unet_flops: float  # one UNet forward at batch 1, FLOP
    vae_decoder_flops: float  # one latent through the VAE decoder, FLOP
    teacher_unet_evals: int = 2  # UNet forwards per teacher step (2: classifier-free guidance)
    student_unet_evals: int = 1  # UNet forwards per student step (guidance distilled away)
    teacher_steps: int = 50  # steps of the conventional schemes (the reference)
    es_device: str = "edge_gpu_l4"  # meg_jax.meg.devices profile of the edge server
    ue_device: str = "phone_npu"  # meg_jax.meg.devices profile of the user's device
    merge_sx: int = 2  # ToMe destination stride on the transmitted grid (x)
    merge_sy: int = 2  # ToMe destination stride on the transmitted grid (y)
    merge_random_dst: bool = False  # False: top-left dst per cell (known to the UE, 0 bits)

    @property
    def num_tokens(self) -> int:
        """``N = h·w`` latent tokens."""
        return self.latent_size * self.latent_size

    @property
    def es(self) -> devices_lib.DeviceProfile:
        return devices_lib.device(self.es_device)

    @property
    def ue(self) -> devices_lib.DeviceProfile:
        return devices_lib.device(self.ue_device)


# Exact counts from ``measure_cost_preset`` (meg_jax.backbone.flops: XLA cost analysis of the
# architecture on abstract shapes, batch 1). Regenerate with
#   python -c "from meg_jax.meg.costs import measure_cost_preset as m; print(m('sd15-512'))"
# (prompt length = the text encoder's max_length: 16 for tiny, 77 for SD1.5/SDXL; SDXL's UNet
# with its text_time conditioning). tests/test_pipeline.py checks the tiny numbers against a
# fresh measurement.
COST_PRESETS: dict[str, CostPreset] = {
    "tiny": CostPreset(
        name="tiny",
        backbone="tiny",
        image_size=32,
        latent_size=8,
        latent_channels=4,
        text_encoder_flops=1160304.0,
        unet_flops=31864328.0,
        vae_decoder_flops=120070512.0,
    ),
    "sd15-512": CostPreset(
        name="sd15-512",
        backbone="sd15",
        image_size=512,
        latent_size=64,
        latent_channels=4,
        text_encoder_flops=13510609920.0,
        unet_flops=788804534272.0,
        vae_decoder_flops=2504093597696.0,
    ),
    "sdxl-1024": CostPreset(
        name="sdxl-1024",
        backbone="sdxl",
        image_size=1024,
        latent_size=128,
        latent_channels=4,
        text_encoder_flops=251072282624.0,
        unet_flops=6771165364224.0,
        vae_decoder_flops=10461991927808.0,
    ),
}


def cost_preset(name: str, **overrides) -> CostPreset:
    """The named cost preset, with optional field overrides (e.g. ``ue_device="jetson_orin"``)."""
    if name not in COST_PRESETS:
        raise ValueError(f"unknown cost preset {name!r}; choose one of {sorted(COST_PRESETS)}")
    return dataclasses.replace(COST_PRESETS[name], **overrides)


@functools.lru_cache(maxsize=None)
def measure_cost_preset(name: str) -> CostPreset:
    """Recomputes a preset's FLOP counts with ``meg_jax.backbone.flops`` (slow for SDXL)."""
    from meg_jax.backbone import flops
    from meg_jax.backbone.config import preset as backbone_preset

    base = cost_preset(name)
    config = backbone_preset(base.backbone)
    hw = (base.latent_size, base.latent_size)
    return dataclasses.replace(
        base,
        text_encoder_flops=float(flops.text_encoder_flops(config)),
        unet_flops=float(flops.unet_flops(config, hw)),
        vae_decoder_flops=float(flops.vae_decoder_flops(config, hw)),
    )


# ----------------------------------------------------------------------------- payload


def num_merged_tokens(preset: CostPreset, merge_ratio: float) -> int:
    """``r = floor(ratio · h·w)`` capped at the number of src tokens (``tome.num_merged``)."""
    n = preset.latent_size
    return tome.num_merged(n * n, merge_ratio, preset.merge_sx, preset.merge_sy, n, n)


def merge_map_bits(preset: CostPreset, merge_ratio: float) -> int:
    """Bits of the merge map the UE needs to unmerge (``tome.side_info_bits``)."""
    n = preset.latent_size
    r = num_merged_tokens(preset, merge_ratio)
    return tome.side_info_bits(n, n, r, preset.merge_sx, preset.merge_sy, use_rand=preset.merge_random_dst)


def latent_payload(preset: CostPreset, link: LinkConfig, merge_ratio: float) -> link_lib.Payload:
    """Payload of one merged latent: ``(h·w − r) · C`` values plus range/scale and the map.

    Example (tiny, digital 8 bit, r = 0.5): N = 64, r = 32 -> 32 · 4 = 128 values ->
    1024 data bits; side = 64 (range) + map bits (see tests/test_link.py).
    """
    sent_tokens = preset.num_tokens - num_merged_tokens(preset, merge_ratio)
    return link_lib.payload(link, sent_tokens * preset.latent_channels, merge_map_bits(preset, merge_ratio))


# ----------------------------------------------------------------------------- costs


def system_costs(
    es_flops: float | jax.Array,
    ue_flops: float | jax.Array,
    load: link_lib.Payload,
    link: LinkConfig,
    snr_db: jax.Array | float,
    es: devices_lib.DeviceProfile,
    ue: devices_lib.DeviceProfile,
) -> Costs:
    """Assembles :class:`Costs` from FLOPs on each side and a payload at ``snr_db``.

    Args:
      es_flops: FLOPs run at the edge server.
      ue_flops: FLOPs run on the user's device.
      load: what goes on the air (zero payload: nothing is sent).
      link: the link (bandwidth; mode only matters through ``load``).
      snr_db: receive SNR in dB, any shape; ``+inf`` for a noiseless link.
      es, ue: device profiles.
    """
    snr_db = jnp.asarray(snr_db, jnp.float32)
    es_time = devices_lib.compute_time(es_flops, es) + jnp.zeros_like(snr_db)
    ue_time = devices_lib.compute_time(ue_flops, ue) + jnp.zeros_like(snr_db)
    tx_time = link_lib.transmission_time(link, load, snr_db)
    ue_comp_e = devices_lib.compute_energy(ue_flops, ue) + jnp.zeros_like(snr_db)
    latency, energy = pricing.request_costs(es_time, tx_time, ue_time, ue_comp_e, ue.rx_power_w)
    return Costs(
        es_time_s=es_time,
        payload_bits=load.total_bits + jnp.zeros_like(snr_db),
        payload_symbols=load.data_symbols + jnp.zeros_like(snr_db),
        tx_time_s=tx_time,
        ue_time_s=ue_time,
        ue_compute_energy_j=ue_comp_e,
        ue_rx_energy_j=devices_lib.reception_energy(tx_time, ue),
        ue_energy_j=energy,
        latency_s=latency,
    )


def meg_costs(
    preset: CostPreset,
    link: LinkConfig,
    steps: int,
    merge_ratio: float,
    snr_db: jax.Array | float,
    *,
    teacher: bool = False,
) -> Costs:
    """Costs of MEG with ``steps`` ES steps and merge ratio ``merge_ratio`` at ``snr_db``.

    ES: text encoder + ``steps`` · (UNet forwards per step) · UNet; UE: VAE decoder.

    Args:
      preset: architecture, FLOPs and devices.
      link: the link.
      steps: K, denoising steps at the ES.
      merge_ratio: r, fraction of latent tokens merged away before sending.
      snr_db: receive SNR, dB (any shape).
      teacher: run the teacher (``teacher_unet_evals`` forwards per step, guidance) instead
        of the step-conditioned student.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    evals = preset.teacher_unet_evals if teacher else preset.student_unet_evals
    es_flops = preset.text_encoder_flops + steps * evals * preset.unet_flops
    load = latent_payload(preset, link, merge_ratio)
    return system_costs(es_flops, preset.vae_decoder_flops, load, link, snr_db, preset.es, preset.ue)


def uncompressed_costs(preset: CostPreset, link: LinkConfig, snr_db: jax.Array | float) -> Costs:
    """Conventional scheme (b), MEG without compression: teacher at full steps, r = 0."""
    return meg_costs(preset, link, preset.teacher_steps, 0.0, snr_db, teacher=True)


def centralised_costs(
    preset: CostPreset, link: LinkConfig, snr_db: jax.Array | float, image_bits: float
) -> Costs:
    """Conventional scheme (a): the ES runs everything and sends the image file.

    Args:
      image_bits: size of the encoded image (PNG) in bits, sent at the Shannon rate.
    """
    es_flops = (
        preset.text_encoder_flops
        + preset.teacher_steps * preset.teacher_unet_evals * preset.unet_flops
        + preset.vae_decoder_flops
    )
    load = link_lib.Payload(
        data_bits=jnp.asarray(image_bits, jnp.float32),
        data_symbols=jnp.zeros((), jnp.float32),
        side_bits=jnp.zeros((), jnp.float32),
    )
    return system_costs(es_flops, 0.0, load, link, snr_db, preset.es, preset.ue)


def on_device_costs(preset: CostPreset, snr_db: jax.Array | float = jnp.inf) -> Costs:
    """Conventional scheme (c): the UE runs text encoder, teacher UNet and decoder; no link."""
    ue_flops = (
        preset.text_encoder_flops
        + preset.teacher_steps * preset.teacher_unet_evals * preset.unet_flops
        + preset.vae_decoder_flops
    )
    zero = jnp.zeros((), jnp.float32)
    load = link_lib.Payload(data_bits=zero, data_symbols=zero, side_bits=zero)
    return system_costs(0.0, ue_flops, load, LinkConfig(), snr_db, preset.es, preset.ue)
