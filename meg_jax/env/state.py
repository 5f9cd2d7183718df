"""The MEG environment's state and parameters as pytrees (``flax.struct``): what ``meg_env`` steps.

``EnvParams`` holds every number the environment reads (sweep or vmap it without retracing);
``MEGCore`` is the per-UE state inside brax's ``State.pipeline_state``; ``StepNoise`` and
``ResetNoise`` are the random draws of one transition / reset (``channel.py`` draws them and
evolves the channel). The observation layout is in ``meg_env``'s module docstring.
"""

from __future__ import annotations

import math

from flax import struct
from jax import Array

__all__ = [
    "EnvParams",
    "PaperParams",
    "ChannelState",
    "MEGCore",
    "StepNoise",
    "ResetNoise",
    "observation_fields",
    "METRIC_KEYS",
    "RESET_STREAM",
]

METRIC_KEYS = (
    "quality",
    "accuracy",
    "psnr_db",
    "latency_s",
    "energy_j",
    "steps",
    "merge_ratio",
    "snr_db",
    "avg_quality",
    "avg_latency_s",
    "avg_energy_j",
)
_SQRT_HALF = math.sqrt(0.5)
RESET_STREAM = 2**31 - 1  # fold_in index of the reset draws


@struct.dataclass
class PaperParams:
    """The paper's environment (``system="paper"``) as arrays, in the authors' units (all []).

    See ``meg_jax.env.config.PaperSystem`` for the formulas; TFLOP = 1e12 FLOP, hJ = 100 J.
    """

    distance_min_m: Array  # d ~ U[min, max] per request (m)
    distance_max_m: Array
    path_loss_a_db: Array  # PL = a + b log10(d) (dB)
    path_loss_b_db: Array
    tx_power_dbm: Array  # P_tx (dBm)
    tx_power_w: Array  # P_tx (W), the transmit-energy term
    noise_dbm: Array  # N0 (dBm)
    bandwidth_hz: Array  # B (Hz)
    unet_tflop_per_step: Array  # UNet TFLOP per denoising step (all guidance passes)
    text_tflop: Array  # text encoder TFLOP per request
    vae_tflop: Array  # VAE decoder TFLOP per request (at the UE)
    es_s_per_tflop: Array  # ES seconds per TFLOP
    ue_s_per_tflop: Array  # UE seconds per TFLOP
    es_hj_per_tflop: Array  # ES hJ per TFLOP
    ue_hj_per_tflop: Array  # UE hJ per TFLOP
    base_delay_s: Array  # fixed delay per request (s)
    bias_energy_hj: Array  # fixed energy per request (hJ)
    num_tokens: Array  # merge tokens of the latent (2 x 2 patches)
    max_merged: Array  # src tokens: the most tokens merging can remove
    token_values: Array  # values per token
    latent_values: Array  # values of the whole latent
    value_bits: Array  # bits per value (fp16)
    map_fraction: Array  # values of merge map per removed value
    quality_snr_db: Array  # the artifact SNR the feature noise maps to: -20 log10(sigma) (dB)
    teacher_steps: Array  # steps of the conventional schemes (full-step teacher), for comparisons


@struct.dataclass
class EnvParams:
    """Every number the environment reads, as arrays: sweep or vmap it without retracing.

    Shapes: K steps options, R merge ratios, S SNR grid points, C task classes.
    """

    # constraints
    limits: Array  # [2] per-request average limits: latency (s), energy (J; UE or system, energy_scope)
    cost_weights: Array  # [2] info["cost"] = costs · cost_weights
    episode_length: Array  # [] int32, T requests per episode (progress and budget features)
    # requests, mobility, geometry
    slot_s: Array  # [] time between requests (s)
    task_cdf: Array  # [C] cumulative task class probabilities (last = 1)
    carrier_hz: Array  # []
    bs_height_m: Array  # []
    ue_height_m: Array  # []
    area_half_width_m: Array  # []
    min_distance_m: Array  # []
    speed_min_mps: Array  # []
    speed_max_mps: Array  # []
    heading_std_rad: Array  # []
    # large scale
    shadowing_std_los_db: Array  # []
    shadowing_std_nlos_db: Array  # []
    shadowing_decorrelation_m: Array  # []
    los_decorrelation_m: Array  # []
    # link
    tx_power_dbm: Array  # []
    noise_psd_dbm_hz: Array  # []
    noise_figure_db: Array  # []
    snr_floor_db: Array  # []
    csi_delay_s: Array  # []
    csi_error_std: Array  # []
    # calibration (from the artifact)
    steps: Array  # [K] float32 step counts
    merge_ratios: Array  # [R]
    snr_grid_db: Array  # [S]
    # [K, R, S, C x P, 2]: (accuracy reading, psnr dB) of cell c x P + p (class c, prompt p);
    # P = 1 for quality_source "class_mean" (the class tables), the artifact's P for "replay"
    quality_table: Array
    es_time_s: Array  # [K]
    payload: Array  # [R] bits (digital) or complex symbols (analog)
    side_info_bits: Array  # [R]
    ue_time_s: Array  # [R]
    ue_energy_j: Array  # [R]
    ue_receive_power_w: Array  # []
    bandwidth_hz: Array  # []
    max_merge_ratio: Array  # [] r_max of the continuous action
    reward_psnr_weight: Array  # [] reward = (1 - w) acc + w psnr / psnr_scale_db + reward_offset
    psnr_scale_db: Array  # []
    reward_offset: Array  # [] (-ln 4 for reward_metric "neg_log_mse", else 0)
    es_power_w: Array  # [] ES power while computing (W): ES compute energy of energy_scope "system"
    paper: PaperParams | None = None  # the paper's environment (system == "paper"), else None
    # static: changing these changes shapes or code paths
    scenario: str = struct.field(pytree_node=False, default="umi")
    analog: bool = struct.field(pytree_node=False, default=True)
    history_length: int = struct.field(pytree_node=False, default=4)
    system: str = struct.field(pytree_node=False, default="mobility")  # "mobility" or "paper"
    energy_scope: str = struct.field(pytree_node=False, default="ue")  # "ue" or "system"

    @property
    def num_classes(self) -> int:
        return self.task_cdf.shape[-1]

    @property
    def prompts_per_class(self) -> int:
        """P of the quality table: 1 for class-mean quality, the artifact's P for replay."""
        return self.quality_table.shape[-2] // self.num_classes

    @property
    def num_actions(self) -> int:
        """Size of the discrete action set K x R."""
        return self.steps.shape[-1] * self.merge_ratios.shape[-1]

    @property
    def obs_dim(self) -> int:
        if self.system == "paper":
            return 3
        return self.history_length + self.num_classes + 5


