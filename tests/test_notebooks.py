"""The notebooks: stored without outputs, and executed headless top to bottom as a user would.
The quickstart and the TPU notebook on 1 device run in a kernel where energy-jax is not
installed, as in a fresh Colab runtime: their install cell installs a wheel built from this
checkout. The TPU notebook on 8 devices is opened from this checkout's notebooks/ folder and
finds the checkout itself."""

import glob
import json
import os
import re
import subprocess
import sys
import sysconfig

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


def _execute(name, cwd, monkeypatch, kernel="python3", **env):
  """Runs notebook ``name`` in a fresh ``kernel`` whose working directory is ``cwd``; returns
  the notebook and the text of its outputs."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel,
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()
  text = "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/markdown", ""))
                   for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
  return nb, text


@pytest.fixture(scope="module")
def fresh_runtime(tmp_path_factory):
  """A Jupyter kernel without energy-jax, as a fresh Colab runtime, and a wheel of this checkout.

  The kernel's Python is a new venv that sees this environment's packages but not energy-jax
  (a folder of links to every site-packages entry but energy-jax's), so that installing the
  wheel there fetches nothing else. Returns ``(kernel name, pip spec of the wheel, venv)``."""
  root = tmp_path_factory.mktemp("fresh_runtime")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"),
                  REPO], check=True)
  wheel, = glob.glob(str(root / "dist" / "energy_jax-*.whl"))
  visible = root / "site"
  visible.mkdir()
  site_packages = sysconfig.get_paths()["purelib"]
  for entry in os.listdir(site_packages):
    if "energy_jax" not in entry:
      os.symlink(os.path.join(site_packages, entry), visible / entry)
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  own_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                             "['purelib'])"], check=True, capture_output=True, text=True).stdout
  with open(os.path.join(own_site.strip(), "_visible.pth"), "w") as f:
    f.write(f"import site; site.addsitedir({str(visible)!r})\n")
  kernel_dir = root / "jupyter" / "kernels" / "fresh"
  kernel_dir.mkdir(parents=True)
  with open(kernel_dir / "kernel.json", "w") as f:
    json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "fresh runtime", "language": "python"}, f)
  os.environ["JUPYTER_PATH"] = str(root / "jupyter")
  assert subprocess.run([python, "-c", "import energy_jax"], cwd=root,
                        capture_output=True).returncode, "energy-jax is importable in the venv"
  yield "fresh", f"energy-jax[train] @ file://{wheel}", venv
  os.environ.pop("JUPYTER_PATH")


@pytest.mark.heavy
def test_quickstart_installs_the_wheel_and_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch,
                                                                     fresh_runtime):
  kernel, wheel, venv = fresh_runtime
  # Without PIP_SPEC, the install cell says what to set and nothing else runs.
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="set PIP_SPEC in the first "
                     "code cell to"):
    _execute("quickstart.ipynb", tmp_path, monkeypatch, kernel=kernel, ENERGY_JAX_PIP="")
  # With it, the wheel is installed into the kernel's venv; one CPU device, as on a laptop.
  nb, text = _execute("quickstart.ipynb", tmp_path, monkeypatch, kernel=kernel,
                      ENERGY_JAX_PIP=wheel, XLA_FLAGS="")
  assert re.search(rf"energy_jax \S+ from {re.escape(str(venv))}/lib/\S+/site-packages/energy_jax",
                   text)
  assert "backend: cpu" in text
  assert "| **mean** |" in text and "energy fine-tuned" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "the energy histogram is shown inline"


@pytest.mark.heavy
@pytest.mark.parametrize("devices", [1, 8])
def test_tpu_notebook_smoke_runs_on_any_device_count(devices, tmp_path, monkeypatch,
                                                     fresh_runtime):
  # 1 device: a fresh runtime installs the wheel (no checkout around tmp_path); 8 devices:
  # opened from notebooks/, it finds this checkout, which this environment has installed.
  kernel, wheel, venv = fresh_runtime
  fresh = devices == 1
  nb, text = _execute(
      "reproduce_cifar10_tpu.ipynb", tmp_path if fresh else NOTEBOOKS, monkeypatch,
      kernel=kernel if fresh else "python3", ENERGY_JAX_PIP=wheel if fresh else "",
      ENERGY_JAX_NOTEBOOK_SMOKE="1", ENERGY_JAX_NOTEBOOK_ROOT=str(tmp_path / "runs"),
      JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  version = __import__("energy_jax").__version__
  if fresh:
    assert "checkout: None\n" in text
    assert re.search(rf"energy_jax {re.escape(version)} from {re.escape(str(venv))}/lib/", text)
  else:
    assert f"checkout: {REPO}\n" in text                  # found up from notebooks/
    assert f"energy_jax {version} from {REPO}" in text
  assert f"backend: cpu | devices: {devices} x" in text
  assert "per device: 4 images, 8 outliers" in text
  # Both runs trained (2 epochs each) and were evaluated: two OOD tables with three sets.
  for run in ("cifar10_pretrain", "cifar10_finetune"):
    assert (tmp_path / "runs" / run / "eval" / "ood_results.json").is_file()
  tables = re.findall(r"\| toy_outliers \|", text)
  assert len(tables) == 2 and text.count("| **mean** |") == 2
  assert not (tmp_path / "runs" / "drive").exists()          # no Drive outside Colab


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
