"""The light install: ``pip install .`` (no extras) in a fresh venv scores logits, saves and loads
a checkpoint and runs a model, with no TensorFlow installed or imported."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

# What the light install needs of the checkout: the package and its build files.
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "constraints.txt", "energy_jax")

DEPLOY = r"""
import json, sys
import numpy as np
import energy_jax
from energy_jax import checkpoints, config, inference, models

logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], np.float32)
scores = np.asarray(energy_jax.energy_score(logits)).tolist()

# A tiny WRN, saved as a run checkpoint and loaded back as a deployment would.
c = config.get_config("test", "pretrain")
model = models.from_config(c)
variables = models.init_variables(model, __import__("jax").random.PRNGKey(0))
with checkpoints.RunCheckpoints(sys.argv[1]) as ckpt:
  ckpt.save(0, dict(variables), checkpoints.run_meta(c, 0, True, {}))
loaded = checkpoints.load_variables(sys.argv[1], c)
images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
out = inference.predict(model, loaded, images, batch_size=4)
print(json.dumps({
    "scores": scores,
    "logits": np.asarray(out.logits).tolist(),
    "image_scores": np.asarray(energy_jax.energy_score(out.logits)).tolist(),
    "tensorflow_imported": sorted(m for m in sys.modules if m.split(".")[0] in
                                  ("tensorflow", "tensorflow_datasets", "tensorboard")),
    "file": energy_jax.__file__,
}))
"""


def _logsumexp(x):
  m = x.max(axis=-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.mark.heavy
def test_light_install_deploys_a_detector_without_tensorflow(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in PACKAGE_FILES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
  py = str(venv / "bin" / "python")
  # The pinned versions (wheels come from the machine's cache or mirror); no extras.
  pip = subprocess.run([py, "-m", "pip", "install", "-q", "-c", str(src / "constraints.txt"),
                        str(src)], capture_output=True, text=True, timeout=900)
  assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
  listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True,
                          text=True, check=True, timeout=120)
  installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
  assert {"jax", "flax", "optax", "orbax-checkpoint", "scikit-learn"} <= installed
  heavy = installed & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "torch",
                       "matplotlib"}
  assert not heavy, f"the light install pulled {sorted(heavy)}"

  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  run = subprocess.run([py, "-c", DEPLOY, str(tmp_path / "run")], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got["file"].startswith(str(venv)), got["file"]        # the installed copy, not the repo
  assert got["tensorflow_imported"] == []
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
  # The float32 scores against float64 numpy: measured 1.8e-8, 1.2e-8 and 4.1e-8 (the model's
  # logits) with XLA:CPU native (AVX2), held to AVX and to SSE4_2 (2026-12-06).
  np.testing.assert_allclose(got["scores"], _logsumexp(logits), rtol=1e-6)
  np.testing.assert_allclose(got["scores"][1], 0.5 + np.log(3.0), rtol=1e-6)
  out_logits = np.array(got["logits"])
  assert out_logits.shape == (5, 4)
  np.testing.assert_allclose(got["image_scores"], _logsumexp(out_logits), rtol=1e-5, atol=1e-5)
