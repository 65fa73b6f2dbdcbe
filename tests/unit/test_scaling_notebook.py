"""notebooks/scaling_laws.ipynb executes end to end on results drawn from a known law."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.scaling_rows import law_rows, write_jsonl, write_training_grid

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "scaling_laws.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_on_results_the_test_writes(tmp_path, monkeypatch):
    for dataset, seed in (("synthetic-400m", 0), ("synthetic-2b", 1)):
        rows = law_rows(seed=seed, dataset=dataset)
        for run in sorted({r["run"] for r in rows}):
            write_jsonl(tmp_path / "runs" / run / "results.jsonl", [r for r in rows if r["run"] == run])
    monkeypatch.setenv("CLIPSCALE_RESULTS", str(tmp_path / "runs" / "*"))
    write_training_grid(tmp_path / "training")
    monkeypatch.setenv("CLIPSCALE_FORECAST_GRID", str(tmp_path / "training" / "grid-*"))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[2]))  # the kernel imports this checkout
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "dataset=synthetic-2b: 1 - acc1 = " in text and "95% CI" in text
    assert "inside" in text or "OUTSIDE" in text
    assert "params" in text and "samples_seen" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert "E[CI width]" in text and "final forecast" in text and "the law" in text
    assert len(images) == 3  # the fits, the design, the forecast
