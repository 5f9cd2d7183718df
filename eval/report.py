"""Report writing for ``eval.evaluate`` and ``meg-jax demo``: plots (PNG), ``report.md``, ``metrics.json``.

Takes the JSON-ready results of :func:`eval.orchestrate.evaluate_runs` (plus image arrays)
and draws one figure per report item, each with axes labels in units and a legend:

* ``schemes.png`` — (1) quality vs latency: the minimum-latency MEG frontier, the learned
  policies, the reference policies and the conventional schemes; latency and UE energy bars;
* ``training.png`` — (2) episode-average costs over their limits, λ and quality over training;
* ``limit_sweep.png`` — (3) quality and achieved latency over a sweep of latency limits;
* ``behaviour.png`` — (4) chosen K and r against the true SNR, per task class;
* ``images.png`` and ``grid.png`` — (5) images at the policy's choices beside the teacher's,
  and the (K, r) grid;
* ``robustness.png`` — (6) quality and costs over limits under shifted channels.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, any backend);
nothing here touches JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from meg_jax.rl.config import FEASIBILITY_TOLERANCE

__all__ = ["write_report", "write_metrics", "summary_rows", "format_summary_table", "save_image_grid"]

_COLORS = {
    "MEG-CVPO": "tab:red",
    "PPO-Lagrangian": "tab:purple",
    "PPO (unconstrained)": "tab:pink",
    "oracle": "black",
    "best fixed": "tab:gray",
    "max quality": "tab:olive",
    "centralised": "tab:blue",
    "meg_uncompressed": "tab:orange",
    "on_device": "tab:green",
}


def _subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A new ``matplotlib.figure.Figure`` and its axes, without pyplot (no global backend change)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


@dataclasses.dataclass(frozen=True)
class Units:
    """How a comparison's latencies and energies are printed: seconds/joules at a real model's
    scale, milliseconds/millijoules at the tiny model's; ``energy`` names the energy scope."""

    latency: str  # "s" or "ms"
    latency_scale: float  # printed value = scale x seconds
    energy_unit: str  # "J" or "mJ"
    energy_scale: float  # printed value = scale x joules
    energy: str  # "UE energy", "system energy" or "energy" (the paper's formula)

    def lat(self, x: Optional[float]) -> str:
        return "–" if x is None else _fmt(self.latency_scale * x)

    def en(self, x: Optional[float]) -> str:
        return "–" if x is None else _fmt(self.energy_scale * x)


ENERGY_NAMES = {"ue": "UE energy", "system": "system energy", "paper": "energy"}


def units_of(comparison: Mapping[str, Any]) -> Units:
    """The :class:`Units` of a comparison: s / J where its limit is at least 1 s / 1 J, else ms / mJ."""
    lat_limit, en_limit = (float(x) for x in comparison["limits"])
    lat, lat_scale = ("s", 1.0) if lat_limit >= 1.0 else ("ms", 1e3)
    en, en_scale = ("J", 1.0) if en_limit >= 1.0 else ("mJ", 1e3)
    return Units(lat, lat_scale, en, en_scale, ENERGY_NAMES.get(str(comparison.get("energy_scope", "ue")), "energy"))


def _pct(x: Optional[float]) -> str:
    if x is None or not math.isfinite(float(x)):
        return "–"
    return f"{100.0 * float(x):+.1f}%"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if not isinstance(v, np.ndarray) or v.ndim == 0}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics(results: Mapping[str, Any], path: str) -> None:
    """Writes the JSON-ready part of ``results`` (arrays of images are left out)."""
    clean = _jsonable({k: v for k, v in results.items() if k not in ("images_data",)})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------- summary table
