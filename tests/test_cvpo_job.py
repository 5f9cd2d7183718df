"""The ``train.cvpo`` job: resume equality, NaN stop, refusals, baseline evaluation."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from train import cvpo as job

TINY_ARGS = [
    "--env.artifact", "synthetic", "--env.num_envs", "8", "--env.episode_length", "8",
    "--blocks_per_log", "4", "--total_env_steps", "96", "--checkpoint_every_logs", "1",
    "--cvpo.actor_hidden", "16", "16", "--cvpo.critic_hidden", "16", "16", "--cvpo.batch_size", "32",
    "--cvpo.num_action_samples", "8", "--cvpo.target_samples", "4", "--cvpo.min_replay", "32",
    "--cvpo.replay_capacity", "512", "--cvpo.updates_per_block", "2", "--eval.num_episodes", "0",
]


def _config(*extra: str):
    _, config = job.parse_args(["--workdir", "unused", *TINY_ARGS, *extra])
    return config


def test_estep_summary_counts_capped_and_infeasible_esteps():
    # 4 E-steps: lam on the cap in 2 (one of them infeasible), prior costs of constraint 0 at
    # 0.9, 1.1, 1.0, 1.0 x threshold (mean 1.0, population std sqrt(0.005))
    flat = {
        "estep_lam_at_cap": np.asarray([1.0, 0.0, 1.0, 0.0]),
        "estep_infeasible": np.asarray([1.0, 0.0, 0.0, 0.0]),
        "estep_prior_costs_over_threshold": np.asarray([[0.9, 1.0], [1.1, 1.0], [1.0, 1.0], [1.0, 1.0]]),
        "estep_baseline_over_threshold": np.asarray([[1.0, 1.0]] * 3 + [[0.98, 0.97]]),
    }
    out = job.estep_summary(flat)
    assert out["estep_lam_at_cap_frac"] == 0.5 and out["estep_infeasible_frac"] == 0.25
    assert out["prior_cost_0_over_threshold"] == pytest.approx(1.0)
    assert out["prior_cost_0_over_threshold_std"] == pytest.approx(np.sqrt(0.005))
    assert out["baseline_cost_1_over_threshold"] == pytest.approx(0.97)


def test_parse_args_applies_dotted_overrides(capsys):
    config = _config("--cvpo.batch_size=64", "--algo", "ppo_lag", "--seed", "3", "--env.preset", "sdxl-mobile")
    assert config.cvpo.batch_size == 64 and config.algo == "ppo_lag" and config.seed == 3
    assert config.env.preset == "sdxl-mobile" and config.env.num_envs == 8
    assert config.cvpo.actor_hidden == (16, 16)
    with pytest.raises(SystemExit) as e:
        _config("--cvpo.no_such_field=1")
    assert e.value.code == 2 and "--cvpo.no_such_field" in capsys.readouterr().err


def test_killed_run_resumes_bit_identical(tmp_path):
    config = _config()  # 96 transitions / (8 envs x 4 blocks) = 3 iterations, a checkpoint after each
    full = job.run(config, str(tmp_path / "full"), progress=False)
    assert full.iterations == 3
    part = job.run(config, str(tmp_path / "resumed"), progress=False, halt_after=1)  # "killed" after 1
    assert part.iterations == 1
    resumed = job.run(config, str(tmp_path / "resumed"), progress=False)
    assert resumed.iterations == 3
    a, b = jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(resumed.state.updates) > 0
    with open(tmp_path / "full" / "config.json") as f:
        assert json.load(f)["cvpo"]["batch_size"] == 32
    # every update's E-step statistics were logged
    with open(tmp_path / "full" / "estep" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == int(full.state.updates)
    assert {"eta", "lam_0", "lam_1", "estep_kl", "estep_cost_0_over_threshold", "lam_at_cap", "infeasible"} <= set(records[0])
    # and the iteration summaries carry the at-cap fraction, consistent with those records
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        summaries = [json.loads(line) for line in f]
    logged = [r for r in summaries if "estep_lam_at_cap_frac" in r]
    assert logged and sum(r["estep_lam_at_cap_frac"] * r["updates_done"] for r in logged) == pytest.approx(
        sum(r["lam_at_cap"] for r in records))
    # a rerun with another config is refused, naming the field
    rc = job.main(["--workdir", str(tmp_path / "full"), *TINY_ARGS, "--cvpo.batch_size=64", "--no_progress"])
    assert rc == job.EXIT_BAD_CONFIG


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # iteration 1 is warm-up only (min_replay = 64 transitions > 32 collected): finite, checkpointed;
    # from iteration 2 the absurd critic step size makes the critic loss non-finite
    workdir = tmp_path / "nan"
    rc = job.main(["--workdir", str(workdir), *TINY_ARGS, "--cvpo.min_replay=64", "--cvpo.critic_lr=1e30",
                   "--no_progress"])
    assert rc == job.EXIT_NON_FINITE
    assert "non-finite" in capsys.readouterr().err
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps and max(steps) < 3  # the diverged iteration was not saved


def test_unknown_preset_and_infeasible_limits_are_refused(tmp_path, capsys):
    rc = job.main(["--workdir", str(tmp_path / "a"), *TINY_ARGS, "--env.preset", "nope"])
    assert rc == job.EXIT_BAD_CONFIG
    assert "unknown environment preset 'nope'" in capsys.readouterr().err
    rc = job.main(["--workdir", str(tmp_path / "b"), *TINY_ARGS, "--env.limits", "1e-6", "1e-6"])
    assert rc == job.EXIT_BAD_CONFIG
    assert "infeasible" in capsys.readouterr().err


def test_fixed_baseline_is_evaluated_in_the_harness(tmp_path):
    workdir = tmp_path / "fixed"
    rc = job.main(["--workdir", str(workdir), *TINY_ARGS, "--algo", "fixed", "--eval.num_episodes", "64",
                   "--no_progress"])
    assert rc == 0
    with open(workdir / "eval.json") as f:
        ev = json.load(f)
    s = ev["summary"]
    assert s["algo"] == "fixed" and ev["fixed"]["episodes"] == 64
    assert s["gap_closed"] == pytest.approx(0.0)
    # the oracle is a ceiling and meets the limits (within the feasibility tolerance)
    assert ev["oracle"]["quality"] >= ev["fixed"]["quality"]
    assert ev["oracle"]["feasible"] and ev["fixed"]["feasible"]
    # Re-scoring with --eval.deterministic writes beside the first evaluation, not over it.
    ev["marker"] = "first evaluation"
    with open(workdir / "eval.json", "w") as f:
        json.dump(ev, f)
    rc = job.main(["--workdir", str(workdir), *TINY_ARGS, "--algo", "fixed", "--eval.num_episodes", "64",
                   "--eval.deterministic", "--no_progress"])
    assert rc == 0
    with open(workdir / "eval.json") as f:
        assert json.load(f)["marker"] == "first evaluation"
    with open(workdir / "eval-deterministic.json") as f:
        assert json.load(f)["summary"]["algo"] == "fixed"
