"""How much of the fixed -> oracle gap can a policy close that sees only its channel *estimate*?

    python -m eval.observable_oracle                          # tiny preset, default CSI
    python -m eval.observable_oracle --preset sdxl-mobile --csi-delay-s 0 --csi-error-std 0

The oracle of ``meg_jax.env.oracle`` knows every request's true SNR. A learned policy sees the
observation: the estimated SNR (``csi_delay_s`` old, with ``csi_error_std`` error), its
history, the large-scale SNR, speed, task class and budget. This script measures an
*information ceiling* for the simplest such policy, "a table over (estimated SNR bin, task
class)":

1. ``--fit-episodes`` episodes (key 123) give, per bin of the current SNR estimate and class,
   the conditional mean quality and costs of every grid action;
2. the Lagrangian oracle (``fit_oracle``) is fitted on those conditional means: its action
   depends on (bin, class) only;
3. that table policy is scored on the evaluation episodes of ``train.cvpo`` (key
   ``fold_in(PRNGKey(seed), 10**6)``, ``--episodes`` of 32 requests), beside the true oracle and
   the best fixed (K, r) of the same episodes, as ``gap closed`` like docs/results.md.

A learned policy also has the SNR history and the large-scale SNR, so it can in principle do
somewhat better than this table; if the table already closes most of the gap, the channel
estimate is not what keeps an agent from the oracle.

The table reads only what the observation carries (:func:`observed_information`): ``paper``'s
observation (the authors': the channel gain and the previous request's costs) has no task
class, so there the table is over the SNR alone and the ceiling is lower than the oracle's by
what the class is worth. Fitted at a policy's own mean costs (``at_costs`` of
:func:`observable_ceiling`) the same table gives the observable frontier at those costs: what a
policy seeing the same information could have had for what it spent.

With ``--quality_source replay`` (per-request prompt replay, ``docs/replay.md``) each request's
reward is its calibration prompt's quality. The oracle knows it (perfect information: the
prompt index is read from the state); the table policy does not (the agent observes the
class, never the prompt), so its conditional means average over the prompts of a (bin,
class). The extra column "SNR+class oracle Q" is the oracle that knows the true SNR and
class but not the prompt (fitted on the class-mean tables, scored on the prompts' quality):
oracle - it is what the prompt information is worth, it - table is what the SNR estimate
costs.

    python -m eval.observable_oracle --quality_source replay --reward_metric neg_log_mse \
        --artifact /work/runs/calib_v2/tiny.npz
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import meg_jax.env as menv
from meg_jax.env import oracle as oracle_lib
from meg_jax.rl.config import REFERENCE_TOLERANCE, EnvSpec
from meg_jax.rl.evaluate import gap_closed, make_env

EPISODE_LENGTH = 32


def observed_information(params, observe: Optional[Sequence[str]] = None) -> tuple[bool, bool]:
    """(the SNR, the task class): which of the two the agents' observation carries.

    ``observe`` is the run's ``EnvSpec.observe`` (None: every field of
    ``meg_jax.env.observation_fields``). ``paper``'s observation (the authors') has the channel
    gain but no class, so its table policy must not read the class: a ceiling that knows what
    the agents cannot see is no ceiling of theirs.

    Raises:
      ValueError: the observation carries the channel only through ``mean_snr``, which the table
        (binned on the SNR estimate) cannot read.
    """
    from meg_jax.env.state import observation_fields

    fields = set(observation_fields(params)) if observe is None else set(observe)
    snr_seen = bool(fields & {"est_snr", "gain_to_noise"})
    if "mean_snr" in fields and not snr_seen:
        # the table bins the instantaneous SNR estimate; without it, it would be blind to the
        # channel the agents read through mean_snr: a "ceiling" below what they can know
        raise ValueError(f"observe={tuple(observe)!r}: the agents see the channel through 'mean_snr' only, which "
                         "the observable table policy cannot read (it bins 'est_snr'); add 'est_snr' to observe, "
                         "or score without the ceiling (eval.compare --no_observable)")
    return snr_seen, "task" in fields


def _bin_index(est: np.ndarray, cls: np.ndarray, num_classes: int, bin_db: float, info: tuple[bool, bool]):
    """Each request's table cell [M] and the number of cells (unobserved inputs collapse to one)."""
    snr_seen, class_seen = info
    edges = np.arange(-80.0, 120.0, bin_db)
    snr_bin = np.digitize(est, edges) if snr_seen else np.zeros(est.shape, np.int64)
    cells = num_classes if class_seen else 1
    return snr_bin * cells + (cls if class_seen else 0), (len(edges) + 1) * cells


