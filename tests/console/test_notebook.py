"""``examples/quickstart.ipynb`` executed as Jupyter would: nbclient on a real ipykernel, with the
tiny model on the embedded backend; the assertions read the cells' outputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient and ipykernel (nox -s console)")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.slow
@pytest.mark.timeout(240)  # a kernel start, a model load and 15 steps
def test_the_quickstart_notebook_runs_and_awaits_at_top_level(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_MODEL", "tiny-llama")
    monkeypatch.setenv("TINKER_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "await training.forward_backward" not in code and ".result()" not in code
    assert re.search(r"^\s*result = await fb$", code, re.M)  # awaited at the top level of a cell

    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(text_of(c) for c in notebook.cells if c.cell_type == "code")
    assert "training a rank-16 LoRA on tiny-llama (embedded backend)" in outputs
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss per token ([\d.]+)$", outputs, re.M)]
    assert len(losses) == 15 and losses[-1] < 0.25 * losses[0], losses  # seeded; measured 7.68 -> 0.81
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the loss curve, drawn inline
    assert re.search(r"^saved tinker://[^/]+/weights/quickstart$", outputs, re.M), outputs
    assert "after training:" in outputs
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
