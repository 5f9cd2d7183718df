"""The MEG environment's dynamics written plainly in NumPy, vectorized over N envs.

An independent re-implementation of ``meg_env.py`` (SciPy's ``j0``/``ndtr`` instead of the
JAX approximations, ``searchsorted`` instead of comparisons) for two uses:

* the parity test feeds it the same random draws as the JAX env (``ResetNoise`` /
  ``StepNoise`` leaves with a leading batch axis, as NumPy arrays) and compares trajectories;
* the throughput benchmark (``eval/bench_env.py``) runs it as the NumPy baseline, drawing
  noise with an explicitly passed ``numpy.random.Generator``.

States are dicts of arrays with leading axis N. Nothing here imports JAX.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy import special

__all__ = [
    "params_to_numpy",
    "reset",
    "step",
    "observe",
    "price",
    "sample_step_noise",
    "sample_reset_noise",
    "NumpyMEGEnv",
]

C_LIGHT = 299_792_458.0
SQRT_HALF = np.sqrt(0.5)
STATIC_FIELDS = ("scenario", "analog", "history_length", "system", "energy_scope")


def params_to_numpy(params: Any, dtype: Any = np.float64) -> dict[str, Any]:
    """``EnvParams`` (any object with its fields) → dict of NumPy arrays and the static fields."""
    out: dict[str, Any] = {}
    for name in params.__dataclass_fields__:
        value = getattr(params, name)
        if name in STATIC_FIELDS or value is None:  # paper: None outside system="paper" (not modelled here)
            out[name] = value
        elif name == "episode_length":
            out[name] = int(np.asarray(value))
        else:
            out[name] = np.asarray(value, dtype=dtype)
    return out


def _as_dict(noise: Any) -> dict[str, Any]:
    if isinstance(noise, Mapping):
        return dict(noise)
    return {k: getattr(noise, k) for k in noise.__dataclass_fields__}


# ----------------------------------------------------------------------- channel
def _path_loss(p: Mapping[str, Any], d2d: np.ndarray, los: np.ndarray) -> np.ndarray:
    fc = p["carrier_hz"] / 1e9
    hb, hu = p["bs_height_m"], p["ue_height_m"]
    d3d = np.sqrt(d2d**2 + (hb - hu) ** 2)
    bp = 4.0 * (hb - 1.0) * (hu - 1.0) * p["carrier_hz"] / C_LIGHT
    if p["scenario"] == "umi":
        pl1 = 32.4 + 21.0 * np.log10(d3d) + 20.0 * np.log10(fc)
        pl2 = 32.4 + 40.0 * np.log10(d3d) + 20.0 * np.log10(fc) - 9.5 * np.log10(bp**2 + (hb - hu) ** 2)
        pl_nlos = 35.3 * np.log10(d3d) + 22.4 + 21.3 * np.log10(fc) - 0.3 * (hu - 1.5)
    else:
        pl1 = 28.0 + 22.0 * np.log10(d3d) + 20.0 * np.log10(fc)
        pl2 = 28.0 + 40.0 * np.log10(d3d) + 20.0 * np.log10(fc) - 9.0 * np.log10(bp**2 + (hb - hu) ** 2)
        pl_nlos = 13.54 + 39.08 * np.log10(d3d) + 20.0 * np.log10(fc) - 0.6 * (hu - 1.5)
    pl_los = np.where(d2d <= bp, pl1, pl2)
    return np.where(los > 0.5, pl_los, np.maximum(pl_los, pl_nlos))


def _los_probability(p: Mapping[str, Any], d2d: np.ndarray) -> np.ndarray:
    d = np.maximum(d2d, 18.0)
    if p["scenario"] == "umi":
        prob = 18.0 / d + np.exp(-d / 36.0) * (1.0 - 18.0 / d)
    else:
        hu = p["ue_height_m"]
        c_prime = 0.0 if hu <= 13.0 else ((min(hu, 23.0) - 13.0) / 10.0) ** 1.5
        prob = (18.0 / d + np.exp(-d / 63.0) * (1.0 - 18.0 / d)) * (1.0 + c_prime * 1.25 * (d / 100.0) ** 3 * np.exp(-d / 150.0))
    return np.where(d2d <= 18.0, 1.0, np.minimum(prob, 1.0))


def _measure(p, pos, z_los, z_shadow, fading, csi_rho, csi):
    """Returns (los, large-scale SNR dB, SNR dB, estimated SNR dB), each [N]."""
    d2d = np.maximum(np.hypot(pos[:, 0], pos[:, 1]), p["min_distance_m"])
    los = (special.ndtr(z_los) < _los_probability(p, d2d)).astype(pos.dtype)
    sigma = np.where(los > 0.5, p["shadowing_std_los_db"], p["shadowing_std_nlos_db"])
    noise_dbm = p["noise_psd_dbm_hz"] + 10.0 * np.log10(p["bandwidth_hz"]) + p["noise_figure_db"]
    large = p["tx_power_dbm"] - _path_loss(p, d2d, los) - sigma * z_shadow - noise_dbm
    snr = large + 10.0 * np.log10(np.maximum(np.sum(fading**2, axis=-1), 1e-12))
    scale = np.sqrt(np.maximum(1.0 - csi_rho**2, 0.0) + p["csi_error_std"] ** 2) * SQRT_HALF
    est = csi_rho[:, None] * fading + scale[:, None] * csi
    est_snr = large + 10.0 * np.log10(np.maximum(np.sum(est**2, axis=-1), 1e-12))
    return los, large, snr, est_snr


def _evolve(p, s: dict, n: Mapping[str, np.ndarray]) -> dict:
    heading = s["heading"] + p["heading_std_rad"] * n["turn"]
    step_m = s["speed"] * p["slot_s"]
    w = p["area_half_width_m"]
    x = s["pos"][:, 0] + step_m * np.cos(heading)
    y = s["pos"][:, 1] + step_m * np.sin(heading)
    # reflect at the walls: a wall crossing mirrors the position and the heading
    heading = np.where(np.abs(x) > w, np.pi - heading, heading)
    x = np.where(x > w, 2 * w - x, np.where(x < -w, -2 * w - x, x))
    heading = np.where(np.abs(y) > w, -heading, heading)
    y = np.where(y > w, 2 * w - y, np.where(y < -w, -2 * w - y, y))
    pos = np.stack([x, y], axis=-1)
    z_los = s["a_los"] * s["z_los"] + np.sqrt(1 - s["a_los"] ** 2) * n["z_los"]
    z_sh = s["a_shadow"] * s["z_shadow"] + np.sqrt(1 - s["a_shadow"] ** 2) * n["z_shadow"]
    fading = s["rho"][:, None] * s["fading"] + (np.sqrt(1 - s["rho"] ** 2) * SQRT_HALF)[:, None] * n["fading"]
    los, large, snr, est = _measure(p, pos, z_los, z_sh, fading, s["csi_rho"], n["csi"])
    history = np.concatenate([est[:, None], s["est_snr_db"][:, :-1]], axis=1)
    return {**s, "pos": pos, "heading": heading, "z_los": z_los, "z_shadow": z_sh, "fading": fading,
            "los": los, "large_scale_snr_db": large, "snr_db": snr, "est_snr_db": history}


def _task_class(p, u: np.ndarray) -> np.ndarray:
    return np.searchsorted(p["task_cdf"][:-1], u, side="right").astype(np.int64)


def _prompts_per_class(p) -> int:
    return p["quality_table"].shape[-2] // len(p["task_cdf"])


def _prompt(p, u: np.ndarray) -> np.ndarray:
    """Prompt index: where u lies within its class's CDF interval, times P (0 unless replay)."""
    num = _prompts_per_class(p)
    edges = np.concatenate([[0.0], p["task_cdf"][:-1], [1.0]])
    c = _task_class(p, u)
    within = (u - edges[c]) / (edges[c + 1] - edges[c])
    return np.clip(np.floor(within * num), 0, num - 1).astype(np.int64)