def _conditional_means(fit, num_classes: int, bin_db: float, info: tuple[bool, bool]):
    """Per table cell, the fit requests' mean quality [B, A] and costs [B, A, m], and their count [B]."""
    _, f_est, f_cls, f_q, f_c = fit
    f_bin, nb = _bin_index(f_est, f_cls, num_classes, bin_db, info)
    count = np.bincount(f_bin, minlength=nb)
    sum_q, sum_c = np.zeros((nb,) + f_q.shape[1:]), np.zeros((nb,) + f_c.shape[1:])
    np.add.at(sum_q, f_bin, f_q)
    np.add.at(sum_c, f_bin, f_c)
    return sum_q / np.maximum(count, 1)[:, None], sum_c / np.maximum(count, 1)[:, None, None], count, f_bin


def table_policy_scores(fit, test, limits, num_classes: int, bin_db: float,
                        info: tuple[bool, bool] = (True, True), at_costs=None):
    """Fits the (estimate bin, class) table on ``fit`` and scores it on ``test``.

    ``info`` says which of (SNR estimate, class) the table may read (:func:`observed_information`).
    The multipliers are fitted on the ``fit`` requests at ``limits``; with ``at_costs`` [m]
    instead on the ``test`` requests at those mean costs, with each cell's costs read as the
    test requests' mean there, so that the table spends exactly what a policy scored on
    ``test`` spent (the observable frontier at that policy's costs; the fit requests' cell
    means would miss it by their sampling difference, which where the frontier is steep is
    worth a few points of a small gap).
    Returns (quality, mean costs / limits [m], share of test requests in cells the fit never saw).
    """
    return _score_table(_conditional_means(fit, num_classes, bin_db, info), test, limits, num_classes, bin_db,
                        info, at_costs)


def _score_table(cells, test, limits, num_classes: int, bin_db: float, info: tuple[bool, bool],
                 at_costs=None, test_cell_costs=None):
    """:func:`table_policy_scores` on a fitted table ``cells`` (:func:`_conditional_means` of the
    fit requests); ``test_cell_costs`` the test requests' cell costs if already computed."""
    mean_q, mean_c, count, f_bin = cells
    _, t_est, t_cls, t_q, t_c = test
    t_bin, _ = _bin_index(t_est, t_cls, num_classes, bin_db, info)
    if at_costs is None:
        sol = oracle_lib.fit_oracle(mean_q[f_bin], mean_c[f_bin], limits)
        target = limits
    else:
        target = np.asarray(at_costs, np.float64)
        # the cells' costs on the scored requests, so the table spends exactly ``at_costs`` there
        mean_c = _conditional_means(test, num_classes, bin_db, info)[1] if test_cell_costs is None else test_cell_costs
        sol = oracle_lib.fit_oracle(mean_q[t_bin], mean_c[t_bin], target)
    probs = np.asarray(oracle_lib.oracle_probabilities(
        jnp.asarray(mean_q[t_bin]), jnp.asarray(mean_c[t_bin]), jnp.asarray(target), jnp.asarray(sol.lambdas),
        sol.temperature), np.float64)
    quality = float(np.mean(np.sum(probs * t_q, axis=1)))
    costs = np.einsum("ma,mak->k", probs, t_c) / len(t_q)
    unseen = float(np.mean(count[t_bin] == 0))
    return quality, costs / limits, unseen


