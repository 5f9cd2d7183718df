"""``notebooks/evaluate_checkpoints.ipynb`` runs top to bottom (nbclient) at a small budget and is stored without outputs."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "evaluate_checkpoints.ipynb")

# a seconds-long CVPO run on the synthetic artifact (the notebook then loads it like a real one)
TINY_RUN = [
    "--env.artifact", "synthetic", "--env.num_envs", "8", "--env.episode_length", "8",
    "--total_env_steps", "128", "--blocks_per_log", "8",
    "--cvpo.actor_hidden", "[16,16]", "--cvpo.critic_hidden", "[16,16]", "--cvpo.batch_size", "32",
    "--cvpo.num_action_samples", "4", "--cvpo.target_samples", "2", "--cvpo.min_replay", "32",
    "--cvpo.replay_capacity", "512", "--cvpo.updates_per_block", "1",
]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_executes(tmp_path, monkeypatch):
    from train import cvpo as cvpo_job

    args, config = cvpo_job.parse_args(["--workdir", str(tmp_path / "runs" / "cvpo"), *TINY_RUN])
    cvpo_job.run(config, args.workdir, progress=False, evaluate=False)
    shipped = os.path.exists(os.path.join(REPO, "checkpoints", "tiny", "backbone.json"))
    monkeypatch.setenv("MEG_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MEG_NOTEBOOK_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MEG_NOTEBOOK_ARTIFACT", "synthetic")  # the artifact the run was trained on
    monkeypatch.setenv("MEG_NOTEBOOK_CHECKPOINTS", os.path.join(REPO, "checkpoints", "tiny") if shipped else "random")
    monkeypatch.setenv("MEG_NOTEBOOK_OUT", str(tmp_path / "report"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "MEG-CVPO" in text and "latency" in text  # section 1's costs and the summary table
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 1 + 5  # section 1's image, then the report's figures (no images in smoke mode)
    report = (tmp_path / "report" / "report.md").read_text()
    for n in range(1, 7):
        assert f"## {n}." in report
