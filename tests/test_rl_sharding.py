"""Scale-out: CVPO on 1 vs 8 fake CPU devices, and on two processes over jax.distributed.

Both run in subprocesses: the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_VS_EIGHT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    import meg_jax.env as menv
    from meg_jax.meg.artifact import synthetic_artifact
    from meg_jax.rl import cvpo
    from meg_jax.rl.config import CVPOConfig
    from meg_jax.rl.sharding import jit_sharded, make_mesh

    assert jax.device_count() == 8, jax.devices()
    env = menv.make("tiny", num_envs=8, episode_length=8, artifact=synthetic_artifact())
    config = CVPOConfig(actor_hidden=(16, 16), critic_hidden=(16, 16), batch_size=32, num_action_samples=8,
                        target_samples=4, min_replay=32, replay_capacity=1024, updates_per_block=2)
    out = {}
    for n in (1, 8):
        mesh = make_mesh(jax.devices()[:n])
        agent = cvpo.make_cvpo(config, env, mesh)

        def blocks(state, key):
            def body(s, _):
                return agent.train_step(s, jax.random.fold_in(key, s.block))
            return jax.lax.scan(body, state, None, length=7)

        init, step = jit_sharded(agent.init, blocks, mesh, jax.random.PRNGKey(0))
        state = init(jax.random.PRNGKey(0))
        state, metrics = step(state, jax.random.PRNGKey(1))
        if n == 8:
            assert state.replay.data.obs.sharding.spec == P("data"), state.replay.data.obs.sharding
            assert state.env_state.obs.sharding.spec == P("data")
            assert len(state.env_state.obs.sharding.device_set) == 8
            assert jax.tree.leaves(state.actor)[0].sharding.is_fully_replicated
        out[n] = {
            "actor": [np.asarray(x).tolist() for x in jax.tree.leaves(state.actor)],
            "eta": float(state.eta), "lam": np.asarray(state.lam).tolist(),
            "critic_loss": np.asarray(metrics["critic_loss"]).tolist(),
            "updates": int(state.updates),
        }
    print("RESULT" + json.dumps(out))
    """
)


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def test_one_vs_eight_devices_agree(tmp_path):
    script = tmp_path / "one_vs_eight.py"
    script.write_text(ONE_VS_EIGHT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=1800, cwd=REPO,
        env=_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    one, eight = out["1"], out["8"]
    assert one["updates"] == eight["updates"] > 0
    # same math up to float summation order across devices
    for a, b in zip(one["actor"], eight["actor"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(one["eta"], eight["eta"], rtol=1e-3)
    np.testing.assert_allclose(one["lam"], eight["lam"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(one["critic_loss"], eight["critic_loss"], rtol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


JOB_ARGS = [
    "--env.artifact", "synthetic", "--env.num_envs", "8", "--env.episode_length", "8",
    "--total_env_steps", "128", "--blocks_per_log", "8", "--checkpoint_every_logs", "0",
    "--cvpo.actor_hidden", "16", "16", "--cvpo.critic_hidden", "16", "16", "--cvpo.batch_size", "32",
    "--cvpo.num_action_samples", "8", "--cvpo.target_samples", "4", "--cvpo.min_replay", "32",
    "--cvpo.replay_capacity", "1024", "--cvpo.updates_per_block", "2", "--eval.num_episodes", "0",
    "--no-progress",
]


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "-m", "train.cvpo", "--workdir", str(single), *JOB_ARGS],
        capture_output=True, text=True, timeout=1800, cwd=REPO, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "train.cvpo", "--workdir", str(multi), *JOB_ARGS, "--distributed",
             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]

    a, b = _records(single), _records(multi)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["env_steps"] == rb["env_steps"]
        for key in ("critic_loss", "eta", "lam_0", "lam_1", "estep_kl", "kl_mean"):
            np.testing.assert_allclose(ra[key], rb[key], rtol=2e-3, atol=1e-6, err_msg=key)