@struct.dataclass
class ChannelState:
    """Per-UE channel state; scalars unless noted."""

    pos: Array  # [2] UE position relative to the BS (m)
    heading: Array  # direction of motion (rad)
    speed: Array  # per-episode speed (m/s)
    rho: Array  # fading correlation between requests, J0(2π f_d slot)
    csi_rho: Array  # correlation between estimate and request instants, J0(2π f_d τ)
    a_shadow: Array  # Gudmundson coefficient of shadowing per request
    a_los: Array  # Gudmundson coefficient of the LOS latent per request
    z_los: Array  # LOS latent, N(0, 1)
    z_shadow: Array  # shadowing latent, N(0, 1)
    fading: Array  # [2] (re, im) of h ~ CN(0, 1)
    los: Array  # 1.0 in line of sight
    large_scale_snr_db: Array  # SNR without small-scale fading (dB)
    snr_db: Array  # true SNR of the current request (dB)
    est_snr_db: Array  # [H] estimated SNR, newest first (dB)


@struct.dataclass
class MEGCore:
    """Environment state held in ``brax State.pipeline_state``."""

    channel: ChannelState
    task_class: Array  # int32 class of the current request
    prompt: Array  # int32 calibration prompt of the current request within its class (0 unless replay)
    t: Array  # int32 requests served in this episode
    cum_costs: Array  # [2] latency (s), energy (J) spent in this episode
    cum_quality: Array  # summed reward in this episode
    last_costs: Array  # [2] latency (s), energy of the previous request (0 before the first)
    key: Array  # episode PRNG key (legacy uint32 [2]); step noise = episode_step_noise(key, t)


@struct.dataclass
class StepNoise:
    """The random draws of one transition (all independent)."""

    turn: Array  # N(0, 1): heading change / heading_std
    z_shadow: Array  # N(0, 1): shadowing innovation
    z_los: Array  # N(0, 1): LOS-latent innovation
    fading: Array  # [2] N(0, 1): fading innovation (re, im), scaled by sqrt(1/2)
    csi: Array  # [2] N(0, 1): CSI error (re, im), scaled by sqrt(1/2)
    task_u: Array  # U[0, 1): next request's task class by inverse CDF (and its prompt, see channel)


@struct.dataclass
class ResetNoise:
    """The random draws of one reset: initial channel plus H-1 warm-up transitions."""

    pos_u: Array  # [2] U[0, 1): position = (2u - 1) w
    heading_u: Array  # U[0, 1): heading = 2π u
    speed_u: Array  # U[0, 1): speed = v_min + u (v_max - v_min)
    z_los: Array  # N(0, 1)
    z_shadow: Array  # N(0, 1)
    fading: Array  # [2] N(0, 1), scaled by sqrt(1/2)
    csi: Array  # [2] N(0, 1)
    task_u: Array  # U[0, 1)
    warmup: StepNoise  # leaves with leading axis H-1: fills the estimate history


def observation_fields(params: EnvParams) -> dict[str, slice]:
    """Name -> slice of the observation vector (see the module docstring)."""
    if params.system == "paper":
        return {"gain_to_noise": slice(0, 1), "prev_latency": slice(1, 2), "prev_energy": slice(2, 3)}
    h, c = params.history_length, params.num_classes
    sizes = (("est_snr", h), ("mean_snr", 1), ("speed", 1), ("task", c), ("progress", 1), ("budget", 2))
    out, start = {}, 0
    for name, size in sizes:
        out[name] = slice(start, start + size)
        start += size
    return out
