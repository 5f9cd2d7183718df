"""The ``paper`` preset measured: fixed -> oracle gap, and MEG vs the conventional schemes.

    python -m eval.paper_system                       # 512 episodes x 64 requests, seed 0
    python -m eval.paper_system --episodes 1024 --out runs/paper_system.json

On E fresh episodes of the paper's environment (``meg_jax.env.config.PaperSystem``, T = 64)
the grid tables of every request are recorded once (``meg_jax.rl.evaluate.record_rollout``);
on them:

1. the reference policies of ``meg_jax.rl.baselines.reference_policies`` (best fixed
   feasible (K, r), always-max-quality, the Lagrangian oracle with perfect channel
   knowledge) and the fixed -> oracle gap, in reward units (-ln MSE up to a constant) and in
   PSNR dB;
2. ``meg_jax.rl.comparison.scheme_comparison``: each conventional scheme priced by the
   paper's formulas, and the lowest-latency MEG (perfect channel knowledge, no energy limit)
   at that scheme's quality minus the tolerance. Quality is the reward of the preset
   (PSNR-based) and, in a second pass with ``reward_psnr_weight = 0``, the attribute accuracy
   the other presets use.

Quality is the calibration artifact's (the tiny model standing in for SDXL): see
``docs/paper_preset.md`` for what that does and does not say about the paper's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Optional, Sequence

import jax

import meg_jax.env as menv
from meg_jax.env.config import PAPER_EPISODE_LENGTH
from meg_jax.rl.baselines import reference_policies
from meg_jax.rl.comparison import scheme_comparison
from meg_jax.rl.evaluate import record_rollout

DB_PER_NAT = 10.0 / math.log(10.0)  # PSNR dB per unit of -ln MSE


def measure(episodes: int, episode_length: int, seed: int, reward_psnr_weight: float) -> dict[str, Any]:
    """Reference policies and the scheme comparison on ``episodes`` fresh episodes."""
    overrides = {} if reward_psnr_weight == 1.0 else {"reward_psnr_weight": reward_psnr_weight}
    env = menv.make("paper", num_envs=episodes, episode_length=episode_length, discrete=True, **overrides)
    params = env.params
    ro = record_rollout(env, jax.random.fold_in(jax.random.PRNGKey(seed), 10**6))
    refs = reference_policies(ro)
    comparison = scheme_comparison(ro, menv.load_artifact(env.config), params, preset="paper")
    fixed, oracle = refs.get("best_fixed"), refs["oracle"]
    gap = None if fixed is None else oracle["quality"] - fixed["quality"]
    return {
        "episodes": episodes, "episode_length": episode_length, "seed": seed,
        "reward_psnr_weight": reward_psnr_weight, "limits": ro.limits.tolist(),
        "limit_report": vars(env.limit_report) if env.limit_report is not None else None,
        "references": refs, "gap": gap,
        "gap_psnr_db": None if gap is None or reward_psnr_weight != 1.0 else gap * DB_PER_NAT,
        "schemes": comparison["schemes"],
    }


def _row(name: str, s: dict[str, Any]) -> str:
    extra = f" K={s['steps']} r={s['merge_ratio']:.2f}" if "steps" in s else ""
    return (f"| {name}{extra} | {s['quality']:.4f} | {s['latency_s']:.3f} | {s['energy_j']:.4f} | "
            f"{s.get('feasible', '')} |")


def report(result: dict[str, Any]) -> str:
    """Markdown tables of one :func:`measure` result."""
    lines = [f"reward_psnr_weight = {result['reward_psnr_weight']}, {result['episodes']} episodes x "
             f"{result['episode_length']} requests, limits {result['limits']}", "",
             "| policy | quality | latency s | energy | feasible |", "|---|---|---|---|---|"]
    for name in ("best_fixed", "max_quality", "oracle"):
        if name in result["references"]:
            lines.append(_row(name, result["references"][name]))
    gap = result["gap"]
    lines += ["", f"fixed -> oracle gap: {gap:.4f} reward units"
              + (f" = {result['gap_psnr_db']:.3f} dB PSNR" if result["gap_psnr_db"] is not None else ""), "",
              "| scheme | quality | latency s | energy | MEG matched: quality | latency s | energy | reached | "
              "latency reduction |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["schemes"].items():
        m = s["meg_matched"] or {}
        lines.append(f"| {name} | {s['quality']:.4f} | {s['latency_s']:.3f} | {s['energy_j']:.4f} | "
                     f"{m.get('quality', float('nan')):.4f} | {m.get('latency_s', float('nan')):.3f} | "
                     f"{m.get('energy_j', float('nan')):.4f} | {m.get('reached')} | "
                     f"{m.get('latency_reduction', float('nan')):.1%} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.paper_system``."""

    episodes: int = 512  # fresh evaluation episodes (>= 2)
    episode_length: int = PAPER_EPISODE_LENGTH  # requests per episode (the authors' T)
    seed: int = 0  # evaluation key fold_in(PRNGKey(seed), 10**6)
    out: Optional[str] = None  # write the results as JSON here


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args` (exit 2 naming a bad flag or value)."""
    from meg_jax import config as config_lib

    prog = "python -m eval.paper_system"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    for name in ("episodes", "episode_length"):
        if getattr(args, name) < (2 if name == "episodes" else 1):
            sys.stderr.write(f"{prog}: error: --{name} too small, got {getattr(args, name)}\n")
            raise SystemExit(2)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: both tables (PSNR reward, then accuracy) on stdout."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = [measure(args.episodes, args.episode_length, args.seed, w) for w in (1.0, 0.0)]
    for r in results:
        print(report(r), end="\n\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


if __name__ == "__main__":
    main()
