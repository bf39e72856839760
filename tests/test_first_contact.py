"""What a new user meets first: ``--help`` of the scripts lists every config field, the package
imports without TensorFlow, TensorFlow starts quietly, the bundled-image sources of the demo."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from energy_jax import config, data
from energy_jax.data import sklearn_images


def _help(args, **env):
  """The stdout of a script's ``--help`` (absl exits 1 after printing it)."""
  out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", **env), timeout=300)
  assert out.returncode in (0, 1) and "Try --helpfull" in out.stdout, out.stderr[-2000:]
  return out.stdout


@pytest.mark.parametrize("script,config_file,stage", [
    ("pretrain.py", "pretrain.py:digits", "pretrain"),
    ("finetune.py", "finetune.py:digits", "finetune"),
    ("evaluate.py", "finetune.py:digits", "finetune"),
])
def test_help_lists_every_config_field_with_its_value_and_meaning(script, config_file, stage):
  out = _help([f"experiments/{script}", "--help",
                f"--config=experiments/configs/{config_file}"])
  lines = {line.split()[0]: line for line in out.splitlines()
           if line.strip().startswith("--config.")}
  values = dict(config.flat_items(config.get_config("digits", stage)))
  assert len(config.fields()) >= 40
  for name, meaning in ((f.name, f.meaning) for f in config.fields()):
    line = lines.get(f"--config.{name}")
    assert line is not None, f"--config.{name} missing from {script} --help"
    assert repr(values[name]) in line and meaning in line, line
  assert "presets: " in out and "digits" in out
  if stage == "finetune":
    assert repr("energy") in lines["--config.objective.name"]
  if script == "evaluate.py":
    assert "--detectors" in out                 # its own flags are still listed


def test_help_of_the_default_preset():
  out = _help(["experiments/finetune.py", "--help"])
  assert "--config=experiments/configs/finetune.py:cifar10" in out
  line = next(l for l in out.splitlines() if l.strip().startswith("--config.objective.m_in "))
  assert "-23.0" in line
  assert "--workdir=DIR (default workdirs/PRESET_finetune" in out


def test_import_pulls_no_tensorflow_and_tensorflow_starts_quietly():
  script = ("import sys, energy_jax, energy_jax.data, energy_jax.checkpoints, "
            "energy_jax.inference, energy_jax.detectors\n"
            "print('TF', sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets', 'tensorboard')))\n"
            "from energy_jax.tf_support import import_tensorflow\n"
            "tf = import_tensorflow()\n"
            "print('sum', int(tf.reduce_sum(tf.range(5))))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",
                                                          "TF_ENABLE_ONEDNN_OPTS")}
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       env=dict(env, PYTHONPATH=REPO), timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "TF []" in out.stdout and "sum 10" in out.stdout
  # TensorFlow 2.21 prints oneDNN's "I0000 ... port.cc" line on import unless told not to.
  assert "oneDNN" not in out.stderr and "port.cc" not in out.stderr, out.stderr


def test_sklearn_digits_are_the_bundled_digits_upsampled():
  from PIL import Image
  from sklearn.datasets import load_digits
  d = load_digits()
  train, test = data.load("sklearn:digits", "train"), data.load("sklearn:digits", "test")
  assert (len(train), len(test)) == (1343, 454) == (data.count("sklearn:digits", "train"),
                                                    data.count("sklearn:digits"))
  assert test.num_classes == 10 and test.images.shape[1:] == (32, 32, 3)
  # Test images are every 4th image of each class: the first test image of class 3 is the
  # data set's first 3; its pixels, 0..16 scaled to 0..255 and resized with PIL.
  first3 = int(np.flatnonzero(d.target == 3)[0])
  grey = np.round(d.images[first3] * 255 / 16).astype(np.uint8)
  want = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BILINEAR))
  got = test.images[np.flatnonzero(test.labels == 3)[0]]
  np.testing.assert_array_equal(got[..., 0], want)
  np.testing.assert_array_equal(got[..., 0], got[..., 2])
  assert np.bincount(train.labels).min() >= 130 and np.bincount(test.labels).min() >= 44


def test_sklearn_photo_patches_outliers_and_ood_set_are_disjoint_halves():
  from sklearn.datasets import load_sample_images
  outliers, ood = data.load("sklearn:photos", "train"), data.load("sklearn:photos")
  assert (len(outliers), len(ood)) == (2000, 1000)
  assert ood.source == "sklearn:photos:test" and outliers.num_classes == 1
  np.testing.assert_array_equal(data.load("sklearn:photos", "train").images, outliers.images)
  # Each patch is its box of a photograph, resized by PIL; the outliers' boxes lie in the left
  # halves, the OOD set's in the right halves.
  from PIL import Image
  photos = load_sample_images().images
  shapes = [p.shape[:2] for p in photos]
  for split, images in (("train", outliers.images), ("test", ood.images)):
    boxes = sklearn_images.patch_boxes(split, shapes, len(images))
    for (p, top, left, side), image in list(zip(boxes, images))[:20]:
      crop = photos[p][top:top + side, left:left + side]
      want = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BILINEAR))
      np.testing.assert_array_equal(image, want)
    w = shapes[0][1]
    assert all(shapes[p][1] == w for p, *_ in boxes)
    sides = np.array([b[3] for b in boxes])
    lefts = np.array([b[2] for b in boxes])
    assert sides.min() >= 24 and sides.max() <= 128 and len(set(sides)) > 50
    if split == "train":
      assert (lefts + sides <= w // 2).all()
    else:
      assert (lefts >= w - w // 2).all() and (lefts + sides <= w).all()
  with pytest.raises(ValueError, match="splits"):
    data.load("sklearn:digits", "validation")
  with pytest.raises(ValueError, match="unknown scikit-learn image set"):
    data.load("sklearn:faces")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
  mine = tmp_path / "results"
  mine.mkdir()
  (mine / "keep.txt").write_text("not the demo's")
  out = subprocess.run(["bash", "experiments/demo.sh"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, DEMO_WORKDIR=str(mine)), timeout=60)
  assert out.returncode == 1 and "was not made by this script" in out.stderr
  assert (mine / "keep.txt").read_text() == "not the demo's"
  assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
