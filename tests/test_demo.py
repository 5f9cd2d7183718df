"""``meg-jax demo``: clear failures without the shipped files, and ``--smoke`` end to end into a tmp dir."""

from __future__ import annotations

import json
import os
import re

import pytest

from train import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_BACKBONE = os.path.join(REPO, "checkpoints", "tiny", "backbone.json")
SHIPPED_ARTIFACT = os.path.join(REPO, "checkpoints", "calibration", "tiny.npz")


def test_missing_backbone_names_path_and_command(tmp_path, capsys):
    rc = demo.main(["--smoke", "--checkpoints", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w")])
    assert rc == 2
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path / "nowhere"), "backbone.json") in err
    assert "python -m train.distill --preset tiny" in err
    assert not os.path.exists(tmp_path / "w")  # nothing started


def test_missing_artifact_names_path_and_command(tmp_path, capsys):
    backbone = tmp_path / "bb"
    backbone.mkdir()
    (backbone / "backbone.json").write_text("{}")
    missing = str(tmp_path / "cal" / "tiny.npz")
    rc = demo.main(["--smoke", "--checkpoints", str(backbone), "--artifact", missing, "--workdir", str(tmp_path / "w")])
    assert rc == 2
    err = capsys.readouterr().err
    assert missing in err and "meg-jax calibrate" in err


def test_plan_sizes():
    smoke, full = demo.plan(None, True), demo.plan(None, False)
    assert smoke.budget == demo.SMOKE_BUDGET and full.budget == demo.DEFAULT_BUDGET
    assert smoke.eval_episodes < full.eval_episodes and demo.plan(1000, False).budget == 1000


@pytest.fixture(scope="module")
def smoke_run(demo_smoke_run):
    """The session's one smoke demo (``conftest.demo_smoke_run``), shared with the report-content
    and headline-regression modules so the suite pays for one run, not two."""
    return demo_smoke_run


def test_smoke_report_has_all_six_items_with_numbers(smoke_run):
    workdir, _, report, _ = smoke_run
    for n in range(1, 7):
        m = re.search(rf"^## {n}\. (.*)$", report, re.M)
        assert m, f"section {n} missing"
        body = report[m.end():].split("\n## ", 1)[0]
        assert re.search(r"^\|.*\d", body, re.M), f"section {n} has no table with numbers"
        assert re.search(r"!\[.*\]\(.*\.png\)", body), f"section {n} has no plot"
    for png in ("schemes_tiny.png", "training.png", "limit_sweep.png", "behaviour.png", "images.png", "grid.png",
                "robustness.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 1000, png


def test_smoke_trains_both_agents_and_evaluates_them(smoke_run):
    workdir, stdout, _, metrics = smoke_run
    assert sorted(r["algo"] for r in metrics["runs"]) == ["cvpo", "ppo_lag"]
    assert set(metrics["training"]) == {"MEG-CVPO", "PPO-Lagrangian"}
    assert metrics["sweep"]["trained"]
    comp = metrics["comparisons"][0]
    assert set(comp["schemes"]) == {"centralised", "meg_uncompressed", "on_device"}
    for name in ("MEG-CVPO", "PPO-Lagrangian"):
        assert name in comp["learned"] and name in stdout
        assert os.path.isdir(os.path.join(workdir, {"MEG-CVPO": "cvpo", "PPO-Lagrangian": "ppo_lag"}[name], "checkpoints"))
    assert len(metrics["image_cases"]) == 2
    assert os.path.join(workdir, "report.md") in stdout


def test_stale_run_is_refused_not_deleted_unless_overwrite(tmp_path, capsys):
    """A run directory made with other settings is user data: the demo stops (exit 2) and keeps it."""
    from meg_jax import checkpoint
    from meg_jax.rl.config import EnvSpec, EvalConfig, RunConfig

    # "fixed" only evaluates (and evaluation is off in the demo's training step): no training
    config = RunConfig(algo="fixed", env=EnvSpec(artifact="synthetic", num_envs=8, episode_length=8),
                       eval=EvalConfig(num_episodes=0))
    run_dir = tmp_path / "cvpo"
    checkpoint.check_config(run_dir, RunConfig(algo="fixed", seed=1, env=config.env))  # another seed
    (run_dir / "precious.txt").write_text("user data")
    with pytest.raises(demo.StaleRunError, match=r"--overwrite.*--workdir") as e:
        demo._train(config, str(run_dir), progress=False, overwrite=False)
    assert "seed: 1 != 0" in str(e.value)
    assert (run_dir / "precious.txt").read_text() == "user data"
    demo._train(config, str(run_dir), progress=False, overwrite=True)
    assert not (run_dir / "precious.txt").exists()
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 0


def test_stale_run_stops_the_demo_with_status_2(tmp_path, capsys):
    if not (os.path.exists(SHIPPED_BACKBONE) and os.path.exists(SHIPPED_ARTIFACT)):
        pytest.skip("the shipped checkpoints are not in this checkout")
    from meg_jax import checkpoint
    from meg_jax.rl.config import RunConfig

    workdir = tmp_path / "w"
    checkpoint.check_config(workdir / "cvpo", RunConfig(seed=5))
    rc = demo.main(["--smoke", "--workdir", str(workdir), "--no_progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds a run made with other settings" in err and "--overwrite" in err
    assert (workdir / "cvpo" / "config.json").exists()
