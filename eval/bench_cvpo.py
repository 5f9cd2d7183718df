"""MEG-CVPO's gradient update at the hardware limit: updates/s, FLOPs, fraction of the matmul peak,
against an FSRL-style PyTorch update timed in the same run.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      taskset -c 1 python -m eval.bench_cvpo    # the table in docs/bench_cvpo.md
    python -m eval.bench_cvpo --quick       # fewer rounds
    python -m eval.bench_cvpo --device gpu  # jax on its GPU backend, the PyTorch update on CUDA

What is timed (one thread each: XLA single-threaded through ``XLA_FLAGS``, ``torch.set_num_threads(1)``,
and the process pinned to one CPU with ``taskset``: XLA:CPU runs its YNNPACK fusions on a thread
pool of its own that ``XLA_FLAGS`` do not reach, and PyTorch's oneDNN kernels used a second
core too, so unpinned "one thread" rows each take a second core when the machine has one free;
the footer prints the CPUs the process may use):

* ``jax update``: ``agent.update_block`` of ``meg_jax.rl.cvpo`` (U gradient updates in one jitted
  call, ``lax.scan``, the train state donated; no environment step, no host transfer inside):
  replay sampling, one evaluation of pi_old's K = 16 actions at each next state by all four
  critic heads, TD step of the critics, the E-step dual solved to tolerance, the M-step with
  its KL backtracking, polyak averaging. The replay is filled first (64 envs x 1 step).
  Twice: all in float32, and with ``cvpo.particle_matmul_dtype="bfloat16"`` (the particle
  evaluation's hidden GEMMs on bfloat16 operands, float32 accumulation: AMX on CPUs that have
  it; the rest of the update float32). The FLOPs, profile and peak tables are the float32 one's.
* ``torch update (FSRL-style)``: FSRL 0.1.0's CVPO update (``fsrl/policy/cvpo.py``: ``learn`` =
  ``critics_loss`` + ``policy_loss``, then ``sync_weight``) written out in PyTorch at the same
  sizes: twin reward critics and one cost critic per constraint as separate 128x128 MLPs,
  TD targets from the target critics at next actions of the target actor (``target_samples``
  = 16 averaged, as meg-jax does; FSRL samples one, see the next row), E-step on M = 16
  actions per state from pi_old scored by the current critics, eta and lam taking one Adam
  step on the dual (FSRL's ``estep_optim``), the M-step's alpha_mu / alpha_sigma taking one
  Adam step (``mstep_optim``) before the decoupled-KL weighted-ML actor step, soft update of
  the target critics. Random batches stand in for tianshou's replay and its n-step returns
  (which would only add host work to the torch side); FSRL's ``.item()`` logging is left out.
  It stands in for FSRL (which needs ``numpy<2`` and is not installed in this venv).
* ``torch update (FSRL's 1-sample target)``: the same with FSRL's own TD target, a single
  next action per state: less work than meg-jax's 16-sample target, so a stricter baseline.
* ``jax training block``: env steps/s while training (N = 1024 environments, 4 updates per
  vectorised step), the old headline row (``--device gpu``: at every batch size of the run).

``--device gpu`` times the same rows on a GPU: jax on its default backend (which must be a GPU),
the PyTorch update on ``cuda`` (each call ends in ``torch.cuda.synchronize()``, as jax's in
``block_until_ready``), the peaks over larger squares; no XLA op profile (its reader parses
XLA:CPU's threads). Both run full f32 matmuls: PyTorch's default, and jax with
``jax_default_matmul_precision="highest"`` (XLA:GPU's default precision would use TF32).
On a GPU the particle evaluation and the critic step run unchunked
(``cvpo.default_rows_per_chunk``).

The torch and jax updates are timed in alternating rounds (machine load changes between
rounds hit both alike); the table gives the median over rounds and the median of the
per-round ratios. FLOPs per update come from XLA's cost analysis of the update as lowered
(the particle evaluation and the critic step in one chunk each so no loop hides them; the E-step dual's and the
backtracking's while loops count one iteration each), the peak from the best f32 matmul
(jnp.dot, square, several sizes) measured in the same process, so the fraction of peak is a
same-run ratio; the peak is the larger of ``jnp.dot``'s and one-thread ``torch.mm``'s (on
some machines PyTorch's GEMM is the faster). A profile of the jitted update (top XLA ops) says
where the time goes. A last table bounds the ratio a faster jax update could reach in this run: the update's FLOPs at
100 % of the peak against PyTorch's measured rate, and the jax fraction of peak a 4x ratio
would need; PyTorch's own GEMM FLOPs per update (``torch.utils.flop_counter``) times its rate
give its fraction of the peak.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import cvpo, networks
from meg_jax.rl.config import CVPOConfig

M = 16
HIDDEN = 128
PREFIX = "jit(update_block)/while/body/closed_call/"


# ------------------------------------------------------------------------------ jax
def _config(batch: int, updates: int, dtype: str = "float32") -> CVPOConfig:
    return CVPOConfig(
        actor_hidden=(HIDDEN, HIDDEN), critic_hidden=(HIDDEN, HIDDEN), batch_size=batch, num_action_samples=M,
        target_samples=M, min_replay=64, updates_per_block=updates, particle_matmul_dtype=dtype,
    )


def _env(artifact: Any, num_envs: int = 64) -> Any:
    import meg_jax.env as menv

    return menv.make("tiny", num_envs=num_envs, episode_length=32, artifact=artifact)


def jax_update(batch: int, updates: int, artifact: Any, dtype: str = "float32", count: bool = True) -> dict[str, Any]:
    """The jitted update block on a filled replay: call(), lower(), compile seconds, and with
    ``count`` FLOPs per update and the particle evaluation's FLOPs and timed call (``dtype``:
    ``cvpo.particle_matmul_dtype``)."""
    env = _env(artifact)
    agent = cvpo.make_cvpo(_config(batch, updates, dtype), env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    state, _ = jax.jit(agent.train_step)(state, jax.random.PRNGKey(1))  # fills the replay (64 transitions)
    step = jax.jit(agent.update_block, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, jax.random.PRNGKey(2)).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "i": 0}

    def call() -> dict:
        box["i"] += 1
        box["state"], metrics = compiled(box["state"], jax.random.PRNGKey(100 + box["i"]))
        jax.block_until_ready(metrics)
        return metrics

    metrics = call()  # warm-up
    out = {"call": call, "lower": lambda: step.lower(box["state"], jax.random.PRNGKey(2)), "compile_s": compile_s,
           "updates": updates, "dual_iterations": float(np.mean(metrics["dual_iterations"]))}
    if not count:
        return out
    # FLOPs: one update, the particle evaluation and the critic step in one chunk each (no loop)
    one = cvpo.make_cvpo(_config(batch, 1), env, particle_rows_per_chunk=batch * M, critic_rows_per_chunk=batch)
    cost = _cost(jax.jit(one.update_block).lower(box["state"], jax.random.PRNGKey(3)))
    # the particle evaluation alone: the update's dominant dense work
    q_flops, q_call = _particle_eval(batch)
    return {**out, "flops": float(cost["flops"]), "particle_flops": q_flops, "particle_call": q_call}


def _cost(lowered: Any) -> dict[str, float]:
    """XLA's cost analysis of a lowered computation: of the HLO as lowered where the backend
    gives one (XLA:CPU), else of the compiled module (XLA:GPU gives none before compiling)."""
    cost = lowered.cost_analysis()
    if cost is None:
        cost = lowered.compile().cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def _particle_eval(batch: int) -> tuple[float, Callable[[], Any]]:
    """FLOPs and a timed call of ``critic_ensemble_particles`` at B x M, 4 heads, as the update runs it."""
    k = jax.random.PRNGKey(0)
    net = networks.CriticEnsemble((HIDDEN, HIDDEN), 4, True)
    params = net.init(k, jnp.zeros((1, 13)), jnp.zeros((1, 2)))
    obs = jax.random.normal(k, (batch, 13))
    acts = jax.random.uniform(k, (batch, M, 2), minval=-1.0, maxval=1.0)
    flops = _cost(jax.jit(lambda p, o, a: networks.critic_ensemble_particles(p, o, a, True, batch * M)).lower(
        params, obs, acts))
    fn = jax.jit(lambda p, o, a: networks.critic_ensemble_particles(
        p, o, a, True, cvpo.default_rows_per_chunk(cvpo.PARTICLE_ROWS_PER_CHUNK)))
    jax.block_until_ready(fn(params, obs, acts))
    return float(flops["flops"]), lambda: jax.block_until_ready(fn(params, obs, acts))


def _best_gflops(mm: Callable[[int], Callable[[], Any]], sizes: tuple[int, ...], reps: int) -> float:
    """Best GFLOP/s of a square n x n matmul over ``sizes``; ``mm(n)`` returns a blocking call."""
    best = 0.0
    for n in sizes:
        call = mm(n)
        call()  # warm-up (compilation for jax)
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_peak(sizes: tuple[int, ...] = (512, 1024, 2048), reps: int = 5) -> float:
    """Best f32 GFLOP/s of a square jnp.dot (the machine's measured matmul peak for this process)."""
    f = jax.jit(jnp.dot)

    def mm(n: int) -> Callable[[], Any]:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        return lambda: jax.block_until_ready(f(a, b))

    return _best_gflops(mm, sizes, reps)


def training_rate(artifact: Any, repeats: int, batch: int = 256) -> tuple[float, float]:
    """(updates/s, env steps/s) of the training block with N = 1024 envs, 4 updates per step."""
    env = _env(artifact, 1024)
    config = _config(batch, 4)
    agent = cvpo.make_cvpo(config, env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    step = jax.jit(agent.train_step, donate_argnums=0)
    for i in range(2):
        state, metrics = step(state, jax.random.PRNGKey(1 + i))
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(repeats):
        state, metrics = step(state, jax.random.PRNGKey(100 + i))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    return 4 * repeats / seconds, 1024 * repeats / seconds


# ------------------------------------------------------------------------------ torch
def torch_update(batch: int, target_samples: int, obs_dim: int = 13, act_dim: int = 2, costs: int = 2,
                 device: str = "cpu") -> Callable[[], None]:
    """One FSRL CVPO update (see the module docstring), as a closure; ``device`` "cpu" (one
    thread) or "cuda" (the call waits for the GPU)."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.set_default_device(device)  # the modules, tensors and samples below

    def mlp(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Linear(i, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, o))

    actor = mlp(obs_dim, 2 * act_dim)
    critics = nn.ModuleList([mlp(obs_dim + act_dim, 1) for _ in range(2 + costs)])
    target_actor = mlp(obs_dim, 2 * act_dim)
    target_critics = nn.ModuleList([mlp(obs_dim + act_dim, 1) for _ in range(2 + costs)])
    target_actor.load_state_dict(actor.state_dict())
    target_critics.load_state_dict(critics.state_dict())
    opt_a = torch.optim.Adam(actor.parameters(), 5e-4)
    opt_c = torch.optim.Adam(critics.parameters(), 1e-3)
    estep_dual = torch.tensor([1.0] + [0.0] * costs, requires_grad=True)  # (eta, lam)
    opt_e = torch.optim.Adam([estep_dual], 0.02)
    mstep_dual = torch.zeros(2, requires_grad=True)  # (alpha_mu, alpha_sigma)
    opt_m = torch.optim.Adam([mstep_dual], 0.1)
    thresholds = torch.ones(costs)
    kl_eps, kl_mu_eps, kl_std_eps = 0.02, 0.005, 0.0005

    def dist(net: nn.Module, obs: Any) -> tuple[Any, Any]:
        mean, raw = net(obs).split(act_dim, -1)
        return mean, nn.functional.softplus(raw) + 1e-3

    def q_all(nets: nn.ModuleList, obs: Any, act: Any) -> Any:
        x = torch.cat([obs, act], -1)
        return torch.cat([n(x) for n in nets], -1)

    def update() -> None:
        obs, act = torch.randn(batch, obs_dim), torch.rand(batch, act_dim) * 2 - 1
        rew, cost, nobs = torch.rand(batch), torch.rand(batch, costs), torch.randn(batch, obs_dim)
        # critics_loss: TD targets from the target critics at the target actor's next actions
        with torch.no_grad():
            mean, std = dist(target_actor, nobs)
            na = (mean + std * torch.randn(target_samples, batch, act_dim)).clamp(-1, 1)
            qn = q_all(target_critics, nobs.expand(target_samples, -1, -1), na).mean(0)
            y_r = rew + 0.5 * torch.minimum(qn[:, 0], qn[:, 1])
            y_c = cost + 0.5 * qn[:, 2:]
        q = q_all(critics, obs, act)
        loss_c = ((q[:, :2] - y_r[:, None]) ** 2).mean(0).sum() + ((q[:, 2:] - y_c) ** 2).mean(0).sum()
        opt_c.zero_grad()
        loss_c.backward()
        opt_c.step()
        # policy_loss, E-step: M actions from pi_old scored by the critics, one Adam step on the dual
        with torch.no_grad():
            mean_o, std_o = dist(target_actor, obs)
            a = mean_o + std_o * torch.randn(M, batch, act_dim)
            qa = q_all(critics, obs.expand(M, -1, -1), a.clamp(-1, 1))
            q_r = torch.minimum(qa[..., 0], qa[..., 1])  # [M, B]
            q_c = qa[..., 2:]
        eta, lam = estep_dual[0], estep_dual[1:]
        combined = q_r - (q_c * lam).sum(-1)
        loss_e = eta * kl_eps + (lam * thresholds).sum() + eta * (torch.logsumexp(combined / eta, 0) - np.log(M)).mean()
        opt_e.zero_grad()
        loss_e.backward()
        opt_e.step()
        with torch.no_grad():
            estep_dual.clamp_(min=1e-6, max=20.0)
            w = torch.softmax((q_r - (q_c * estep_dual[1:]).sum(-1)) / estep_dual[0], 0)  # [M, B]
        # M-step: dual step on alpha, then the decoupled weighted-ML actor step
        mean, std = dist(actor, obs)
        lp_mu = torch.distributions.Normal(mean, std_o).log_prob(a).sum(-1)
        lp_sig = torch.distributions.Normal(mean_o, std).log_prob(a).sum(-1)
        loss_mle = -(w * (lp_mu + lp_sig)).mean()
        kl_mu = (0.5 * (mean - mean_o) ** 2 / std_o**2).sum(-1).mean()
        ratio = (std_o / std) ** 2
        kl_sig = (0.5 * (ratio - 1 - torch.log(ratio))).sum(-1).mean()
        loss_m = mstep_dual[0] * (kl_mu_eps - kl_mu).detach() + mstep_dual[1] * (kl_std_eps - kl_sig).detach()
        opt_m.zero_grad()
        loss_m.backward()
        opt_m.step()
        alpha = mstep_dual.detach().clamp(0.0, 0.5)
        loss_a = loss_mle + alpha[0] * (kl_mu - kl_mu_eps) + alpha[1] * (kl_sig - kl_std_eps)
        opt_a.zero_grad()
        loss_a.backward()
        opt_a.step()
        with torch.no_grad():  # sync_weight (and the target actor, as meg-jax keeps one)
            for t, s in zip(list(target_actor.parameters()) + list(target_critics.parameters()),
                            list(actor.parameters()) + list(critics.parameters())):
                t.mul_(0.95).add_(0.05 * s)
        if device != "cpu":
            torch.cuda.synchronize()

    def on_device() -> None:  # the update's own tensors (randn, rand, ...) on ``device`` too
        with torch.device(device):
            update()

    for _ in range(3):
        on_device()
    torch.set_default_device("cpu")
    return on_device


def torch_update_flops(update: Callable[[], None]) -> float:
    """Matmul FLOPs of one call of an FSRL-style ``update`` (forward and backward), counted by
    PyTorch's ``FlopCounterMode`` (it counts the GEMMs only: the elementwise work is not in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        update()
    return float(counter.get_total_flops())


def torch_matmul_peak(sizes: tuple[int, ...] = (512, 1024, 2048), reps: int = 5, device: str = "cpu") -> float:
    """Best f32 GFLOP/s of a square ``torch.mm`` on one thread (PyTorch's own peak, this process)."""
    import torch

    torch.set_num_threads(1)

    def mm(n: int) -> Callable[[], Any]:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        if device == "cpu":
            return lambda: torch.mm(a, b)
        return lambda: (torch.mm(a, b), torch.cuda.synchronize())

    return _best_gflops(mm, sizes, reps)


# ------------------------------------------------------------------------------ the run
def _torch_device(gpu: bool) -> str:
    return "cuda" if gpu else "cpu"


def _timed(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_batch(batch: int, rounds: int, artifact: Any, profile: bool, device: str = "cpu") -> dict[str, Any]:
    """Alternating rounds of torch (both targets) and jax at one batch size; medians."""
    gpu = device == "gpu"
    updates = 50 if batch <= 512 or gpu else 4
    torch_n = 20 if batch <= 512 or gpu else 2
    jx = jax_update(batch, updates, artifact)
    jx16 = jax_update(batch, updates, artifact, "bfloat16", count=False)  # FLOPs and profile: the f32 one's
    t_full = torch_update(batch, M, device=_torch_device(gpu))
    t_one = torch_update(batch, 1, device=_torch_device(gpu))
    rates: dict[str, list[float]] = {"jax": [], "jax_bf16": [], "torch": [], "torch1": [], "particles": []}
    for _ in range(rounds):
        rates["torch"].append(1.0 / _timed(t_full, torch_n))
        rates["jax"].append(updates / _timed(jx["call"], 1))
        rates["torch1"].append(1.0 / _timed(t_one, torch_n))
        rates["jax_bf16"].append(updates / _timed(jx16["call"], 1))
        rates["particles"].append(1.0 / _timed(jx["particle_call"], 3))
    med = {k: statistics.median(v) for k, v in rates.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    out = {
        "batch": batch, "updates_per_call": updates, "rounds": rounds, "median": med,
        "ratio_torch": ratio("jax", "torch"), "ratio_torch1": ratio("jax", "torch1"),
        "ratio_bf16_torch": ratio("jax_bf16", "torch"), "ratio_bf16_torch1": ratio("jax_bf16", "torch1"),
        "flops": jx["flops"], "particle_flops": jx["particle_flops"], "compile_s": jx["compile_s"],
        "dual_iterations": jx["dual_iterations"], "profile": [],
        "torch_flops": torch_update_flops(t_full),  # after the timed rounds: one more update, counted
    }
    if profile:
        from eval.bench_backbone import _xla_profile

        rows = _xla_profile(jx["call"], jx["lower"], top=12, calls=2)
        out["profile"] = [[name, ms / updates, share, src.replace(PREFIX, "")] for name, ms, share, src in rows]
    return out


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.bench_cvpo``."""

    quick: bool = False  # 3 rounds instead of 7, no training row
    batches: tuple[int, ...] = (256, 4096)  # batch sizes B
    device: str = "cpu"  # "cpu" (one thread each) or "gpu" (jax's GPU backend, PyTorch on cuda)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args` (exit 2 naming a bad flag or value)."""
    from meg_jax import config as config_lib

    prog = "python -m eval.bench_cvpo"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    if not args.batches or min(args.batches) < 1:
        sys.stderr.write(f"{prog}: error: --batches must be >= 1, got {list(args.batches)}\n")
        raise SystemExit(2)
    if args.device not in ("cpu", "gpu"):
        sys.stderr.write(f"{prog}: error: --device must be 'cpu' or 'gpu', got {args.device!r}\n")
        raise SystemExit(2)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        sys.stderr.write(f"{prog}: error: --device gpu but jax's default backend is {jax.default_backend()!r} "
                         "(install jax with its CUDA plugin, or leave --device at cpu)\n")
        raise SystemExit(2)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rounds = 3 if args.quick else 7
    gpu = args.device == "gpu"
    if gpu:  # full f32 dots, as PyTorch's default (XLA:GPU's default precision would take TF32)
        jax.config.update("jax_default_matmul_precision", "highest")
    where = "GPU" if gpu else "1 thread"
    sizes = (2048, 4096, 8192) if gpu else (512, 1024, 2048)
    artifact = synthetic_artifact()
    load0 = os.getloadavg()
    peak = matmul_peak(sizes)
    torch_peak = torch_matmul_peak(sizes, device=_torch_device(gpu))
    results = [bench_batch(b, rounds, artifact, profile=not gpu, device=args.device) for b in args.batches]
    peak = max(peak, matmul_peak(sizes))  # measured again after the rows; the better of the two
    torch_peak = max(torch_peak, torch_matmul_peak(sizes, device=_torch_device(gpu)))
    load1 = os.getloadavg()

    print(f"| row | B | M | nets | updates/s (median of {rounds} rounds) | jax (f32) / this row | "
          "jax (bf16 particle GEMMs) / this row |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in results:
        md, b = r["median"], r["batch"]
        print(f"| torch update (FSRL-style, 16-sample target, {where}) | {b} | {M} | 128x128 | {md['torch']:.2f} | "
              f"{r['ratio_torch']:.2f}x | {r['ratio_bf16_torch']:.2f}x |")
        print(f"| torch update (FSRL's 1-sample target, {where}) | {b} | {M} | 128x128 | {md['torch1']:.2f} | "
              f"{r['ratio_torch1']:.2f}x | {r['ratio_bf16_torch1']:.2f}x |")
        print(f"| **jax update (meg-jax, f32, {where})** | {b} | {M} | 128x128 | **{md['jax']:.2f}** | - | - |")
        print(f"| **jax update (meg-jax, bf16 particle GEMMs, {where})** | {b} | {M} | 128x128 | **{md['jax_bf16']:.2f}** | - | - |")
    jax_peak, peak = peak, max(peak, torch_peak)  # the machine's peak: the faster library's
    precision = " (both full f32: jax_default_matmul_precision='highest', PyTorch's TF32 off)" if gpu else ""
    print(f"\nmeasured f32 matmul peak ({where}, best of {'/'.join(map(str, sizes))}){precision}: jnp.dot "
          f"{jax_peak:.1f}, torch.mm {torch_peak:.1f} GFLOP/s; fractions below are of the larger, {peak:.1f}")
    print("\n| B | GFLOP per update (XLA) | achieved GFLOP/s | fraction of peak | particle eval GFLOP | its GFLOP/s | its fraction | dual iterations | compile s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        achieved = r["flops"] * r["median"]["jax"] / 1e9
        p_achieved = r["particle_flops"] * r["median"]["particles"] / 1e9
        print(f"| {r['batch']} | {r['flops'] / 1e9:.3f} | {achieved:.1f} | {achieved / peak:.1%} | "
              f"{r['particle_flops'] / 1e9:.3f} | {p_achieved:.1f} | {p_achieved / peak:.1%} | {r['dual_iterations']:.1f} | {r['compile_s']:.0f} |")
    print("\nWhat bounds the ratio: meg-jax at 100 % of that peak against PyTorch as measured "
          "(torch FLOPs are its GEMMs, counted by FlopCounterMode)\n")
    print("| B | jax GFLOP / update | jax updates/s at 100 % of peak | largest jax / torch possible | "
          "jax fraction of peak a 4x ratio needs | torch GEMM GFLOP / update | torch GEMM GFLOP/s | its fraction of peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        bound = peak * 1e9 / r["flops"]
        t_rate = r["median"]["torch"]
        t_achieved = r["torch_flops"] * t_rate / 1e9
        print(f"| {r['batch']} | {r['flops'] / 1e9:.3f} | {bound:.2f} | {bound / t_rate:.2f}x | "
              f"{4 * t_rate * r['flops'] / 1e9 / peak:.1%} | {r['torch_flops'] / 1e9:.3f} | {t_achieved:.1f} | {t_achieved / peak:.1%} |")
    for r in results:
        if r["profile"]:
            print(f"\nXLA profile of the update, B = {r['batch']} (ms per update, share of the op time, source op)\n")
            print("| op | ms / update | share | source |\n|---|---:|---:|---|")
            for name, ms, share, src in r["profile"]:
                print(f"| {name} | {ms:.3f} | {share:.1%} | `{src}` |")
    if not args.quick:
        print()
        for b in args.batches if gpu else (256,):
            ups, env_s = training_rate(artifact, 10, b)
            print(f"jax training block (N=1024 envs, 4 updates per step, B={b}, {where}): {ups:.1f} updates/s, "
                  f"{env_s:.0f} env steps/s")
    print(f"\njax {jax.__version__}, backend {jax.default_backend()}; load average (1 min) {load0[0]:.1f} before, "
          f"{load1[0]:.1f} after; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"CPUs this process may use: {sorted(os.sched_getaffinity(0))} of {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