def observable_ceiling(spec: EnvSpec, seeds: Sequence[int], episodes: int = 1024, fit_episodes: int = 4096,
                       bin_db: float = 0.5, episode_length: int = EPISODE_LENGTH,
                       at_costs: Optional[Mapping[int, Sequence[Sequence[float]]]] = None) -> dict[int, dict]:
    """The (estimated-SNR bin, class) table policy scored on each seed's evaluation episodes.

    The evaluation episodes are ``train.cvpo``'s (key ``fold_in(PRNGKey(seed), 10**6)``,
    ``episodes`` of ``episode_length`` requests), so the numbers pair with its ``eval.json``.
    The table reads only what the agents' observation carries (:func:`observed_information`:
    on ``paper`` the SNR but not the class).

    Args:
      at_costs: optionally seed -> mean cost vectors [m] (s, J) of policies scored on that
        seed's episodes; each entry then also gets ``"at_costs"``: the table's quality with its
        multipliers fitted to spend those costs (the observable frontier there), in order.

    Returns:
      seed -> {"quality", "latency_over_limit", "energy_over_limit", "fixed_quality",
      "oracle_quality", "gap_closed", "observes"} (the table policy's quality and its gap
      closed, the best fixed feasible action's and the oracle's quality on the same requests,
      and which of "snr" / "class" the table read), plus "at_costs" when asked.
    """
    fit_env = make_env(spec, num_envs=fit_episodes, discrete=True)
    params = fit_env.params
    limits = np.asarray(params.limits, np.float64)
    num_classes = int(params.num_classes)
    info = observed_information(params, spec.observe)
    observes = [name for name, seen in zip(("snr", "class"), info) if seen]
    fit = _request_tables(fit_env, jax.random.PRNGKey(123), episode_length)
    cells = _conditional_means(fit, num_classes, bin_db, info)  # the table, fitted once for every seed
    eval_env = make_env(spec, num_envs=episodes, discrete=True)
    out = {}
    for seed in seeds:
        test = _request_tables(eval_env, _eval_key(seed), episode_length)
        orc = oracle_lib.fit_oracle(test[3], test[4], limits)
        fixed = oracle_lib.best_fixed_action(params, jnp.asarray(test[3]), jnp.asarray(test[4]), limits)
        q, ratio, _ = _score_table(cells, test, limits, num_classes, bin_db, info)
        out[int(seed)] = {
            "quality": q, "latency_over_limit": float(ratio[0]), "energy_over_limit": float(ratio[1]),
            "fixed_quality": float(fixed.avg_quality), "oracle_quality": float(orc.avg_quality),
            "gap_closed": gap_closed(q, fixed.avg_quality, orc.avg_quality), "observes": observes,
        }
        if at_costs is not None:
            test_cell_costs = _conditional_means(test, num_classes, bin_db, info)[1]
            out[int(seed)]["at_costs"] = [
                _score_table(cells, test, limits, num_classes, bin_db, info,
                             _positive_costs(seed, costs, limits.shape[0]), test_cell_costs)[0]
                for costs in at_costs.get(seed, ())]
    return out


def _positive_costs(seed: int, costs, m: int) -> np.ndarray:
    costs = np.asarray(costs, np.float64)
    if costs.shape != (m,) or not np.all(costs > 0):
        raise ValueError(f"costs of seed {seed}: expected {m} positive mean costs, got {costs}")
    return costs


def _eval_key(seed: int) -> jax.Array:
    """``train.cvpo``'s evaluation key of ``seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(int(seed)), 10**6)


def _request_tables(env, key: jax.Array, episode_length: int):
    """(true SNR, estimated SNR, class, Q [E*T, A], C [E*T, A, m]) of ``env``'s episodes under ``key``."""
    collect = jax.jit(lambda k: oracle_lib.collect_env_requests(env, k, episode_length, estimate=True))
    snr, cls, est = (np.asarray(x).reshape(-1) for x in collect(key))
    q, c = oracle_lib.action_tables(env.params, jnp.asarray(snr), jnp.asarray(cls))
    return snr, est, cls, np.asarray(q, np.float64), np.asarray(c, np.float64)


