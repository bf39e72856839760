"""The notebooks: stored without outputs, and executed headless top to bottom as a user would
(the quickstart on one CPU device; the TPU notebook in smoke mode on 1 and on 8 CPU devices,
opened from this checkout's notebooks/ folder so that it finds the checkout itself)."""

import os
import re

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


def _execute(name, cwd, monkeypatch, **env):
  """Runs notebook ``name`` in a fresh kernel whose working directory is ``cwd``; returns the
  notebook and the text of its outputs."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()
  text = "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/markdown", ""))
                   for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
  return nb, text


@pytest.mark.heavy
def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  # The kernel sees one CPU device (as a laptop would) and the checkout's package.
  nb, text = _execute("quickstart.ipynb", tmp_path, monkeypatch, XLA_FLAGS="", PYTHONPATH=REPO)
  assert "backend: cpu" in text
  assert "| **mean** |" in text and "energy fine-tuned" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the energy histogram is shown inline"


@pytest.mark.heavy
@pytest.mark.parametrize("devices", [1, 8])
def test_tpu_notebook_smoke_runs_on_any_device_count(devices, tmp_path, monkeypatch):
  nb, text = _execute(
      "reproduce_cifar10_tpu.ipynb", NOTEBOOKS, monkeypatch, ENERGY_JAX_NOTEBOOK_SMOKE="1",
      ENERGY_JAX_NOTEBOOK_ROOT=str(tmp_path), JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  assert f"checkout: {REPO}\n" in text                  # found up from notebooks/
  assert f"energy_jax {__import__('energy_jax').__version__} from {REPO}" in text
  assert f"backend: cpu | devices: {devices} x" in text
  assert "per device: 4 images, 8 outliers" in text
  # Both runs trained (2 epochs each) and were evaluated: two OOD tables with three sets.
  for run in ("cifar10_pretrain", "cifar10_finetune"):
    assert (tmp_path / run / "eval" / "ood_results.json").is_file()
  tables = re.findall(r"\| toy_outliers \|", text)
  assert len(tables) == 2 and text.count("| **mean** |") == 2
  assert not (tmp_path / "drive").exists()          # no Drive outside Colab


def test_tpu_notebook_names_batch_sizes_that_do_not_divide(tmp_path, monkeypatch):
  """The notebook's config cell, run for 8 devices on a config whose batch of 100 does not
  divide over them."""
  import jax
  from energy_jax import config
  nb = nbformat.read(os.path.join(NOTEBOOKS, "reproduce_cifar10_tpu.ipynb"), as_version=4)
  source = next(c.source for c in nb.cells if "def make_config" in c.source)
  odd = config.get_config("cifar10", "pretrain")
  odd.batch_size = 100
  monkeypatch.setattr(config, "get_config", lambda preset, stage: odd)
  namespace = {"SMOKE": False, "n_dev": 8, "ROOT": str(tmp_path), "jax": jax}
  exec(source.split("\npre, ft =")[0], namespace)
  with pytest.raises(ValueError, match=r"config.batch_size = 100 does not divide over the 8 "
                                       r"devices: set it to a multiple of 8"):
    namespace["make_config"]("pretrain")
