"""Evaluation of trained MEG policies: the numbers behind ``eval.evaluate`` and ``meg-jax demo``.

This module computes; :mod:`meg_jax.report` draws and writes. Everything here runs on fresh
episodes of the batched environment (``meg_jax.env.make``) inside one jitted ``lax.scan``
per policy, and is then summarised on the host with NumPy. Because the channel does not
depend on the action, one rollout also records, for every request, the quality and costs of
**every** grid action at the true SNR and task class (``grid_action_table``); the reference
policies (best fixed (K, r), always-max-quality, the Lagrangian oracle, the minimum-latency
MEG frontier) and the conventional schemes are all scored on exactly those requests.

The six items of the report (issue 7):

1. :func:`scheme_comparison` — latency and UE energy of the learned policies, the MEG
   frontier at matched quality, the fixed policies and the three conventional schemes;
2. :func:`training_curves` — episode-average costs over their limits and the multipliers
   λ over training (from the run's ``metrics.jsonl``);
3. :func:`limit_sweep` / :func:`train_limit_sweep` — quality and costs over a sweep of
   latency limits, CVPO retrained per limit (``vmap`` over limits of ``cvpo.make_train``);
4. :func:`policy_behaviour` — the chosen K and r against SNR and task class;
5. :func:`policy_image_cases` — the channel states at which images are generated
   (the generation itself is :func:`generate_case_images`, with the shipped backbone);
6. :func:`robustness` — the trained policy under shifted channels (UE speed ×2, path loss
   +10 dB, CSI error ×2, and all three), beside the oracle of the shifted channel.

Units: latency in seconds, UE energy in joules, SNR in dB, quality in reward units (the
attribute accuracy in [0, 1] unless the environment mixes in PSNR).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ChannelShift",
    "DEFAULT_SHIFTS",
    "LoadedPolicy",
    "Rollout",
    "find_runs",
    "load_run",
    "make_eval_env",
    "shift_params",
    "make_rollout",
    "rollout",
    "summarise",
    "reference_policies",
    "conventional_schemes",
    "meg_frontier",
    "scheme_comparison",
    "training_curves",
    "policy_behaviour",
    "robustness",
    "sweep_latency_limits",
    "train_limit_sweep",
    "limit_sweep",
    "policy_image_cases",
    "generate_case_images",
    "image_grid",
    "link_of_artifact",
    "class_prompt",
    "ALGO_LABELS",
    "evaluate_runs",
    "oracle_rollout",
    "summarise_rollout",
    "fit_oracle_on",
    "best_fixed_index",
    "fixed_policies",
    "matched_quality_meg",
    "QUALITY_TOLERANCE",
]

# display names of the algorithms of train.cvpo
ALGO_LABELS = {"cvpo": "MEG-CVPO", "ppo_lag": "PPO-Lagrangian", "ppo": "PPO (unconstrained)"}
FEASIBILITY_TOLERANCE = 1.02  # a policy is feasible if every average cost <= limit x this (as rl.evaluate)


# ------------------------------------------------------------------------ channel shifts
@dataclasses.dataclass(frozen=True)
class ChannelShift:
    """A change of the channel statistics that the policy never saw in training."""

    name: str  # label in tables and plots
    speed_factor: float = 1.0  # UE speed range multiplied by this (faster fading, staler CSI)
    path_loss_offset_db: float = 0.0  # extra path loss (dB): every SNR falls by this much
    csi_error_factor: float = 1.0  # CSI estimation-error std multiplied by this


DEFAULT_SHIFTS = (
    ChannelShift("nominal"),
    ChannelShift("UE speed x2", speed_factor=2.0),
    ChannelShift("path loss +10 dB", path_loss_offset_db=10.0),
    ChannelShift("CSI error x2", csi_error_factor=2.0),
    ChannelShift("all three", speed_factor=2.0, path_loss_offset_db=10.0, csi_error_factor=2.0),
)


def shift_params(params: Any, shift: ChannelShift) -> Any:
    """``EnvParams`` of the shifted channel; limits, costs and calibration unchanged.

    Extra path loss enters as lower transmit power (the SNR is ``P_tx - PL - ...`` dB, so
    the two are the same thing for the link); the speed scales both ends of the per-episode
    speed range (the Doppler, hence the fading and CSI-ageing correlations, follow from it
    at every reset).
    """
    return params.replace(
        speed_min_mps=params.speed_min_mps * shift.speed_factor,
        speed_max_mps=params.speed_max_mps * shift.speed_factor,
        tx_power_dbm=params.tx_power_dbm - shift.path_loss_offset_db,
        csi_error_std=params.csi_error_std * shift.csi_error_factor,
    )


# ------------------------------------------------------------------------- loading runs
@dataclasses.dataclass
class LoadedPolicy:
    """A trained policy restored from a ``train.cvpo`` run directory.

    Attributes:
      name: display name (``MEG-CVPO``, ``PPO-Lagrangian``).
      algo: ``config.algo``.
      run_dir: the run directory.
      config: its ``meg_jax.rl.config.RunConfig``.
      act: ``act(actor_params, obs [N, obs_dim], key, deterministic) -> action``.
      actor_params: the restored actor parameters.
      discrete: whether the policy acts on the discrete K x r grid.
      step: the checkpoint step (host iterations) restored.
      artifact: the ``CalibrationArtifact`` object the run used, or None (the preset's file).
      log_dir: the folder of its ``metrics.jsonl``.
    """

    name: str
    algo: str
    run_dir: str
    config: Any
    act: Callable[..., jax.Array]
    actor_params: Any
    discrete: bool
    step: int
    artifact: Any = None
    log_dir: str = ""  # where its metrics.jsonl is (the run dir, or its seed_<seed> folder)


def find_runs(path: str | os.PathLike) -> list[str]:
    """Run directories of ``train.cvpo`` at ``path`` or one level below it (sorted).

    A run directory holds ``config.json`` with an ``algo`` field and a ``checkpoints/``
    folder (baseline-only runs without checkpoints are skipped).
    """
    import json

    path = os.fspath(path)
    candidates = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
    runs = []
    for c in candidates:
        cfg = os.path.join(c, "config.json")
        if not (os.path.isfile(cfg) and os.path.isdir(os.path.join(c, "checkpoints"))):
            continue
        try:
            with open(cfg) as f:
                algo = json.load(f).get("algo")
        except (OSError, ValueError):
            continue
        if algo in ALGO_LABELS:
            runs.append(c)
    return runs


def _run_artifact(config: Any) -> Any:
    if config.env.artifact == "synthetic":
        from meg_jax.meg.artifact import synthetic_artifact

        return synthetic_artifact()
    return None


def _make_agent(config: Any, env: Any) -> Any:
    if config.algo == "cvpo":
        from meg_jax.rl.cvpo import make_cvpo

        return make_cvpo(config.cvpo, env)
    from meg_jax.rl.ppo_lagrangian import make_ppo

    return make_ppo(dataclasses.replace(config.ppo, lagrangian=config.algo == "ppo_lag"), env)


def policy_discrete(config: Any) -> bool:
    """Whether the run's agent acts on the discrete grid."""
    return bool(config.cvpo.discrete if config.algo == "cvpo" else config.ppo.discrete)


def load_run(run_dir: str | os.PathLike, seed_index: int = 0) -> LoadedPolicy:
    """Restores the latest checkpoint of a ``train.cvpo`` run (CVPO or PPO) through the library API.

    A multi-seed run (``num_seeds > 1``, states stacked over seeds) yields the policy of seed
    ``seed + seed_index``; its training curves are under ``run_dir/seed_<seed>``.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint in ``run_dir``.
      ValueError: the run's algorithm has no policy (a baseline-only run).
    """
    from meg_jax import checkpoint as ckpt
    from meg_jax import config as config_lib
    from meg_jax.rl.config import RunConfig
    from meg_jax.rl.evaluate import make_env

    run_dir = os.fspath(run_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir!r} is not a run directory of `python -m train.cvpo`")
    config = config_lib.load_json(RunConfig, cfg_path)
    if config.algo not in ALGO_LABELS:
        raise ValueError(f"{run_dir}: algo {config.algo!r} has no trained policy (choose a cvpo/ppo_lag/ppo run)")
    artifact = _run_artifact(config)
    discrete = policy_discrete(config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"limits .* do not bind", category=UserWarning)
        env = make_env(config.env, discrete=discrete, artifact=artifact)
    agent = _make_agent(config, env)
    import orbax.checkpoint as ocp

    k_init, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    # abstract template (no compile of init): the shapes of the saved state, on one device
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    num_seeds = int(getattr(config, "num_seeds", 1))
    if not 0 <= seed_index < num_seeds:
        raise ValueError(f"seed_index {seed_index} out of range: the run trained {num_seeds} seed(s)")
    if num_seeds > 1:  # train.cvpo stacks the seeds' states (vmapped init)
        keys = jnp.stack([jax.random.split(jax.random.PRNGKey(config.seed + i))[0] for i in range(num_seeds)])
        shapes = jax.eval_shape(jax.vmap(agent.init), keys)
    else:
        shapes = jax.eval_shape(agent.init, k_init)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    manager = ckpt.make_manager(os.path.join(run_dir, "checkpoints"), async_save=False)
    try:
        step = manager.latest_step()
        state = None if step is None else manager.restore(step, args=ocp.args.StandardRestore(template))
    finally:
        manager.close()
    step = 0 if step is None else int(step)
    if step == 0:
        raise FileNotFoundError(
            f"{run_dir}/checkpoints holds no checkpoint; train first: "
            f"python -m train.cvpo --algo {config.algo} --workdir {run_dir}"
        )
    actor = state.actor if num_seeds == 1 else jax.tree.map(lambda x: x[seed_index], state.actor)
    log_dir = run_dir if num_seeds == 1 else os.path.join(run_dir, f"seed_{config.seed + seed_index}")
    return LoadedPolicy(
        name=ALGO_LABELS[config.algo], algo=config.algo, run_dir=run_dir, config=config, act=agent.act,
        actor_params=jax.tree.map(jnp.asarray, actor), discrete=discrete, step=int(step), artifact=artifact,
        log_dir=log_dir,
    )


def make_eval_env(spec: Any, num_episodes: int, discrete: bool = False, artifact: Any = None) -> Any:
    """Batched env of ``spec`` (``EnvSpec``) with one slot per evaluation episode."""
    from meg_jax.rl.evaluate import make_env

    with warnings.catch_warnings():
        # "limits do not bind" is reported by the env's own job
        warnings.filterwarnings("ignore", message=r"limits .* do not bind", category=UserWarning)
        return make_env(spec, num_envs=num_episodes, discrete=discrete, artifact=artifact)


# ------------------------------------------------------------------------------ rollout
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Per-request records of E fresh episodes of T requests (host NumPy).

    ``A = K x R`` grid actions in the order ``k_idx * R + r_idx``.
    """

    snr_db: np.ndarray  # [E, T] true SNR of each request (dB)
    est_snr_db: np.ndarray  # [E, T] the agent's estimate of it (dB)
    task_class: np.ndarray  # [E, T] int task class
    steps: np.ndarray  # [E, T] K chosen by the policy
    merge_ratio: np.ndarray  # [E, T] r chosen by the policy
    quality: np.ndarray  # [E, T] reward (quality) of the chosen action
    latency_s: np.ndarray  # [E, T] (s)
    energy_j: np.ndarray  # [E, T] (J)
    table_quality: np.ndarray  # [E, T, A] quality of every grid action
    table_costs: np.ndarray  # [E, T, A, 2] latency (s), energy (J) of every grid action
    limits: np.ndarray  # [2] episode-average limits (s, J)
    grid_steps: np.ndarray  # [K]
    grid_ratios: np.ndarray  # [R]

    @property
    def episodes(self) -> int:
        return int(self.snr_db.shape[0])


def make_rollout(env: Any, act: Optional[Callable[..., jax.Array]] = None, deterministic: bool = False) -> Callable:
    """Jitted ``run(params, actor_params, key) -> dict of [T, E, ...] arrays``.

    ``params`` (``EnvParams``) is an argument, so one compilation serves every channel shift,
    limit and preset with the same grid sizes; ``act=None`` plays grid action 0 (only the
    tables matter then). Keys: ``k_reset, k_run = split(key)``, as ``rl.evaluate``.
    """
    from meg_jax.env import replace_params
    from meg_jax.env.meg_env import grid_action_table

    episode_length = int(env.episode_length)
    num_envs = int(env.num_envs)
    discrete = bool(getattr(env.unwrapped, "discrete", False))

    def run(params, actor_params, key):
        e = replace_params(env, params)
        k_reset, k_run = jax.random.split(key)
        state = e.reset(k_reset)

        def body(s, k):
            core = s.pipeline_state
            q, c = grid_action_table(params, core.channel.snr_db, core.task_class)
            if act is None:
                a = jnp.zeros((num_envs,), jnp.int32) if discrete else jnp.zeros((num_envs, 2), jnp.float32)
            else:
                a = act(actor_params, s.obs, k, deterministic)
            ns = e.step(s, a)
            rec = {
                "snr_db": core.channel.snr_db,
                "est_snr_db": core.channel.est_snr_db[:, 0],
                "task_class": core.task_class,
                "steps": ns.metrics["steps"],
                "merge_ratio": ns.metrics["merge_ratio"],
                "quality": ns.reward,
                "latency_s": ns.metrics["latency_s"],
                "energy_j": ns.metrics["energy_j"],
                "table_quality": q,
                "table_costs": c,
            }
            return ns, rec

        _, recs = jax.lax.scan(body, state, jax.random.split(k_run, episode_length))
        return recs

    return jax.jit(run)


def rollout(run: Callable, params: Any, actor_params: Any, key: jax.Array) -> Rollout:
    """Runs a function from :func:`make_rollout` and moves its records to the host as [E, T, ...]."""
    recs = jax.device_get(run(params, actor_params, key))
    recs = {k: np.swapaxes(np.asarray(v), 0, 1) for k, v in recs.items()}
    return Rollout(
        snr_db=recs["snr_db"].astype(np.float64),
        est_snr_db=recs["est_snr_db"].astype(np.float64),
        task_class=recs["task_class"].astype(np.int64),
        steps=recs["steps"].astype(np.float64),
        merge_ratio=recs["merge_ratio"].astype(np.float64),
        quality=recs["quality"].astype(np.float64),
        latency_s=recs["latency_s"].astype(np.float64),
        energy_j=recs["energy_j"].astype(np.float64),
        table_quality=recs["table_quality"].astype(np.float64),
        table_costs=recs["table_costs"].astype(np.float64),
        limits=np.asarray(params.limits, np.float64),
        grid_steps=np.asarray(params.steps, np.float64),
        grid_ratios=np.asarray(params.merge_ratios, np.float64),
    )


# --------------------------------------------------------------------------- summaries
def summarise(quality: np.ndarray, latency_s: np.ndarray, energy_j: np.ndarray, limits: np.ndarray,
              tolerance: float = FEASIBILITY_TOLERANCE) -> dict[str, Any]:
    """Episode-average scores of per-request records ``[E, T]`` (as ``rl.evaluate.EvalResult``).

    Returns a JSON-ready dict: ``quality`` (mean of episode averages) and its standard error,
    ``latency_s`` and ``energy_j`` (means), their ratios to the limits, and ``feasible``.
    """
    q_ep = np.mean(quality, axis=-1)
    costs = np.array([np.mean(latency_s), np.mean(energy_j)])
    ratio = costs / np.asarray(limits, np.float64)
    e = q_ep.shape[0]
    return {
        "quality": float(np.mean(q_ep)),
        "quality_se": float(np.std(q_ep, ddof=1) / math.sqrt(e)) if e > 1 else 0.0,
        "latency_s": float(costs[0]),
        "energy_j": float(costs[1]),
        "latency_over_limit": float(ratio[0]),
        "energy_over_limit": float(ratio[1]),
        "feasible": bool(np.all(ratio <= tolerance)),
    }


def summarise_rollout(ro: Rollout) -> dict[str, Any]:
    """:func:`summarise` of the policy that made the rollout."""
    return summarise(ro.quality, ro.latency_s, ro.energy_j, ro.limits)


def _pick(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """table [E, T, A, ...] at per-request action index [E, T] -> [E, T, ...]."""
    return np.take_along_axis(table, index.reshape(index.shape + (1,) * (table.ndim - index.ndim)), axis=2)[:, :, 0]


def _action_label(ro: Rollout, index: int) -> tuple[int, float]:
    num_r = len(ro.grid_ratios)
    return int(ro.grid_steps[index // num_r]), float(ro.grid_ratios[index % num_r])


def fit_oracle_on(ro: Rollout, limits: Optional[np.ndarray] = None) -> tuple[Any, np.ndarray, float]:
    """The environment's Lagrangian oracle fitted on ``ro``'s tables.

    Returns ``(solution, probs [E, T, A], ceiling)``: ``meg_jax.env.oracle.fit_oracle``'s
    multipliers, the oracle's per-request action distribution (Boltzmann at its final
    temperature, so its average costs meet the active limits) and the exact LP dual at those
    multipliers (an upper bound on any feasible policy's quality, by weak duality).
    """
    from meg_jax.env import oracle as env_oracle

    limits = ro.limits if limits is None else np.asarray(limits, np.float64)
    q, c = ro.table_quality, ro.table_costs
    a = q.shape[-1]
    sol = env_oracle.fit_oracle(q.reshape(-1, a), c.reshape(-1, a, c.shape[-1]), limits)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    probs = np.asarray(env_oracle.oracle_probabilities(f32(q), f32(c), f32(limits), f32(sol.lambdas), sol.temperature),
                       np.float64)
    lam = np.maximum(np.asarray(sol.lambdas, np.float64), 0.0)
    ceiling = float(np.mean(np.max(q - np.einsum("etam,m->eta", c / limits, lam), axis=-1)) + lam.sum())
    return sol, probs, ceiling


def best_fixed_index(ro: Rollout, limits: Optional[np.ndarray] = None) -> Optional[int]:
    """The grid action with the highest average quality whose average costs meet every limit (None if none)."""
    limits = ro.limits if limits is None else np.asarray(limits, np.float64)
    mean_q = ro.table_quality.mean(axis=(0, 1))
    mean_c = ro.table_costs.mean(axis=(0, 1))
    feasible = np.all(mean_c <= limits, axis=-1)
    if not feasible.any():
        return None
    return int(np.argmax(np.where(feasible, mean_q, -np.inf)))


def reference_policies(ro: Rollout, limits: Optional[np.ndarray] = None) -> dict[str, dict[str, Any]]:
    """Best fixed feasible (K, r), always-max-quality and the Lagrangian oracle on ``ro``'s requests.

    The oracle (perfect channel knowledge) is the environment's (``meg_jax.env.oracle``),
    scored by its expected quality and costs per request; ``ceiling_quality`` is the LP dual
    bound at its multipliers. The best fixed action is chosen on the same requests.
    """
    limits = ro.limits if limits is None else np.asarray(limits, np.float64)
    q, c = ro.table_quality, ro.table_costs
    out: dict[str, dict[str, Any]] = {}
    idx = best_fixed_index(ro, limits)
    if idx is not None:
        fixed = summarise(q[:, :, idx], c[:, :, idx, 0], c[:, :, idx, 1], limits)
        k, r = _action_label(ro, idx)
        fixed.update(action=idx, steps=k, merge_ratio=r)
        out["best_fixed"] = fixed
    best = np.argmax(q, axis=-1)
    out["max_quality"] = summarise(_pick(q, best), _pick(c, best)[..., 0], _pick(c, best)[..., 1], limits)
    sol, probs, ceiling = fit_oracle_on(ro, limits)
    ec = np.einsum("eta,etam->etm", probs, c)
    oracle = summarise(np.sum(probs * q, axis=-1), ec[..., 0], ec[..., 1], limits)
    oracle.update(lam=[float(x) for x in sol.lambdas], ceiling_quality=ceiling, temperature=float(sol.temperature))
    out["oracle"] = oracle
    return out


def fixed_policies(ro: Rollout, limits: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
    """Every fixed grid action (K, r): its averages on ``ro``'s requests."""
    limits = ro.limits if limits is None else np.asarray(limits, np.float64)
    out = []
    for a in range(ro.table_quality.shape[-1]):
        s = summarise(ro.table_quality[:, :, a], ro.table_costs[:, :, a, 0], ro.table_costs[:, :, a, 1], limits)
        k, r = _action_label(ro, a)
        s.update(action=a, steps=k, merge_ratio=r)
        out.append(s)
    return out


# ------------------------------------------------------------------ conventional schemes
def conventional_schemes(artifact: Any, params: Any, snr_db: np.ndarray, task_class: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-request quality, latency and UE energy of the artifact's conventional schemes.

    Priced exactly as the environment prices an action (``meg_jax.meg.artifact``): Shannon
    rate at max(SNR, floor); ``digital`` sends payload + side bits at that rate, ``analog``
    one symbol per Hz·s plus the side bits at that rate, ``none`` sends nothing. Quality is
    the scheme's calibrated accuracy/PSNR at the (clamped) SNR, mixed like the reward.

    Args:
      artifact: the ``CalibrationArtifact`` of the environment.
      params: the environment's ``EnvParams`` (bandwidth, SNR floor, reward mix).
      snr_db, task_class: requests, any equal shapes.

    Returns:
      scheme name -> {"quality", "latency_s", "energy_j"} arrays of the requests' shape.
    """
    snr = np.asarray(snr_db, np.float64)
    cls = np.asarray(task_class, np.int64)
    bandwidth = float(params.bandwidth_hz)
    floor = float(params.snr_floor_db)
    rate = bandwidth * np.log2(1.0 + 10.0 ** (np.maximum(snr, floor) / 10.0))
    grid = np.asarray(artifact.snr_db, np.float64)
    clamped = np.clip(snr, grid[0], grid[-1])
    w = float(params.reward_psnr_weight)
    scale = float(params.psnr_scale_db)
    out = {}
    for name, s in artifact.conventional_schemes.items():
        if s.link_mode == "digital":
            t_tx = (s.payload + s.side_info_bits) / rate
        elif s.link_mode == "analog":
            t_tx = s.payload / bandwidth + s.side_info_bits / rate
        else:
            t_tx = np.zeros_like(snr)
        acc = np.stack([np.interp(clamped, grid, s.accuracy[:, c]) for c in range(s.accuracy.shape[1])], -1)
        psnr = np.stack([np.interp(clamped, grid, s.psnr[:, c]) for c in range(s.psnr.shape[1])], -1)
        acc = np.take_along_axis(acc, cls[..., None], -1)[..., 0]
        psnr = np.take_along_axis(psnr, cls[..., None], -1)[..., 0]
        out[name] = {
            "quality": (1.0 - w) * acc + w * psnr / scale,
            "latency_s": s.es_compute_time_s + t_tx + s.ue_compute_time_s,
            "energy_j": s.ue_compute_energy_j + artifact.ue_receive_power_w * t_tx,
        }
    return out


SCHEME_LABELS = {
    "centralised": "centralised (ES teacher, image sent)",
    "meg_uncompressed": "MEG uncompressed (teacher, r = 0)",
    "on_device": "on-device (UE runs all)",
}


def _frontier_choice(q: np.ndarray, lat: np.ndarray, mu: float) -> np.ndarray:
    """Per request argmin_a latency − μ Q (ties to higher quality): [E, T] indices."""
    return np.argmin(lat - mu * q - 1e-12 * q, axis=-1)


def meg_frontier(ro: Rollout, num_points: int = 41) -> dict[str, list[float]]:
    """The minimum-latency MEG frontier with perfect channel knowledge (no energy limit).

    For μ on a log grid, per request argmin_a latency_a − μ·Q_a; every μ gives a point
    (average quality, average latency, average energy) on the lower convex hull of what any
    per-request (K, r) choice achieves. Sorted by quality.
    """
    q, lat, en = ro.table_quality, ro.table_costs[..., 0], ro.table_costs[..., 1]
    pts = []
    for mu in np.concatenate([[0.0], np.logspace(-5, 5, num_points)]):
        a = _frontier_choice(q, lat, mu)
        pts.append((float(np.mean(_pick(q, a))), float(np.mean(_pick(lat, a))), float(np.mean(_pick(en, a)))))
    pts.sort()
    return {"quality": [p[0] for p in pts], "latency_s": [p[1] for p in pts], "energy_j": [p[2] for p in pts]}


def matched_quality_meg(ro: Rollout, target_quality: float, iterations: int = 40) -> Optional[dict[str, float]]:
    """Lowest average latency MEG reaches with average quality >= ``target_quality``.

    Bisection on μ of :func:`meg_frontier`'s per-request rule (perfect channel knowledge);
    None when even the per-request maximum quality falls short of the target.
    """
    q, lat, en = ro.table_quality, ro.table_costs[..., 0], ro.table_costs[..., 1]

    def at(mu: float) -> tuple[float, float, float]:
        a = _frontier_choice(q, lat, mu)
        return float(np.mean(_pick(q, a))), float(np.mean(_pick(lat, a))), float(np.mean(_pick(en, a)))

    if at(0.0)[0] >= target_quality:
        mu = 0.0
    else:
        lo, hi = -9.0, 6.0  # log10 of mu
        if at(10.0**hi)[0] < target_quality - 1e-12:
            return None
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if at(10.0**mid)[0] >= target_quality:
                hi = mid
            else:
                lo = mid
        mu = 10.0**hi
    qual, l, e = at(mu)
    return {"quality": qual, "latency_s": l, "energy_j": e, "mu": mu}


QUALITY_TOLERANCE = 0.02  # "matched quality": MEG's average quality >= the scheme's minus this (accuracy units)


def scheme_comparison(ro: Rollout, artifact: Any, params: Any,
                      learned: Mapping[str, dict[str, Any]] = (), preset: str = "tiny",
                      quality_tolerance: float = QUALITY_TOLERANCE) -> dict[str, Any]:
    """Item 1: learned policies vs the three conventional schemes and the fixed policies.

    Args:
      ro: a rollout on the preset's nominal channel (its tables score everything).
      artifact: the preset's calibration artifact (holds the conventional schemes).
      params: the env params of ``ro``.
      learned: policy name -> :func:`summarise` dict of the learned policies on the same
        requests.
      preset: label.
      quality_tolerance: MEG matches a scheme's quality when its average quality is at least
        the scheme's minus this (the calibration's sampling error is of this order: a mean
        accuracy over 128 prompts x 5 attributes has a standard error near 0.02). When even
        MEG's highest quality is below that, ``meg_matched`` holds MEG's highest-quality
        point with ``reached = False``.

    Returns:
      JSON-ready dict with ``schemes`` (each conventional scheme's quality, latency, energy,
      plus ``meg_matched``: the lowest-latency MEG at >= its quality, and the latency and
      energy reductions), ``learned`` (each learned policy, plus its latency reduction
      against each scheme), ``references`` (best fixed, max quality, oracle), ``fixed``
      (every grid action) and ``frontier``.
    """
    conv = conventional_schemes(artifact, params, ro.snr_db, ro.task_class)
    schemes = {}
    for name, rec in conv.items():
        s = summarise(rec["quality"], rec["latency_s"], rec["energy_j"], ro.limits)
        s["label"] = SCHEME_LABELS.get(name, name)
        m = matched_quality_meg(ro, s["quality"] - quality_tolerance)
        if m is None:
            m = matched_quality_meg(ro, float(np.mean(np.max(ro.table_quality, axis=-1))) - 1e-9)
            if m is not None:
                m["reached"] = False
        else:
            m["reached"] = True
        if m is not None:
            m["latency_reduction"] = 1.0 - m["latency_s"] / s["latency_s"]
            m["energy_reduction"] = 1.0 - m["energy_j"] / s["energy_j"] if s["energy_j"] > 0 else float("nan")
        s["meg_matched"] = m
        schemes[name] = s
    learned_out = {}
    for name, s in dict(learned).items():
        s = dict(s)
        s["latency_reduction_vs"] = {n: 1.0 - s["latency_s"] / v["latency_s"] for n, v in schemes.items()}
        s["energy_reduction_vs"] = {
            n: (1.0 - s["energy_j"] / v["energy_j"]) if v["energy_j"] > 0 else float("nan") for n, v in schemes.items()
        }
        s["quality_minus"] = {n: s["quality"] - v["quality"] for n, v in schemes.items()}
        learned_out[name] = s
    return {
        "preset": preset,
        "quality_tolerance": quality_tolerance,
        "episodes": ro.episodes,
        "episode_length": int(ro.snr_db.shape[1]),
        "limits": ro.limits.tolist(),
        "schemes": schemes,
        "learned": learned_out,
        "references": reference_policies(ro),
        "fixed": fixed_policies(ro),
        "frontier": meg_frontier(ro),
    }


# ---------------------------------------------------------------------- training curves
def training_curves(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Item 2: what the run logged per host iteration (``metrics.jsonl``), as lists.

    Returns ``env_steps``, ``episode_quality``, ``latency_over_limit``, ``energy_over_limit``,
    ``lam_0``/``lam_1`` (the multipliers at the end of each iteration) and, for CVPO,
    ``estep`` (per-update λ from ``estep/metrics.jsonl``) — each a list (missing keys: empty).
    """
    from meg_jax.run_log import read_metrics

    recs = read_metrics(run_dir)
    # a resumed run may have written an iteration twice: keep the last record per step
    by_step = {}
    for r in recs:
        by_step[int(r["step"])] = r
    recs = [by_step[s] for s in sorted(by_step)]

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in recs if key in r]

    with_eps = [r for r in recs if "episode_quality" in r]
    out = {
        "env_steps": [float(r["env_steps"]) for r in with_eps],
        "episode_quality": [float(r["episode_quality"]) for r in with_eps],
        "latency_over_limit": [float(r["episode_latency_over_limit"]) for r in with_eps],
        "energy_over_limit": [float(r["episode_energy_over_limit"]) for r in with_eps],
        "lam_steps": [float(r["env_steps"]) for r in recs if "lam_0" in r],
        "lam_0": col("lam_0"),
        "lam_1": col("lam_1"),
    }
    estep = read_metrics(os.path.join(os.fspath(run_dir), "estep"))
    out["estep_update"] = [int(r["step"]) for r in estep]
    out["estep_lam_0"] = [float(r.get("lam_0", float("nan"))) for r in estep]
    out["estep_lam_1"] = [float(r.get("lam_1", float("nan"))) for r in estep]
    if out["latency_over_limit"]:
        tail = max(1, len(out["latency_over_limit"]) // 5)  # the last 20% of training
        out["final_latency_over_limit"] = float(np.mean(out["latency_over_limit"][-tail:]))
        out["final_energy_over_limit"] = float(np.mean(out["energy_over_limit"][-tail:]))
        out["final_quality"] = float(np.mean(out["episode_quality"][-tail:]))
        out["tail_iterations"] = tail
    return out


# --------------------------------------------------------------------- policy behaviour
def policy_behaviour(ro: Rollout, task_classes: Sequence[str], snr_edges: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """Item 4: mean chosen K and r per true-SNR bin and task class, and per class overall.

    Returns lists ready for plotting: ``snr_centres`` [B], ``mean_steps`` / ``mean_ratio``
    [C][B] (NaN where a bin is empty), ``count`` [C][B], and per class ``class_steps``,
    ``class_ratio``, ``class_quality``; ``step_histogram`` [C][K] (fraction choosing each K).
    """
    if snr_edges is None:
        lo, hi = np.percentile(ro.snr_db, [1, 99])
        snr_edges = np.linspace(math.floor(lo / 5) * 5, math.ceil(hi / 5) * 5, 9)
    edges = np.asarray(snr_edges, np.float64)
    which = np.clip(np.digitize(ro.snr_db, edges) - 1, 0, len(edges) - 2)
    num_b, num_c = len(edges) - 1, len(task_classes)
    mean_k = np.full((num_c, num_b), np.nan)
    mean_r = np.full((num_c, num_b), np.nan)
    count = np.zeros((num_c, num_b), np.int64)
    for c in range(num_c):
        for b in range(num_b):
            sel = (ro.task_class == c) & (which == b)
            count[c, b] = int(sel.sum())
            if count[c, b]:
                mean_k[c, b] = float(ro.steps[sel].mean())
                mean_r[c, b] = float(ro.merge_ratio[sel].mean())
    hist = []
    for c in range(num_c):
        sel = ro.task_class == c
        hist.append([float(np.mean(ro.steps[sel] == k)) if sel.any() else 0.0 for k in ro.grid_steps])

    def per_class(x: np.ndarray) -> list[float]:
        return [float(x[ro.task_class == c].mean()) if (ro.task_class == c).any() else float("nan") for c in range(num_c)]

    return {
        "task_classes": list(task_classes),
        "snr_edges": edges.tolist(),
        "snr_centres": (0.5 * (edges[1:] + edges[:-1])).tolist(),
        "mean_steps": mean_k.tolist(),
        "mean_ratio": mean_r.tolist(),
        "count": count.tolist(),
        "class_steps": per_class(ro.steps),
        "class_ratio": per_class(ro.merge_ratio),
        "class_quality": per_class(ro.quality),
        "grid_steps": ro.grid_steps.tolist(),
        "step_histogram": hist,
        "snr_corr_steps": _corr(ro.snr_db, ro.steps),
        "snr_corr_ratio": _corr(ro.snr_db, ro.merge_ratio),
    }


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.ravel(x), np.ravel(y)
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# ---------------------------------------------------------------------------- robustness
def robustness(run: Callable, params: Any, actor_params: Any, key: jax.Array,
               shifts: Sequence[ChannelShift] = DEFAULT_SHIFTS) -> list[dict[str, Any]]:
    """Item 6: the policy of ``run`` (from :func:`make_rollout`) under each channel shift.

    The limits stay the trained ones; the oracle is refitted on the shifted channel (perfect
    knowledge of it), the best fixed feasible (K, r) too. Same key for every shift.
    """
    out = []
    for shift in shifts:
        ro = rollout(run, shift_params(params, shift), actor_params, key)
        refs = reference_policies(ro)
        out.append({
            "shift": shift.name,
            "mean_snr_db": float(np.mean(ro.snr_db)),
            "policy": summarise_rollout(ro),
            "oracle": refs["oracle"],
            "best_fixed": refs.get("best_fixed"),
        })
    return out


# --------------------------------------------------------------------- limit sweep
def sweep_latency_limits(report: Any, fractions: Sequence[float]) -> list[float]:
    """Latency limits placed ``f`` of the way from the lowest reachable average latency to
    what "always max quality" costs (``LimitReport`` of the env), f in (0, 1]."""
    lo, hi = report.lower_bound[0], report.max_quality_costs[0]
    lo = max(lo, report.cheapest[0] if report.cheapest[0] < hi else lo)
    return [float(lo + f * (hi - lo)) for f in fractions]


def train_limit_sweep(config: Any, latency_limits: Sequence[float], num_blocks: int, key: jax.Array,
                      artifact: Any = None) -> tuple[Any, np.ndarray, Any]:
    """CVPO retrained at each latency limit, all limits in one ``vmap`` of ``cvpo.make_train``.

    The energy limit stays the env's. The environment parameters (limits and cost weights)
    are traced arguments, so the L runs share one compilation and run as one batched program.

    Args:
      config: a ``RunConfig`` (its ``cvpo`` and ``env`` fields).
      latency_limits: [L] limits (s).
      num_blocks: ``train_step`` blocks per run.
      key: one key; every limit uses the same seed (differences come from the limit alone).
      artifact: a ``CalibrationArtifact`` object, or None for the preset's file.

    Returns:
      (the env used, limits [L, 2], stacked final actor params [L, ...]).
    """
    from meg_jax.env import replace_params
    from meg_jax.rl import cvpo

    env = make_eval_env(config.env, config.env.num_envs, config.cvpo.discrete, artifact)
    base = env.params
    limits = np.stack([np.asarray(latency_limits, np.float64),
                       np.full(len(latency_limits), float(base.limits[1]))], axis=-1)

    def one(lim, k):
        lim = lim.astype(jnp.float32)
        p = base.replace(limits=lim, cost_weights=_cost_weights(base, lim))
        e = replace_params(env, p)
        state, _ = cvpo.make_train(config.cvpo, e, num_blocks)(k)
        return state.actor

    actors = jax.jit(jax.vmap(one, in_axes=(0, None)))(jnp.asarray(limits, jnp.float32), key)
    return env, limits, actors


def _cost_weights(params: Any, limits: jax.Array) -> jax.Array:
    """``info["cost"]`` weights for new limits: 1/limits when the env normalises by them
    (the default ``single_cost``), else unchanged."""
    normalised = np.allclose(np.asarray(params.cost_weights) * np.asarray(params.limits), 1.0, rtol=1e-4)
    return 1.0 / limits if normalised else params.cost_weights


def limit_sweep(run: Callable, params: Any, latency_limits: np.ndarray, actors: Any, key: jax.Array,
                fallback_actor: Any = None) -> dict[str, Any]:
    """Item 3: quality and costs over latency limits: retrained CVPO (if ``actors``), oracle, best fixed.

    Args:
      run: a rollout function of the CVPO policy (from :func:`make_rollout`).
      params: nominal ``EnvParams``.
      latency_limits: [L, 2] (latency s, energy J) limits.
      actors: stacked actor params [L, ...] (from :func:`train_limit_sweep`) or None (then
        only the oracle and the best fixed policy are scored).
      key: evaluation key (same for every limit).
      fallback_actor: the actor ``run`` is called with when ``actors`` is None.
    """
    rows = []
    for i, lim in enumerate(np.asarray(latency_limits, np.float64)):
        lim32 = jnp.asarray(lim, jnp.float32)
        p = params.replace(limits=lim32, cost_weights=_cost_weights(params, lim32))
        actor = fallback_actor if actors is None else jax.tree.map(lambda x: x[i], actors)
        ro = rollout(run, p, actor, key)
        refs = reference_policies(ro)
        row = {"latency_limit_s": float(lim[0]), "energy_limit_j": float(lim[1]),
               "oracle": refs["oracle"], "best_fixed": refs.get("best_fixed")}
        if actors is not None:
            row["cvpo"] = summarise_rollout(ro)
        rows.append(row)
    return {"rows": rows, "trained": actors is not None}


# -------------------------------------------------------------------- images at choices
def policy_image_cases(ro: Rollout, task_classes: Sequence[str], target_snrs_db: Sequence[float] = (0.0, 10.0, 25.0),
                       ) -> list[dict[str, Any]]:
    """Item 5: requests of ``ro`` nearest each target SNR; the policy's (K, r) there.

    Classes cycle over the task classes so the images show several prompts. Each case:
    ``snr_db`` (true), ``task_class``, ``steps`` K, ``merge_ratio`` r (rounded to 0.01,
    the generator compiles per r), ``latency_s``, ``energy_j``, ``quality`` (calibrated).
    """
    cases = []
    for i, target in enumerate(target_snrs_db):
        c = i % len(task_classes)
        mask = ro.task_class == c
        dist = np.where(mask, np.abs(ro.snr_db - target), np.inf)
        e, t = np.unravel_index(int(np.argmin(dist)), dist.shape)
        cases.append({
            "target_snr_db": float(target),
            "snr_db": float(ro.snr_db[e, t]),
            "task_class": int(ro.task_class[e, t]),
            "task": task_classes[int(ro.task_class[e, t])],
            "steps": int(round(ro.steps[e, t])),
            "merge_ratio": float(np.round(ro.merge_ratio[e, t], 2)),
            "latency_s": float(ro.latency_s[e, t]),
            "energy_j": float(ro.energy_j[e, t]),
            "quality": float(ro.quality[e, t]),
        })
    return cases


CLASS_PROMPTS = (
    "a large red {} at the center on a blue background",
    "a large yellow {} at the top left on a black background",
    "a large white {} at the bottom on a green background",
    "a large cyan {} at the right on a magenta background",
)


def class_prompt(task: str, index: int = 0) -> str:
    """A prompt of the procedural grammar whose shape is the task class ``task``.

    A class name the grammar does not know (e.g. the synthetic test artifact's) is replaced
    by the grammar's shape of the same index.
    """
    from meg_jax.data.shapes import SHAPES

    if task not in SHAPES:
        task = SHAPES[index % len(SHAPES)]
    return CLASS_PROMPTS[index % len(CLASS_PROMPTS)].format(task)


def link_of_artifact(artifact: Any) -> Any:
    """The ``LinkConfig`` an artifact was calibrated with (mode, bandwidth, power, fading)."""
    from meg_jax.meg.link import LinkConfig

    prov = dict(artifact.provenance)
    return LinkConfig(
        mode=artifact.link_mode,
        bandwidth_hz=float(artifact.bandwidth_hz),
        tx_power_dbm=float(artifact.tx_power_dbm if artifact.tx_power_dbm is not None else 30.0),
        noise_figure_db=float(artifact.noise_figure_db if artifact.noise_figure_db is not None else 7.0),
        bits=int(artifact.bits_per_value or 8),
        fading=str(prov.get("fading", "awgn")) if prov.get("fading") in ("awgn", "rayleigh") else "awgn",
    )


def _score(backbone: Any, images: jax.Array, prompts: Sequence[str], reference: jax.Array) -> Optional[dict[str, list[float]]]:
    if backbone.classifier is None:
        return None
    from meg_jax.data.shapes import attributes_of_prompts
    from meg_jax.meg import schemes

    q = schemes.score_images(backbone, images, attributes_of_prompts(list(prompts)), reference)
    return {"accuracy": np.asarray(q.accuracy).tolist(), "psnr_db": np.asarray(q.psnr).tolist()}


def generate_case_images(backbone: Any, cases: Sequence[dict[str, Any]], link: Any, key: jax.Array,
                         cost: str = "tiny") -> dict[str, Any]:
    """Item 5: the image at each case's (K, r, SNR) with ``pipeline.generate``, and the teacher's.

    Same prompt and initial noise for both; the teacher's is the 50-step, uncompressed,
    noiseless reference. Returns images ``[N, H, W, 3]`` in [-1, 1] (NumPy), the prompts,
    the pipeline's costs per case and, with a classifier, accuracy/PSNR of each image.
    """
    from meg_jax.meg import pipeline

    prompts = [class_prompt(c["task"], i) for i, c in enumerate(cases)]
    h = backbone.config.latent_size
    noise = jax.random.normal(jax.random.fold_in(key, 1), (len(cases), h, h, backbone.config.vae.latent_channels))
    reference = pipeline.reference_images(backbone, prompts, noise)
    images, costs = [], []
    for i, c in enumerate(cases):
        img, cst = pipeline.generate(backbone, prompts[i:i + 1], int(c["steps"]), float(c["merge_ratio"]), link,
                                     jax.random.fold_in(key, 100 + i), snr_db=float(c["snr_db"]),
                                     noise=noise[i:i + 1], cost=cost)
        images.append(np.asarray(img[0]))
        costs.append({"latency_s": float(cst.latency_s[0]), "ue_energy_j": float(cst.ue_energy_j[0]),
                      "tx_time_s": float(cst.tx_time_s[0]), "es_time_s": float(cst.es_time_s[0])})
    images = np.stack(images)
    return {
        "prompts": prompts,
        "images": images,
        "reference": np.asarray(reference),
        "pipeline_costs": costs,
        "scores": _score(backbone, jnp.asarray(images), prompts, reference),
        "reference_scores": _score(backbone, reference, prompts, reference),
    }


def image_grid(backbone: Any, steps: Sequence[int], ratios: Sequence[float], link: Any, snr_db: float,
               key: jax.Array, prompt: str) -> np.ndarray:
    """Images ``[len(steps), len(ratios), H, W, 3]`` of one prompt and noise over a (K, r) grid.

    The ES latents are computed once per K and sent at every r (one compile per K and per r
    rather than per pair).
    """
    from meg_jax.meg import pipeline

    tokens = pipeline.tokenize(backbone, [prompt])
    h = backbone.config.latent_size
    noise = jax.random.normal(jax.random.fold_in(key, 1), (1, h, h, backbone.config.vae.latent_channels))
    context = jax.jit(pipeline.encode_text)(backbone, tokens)
    es = jax.jit(pipeline.es_latents, static_argnums=3)
    rows = []
    for k in steps:
        latents = es(backbone, context, noise, int(k))
        row = []
        for r in ratios:
            row.append(np.asarray(_receive(backbone, latents, float(r), link, jnp.float32(snr_db), key)[0]))
        rows.append(row)
    return np.asarray(rows)


def _receive_impl(backbone, latents, snr_db, key, merge_ratio, link):
    from meg_jax.meg import pipeline

    received = pipeline.transmit_latents(latents, merge_ratio, link, jnp.broadcast_to(snr_db, latents.shape[:1]), key)
    return pipeline.decode_latents(backbone, received)


_receive_jit = jax.jit(_receive_impl, static_argnames=("merge_ratio", "link"))


def _receive(backbone, latents, merge_ratio, link, snr_db, key):
    return _receive_jit(backbone, latents, snr_db, key, merge_ratio=merge_ratio, link=link)


# ------------------------------------------------------------------------ orchestration
def oracle_rollout(ro: Rollout) -> Rollout:
    """``ro`` with the choices replaced by the oracle's most likely action per request (perfect CSI)."""
    _, probs, _ = fit_oracle_on(ro)
    choice = np.argmax(probs, axis=-1)
    num_r = len(ro.grid_ratios)
    c = _pick(ro.table_costs, choice)
    return dataclasses.replace(
        ro, steps=ro.grid_steps[choice // num_r], merge_ratio=ro.grid_ratios[choice % num_r],
        quality=_pick(ro.table_quality, choice), latency_s=c[..., 0], energy_j=c[..., 1],
    )


def _log(progress: Any, message: str) -> None:
    if progress is not None:
        progress(message)


def evaluate_runs(
    run_dirs: Sequence[str],
    *,
    episodes: int = 1024,
    preset: str = "tiny",
    extra_presets: Sequence[str] = ("sdxl-mobile",),
    sweep_blocks: int = 0,
    sweep_fractions: Sequence[float] = (0.15, 0.35, 0.6, 1.0),
    backbone: Any = None,
    backbone_path: Optional[str] = None,
    image_snrs_db: Sequence[float] = (0.0, 10.0, 25.0),
    grid_steps: Sequence[int] = (1, 2, 4, 8),
    grid_ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    shifts: Sequence[ChannelShift] = DEFAULT_SHIFTS,
    seed: int = 0,
    artifact: Any = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Everything the report shows, for the trained runs in ``run_dirs`` (may be empty).

    Args:
      run_dirs: ``train.cvpo`` run directories (CVPO, PPO-Lagrangian); they must share the
        environment spec. With none, the Lagrangian oracle stands in for the policy.
      episodes: fresh evaluation episodes (one parallel slot each).
      preset: environment preset when no run names one.
      extra_presets: presets whose scheme comparison (item 1) is added from their artifact if
        it exists (no trained policy: frontier, fixed, oracle and conventional schemes).
      sweep_blocks: CVPO ``train_step`` blocks per latency limit for item 3 (0: no retraining,
        the sweep shows the oracle and the best fixed policy only).
      sweep_fractions: where the swept latency limits lie (see :func:`sweep_latency_limits`).
      backbone: a loaded ``Backbone`` for item 5; else ``backbone_path`` is loaded if given.
      image_snrs_db: channel states (true SNR, dB) of the item-5 images.
      grid_steps, grid_ratios: the (K, r) image grid (empty to skip).
      shifts: item 6's channel shifts.
      seed: evaluation key ``PRNGKey(seed)`` (the same episodes for every policy).
      artifact: ``CalibrationArtifact`` object overriding the runs'/preset's (tests).
      progress: called with one line per stage.

    Returns:
      JSON-ready results, plus ``images_data`` / ``grid_data`` (NumPy images) when generated.
    """
    import meg_jax.env as menv
    from meg_jax.rl.config import EnvSpec

    key = jax.random.PRNGKey(seed)
    k_eval, k_images = jax.random.split(key)
    policies = []
    for d in run_dirs:
        _log(progress, f"loading {d}")
        policies.append(load_run(d))
    if policies:
        spec = policies[0].config.env
        if any(p.config.env != spec for p in policies[1:]):
            raise ValueError("the runs were trained on different environments; evaluate them separately: "
                             + ", ".join(f"{p.run_dir}: {p.config.env}" for p in policies))
        if artifact is None:
            artifact = policies[0].artifact
    else:
        spec = EnvSpec(preset=preset)
    env_config = menv.get_preset(spec.preset)
    art = menv.load_artifact(env_config, artifact if artifact is not None else spec.artifact)
    results: dict[str, Any] = {
        "preset": spec.preset,
        "episodes": episodes,
        "seed": seed,
        "artifact_provenance": dict(art.provenance),
        "runs": [],
        "notes": [],
    }

    # nominal rollouts: the tables (and, per policy, its choices)
    envs: dict[bool, Any] = {}

    def env_for(discrete: bool) -> Any:
        if discrete not in envs:
            envs[discrete] = make_eval_env(spec, episodes, discrete, art)
        return envs[discrete]

    base_env = env_for(False)
    params = base_env.params
    learned: dict[str, dict[str, Any]] = {}
    rollouts: dict[str, Rollout] = {}
    runs_fn: dict[str, Callable] = {}
    for p in policies:
        _log(progress, f"evaluating {p.name} on {episodes} fresh episodes")
        env = env_for(p.discrete)
        fn = make_rollout(env, p.act, p.config.eval.deterministic)
        runs_fn[p.name] = fn
        ro = rollout(fn, env.params, p.actor_params, k_eval)
        rollouts[p.name] = ro
        learned[p.name] = summarise_rollout(ro)
        curves = training_curves(p.log_dir or p.run_dir)
        results["runs"].append({"name": p.name, "algo": p.algo, "run_dir": p.run_dir, "checkpoint_step": p.step,
                                "env_steps": curves["env_steps"][-1] if curves["env_steps"] else 0.0,
                                "config": _config_dict(p.config)})
        results.setdefault("training", {})[p.name] = curves
    # any compiled rollout records the action tables (they do not depend on the policy): reuse one
    if policies:
        tables_fn, tables_actor = runs_fn[policies[0].name], policies[0].actor_params
    else:
        tables_fn, tables_actor = make_rollout(base_env), None
    if rollouts:
        nominal = next(iter(rollouts.values()))
    else:
        _log(progress, f"recording the action tables on {episodes} fresh episodes")
        nominal = rollout(tables_fn, params, tables_actor, k_eval)

    # (1) schemes
    _log(progress, "(1) comparing with the conventional schemes")
    comparisons = [scheme_comparison(nominal, art, params, learned, spec.preset)]
    for extra in extra_presets:
        if extra == spec.preset:
            continue
        cfg = menv.get_preset(extra)
        path = menv.meg_env.resolve_artifact_path(cfg.artifact_path)
        if not os.path.exists(path):
            results["notes"].append(f"item 1 for preset {extra!r} skipped: its artifact {path} does not exist "
                                    "(make it with `meg-jax calibrate`).")
            continue
        try:
            extra_env = make_eval_env(dataclasses.replace(spec, preset=extra, artifact=None, limits=None), episodes)
        except ValueError as e:
            results["notes"].append(f"item 1 for preset {extra!r} skipped: {e}")
            continue
        extra_art = menv.load_artifact(cfg)
        same_shape = all(np.shape(a) == np.shape(b) for a, b in
                         zip(jax.tree.leaves(extra_env.params), jax.tree.leaves(params)))
        if same_shape and int(extra_env.episode_length) == int(base_env.episode_length):
            ro = rollout(tables_fn, extra_env.params, tables_actor, k_eval)
        else:
            ro = rollout(make_rollout(extra_env), extra_env.params, None, k_eval)
        comparisons.append(scheme_comparison(ro, extra_art, extra_env.params, {}, extra))
        comparisons[-1]["note"] = "no trained policy on this preset: frontier, references and schemes only"
    results["comparisons"] = comparisons

    # (4) behaviour
    _log(progress, "(4) the policies' choices against SNR and task class")
    behaviour = {name: policy_behaviour(ro, art.task_classes) for name, ro in rollouts.items()}
    if not behaviour:
        behaviour["oracle (perfect CSI)"] = policy_behaviour(oracle_rollout(nominal), art.task_classes)
    results["behaviour"] = behaviour

    # (6) robustness
    _log(progress, "(6) robustness under shifted channels")
    robust = {}
    for p in policies:
        robust[p.name] = robustness(runs_fn[p.name], env_for(p.discrete).params, p.actor_params, k_eval, shifts)
    if not robust:
        rows = []
        for shift in shifts:
            ro = rollout(tables_fn, shift_params(params, shift), tables_actor, k_eval)
            refs = reference_policies(ro)
            rows.append({"shift": shift.name, "mean_snr_db": float(np.mean(ro.snr_db)), "policy": refs["oracle"],
                         "oracle": refs["oracle"], "best_fixed": refs.get("best_fixed")})
        robust["oracle (perfect CSI)"] = rows
    results["robustness"] = robust

    # (3) sweep over latency limits
    report = getattr(base_env, "limit_report", None)
    cvpo_runs = [p for p in policies if p.algo == "cvpo"]
    if report is not None:
        lat_limits = sweep_latency_limits(report, sweep_fractions)
        limits = np.stack([lat_limits, np.full(len(lat_limits), float(params.limits[1]))], -1)
        actors, fn, sweep_params = None, tables_fn, params
        note = ("Oracle and best fixed (K, r) at each limit; no retraining was asked for "
                "(`--sweep_blocks 0`).")
        if cvpo_runs and sweep_blocks > 0:
            p = cvpo_runs[0]
            _log(progress, f"(3) retraining MEG-CVPO at {len(lat_limits)} latency limits "
                           f"({sweep_blocks} blocks each, vmapped)")
            cfg = p.config
            _, limits, actors = train_limit_sweep(cfg, lat_limits, sweep_blocks, jax.random.PRNGKey(cfg.seed), artifact)
            fn = runs_fn[p.name]
            sweep_params = env_for(p.discrete).params
            per_block = cfg.env.num_envs * cfg.cvpo.env_steps_per_block
            note = (f"MEG-CVPO retrained from scratch at each latency limit (energy limit fixed at "
                    f"{_ms_text(params.limits[1])} mJ), {sweep_blocks} blocks = {sweep_blocks * per_block} env steps "
                    f"each, all limits in one `jax.vmap` of `cvpo.make_train`; the oracle and the best fixed "
                    f"(K, r) on the same evaluation episodes.")
        else:
            _log(progress, "(3) oracle and best fixed over latency limits")
        sweep = limit_sweep(fn, sweep_params, limits, actors, k_eval, fallback_actor=tables_actor)
        sweep["note"] = note
        results["sweep"] = sweep

    # (5) images
    if backbone is None and backbone_path is not None:
        from meg_jax.checkpoint import load_backbone

        _log(progress, f"(5) loading the backbone {backbone_path}")
        backbone = load_backbone(backbone_path)
        results["backbone"] = backbone_path
    elif backbone is not None:
        results["backbone"] = backbone_path or "in-memory backbone"
    if backbone is not None:
        source_name = cvpo_runs[0].name if cvpo_runs else (policies[0].name if policies else "oracle (perfect CSI)")
        source = rollouts.get(source_name) or oracle_rollout(nominal)
        cases = policy_image_cases(source, art.task_classes, image_snrs_db)
        link = link_of_artifact(art)
        _log(progress, f"(5) generating {len(cases)} images at {source_name}'s choices and the teacher's")
        data = generate_case_images(backbone, cases, link, k_images, cost=_cost_preset_name(art))
        results["image_policy"] = source_name
        results["image_cases"] = cases
        results["image_scores"] = data["scores"]
        results["image_reference_scores"] = data["reference_scores"]
        results["image_pipeline_costs"] = data["pipeline_costs"]
        results["image_prompts"] = data["prompts"]
        results["images_data"] = data
        if grid_steps and grid_ratios:
            _log(progress, f"(5) the {len(grid_steps)} x {len(grid_ratios)} (K, r) image grid")
            snr = float(image_snrs_db[len(image_snrs_db) // 2]) if image_snrs_db else 10.0
            prompt = class_prompt(art.task_classes[0])
            results["grid"] = {"steps": list(grid_steps), "ratios": list(grid_ratios), "snr_db": snr, "prompt": prompt}
            results["grid_data"] = image_grid(backbone, grid_steps, grid_ratios, link, snr, k_images, prompt)
    else:
        results["images_note"] = "Not generated: no backbone was given (pass the shipped `checkpoints/tiny`)."
    return results


def _ms_text(x: Any) -> str:
    return f"{1e3 * float(x):.3g}"


def _cost_preset_name(art: Any) -> str:
    from meg_jax.meg import costs as costs_lib

    name = str(art.provenance.get("cost_preset", "tiny"))
    return name if name in costs_lib.COST_PRESETS else "tiny"


def _config_dict(config: Any) -> dict[str, Any]:
    from meg_jax import config as config_lib

    return config_lib.to_dict(config)
