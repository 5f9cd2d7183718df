"""``notebooks/evaluate_checkpoints.ipynb`` runs top to bottom (nbclient) at a small budget and is stored without outputs."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "evaluate_checkpoints.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_executes(tmp_path, monkeypatch, tiny_cvpo_runs):
    # tiny_cvpo_runs: a seconds-long CVPO run on the synthetic artifact, shared with
    # test_evaluate (conftest); the notebook loads it like a real one
    shipped = os.path.exists(os.path.join(REPO, "checkpoints", "tiny", "backbone.json"))
    monkeypatch.setenv("MEG_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MEG_NOTEBOOK_RUN_DIR", tiny_cvpo_runs)
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