def summary_rows(comparison: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per policy/scheme of a scheme comparison: name, quality, latency, energy, ratios."""
    rows = []
    for name, s in comparison.get("learned", {}).items():
        rows.append({"name": name, **s})
    refs = comparison.get("references", {})
    if "oracle" in refs:
        rows.append({"name": "oracle (perfect CSI)", **refs["oracle"]})
    if "best_fixed" in refs:
        b = refs["best_fixed"]
        rows.append({"name": f"best fixed (K={b['steps']}, r={b['merge_ratio']:.2f})", **b})
    if "max_quality" in refs:
        rows.append({"name": "always max quality", **refs["max_quality"]})
    for name, s in comparison.get("schemes", {}).items():
        rows.append({"name": s.get("label", name), **s})
    return rows


def format_summary_table(comparison: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`summary_rows` for the terminal."""
    rows = summary_rows(comparison)
    u = units_of(comparison)
    head = (f"{'policy / scheme':44s} {'quality':>8s} {'latency ' + u.latency:>11s} {'energy ' + u.energy_unit:>10s} "
            f"{'lat/lim':>8s} {'en/lim':>7s} {'feasible':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name'][:44]:44s} {r['quality']:8.4f} {u.latency_scale * r['latency_s']:11.4g} "
            f"{u.energy_scale * r['energy_j']:10.4g} "
            f"{r['latency_over_limit']:8.3f} {r['energy_over_limit']:7.3f} {('yes' if r['feasible'] else 'no'):>8s}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures
def _plot_schemes(comparison: Mapping[str, Any], path: str) -> None:
    fig, axes = _subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    u = units_of(comparison)
    ls = u.latency_scale
    fr = comparison["frontier"]
    ax.plot(ls * np.asarray(fr["latency_s"]), fr["quality"], "-", color="0.5", lw=1.5,
            label="MEG frontier (min latency, perfect CSI)")
    fixed = comparison["fixed"]
    ax.scatter([ls * f["latency_s"] for f in fixed], [f["quality"] for f in fixed], s=10, color="0.75",
               label="fixed (K, r) policies", zorder=2)
    for name, s in comparison["schemes"].items():
        ax.scatter([ls * s["latency_s"]], [s["quality"]], marker="s", s=60, color=_COLORS.get(name, "tab:brown"),
                   label=s.get("label", name), zorder=3)
        m = s.get("meg_matched")
        if m is not None and m.get("reached", True):
            ax.annotate("", xy=(ls * m["latency_s"], m["quality"]), xytext=(ls * s["latency_s"], s["quality"]),
                        arrowprops=dict(arrowstyle="->", color=_COLORS.get(name, "tab:brown"), lw=1))
    refs = comparison["references"]
    if "oracle" in refs:
        o = refs["oracle"]
        ax.scatter([ls * o["latency_s"]], [o["quality"]], marker="*", s=120, color="black", label="oracle (at limits)", zorder=4)
    for name, s in comparison["learned"].items():
        ax.scatter([ls * s["latency_s"]], [s["quality"]], marker="o", s=70, color=_COLORS.get(name, "tab:red"),
                   edgecolor="k", label=name, zorder=5)
    ax.axvline(ls * comparison["limits"][0], color="tab:red", ls=":", lw=1, label="latency limit")
    ax.set_xscale("log")
    ax.set_xlabel(f"average latency per request ({u.latency}, log scale)")
    ax.set_ylabel("average quality (attribute accuracy)")
    ax.set_title(f"(1) quality vs latency — {comparison['preset']}")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    names, lat, en, colors = [], [], [], []
    for name, s in comparison["learned"].items():
        names.append(name); lat.append(s["latency_s"]); en.append(s["energy_j"]); colors.append(_COLORS.get(name, "tab:red"))
    if "best_fixed" in refs:
        names.append("best fixed"); lat.append(refs["best_fixed"]["latency_s"]); en.append(refs["best_fixed"]["energy_j"])
        colors.append("tab:gray")
    for name, s in comparison["schemes"].items():
        names.append(name.replace("_", " ")); lat.append(s["latency_s"]); en.append(s["energy_j"])
        colors.append(_COLORS.get(name, "tab:brown"))
        if s.get("meg_matched") is not None:
            names.append(f"MEG @ {name.replace('_', ' ')} quality"); lat.append(s["meg_matched"]["latency_s"])
            en.append(s["meg_matched"]["energy_j"]); colors.append("0.55")
    y = np.arange(len(names))
    for ax, vals, unit, scale, title, lim in (
            (axes[1], lat, u.latency, u.latency_scale, "latency", comparison["limits"][0]),
            (axes[2], en, u.energy_unit, u.energy_scale, u.energy, comparison["limits"][1])):
        v = scale * np.maximum(np.asarray(vals), 1e-12)
        ax.barh(y, v, color=colors)
        ax.axvline(scale * lim, color="tab:red", ls=":", lw=1, label=f"{title} limit")
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(f"average {title} per request ({unit}, log scale)")
        ax.set_title(f"(1) {title}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_training(curves: Mapping[str, Mapping[str, Any]], path: str) -> None:
    fig, axes = _subplots(1, 3, figsize=(16, 4.2))
    for name, c in curves.items():
        color = _COLORS.get(name, None)
        x = np.asarray(c["env_steps"])
        if len(x):
            axes[0].plot(x, c["latency_over_limit"], "-", color=color, label=f"{name}: latency / limit")
            axes[0].plot(x, c["energy_over_limit"], "--", color=color, label=f"{name}: energy / limit")
            axes[2].plot(x, c["episode_quality"], "-", color=color, label=name)
        if c["lam_0"]:
            xl = np.asarray(c["lam_steps"])
            axes[1].plot(xl, c["lam_0"], "-", color=color, label=f"{name}: λ latency")
            axes[1].plot(xl, c["lam_1"], "--", color=color, label=f"{name}: λ energy")
    axes[0].axhline(1.0, color="k", lw=1, ls=":", label="limit")
    _finish_panels(fig, axes, path, "environment steps (transitions)", [
        ("episode-average cost / limit", "(2) constraint satisfaction during training"),
        ("multiplier λ (per unit of cost / limit)", "(2) Lagrange multipliers"),
        ("episode-average quality (accuracy)", "(2) quality during training")], legend_fontsize=7)


def _finish_panels(fig: Any, axes: Any, path: str, xlabel: str, labels: Sequence[tuple[str, str]],
                   legend_fontsize: int) -> None:
    """Label a row of panels (``labels``: one (y label, title) per panel), grid, legend, save."""
    for ax, (ylabel, title) in zip(axes, labels):
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_sweep(sweep: Mapping[str, Any], path: str, units: Optional[Units] = None) -> None:
    u = units or Units("ms", 1e3, "mJ", 1e3, "UE energy")
    ls = u.latency_scale
    rows = sweep["rows"]
    x = ls * np.asarray([r["latency_limit_s"] for r in rows])
    fig, axes = _subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(x, [r["oracle"]["quality"] for r in rows], "k*-", label="oracle (perfect CSI)")
    bf = [r["best_fixed"]["quality"] if r.get("best_fixed") else np.nan for r in rows]
    axes[0].plot(x, bf, "s--", color="tab:gray", label="best fixed feasible (K, r)")
    axes[1].plot(x, ls * np.asarray([r["oracle"]["latency_s"] for r in rows]), "k*-", label="oracle")
    axes[1].plot(x, ls * np.asarray([r["best_fixed"]["latency_s"] if r.get("best_fixed") else np.nan for r in rows]),
                 "s--", color="tab:gray", label="best fixed")
    if sweep.get("trained"):
        q = [r["cvpo"]["quality"] for r in rows]
        se = [r["cvpo"]["quality_se"] for r in rows]
        axes[0].errorbar(x, q, yerr=se, fmt="o-", color="tab:red", capsize=3, label="MEG-CVPO retrained per limit")
        axes[1].plot(x, ls * np.asarray([r["cvpo"]["latency_s"] for r in rows]), "o-", color="tab:red", label="MEG-CVPO")
    axes[1].plot(x, x, ":", color="tab:red", lw=1, label="= limit")
    _finish_panels(fig, axes, path, f"latency limit ({u.latency} per request, episode average)", [
        ("average quality (accuracy)", "(3) quality vs latency limit"),
        (f"achieved average latency ({u.latency})", "(3) achieved latency vs limit")], legend_fontsize=8)


def _plot_behaviour(behaviour: Mapping[str, Mapping[str, Any]], path: str) -> None:
    n = len(behaviour)
    fig, axes = _subplots(n, 2, figsize=(11, 3.8 * n), squeeze=False)
    for i, (name, b) in enumerate(behaviour.items()):
        x = np.asarray(b["snr_centres"])
        for c, cls in enumerate(b["task_classes"]):
            axes[i, 0].plot(x, b["mean_steps"][c], "o-", label=f"class {cls}")
            axes[i, 1].plot(x, b["mean_ratio"][c], "o-", label=f"class {cls}")
        axes[i, 0].set_ylabel("mean denoising steps K")
        axes[i, 0].set_yticks(b["grid_steps"])
        axes[i, 1].set_ylabel("mean merge ratio r")
        axes[i, 0].set_title(f"(4) {name}: chosen K vs SNR")
        axes[i, 1].set_title(f"(4) {name}: chosen r vs SNR")
        for ax in axes[i]:
            ax.set_xlabel("true SNR of the request (dB, bin centre)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _to_unit(img: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(img, np.float32), -1.0, 1.0) + 1.0) / 2.0


def _plot_images(images: Mapping[str, Any], cases: Sequence[Mapping[str, Any]], path: str) -> None:
    n = len(cases)
    fig, axes = _subplots(2, n, figsize=(max(2.8 * n, 5.0), 6.0), squeeze=False)
    for j, c in enumerate(cases):
        axes[0, j].imshow(_to_unit(images["images"][j]), interpolation="nearest")
        axes[0, j].set_title(f"SNR {c['snr_db']:.1f} dB\npolicy: K={c['steps']}, r={c['merge_ratio']:.2f}", fontsize=8)
        axes[1, j].imshow(_to_unit(images["reference"][j]), interpolation="nearest")
        axes[1, j].set_title("teacher (50 steps, r=0, no noise)", fontsize=8)
        axes[1, j].set_xlabel(images["prompts"][j].replace(" at the", "\nat the"), fontsize=6)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("(5) the policy's choices (top) and the teacher (bottom):\nsame prompt, same initial noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_image_grid(grid: np.ndarray, steps: Sequence[int], ratios: Sequence[float], snr_db: float, prompt: str,
                    path: str) -> None:
    """Draws images ``[K, R, H, W, 3]`` as rows K, columns r."""
    fig, axes = _subplots(len(steps), len(ratios), figsize=(1.9 * len(ratios), 1.9 * len(steps)), squeeze=False)
    for i, k in enumerate(steps):
        for j, r in enumerate(ratios):
            axes[i, j].imshow(_to_unit(grid[i, j]), interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(f"r = {r:.2f}", fontsize=9)
            if j == 0:
                axes[i, j].set_ylabel(f"K = {k}", fontsize=9)
    fig.suptitle(f"(5) ES: K student steps → merge r of the latent tokens → link at {snr_db:.0f} dB → UE decodes\n"
                 f"“{prompt}”", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_robustness(robust: Mapping[str, Sequence[Mapping[str, Any]]], path: str, energy_name: str = "UE energy") -> None:
    fig, axes = _subplots(1, 3, figsize=(16, 4.4))
    first = next(iter(robust.values()))
    shifts = [r["shift"] for r in first]
    x = np.arange(len(shifts))
    series = [("oracle (refitted, perfect CSI)", [r["oracle"] for r in first], "black")]
    for name, rows in robust.items():
        series.append((name, [r["policy"] for r in rows], _COLORS.get(name, "tab:red")))
    width = 0.8 / len(series)
    for i, (label, vals, color) in enumerate(series):
        off = (i - (len(series) - 1) / 2) * width
        axes[0].bar(x + off, [v["quality"] for v in vals], width, color=color, label=label)
        axes[1].bar(x + off, [v["latency_over_limit"] for v in vals], width, color=color, label=label)
        axes[2].bar(x + off, [v["energy_over_limit"] for v in vals], width, color=color, label=label)
    axes[0].set_ylabel("average quality (accuracy)")
    axes[1].set_ylabel("average latency / limit")
    axes[2].set_ylabel(f"average {energy_name} / limit")
    axes[0].set_title("(6) quality under shifted channels")
    axes[1].set_title("(6) latency constraint")
    axes[2].set_title("(6) energy constraint")
    for ax in axes[1:]:
        ax.axhline(1.0, color="tab:red", ls=":", lw=1, label="limit")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(shifts, rotation=20, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _section_schemes(comp: Mapping[str, Any], fig: Optional[str]) -> list[str]:
    u = units_of(comp)
    lines = [f"### Preset `{comp['preset']}`", "",
             f"{comp['episodes']} fresh episodes × {comp['episode_length']} requests; limits: latency "
             f"{u.lat(comp['limits'][0])} {u.latency}, {u.energy} {u.en(comp['limits'][1])} {u.energy_unit} per "
             "request (episode average).", ""]
    rows = []
    for r in summary_rows(comp):
        rows.append([r["name"], _fmt(r["quality"], 4), u.lat(r["latency_s"]), u.en(r["energy_j"]),
                     _fmt(r["latency_over_limit"]), _fmt(r["energy_over_limit"]), _fmt(r["feasible"])])
    lines.append(_md_table(["policy / scheme", "quality", f"latency ({u.latency})", f"{u.energy} ({u.energy_unit})",
                            "latency / limit", "energy / limit", "meets limits"], rows))
    tol = comp.get("quality_tolerance", 0.0)
    lines += ["", "**At matched quality** — the lowest-latency MEG (per-request (K, r) with perfect channel "
              f"knowledge, no energy limit) whose average quality is at least the conventional scheme's minus "
              f"{_fmt(tol)} (the calibration's sampling error); where MEG cannot get there, its highest-quality "
              "point is shown and marked:", ""]
    rows = []
    for name, s in comp["schemes"].items():
        m = s.get("meg_matched")
        if m is None:
            rows.append([s.get("label", name), _fmt(s["quality"], 4), u.lat(s["latency_s"]), "–", "–", "–", "–"])
        else:
            mark = "" if m.get("reached", True) else " (MEG's maximum; not matched)"
            rows.append([s.get("label", name), _fmt(s["quality"], 4), u.lat(s["latency_s"]), _fmt(m["quality"], 4) + mark,
                         u.lat(m["latency_s"]), _pct(-m["latency_reduction"]), _pct(-m["energy_reduction"])])
    lines.append(_md_table(["scheme", "its quality", f"its latency ({u.latency})", "MEG quality",
                            f"MEG latency ({u.latency})", "latency change", f"{u.energy} change"], rows))
    if comp["learned"]:
        lines += ["", "**Learned policies against each scheme** (negative = lower than the scheme):", ""]
        rows = []
        for name, s in comp["learned"].items():
            for sch, red in s["latency_reduction_vs"].items():
                rows.append([name, comp["schemes"][sch].get("label", sch), _pct(-red),
                             _pct(-s["energy_reduction_vs"][sch]), _fmt(s["quality_minus"][sch], 3)])
        lines.append(_md_table(["policy", "vs scheme", "latency change", f"{u.energy} change", "quality difference"], rows))
    if fig:
        lines += ["", f"![schemes]({fig})"]
    return lines + [""]


def write_report(results: Mapping[str, Any], out_dir: str, *, title: str = "MEG evaluation report",
                 preamble: Sequence[str] = ()) -> str:
    """Draws every figure and writes ``report.md`` and ``metrics.json`` into ``out_dir``.

    Args:
      results: from :func:`eval.orchestrate.evaluate_runs` (``images_data`` holds arrays).
      out_dir: created if missing.
      title: the report's heading.
      preamble: extra markdown lines after the heading (the demo's timing and commands).

    Returns:
      the path of ``report.md``.
    """
    os.makedirs(out_dir, exist_ok=True)
    figs = {}
    L = [f"# {title}", ""] + list(preamble) + [""]
    L += ["Quality is the calibrated attribute accuracy of the generated image (fraction of the five prompt "
          "attributes an attribute classifier reads right); latency is ES compute + air time + UE compute per "
          "request; UE energy is decode + reception, system energy adds the ES's compute and radiated transmit "
          "energy. Constraints are on episode averages; a policy meets them "
          f"if each average is ≤ {FEASIBILITY_TOLERANCE:g} × its limit (the oracle and the fixed (K, r) actions, "
          "chosen on these same requests, meet the limits exactly).", ""]
    if results.get("runs"):
        L += ["Runs: " + ", ".join(f"`{r['name']}` ({r['run_dir']}, {r['env_steps']:.0f} env steps)"
                                  for r in results["runs"]), ""]

    # (1)
    main_units = units_of(results["comparisons"][0]) if results.get("comparisons") else Units("ms", 1e3, "mJ", 1e3, "UE energy")
    L += ["## 1. Latency and energy against conventional schemes", ""]
    for comp in results["comparisons"]:
        fig = f"schemes_{comp['preset']}.png"
        _plot_schemes(comp, os.path.join(out_dir, fig))
        figs[fig] = True
        L += _section_schemes(comp, fig)

    # (2)
    L += ["## 2. Constraint satisfaction during training", ""]
    curves = results.get("training", {})
    if curves and any(c["env_steps"] for c in curves.values()):
        _plot_training(curves, os.path.join(out_dir, "training.png"))
        rows = []
        for name, c in curves.items():
            rows.append([name, _fmt(c.get("final_latency_over_limit")), _fmt(c.get("final_energy_over_limit")),
                         _fmt(c.get("final_quality"), 4), _fmt(c["lam_0"][-1] if c["lam_0"] else None),
                         _fmt(c["lam_1"][-1] if c["lam_1"] else None), str(len(c["env_steps"]))])
        L += ["Episode averages of the episodes that ended during the last 20% of the logged iterations, and the "
              "final multipliers:", "",
              _md_table(["run", "latency / limit", "energy / limit", "quality", "final λ latency", "final λ energy",
                         "logged iterations"], rows), "", "![training](training.png)", ""]
    else:
        L += ["No training run was evaluated (no `metrics.jsonl`).", ""]

    # (3)
    L += ["## 3. Quality/cost trade-off over latency limits", ""]
    sweep = results.get("sweep")
    if sweep:
        _plot_sweep(sweep, os.path.join(out_dir, "limit_sweep.png"), main_units)
        L += [sweep.get("note", ""), ""]
        header = [f"latency limit ({main_units.latency})", "oracle quality", "best fixed quality"]
        if sweep.get("trained"):
            header += ["MEG-CVPO quality", "MEG-CVPO latency / limit", "MEG-CVPO energy / limit", "meets limits"]
        rows = []
        for r in sweep["rows"]:
            row = [main_units.lat(r["latency_limit_s"]), _fmt(r["oracle"]["quality"], 4),
                   _fmt(r["best_fixed"]["quality"], 4) if r.get("best_fixed") else "none feasible"]
            if sweep.get("trained"):
                c = r["cvpo"]
                row += [_fmt(c["quality"], 4), _fmt(c["latency_over_limit"]), _fmt(c["energy_over_limit"]), _fmt(c["feasible"])]
            rows.append(row)
        L += [_md_table(header, rows), "", "![limit sweep](limit_sweep.png)", ""]
    else:
        L += ["Not computed.", ""]

    # (4)
    L += ["## 4. What the policy chooses: K and r against SNR and task class", ""]
    beh = results.get("behaviour", {})
    if beh:
        _plot_behaviour(beh, os.path.join(out_dir, "behaviour.png"))
        for name, b in beh.items():
            rows = [[cls, _fmt(b["class_steps"][c]), _fmt(b["class_ratio"][c]), _fmt(b["class_quality"][c], 4)]
                    for c, cls in enumerate(b["task_classes"])]
            L += [f"**{name}** — correlation with the true SNR: K {_fmt(b['snr_corr_steps'])}, r "
                  f"{_fmt(b['snr_corr_ratio'])}.", "",
                  _md_table(["task class", "mean K", "mean r", "mean quality"], rows), ""]
        L += ["![behaviour](behaviour.png)", ""]

    # (5)
    L += ["## 5. Images at the policy's choices", ""]
    img = results.get("images_data")
    cases = results.get("image_cases")
    if img is not None and cases:
        _plot_images(img, cases, os.path.join(out_dir, "images.png"))
        rows = []
        for j, c in enumerate(cases):
            sc = (results.get("image_scores") or {})
            acc = sc.get("accuracy", [None] * len(cases))[j] if sc else None
            ps = sc.get("psnr_db", [None] * len(cases))[j] if sc else None
            rows.append([f"{c['snr_db']:.1f}", c["task"], str(c["steps"]), f"{c['merge_ratio']:.2f}",
                         main_units.lat(c["latency_s"]), _fmt(c["quality"], 3), _fmt(acc, 3), _fmt(ps, 3)])
        L += [f"Policy: {results.get('image_policy', '–')}. Backbone: `{results.get('backbone', '–')}`.", "",
              _md_table(["true SNR (dB)", "task", "K", "r", f"env latency ({main_units.latency})", "calibrated quality",
                         "this image's accuracy", "PSNR vs teacher (dB)"], rows), "", "![images](images.png)", ""]
        if results.get("grid_data") is not None:
            g = results["grid"]
            save_image_grid(results["grid_data"], g["steps"], g["ratios"], g["snr_db"], g["prompt"],
                            os.path.join(out_dir, "grid.png"))
            L += ["The (K, r) grid of one prompt and noise:", "", "![grid](grid.png)", ""]
    else:
        L += [results.get("images_note", "Not generated (no backbone)."), ""]

    # (6)
    L += ["## 6. Robustness to a channel the policy never saw", ""]
    rob = results.get("robustness", {})
    if rob:
        _plot_robustness(rob, os.path.join(out_dir, "robustness.png"), main_units.energy)
        rows = []
        for name, rs in rob.items():
            for r in rs:
                p, o = r["policy"], r["oracle"]
                rows.append([name, r["shift"], _fmt(r["mean_snr_db"], 3), _fmt(p["quality"], 4), _fmt(p["latency_over_limit"]),
                             _fmt(p["energy_over_limit"]), _fmt(p["feasible"]), _fmt(o["quality"], 4),
                             _fmt(o["latency_over_limit"]), _fmt(o["energy_over_limit"])])
        L += ["Path loss +10 dB is applied as 10 dB less transmit power (the same SNR shift); the limits are "
              "the trained ones; the oracle is refitted to the shifted channel with perfect knowledge.", "",
              _md_table(["policy", "channel", "mean SNR (dB)", "quality", "latency / limit", "energy / limit",
                         "meets limits", "oracle quality", "oracle latency / limit", "oracle energy / limit"], rows),
              "", "![robustness](robustness.png)", ""]
    for note in results.get("notes", []):
        L.append(f"- {note}")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")
    write_metrics(results, os.path.join(out_dir, "metrics.json"))
    return path
