"""Throughput of MEG-CVPO: gradient updates/s and env steps/s, with a PyTorch baseline in the same run.

    python -m eval.bench_cvpo                 # the table in docs/bench_cvpo.md
    python -m eval.bench_cvpo --quick         # fewer repetitions

Rows:

* ``jax update``: one jitted block = 1 vectorised env step (N envs) + U gradient updates
  (critic TD step, E-step with the in-jit dual solve, M-step with KL backtracking, polyak),
  timed over repeated blocks after compilation; updates/s = U x blocks / seconds.
* ``torch update``: the same update structure written in PyTorch on the CPU (1 thread, as
  FSRL's was measured: twin reward critics + one cost critic per constraint, next-action
  sampling from the target actor, M actions per state, the dual variables eta, lam taking one
  Adam step per update as FSRL does, decoupled Gaussian M-step). It is a stand-in for FSRL's
  CVPO update at the same sizes, not FSRL itself (FSRL needs numpy<2 and is not installed).
* ``jax training``: env steps/s of the default training block (N envs, 1 step, U updates).

Every row is measured in the same process; numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import cvpo
from meg_jax.rl.config import CVPOConfig


def _jax_rate(batch: int, m: int, hidden: tuple[int, ...], num_envs: int, updates: int, repeats: int, artifact):
    import meg_jax.env as menv

    env = menv.make("tiny", num_envs=num_envs, episode_length=32, artifact=artifact)
    config = CVPOConfig(
        actor_hidden=hidden, critic_hidden=hidden, batch_size=batch, num_action_samples=m, target_samples=m,
        min_replay=num_envs, updates_per_block=updates, replay_capacity=max(100_000, 4 * num_envs),
    )
    agent = cvpo.make_cvpo(config, env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    step = jax.jit(agent.train_step, donate_argnums=0)
    t0 = time.perf_counter()
    state, metrics = step(state, jax.random.PRNGKey(1))  # compile (+ first block)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for i in range(2):  # warm-up: replay filled, updates running
        state, metrics = step(state, jax.random.PRNGKey(2 + i))
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(repeats):
        state, metrics = step(state, jax.random.PRNGKey(100 + i))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    assert float(np.asarray(metrics["updated"]).min()) == 1.0
    return updates * repeats / seconds, num_envs * repeats / seconds, compile_s


def _torch_rate(batch: int, m: int, hidden: int, repeats: int, obs_dim: int = 13, act_dim: int = 2, costs: int = 2):
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def mlp(i, o):
        return nn.Sequential(nn.Linear(i, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, o))

    actor = mlp(obs_dim, 2 * act_dim)
    critics = nn.ModuleList([mlp(obs_dim + act_dim, 1) for _ in range(2 + costs)])
    target_actor = mlp(obs_dim, 2 * act_dim)
    target_critics = nn.ModuleList([mlp(obs_dim + act_dim, 1) for _ in range(2 + costs)])
    target_actor.load_state_dict(actor.state_dict())
    target_critics.load_state_dict(critics.state_dict())
    opt_a = torch.optim.Adam(actor.parameters(), 5e-4)
    opt_c = torch.optim.Adam(critics.parameters(), 1e-3)
    eta = torch.tensor(1.0, requires_grad=True)
    lam = torch.zeros(costs, requires_grad=True)
    opt_d = torch.optim.Adam([eta, lam], 0.02)
    thresholds = torch.ones(costs)

    def dist(net, obs):
        out = net(obs)
        mean, raw = out.split(act_dim, -1)
        return mean, nn.functional.softplus(raw) + 1e-3

    def q_all(nets, obs, act):
        x = torch.cat([obs, act], -1)
        return torch.cat([n(x) for n in nets], -1)

    def update():
        obs, act = torch.randn(batch, obs_dim), torch.rand(batch, act_dim) * 2 - 1
        rew, cost, nobs = torch.rand(batch), torch.rand(batch, costs), torch.randn(batch, obs_dim)
        with torch.no_grad():
            mean, std = dist(target_actor, nobs)
            na = (mean + std * torch.randn(m, batch, act_dim)).clamp(-1, 1)
            qn = q_all(target_critics, nobs.expand(m, -1, -1), na).mean(0)
            y_r = rew + 0.5 * torch.minimum(qn[:, 0], qn[:, 1])
            y_c = cost + 0.5 * qn[:, 2:]
        q = q_all(critics, obs, act)
        loss_c = ((q[:, :2] - y_r[:, None]) ** 2).mean() + ((q[:, 2:] - y_c) ** 2).mean()
        opt_c.zero_grad()
        loss_c.backward()
        opt_c.step()
        with torch.no_grad():
            mean_o, std_o = dist(target_actor, obs)
            a = mean_o + std_o * torch.randn(m, batch, act_dim)
            qa = q_all(target_critics, obs.expand(m, -1, -1), a.clamp(-1, 1))
            q_r = torch.minimum(qa[..., 0], qa[..., 1])
            q_c = qa[..., 2:]
        adv = q_r - (q_c * lam.detach().clamp(min=0)).sum(-1)  # [M, B]
        e = eta.clamp(min=1e-6)
        dual = e * 0.02 + (lam.clamp(min=0) * thresholds).sum() + e * (
            torch.logsumexp((q_r - (q_c * lam.clamp(min=0)).sum(-1)) / e, 0) - np.log(m)).mean()
        opt_d.zero_grad()
        dual.backward()
        opt_d.step()
        w = torch.softmax(adv / e.detach(), 0)
        mean, std = dist(actor, obs)
        lp_mu = torch.distributions.Normal(mean, std_o).log_prob(a).sum(-1)
        lp_sig = torch.distributions.Normal(mean_o, std).log_prob(a).sum(-1)
        kl_mu = (0.5 * ((mean - mean_o) / std_o) ** 2).sum(-1).mean()
        ratio = (std_o / std) ** 2
        kl_sig = (0.5 * (ratio - 1 - torch.log(ratio))).sum(-1).mean()
        loss_a = -(w * (lp_mu + lp_sig)).sum(0).mean() + 0.1 * kl_mu + 0.1 * kl_sig
        opt_a.zero_grad()
        loss_a.backward()
        opt_a.step()
        with torch.no_grad():
            for t, s in zip(list(target_actor.parameters()) + list(target_critics.parameters()),
                            list(actor.parameters()) + list(critics.parameters())):
                t.mul_(0.95).add_(0.05 * s)

    for _ in range(3):
        update()
    t0 = time.perf_counter()
    for _ in range(repeats):
        update()
    return repeats / (time.perf_counter() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else 20
    artifact = synthetic_artifact()
    rows = []
    torch_small = _torch_rate(256, 16, 128, repeats=30 if args.quick else 100)
    rows.append(("torch update (FSRL-style, 1 thread)", 256, 16, "128x128", f"{torch_small:.1f}", "-", "-"))
    ups, _, comp = _jax_rate(256, 16, (128, 128), 64, updates=50, repeats=reps, artifact=artifact)
    rows.append(("jax update (this repo)", 256, 16, "128x128", f"{ups:.1f}", "-", f"{comp:.0f}"))
    torch_large = _torch_rate(4096, 16, 128, repeats=5 if args.quick else 10)
    rows.append(("torch update (FSRL-style, 1 thread)", 4096, 16, "128x128", f"{torch_large:.2f}", "-", "-"))
    ups_l, _, comp_l = _jax_rate(4096, 16, (128, 128), 64, updates=10, repeats=max(2, reps // 4), artifact=artifact)
    rows.append(("jax update (this repo)", 4096, 16, "128x128", f"{ups_l:.2f}", "-", f"{comp_l:.0f}"))
    ups_t, env_t, comp_t = _jax_rate(256, 16, (128, 128), 1024, updates=4, repeats=reps, artifact=artifact)
    rows.append(("jax training block (N=1024, 4 updates/step)", 256, 16, "128x128", f"{ups_t:.1f}", f"{env_t:.0f}",
                 f"{comp_t:.0f}"))
    header = ("row", "batch", "M", "nets", "updates/s", "env steps/s", "compile s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(f"\njax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}; "
          f"jax/torch at B=256: {ups / torch_small:.2f}x, at B=4096: {ups_l / torch_large:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