def reset(p: Mapping[str, Any], noise: Any) -> dict[str, np.ndarray]:
    """Initial states [N] from reset draws (fields of ``ResetNoise`` with a leading N axis)."""
    n = _as_dict(noise)
    speed = p["speed_min_mps"] + n["speed_u"] * (p["speed_max_mps"] - p["speed_min_mps"])
    pos = (2.0 * n["pos_u"] - 1.0) * p["area_half_width_m"]
    f_d = speed * p["carrier_hz"] / C_LIGHT
    rho = special.j0(2 * np.pi * f_d * p["slot_s"])
    csi_rho = special.j0(2 * np.pi * f_d * p["csi_delay_s"])
    fading = SQRT_HALF * n["fading"]
    los, large, snr, est = _measure(p, pos, n["z_los"], n["z_shadow"], fading, csi_rho, n["csi"])
    h = p["history_length"]
    s = {
        "pos": pos, "heading": 2 * np.pi * n["heading_u"], "speed": speed, "rho": rho, "csi_rho": csi_rho,
        "a_shadow": np.exp(-speed * p["slot_s"] / p["shadowing_decorrelation_m"]),
        "a_los": np.exp(-speed * p["slot_s"] / p["los_decorrelation_m"]),
        "z_los": n["z_los"], "z_shadow": n["z_shadow"], "fading": fading, "los": los,
        "large_scale_snr_db": large, "snr_db": snr, "est_snr_db": np.repeat(est[:, None], h, axis=1),
    }
    warm = _as_dict(n["warmup"])  # leaves [N, H-1, ...]
    for j in range(h - 1):
        s = _evolve(p, s, {k: v[:, j] for k, v in warm.items()})
    s["task_class"] = _task_class(p, n["task_u"])
    s["prompt"] = _prompt(p, n["task_u"])
    s["t"] = np.zeros(len(speed), np.int64)
    s["cum_costs"] = np.zeros((len(speed), 2), pos.dtype)
    s["cum_quality"] = np.zeros(len(speed), pos.dtype)
    return s