def equal_cost_oracle(spec: EnvSpec, costs_by_seed: Mapping[int, Sequence[Sequence[float]]],
                      episodes: int = 1024) -> dict[int, list[float]]:
    """The oracle's quality on each seed's evaluation episodes when it may spend a policy's own costs.

    "Gap closed" measures a policy against the Lagrangian oracle at the limits. A policy that
    spends more than a limit (up to the feasibility tolerance) buys quality the oracle was
    denied; where that tolerance is worth as much as the fixed -> oracle gap (the ``paper``
    preset) agents rank by their cost excess. Fitting the oracle with its limits set to the
    policy's own mean costs compares both at equal cost: with perfect channel knowledge the
    oracle's feasible set contains every policy's, so its quality there bounds the policy's
    (up to the oracle's temperature, tau log A, and the evaluation's sampling noise).

    Args:
      spec: the environment the policies were evaluated on (a run's ``config.env``).
      costs_by_seed: seed -> list of mean episode-average cost vectors [m] (s, J), one per policy.
      episodes: evaluation episodes per seed (``train.cvpo``'s, key ``fold_in(PRNGKey(seed), 10**6)``,
        as ``meg_jax.rl.baselines.evaluate_all`` draws them).

    Returns:
      seed -> the oracle's expected quality at each of the seed's cost vectors, in order.
    """
    from meg_jax.rl.baselines import request_tables

    env = make_env(spec, num_envs=episodes, discrete=True)
    out: dict[int, list[float]] = {}
    for seed, cost_list in costs_by_seed.items():
        q, c = request_tables(env, _eval_key(seed))  # the exact per-request tables the agents were scored on
        q, c = q.reshape(-1, q.shape[-1]), c.reshape(-1, *c.shape[-2:])
        qualities = []
        for costs in cost_list:
            costs = _positive_costs(seed, costs, c.shape[-1])
            qualities.append(float(oracle_lib.fit_oracle(q, c, costs).avg_quality))
        out[int(seed)] = qualities
    return out


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.observable_oracle``."""

    preset: str = "tiny"  # environment preset
    episodes: int = 1024  # evaluation episodes (train.cvpo's eval.num_episodes)
    fit_episodes: int = 4096  # episodes that fit the table
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # evaluation keys as in train.cvpo
    bins: tuple[float, ...] = (0.5, 2.0)  # SNR-estimate bin widths (dB)
    csi_delay_s: Optional[float] = None  # age of the channel estimate (s); None: the preset's
    csi_error_std: Optional[float] = None  # error of the channel estimate; None: the preset's
    artifact: Optional[str] = None  # calibration artifact path; None: the preset's
    quality_source: str = "class_mean"  # "class_mean" or "replay" (per-prompt quality; schema-2 artifact)
    reward_metric: str = "accuracy"  # "accuracy", "pixel_accuracy", "psnr" or "neg_log_mse"


def main(argv: Optional[Sequence[str]] = None) -> None:
    import sys

    from meg_jax import config as config_lib

    argv = sys.argv[1:] if argv is None else argv
    args = config_lib.parse_cli(Args, argv, prog="python -m eval.observable_oracle",
                                description=__doc__.split("\n")[0])

    overrides = {"quality_source": args.quality_source, "reward_metric": args.reward_metric}
    for name in ("csi_delay_s", "csi_error_std"):
        if getattr(args, name) is not None:
            overrides[name] = float(getattr(args, name))
    base = menv.get_preset(args.preset)
    artifact = menv.load_artifact(base, args.artifact)

    def make(num_envs: int):  # rl.evaluate.make_env's environment, with the quality overrides
        return menv.make(args.preset, num_envs=num_envs, episode_length=EPISODE_LENGTH, artifact=artifact,
                         discrete=True, **overrides)

    fit_env = make(args.fit_episodes)
    params = fit_env.params
    replay = args.quality_source == "replay"
    num_classes = int(params.num_classes)
    # the class-mean tables (true SNR and class, prompt unknown): the "SNR+class oracle"; the
    # mean of the prompts' rows is the class row (quality is linear in the tables)
    table = params.quality_table
    blind_params = params.replace(quality_table=jnp.mean(
        table.reshape(table.shape[:3] + (num_classes, params.prompts_per_class, 2)), axis=4))
    limits = np.asarray(params.limits, np.float64)

    def collector(env):  # compiled once per env, reused for every key
        return jax.jit(lambda k: oracle_lib.collect_env_requests(env, k, EPISODE_LENGTH, estimate=True,
                                                                 with_prompt=True))

    def tables(collect, key):
        """True SNR, its estimate, class [N·T], every action's quality and costs, and the
        class-mean quality (numpy)."""
        snr, cls, prompt, est = (np.asarray(x).reshape(-1) for x in collect(key))
        q, c = oracle_lib.action_tables(params, jnp.asarray(snr), jnp.asarray(cls), jnp.asarray(prompt))
        q_blind = oracle_lib.action_tables(blind_params, jnp.asarray(snr), jnp.asarray(cls))[0] if replay else q
        return snr, est, cls, np.asarray(q, np.float64), np.asarray(c, np.float64), np.asarray(q_blind, np.float64)

    collect_fit = collector(fit_env)
    fit = tables(collect_fit, jax.random.PRNGKey(123))[:5]
    collect_eval = collect_fit if args.episodes == args.fit_episodes else collector(make(args.episodes))
    cfg = fit_env.config
    print(f"preset {args.preset}; CSI delay {cfg.csi_delay_s} s, error std {cfg.csi_error_std}; "
          f"quality {cfg.quality_source} (P = {params.prompts_per_class} prompts per class), reward "
          f"{cfg.reward_metric}; fit on {args.fit_episodes} episodes, evaluated on {args.episodes} x "
          f"{EPISODE_LENGTH} requests per seed")
    rows = []
    for seed in args.seeds:
        *test, q_blind = tables(collect_eval, jax.random.fold_in(jax.random.PRNGKey(seed), 10**6))
        err = np.abs(test[1] - test[0])
        orc = oracle_lib.fit_oracle(test[3], test[4], limits)
        blind = oracle_lib.fit_oracle(q_blind, test[4], limits)
        probs = np.asarray(oracle_lib.oracle_probabilities(
            jnp.asarray(q_blind), jnp.asarray(test[4]), jnp.asarray(limits), jnp.asarray(blind.lambdas),
            blind.temperature), np.float64)
        blind_q = float(np.mean(np.sum(probs * test[3], axis=1)))  # scored on the true (prompt) quality
        fixed = oracle_lib.best_fixed_action(params, jnp.asarray(test[3]), jnp.asarray(test[4]), limits,
                                             REFERENCE_TOLERANCE)
        for width in args.bins:
            q, ratio, unseen = table_policy_scores(fit, test, limits, num_classes, width, observed_information(params))
            rows.append((seed, width, float(np.mean(err)), float(np.percentile(err, 90)), fixed.avg_quality,
                         orc.avg_quality, blind_q, q, ratio, gap_closed(q, fixed.avg_quality, orc.avg_quality),
                         unseen))
    print("\n| seed | bin (dB) | mean abs SNR-estimate error (dB) | p90 (dB) | best fixed Q | oracle Q | "
          "SNR+class oracle Q | table policy Q | latency / limit | energy / limit | gap closed | "
          "eval requests in unseen bins |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, width, e_mean, e_p90, fq, oq, bq, q, ratio, gap, unseen in rows:
        print(f"| {seed} | {width:g} | {e_mean:.2f} | {e_p90:.2f} | {fq:.4f} | {oq:.4f} | {bq:.4f} | {q:.4f} | "
              f"{ratio[0]:.4f} | {ratio[1]:.4f} | {100 * gap:.1f}% | {unseen:.4f} |")
    for width in args.bins:
        gaps = [r[9] for r in rows if r[1] == width]
        print(f"bin {width:g} dB: median gap closed {100 * float(np.median(gaps)):.1f}% over {len(gaps)} seeds")


if __name__ == "__main__":
    main()
