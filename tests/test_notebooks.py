import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
NOTEBOOKS = os.path.join(REPO, "notebooks")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "reproduce_cifar10_tpu.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name} holds outputs"


def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  # The kernel sees one CPU device (as a laptop would) and the checkout's package.
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("PYTHONPATH", REPO)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/markdown", ""))
                   for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
  assert "backend: cpu" in text
  assert "| **mean** |" in text and "energy fine-tuned" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the energy histogram is shown inline"