def price(p: Mapping[str, Any], snr_db: np.ndarray, cls: np.ndarray, k_idx: np.ndarray, r: np.ndarray,
          prompt: np.ndarray | None = None) -> dict:
    """Quality (bilinear in r and clamped SNR, nearest K) and costs of each request [N].

    ``prompt`` [N]: prompt index within the class (replay tables have C x P rows, class-major).
    """
    if prompt is not None:
        cls = cls * _prompts_per_class(p) + prompt
    rg, sg = p["merge_ratios"], p["snr_grid_db"]
    ri = np.clip(np.searchsorted(rg, r, side="right") - 1, 0, len(rg) - 2)
    wr = np.clip((r - rg[ri]) / (rg[ri + 1] - rg[ri]), 0, 1)
    s_c = np.clip(snr_db, sg[0], sg[-1])
    si = np.clip(np.searchsorted(sg, s_c, side="right") - 1, 0, len(sg) - 2)
    ws = np.clip((s_c - sg[si]) / (sg[si + 1] - sg[si]), 0, 1)
    t = p["quality_table"]
    q = ((1 - wr) * (1 - ws))[:, None] * t[k_idx, ri, si, cls] + ((1 - wr) * ws)[:, None] * t[k_idx, ri, si + 1, cls] \
        + (wr * (1 - ws))[:, None] * t[k_idx, ri + 1, si, cls] + (wr * ws)[:, None] * t[k_idx, ri + 1, si + 1, cls]
    acc, psnr = q[:, 0], q[:, 1]
    w = p["reward_psnr_weight"]
    quality = (1 - w) * acc + w * psnr / p["psnr_scale_db"] + p.get("reward_offset", 0.0)
    lerp = lambda v: (1 - wr) * v[ri] + wr * v[ri + 1]  # noqa: E731
    rate = p["bandwidth_hz"] * np.log2(1 + 10 ** (np.maximum(snr_db, p["snr_floor_db"]) / 10))
    payload, side = lerp(p["payload"]), lerp(p["side_info_bits"])
    tx = payload / p["bandwidth_hz"] + side / rate if p["analog"] else (payload + side) / rate
    latency = p["es_time_s"][k_idx] + tx + lerp(p["ue_time_s"])
    energy = lerp(p["ue_energy_j"]) + p["ue_receive_power_w"] * tx
    if p.get("energy_scope", "ue") == "system":  # + ES compute (power x time) + radiated transmit energy
        energy = energy + p["es_power_w"] * p["es_time_s"][k_idx] + 10 ** (p["tx_power_dbm"] / 10) / 1e3 * tx
    return {"accuracy": acc, "psnr_db": psnr, "quality": quality, "latency_s": latency, "energy_j": energy, "tx_time_s": tx}


def step(p: Mapping[str, Any], s: dict, k_idx: np.ndarray, r: np.ndarray, noise: Any) -> tuple[dict, dict]:
    """Serves every env's current request with (k_idx, r) [N] and evolves the channel."""
    n = _as_dict(noise)
    out = price(p, s["snr_db"], s["task_class"], k_idx, r, s["prompt"])
    out["snr_db"] = s["snr_db"]
    costs = np.stack([out["latency_s"], out["energy_j"]], axis=-1)
    nxt = _evolve(p, s, n)
    nxt["task_class"] = _task_class(p, n["task_u"])
    nxt["prompt"] = _prompt(p, n["task_u"])
    nxt["t"] = s["t"] + 1
    nxt["cum_costs"] = s["cum_costs"] + costs
    nxt["cum_quality"] = s["cum_quality"] + out["quality"]
    return nxt, out


