"""The evaluation job's orchestration: everything ``eval.evaluate`` and ``meg-jax demo`` report.

Application code (the library pieces it calls live once in ``meg_jax.rl``: rollouts and
scores in ``rl.evaluate``, reference policies and the oracle in ``rl.baselines``, the
conventional schemes in ``rl.comparison``). One rollout per policy records every request
and the quality and costs of every grid action there, so the reference policies and the
conventional schemes are scored on exactly the policy's requests. The six items of the
report (issue 7):

1. scheme comparison — learned policies, the MEG frontier at matched quality, the fixed
   policies and the three conventional schemes (``meg_jax.rl.comparison.scheme_comparison``);
2. training curves — episode-average costs over their limits and λ over training
   (``eval.runs.training_curves``);
3. :func:`limit_sweep` / :func:`train_limit_sweep` — quality and costs over a sweep of
   latency limits, CVPO retrained per limit (``vmap`` over limits of ``cvpo.make_train``);
4. :func:`policy_behaviour` — the chosen K and r against SNR and task class;
5. images at the policy's choices (``eval.images``);
6. :func:`robustness` — the trained policy under shifted channels, beside the oracle of the
   shifted channel.

Every rollout of one policy (nominal, each channel shift, each swept limit) runs the same
compiled program: environment parameters and actor weights are arguments
(``meg_jax.rl.evaluate``). Units: latency in seconds, UE energy in joules, SNR in dB.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import meg_jax.env as menv
from meg_jax import config as config_lib
from meg_jax.checkpoint import load_backbone
from meg_jax.env import replace_params
from meg_jax.meg import costs as costs_lib
from meg_jax.rl import cvpo
from meg_jax.rl.baselines import oracle_rollout, reference_policies
from meg_jax.rl.comparison import scheme_comparison
from meg_jax.rl.config import EnvSpec
from meg_jax.rl.evaluate import (
    DEFAULT_SHIFTS,
    ChannelShift,
    LearnedPolicy,
    Rollout,
    cost_weights_for,
    make_env,
    record_rollout,
    shift_params,
)

from . import images as images_lib
from .runs import load_run, training_curves

__all__ = [
    "make_eval_env",
    "policy_behaviour",
    "robustness",
    "sweep_latency_limits",
    "train_limit_sweep",
    "limit_sweep",
    "evaluate_runs",
]


def make_eval_env(spec: Any, num_episodes: int, discrete: bool = False, artifact: Any = None) -> Any:
    """Batched env of ``spec`` (``EnvSpec``) with one slot per evaluation episode."""
    with warnings.catch_warnings():
        # "limits do not bind" is reported by the env's own job (train.cvpo, calibrate)
        warnings.filterwarnings("ignore", message="limits .* do not bind")
        return make_env(spec, num_envs=num_episodes, discrete=discrete, artifact=artifact)


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
def robustness(env: Any, policy: Any, policy_params: Any, key: jax.Array,
               shifts: Sequence[ChannelShift] = DEFAULT_SHIFTS) -> list[dict[str, Any]]:
    """Item 6: ``policy`` (``meg_jax.rl.evaluate``'s convention) under each channel shift.

    The limits stay the trained ones; the oracle is refitted on the shifted channel (perfect
    knowledge of it), the best fixed feasible (K, r) too. Same key for every shift; every
    shift runs the same compiled rollout (the shifted ``EnvParams`` are an argument).
    ``policy=None`` scores the oracle itself as the policy.
    """
    out = []
    for shift in shifts:
        ro = record_rollout(env, key, policy, policy_params=policy_params, env_params=shift_params(env.params, shift))
        refs = reference_policies(ro)
        out.append({
            "shift": shift.name,
            "mean_snr_db": float(np.mean(ro.snr_db)),
            "policy": refs["oracle"] if policy is None else ro.result().named(),
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
    env = make_eval_env(config.env, config.env.num_envs, config.cvpo.discrete, artifact)
    base = env.params
    limits = np.stack([np.asarray(latency_limits, np.float64),
                       np.full(len(latency_limits), float(base.limits[1]))], axis=-1)

    def one(lim, k):
        lim = lim.astype(jnp.float32)
        p = base.replace(limits=lim, cost_weights=cost_weights_for(base, lim))
        e = replace_params(env, p)
        state, _ = cvpo.make_train(config.cvpo, e, num_blocks)(k)
        return state.actor

    actors = jax.jit(jax.vmap(one, in_axes=(0, None)))(jnp.asarray(limits, jnp.float32), key)
    return env, limits, actors


def limit_sweep(env: Any, policy: Any, latency_limits: np.ndarray, actors: Any, key: jax.Array,
                fallback_params: Any = None) -> dict[str, Any]:
    """Item 3: quality and costs over latency limits: retrained CVPO (if ``actors``), oracle, best fixed.

    Args:
      env: the evaluation env of the CVPO policy (its params are the nominal ones).
      policy: the parametrised CVPO policy (``LearnedPolicy``), or None (tables only).
      latency_limits: [L, 2] (latency s, energy J) limits.
      actors: stacked actor params [L, ...] (from :func:`train_limit_sweep`) or None (then
        only the oracle and the best fixed policy are scored).
      key: evaluation key (same for every limit).
      fallback_params: the policy parameters used when ``actors`` is None.
    """
    params = env.params
    rows = []
    for i, lim in enumerate(np.asarray(latency_limits, np.float64)):
        lim32 = jnp.asarray(lim, jnp.float32)
        p = params.replace(limits=lim32, cost_weights=cost_weights_for(params, lim32))
        actor = fallback_params if actors is None else jax.tree.map(lambda x: x[i], actors)
        ro = record_rollout(env, key, policy, policy_params=actor, env_params=p)
        refs = reference_policies(ro)
        row = {"latency_limit_s": float(lim[0]), "energy_limit_j": float(lim[1]),
               "oracle": refs["oracle"], "best_fixed": refs.get("best_fixed")}
        if actors is not None:
            row["cvpo"] = ro.result().named()
        rows.append(row)
    return {"rows": rows, "trained": actors is not None}


# ------------------------------------------------------------------------ orchestration
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
    # per policy: (its eval env, the parametrised policy, its actor weights); every rollout of
    # one policy below (shifts, limits) reuses the compiled program of its first one
    sources: dict[str, tuple[Any, Any, Any]] = {}
    for p in policies:
        _log(progress, f"evaluating {p.name} on {episodes} fresh episodes")
        sources[p.name] = (env_for(p.discrete), LearnedPolicy(p.act, p.config.eval.deterministic), p.actor_params)
        env, policy, actor = sources[p.name]
        ro = record_rollout(env, k_eval, policy, policy_params=actor)
        rollouts[p.name] = ro
        learned[p.name] = ro.result().named()
        curves = training_curves(p.log_dir or p.run_dir)
        results["runs"].append({"name": p.name, "algo": p.algo, "run_dir": p.run_dir, "checkpoint_step": p.step,
                                "env_steps": curves["env_steps"][-1] if curves["env_steps"] else 0.0,
                                "config": _config_dict(p.config)})
        results.setdefault("training", {})[p.name] = curves
    # any compiled rollout records the action tables (they do not depend on the policy): reuse one
    tables_env, tables_policy, tables_actor = sources[policies[0].name] if policies else (base_env, None, None)
    if rollouts:
        nominal = next(iter(rollouts.values()))
    else:
        _log(progress, f"recording the action tables on {episodes} fresh episodes")
        nominal = record_rollout(tables_env, k_eval)

    # (1) schemes
    _log(progress, "(1) comparing with the conventional schemes")
    comparisons = [scheme_comparison(nominal, art, params, learned, spec.preset)]
    for extra in extra_presets:
        if extra == spec.preset:
            continue
        cfg = menv.get_preset(extra)
        path = menv.resolve_artifact_path(cfg.artifact_path)
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
            ro = record_rollout(tables_env, k_eval, tables_policy, policy_params=tables_actor,
                                env_params=extra_env.params)
        else:
            ro = record_rollout(extra_env, k_eval)
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
        robust[p.name] = robustness(*sources[p.name], k_eval, shifts)
    if not robust:
        robust["oracle (perfect CSI)"] = robustness(tables_env, None, None, k_eval, shifts)
    results["robustness"] = robust

    # (3) sweep over latency limits
    report = getattr(base_env, "limit_report", None)
    cvpo_runs = [p for p in policies if p.algo == "cvpo"]
    if report is not None:
        lat_limits = sweep_latency_limits(report, sweep_fractions)
        limits = np.stack([lat_limits, np.full(len(lat_limits), float(params.limits[1]))], -1)
        actors, sweep_env, sweep_policy = None, tables_env, tables_policy
        note = ("Oracle and best fixed (K, r) at each limit; no retraining was asked for "
                "(`--sweep_blocks 0`).")
        if cvpo_runs and sweep_blocks > 0:
            p = cvpo_runs[0]
            _log(progress, f"(3) retraining MEG-CVPO at {len(lat_limits)} latency limits "
                           f"({sweep_blocks} blocks each, vmapped)")
            cfg = p.config
            _, limits, actors = train_limit_sweep(cfg, lat_limits, sweep_blocks, jax.random.PRNGKey(cfg.seed), artifact)
            sweep_env, sweep_policy, _ = sources[p.name]
            per_block = cfg.env.num_envs * cfg.cvpo.env_steps_per_block
            note = (f"MEG-CVPO retrained from scratch at each latency limit (energy limit fixed at "
                    f"{_ms_text(params.limits[1])} mJ), {sweep_blocks} blocks = {sweep_blocks * per_block} env steps "
                    f"each, all limits in one `jax.vmap` of `cvpo.make_train`; the oracle and the best fixed "
                    f"(K, r) on the same evaluation episodes.")
        else:
            _log(progress, "(3) oracle and best fixed over latency limits")
        sweep = limit_sweep(sweep_env, sweep_policy, limits, actors, k_eval, fallback_params=tables_actor)
        sweep["note"] = note
        results["sweep"] = sweep

    # (5) images
    if backbone is None and backbone_path is not None:
        _log(progress, f"(5) loading the backbone {backbone_path}")
        backbone = load_backbone(backbone_path)
        results["backbone"] = backbone_path
    elif backbone is not None:
        results["backbone"] = backbone_path or "in-memory backbone"
    if backbone is not None:
        source_name = cvpo_runs[0].name if cvpo_runs else (policies[0].name if policies else "oracle (perfect CSI)")
        source = rollouts.get(source_name) or oracle_rollout(nominal)
        cases = images_lib.policy_image_cases(source, art.task_classes, image_snrs_db)
        link = images_lib.link_of_artifact(art)
        _log(progress, f"(5) generating {len(cases)} images at {source_name}'s choices and the teacher's")
        data = images_lib.generate_case_images(backbone, cases, link, k_images, cost=_cost_preset_name(art))
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
            prompt = images_lib.class_prompt(art.task_classes[0])
            results["grid"] = {"steps": list(grid_steps), "ratios": list(grid_ratios), "snr_db": snr, "prompt": prompt}
            results["grid_data"] = images_lib.image_grid(backbone, grid_steps, grid_ratios, link, snr, k_images, prompt)
    else:
        results["images_note"] = "Not generated: no backbone was given (pass the shipped `checkpoints/tiny`)."
    return results


def _ms_text(x: Any) -> str:
    return f"{1e3 * float(x):.3g}"


def _cost_preset_name(art: Any) -> str:
    name = str(art.provenance.get("cost_preset", "tiny"))
    return name if name in costs_lib.COST_PRESETS else "tiny"


def _config_dict(config: Any) -> dict[str, Any]:
    return config_lib.to_dict(config)
