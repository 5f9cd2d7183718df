"""Device profiles of the edge server (ES) and the user's device (UE), and the FLOP cost model.

Compute time is ``FLOPs / (peak FLOP/s × utilisation)``; UE energy is ``FLOPs × energy per
FLOP + receive power × transmission time`` (``/work/shared/reference/wireless.md``, "FLOP
model"). FLOP counts come from the backbone's XLA cost analysis (``meg_jax.backbone.flops``),
never from guesses; only the device numbers below are taken from datasheets and papers, each
with its source. Utilisation factors are this project's assumption (no datasheet gives one);
each is checked against a published end-to-end timing in its comment.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["DeviceProfile", "DEVICES", "device", "compute_time", "compute_energy", "reception_energy"]


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One compute device (GPU at the ES, NPU in the phone)."""

    name: str  # preset name
    peak_flops: float  # peak dense FP16 throughput, FLOP/s
    utilisation: float  # fraction of peak reached by diffusion inference, in (0, 1]
    energy_per_flop_j: float  # joules per FLOP while computing (UE; the ES only in energy_scope="system")
    rx_power_w: float  # radio power while receiving, watts (only used for the UE)
    source: str  # where the numbers come from (short citation)

    def __post_init__(self):
        if not self.peak_flops > 0:
            raise ValueError(f"DeviceProfile {self.name}: peak_flops={self.peak_flops} must be > 0")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"DeviceProfile {self.name}: utilisation={self.utilisation} must be in (0, 1]")
        if self.energy_per_flop_j < 0 or self.rx_power_w < 0:
            raise ValueError(f"DeviceProfile {self.name}: energy_per_flop_j and rx_power_w must be >= 0")

    @property
    def effective_flops(self) -> float:
        """Sustained FLOP/s: peak × utilisation."""
        return self.peak_flops * self.utilisation


# Huang et al., "A Close Examination of Performance and Power Characteristics of 4G LTE
# Networks", MobiSys 2012, Table 4: LTE radio power model base term beta = 1288.04 mW (the
# downlink throughput term, 51.97 mW/Mbit/s, is left out: it adds < 0.1 W below 2 Mbit/s
# and the payloads here are short bursts).
_LTE_RX_POWER_W = 1.288

DEVICES: dict[str, DeviceProfile] = {
    # NVIDIA L4 datasheet (2023): FP16 Tensor Core 242 TFLOP/s with sparsity, i.e. 121 TFLOP/s
    # dense; 72 W. Utilisation 0.35 is this project's assumption for batched fp16 UNet
    # inference (convolutions and attention at SD sizes keep tensor cores a third busy; no
    # measurement here backs it). ES energy enters only the environment's
    # energy_scope="system" (power under load x ES compute time: meg_jax.env.params.es_power_w).
    "edge_gpu_l4": DeviceProfile(
        name="edge_gpu_l4",
        peak_flops=121e12,
        utilisation=0.35,
        energy_per_flop_j=72.0 / (121e12 * 0.35),
        rx_power_w=0.0,
        source="NVIDIA L4 datasheet: 242 TFLOP/s FP16 sparse (121 dense), 72 W TDP",
    ),
    # NVIDIA A100 SXM4 datasheet (2020): FP16 Tensor Core 312 TFLOP/s dense, 400 W.
    "edge_gpu_a100": DeviceProfile(
        name="edge_gpu_a100",
        peak_flops=312e12,
        utilisation=0.35,
        energy_per_flop_j=400.0 / (312e12 * 0.35),
        rx_power_w=0.0,
        source="NVIDIA A100 datasheet: 312 TFLOP/s FP16 dense, 400 W (SXM4)",
    ),
    # Phone NPU. Peak: Apple A17 Pro Neural Engine "35 trillion operations per second"
    # (Apple newsroom, 12 Sep 2023), INT8 ops; FP16 is taken as half: 17.5 TFLOP/s.
    # Utilisation 0.1: Qualcomm ran SD1.5 at 512², 20 steps, in under 15 s on a Snapdragon
    # 8 Gen 2 (Qualcomm OnQ blog, Feb 2023); with ~0.8 TFLOP per guided UNet step that is
    # ~16 TFLOP / 15 s ~ 1.1 TFLOP/s sustained on a 2023 phone NPU, ~0.1 of an FP16 peak in
    # the 10–20 TFLOP/s class. Energy: ~5 W sustained SoC power under NPU load (phones are
    # thermally limited to 5–8 W; Creative Strategies "The NPU Wattage Advantage", 2024,
    # measures single-digit watts for on-device SD) over 1.75 TFLOP/s sustained
    # -> 2.9 pJ/FLOP. Receive power: LTE model above.
    "phone_npu": DeviceProfile(
        name="phone_npu",
        peak_flops=17.5e12,
        utilisation=0.1,
        energy_per_flop_j=5.0 / (17.5e12 * 0.1),
        rx_power_w=_LTE_RX_POWER_W,
        source="Apple A17 Pro NE 35 TOPS (FP16 = half); Qualcomm SD-on-8-Gen-2 demo for "
        "utilisation; ~5 W NPU-load power; LTE rx power 1.288 W (Huang et al. MobiSys 2012)",
    ),
    # Edge-class embedded GPU as a UE alternative: NVIDIA Jetson AGX Orin 64GB datasheet:
    # 275 TOPS INT8 sparse (137.5 dense; FP16 = half, 68.75 TFLOP/s), 15–60 W. Utilisation
    # 0.2, 40 W under load -> 2.9 pJ/FLOP. Receive power: LTE model above.
    "jetson_orin": DeviceProfile(
        name="jetson_orin",
        peak_flops=68.75e12,
        utilisation=0.2,
        energy_per_flop_j=40.0 / (68.75e12 * 0.2),
        rx_power_w=_LTE_RX_POWER_W,
        source="NVIDIA Jetson AGX Orin datasheet: 275 TOPS INT8 sparse, 15-60 W",
    ),
}


def device(name: str) -> DeviceProfile:
    """The named device profile; ``ValueError`` lists the names if it is unknown."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {sorted(DEVICES)}")
    return DEVICES[name]


def compute_time(flops: jax.Array | float, profile: DeviceProfile) -> jax.Array:
    """Seconds to run ``flops`` on ``profile``: ``FLOPs / (peak × utilisation)``.

    Example: 1e12 FLOP on the phone NPU: 1e12 / (17.5e12 · 0.1) = 0.5714 s.
    """
    return jnp.asarray(flops, jnp.float32) / profile.effective_flops


def compute_energy(flops: jax.Array | float, profile: DeviceProfile) -> jax.Array:
    """Joules to run ``flops`` on ``profile``: ``FLOPs × energy per FLOP``."""
    return jnp.asarray(flops, jnp.float32) * profile.energy_per_flop_j


def reception_energy(tx_time_s: jax.Array | float, profile: DeviceProfile) -> jax.Array:
    """Joules the UE's radio spends receiving for ``tx_time_s`` seconds."""
    return jnp.asarray(tx_time_s, jnp.float32) * profile.rx_power_w