def observe(p: Mapping[str, Any], s: dict) -> np.ndarray:
    """Observation [N, obs_dim] (layout in ``meg_env``'s module docstring)."""
    g = p["snr_grid_db"]
    mid, half = (g[0] + g[-1]) / 2, (g[-1] - g[0]) / 2
    num_c = len(p["task_cdf"])
    horizon = float(p["episode_length"])
    return np.concatenate([
        (s["est_snr_db"] - mid) / half,
        ((s["large_scale_snr_db"] - mid) / half)[:, None],
        (s["speed"] / p["speed_max_mps"])[:, None],
        (np.arange(num_c)[None, :] == s["task_class"][:, None]).astype(s["speed"].dtype),
        (s["t"] / horizon)[:, None],
        s["cum_costs"] / (p["limits"] * horizon),
    ], axis=1)


def continuous_to_choice(p: Mapping[str, Any], action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 2] in [-1, 1] → (k_idx [N], r [N]); same rule as the JAX env."""
    a = np.clip(action, -1, 1)
    k_idx = np.rint(0.5 * (a[:, 0] + 1) * (len(p["steps"]) - 1)).astype(np.int64)
    return k_idx, 0.5 * (a[:, 1] + 1) * p["max_merge_ratio"]


def sample_step_noise(rng: np.random.Generator, n: int, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    """StepNoise-shaped draws for N envs from an explicitly passed generator."""
    z = rng.standard_normal((n, 7), dtype=dtype)
    return {"turn": z[:, 0], "z_shadow": z[:, 1], "z_los": z[:, 2], "fading": z[:, 3:5], "csi": z[:, 5:7],
            "task_u": rng.random(n, dtype=dtype)}


def sample_reset_noise(rng: np.random.Generator, n: int, history_length: int, dtype: Any = np.float64) -> dict:
    """ResetNoise-shaped draws for N envs."""
    u = rng.random((n, 5), dtype=dtype)
    z = rng.standard_normal((n, 6), dtype=dtype)
    warm = [sample_step_noise(rng, n, dtype) for _ in range(history_length - 1)]
    warmup = {k: np.stack([w[k] for w in warm], axis=1) if warm else np.zeros((n, 0) + (2,) * (k in ("fading", "csi")), dtype)
              for k in ("turn", "z_shadow", "z_los", "fading", "csi", "task_u")}
    return {"pos_u": u[:, 0:2], "heading_u": u[:, 2], "speed_u": u[:, 3], "task_u": u[:, 4],
            "z_los": z[:, 0], "z_shadow": z[:, 1], "fading": z[:, 2:4], "csi": z[:, 4:6], "warmup": warmup}


class NumpyMEGEnv:
    """A batched NumPy env with the same episode logic as ``meg_jax.env.make`` (benchmark baseline).

    Args:
      params: ``EnvParams`` of the JAX env.
      num_envs: N.
      rng: the generator for every draw.
      dtype: float dtype of the computation.
    """

    def __init__(self, params: Any, num_envs: int, rng: np.random.Generator, dtype: Any = np.float64):
        self.p = params_to_numpy(params, dtype)
        self.n = num_envs
        self.rng = rng
        self.dtype = dtype
        self.state: dict[str, np.ndarray] = {}

    def reset(self) -> np.ndarray:
        self.state = reset(self.p, sample_reset_noise(self.rng, self.n, self.p["history_length"], self.dtype))
        return observe(self.p, self.state)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Returns (obs [N, D], reward [N], costs [N, 2], done [N]); finished envs restart fresh."""
        k_idx, r = continuous_to_choice(self.p, action)
        self.state, out = step(self.p, self.state, k_idx, r, sample_step_noise(self.rng, self.n, self.dtype))
        done = self.state["t"] >= self.p["episode_length"]
        if done.any():
            fresh = reset(self.p, sample_reset_noise(self.rng, self.n, self.p["history_length"], self.dtype))
            for k, v in fresh.items():
                mask = done.reshape((-1,) + (1,) * (v.ndim - 1))
                self.state[k] = np.where(mask, v, self.state[k])
        costs = np.stack([out["latency_s"], out["energy_j"]], axis=-1)
        return observe(self.p, self.state), out["quality"], costs, done
