"""The paper's evaluation sets as the reference builds them: per-set preprocessing, validation
corruptions of the other CIFAR's test set, and a whole evaluation over generated folders of the
sizes the reference reads."""

import os

import numpy as np
import pytest
from PIL import Image

from energy_jax import config as config_lib, data
from energy_jax.data import synthetic
from energy_jax.ood import protocol


def _folder(root, size, n, seed, mode="RGB"):
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  arrays = []
  for i in range(n):
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(os.path.join(root, f"{i:03d}.png"))
    arrays.append(np.asarray(Image.fromarray(a).convert(mode).convert("RGB")))
  return arrays


def test_the_paper_sets_and_their_preprocessing():
  assert set(protocol.PAPER_OOD_SETS) == {"textures", "svhn", "places365", "lsun_c", "lsun_r",
                                          "isun"}
  resized = {n for n, s in protocol.PAPER_OOD_SETS.items() if s.transform == "resize"}
  assert resized == {"textures", "places365"}           # the others are fed as they are
  # Each the official archive, fetched by name: all 5,640 DTD images (the folder of its 47
  # classes), the SVHN test .mat, Places365's val_256.
  from energy_jax import fetch
  for name, root in (("textures", "dtd/images"), ("svhn", "test_32x32.npy"),
                     ("places365", "val_256")):
    spec = protocol.PAPER_OOD_SETS[name]
    assert spec.source == f"energy_ood:{name}" and spec.split is None
    assert fetch.get(spec.source).root == root
  assert protocol.parse_ood("lsun_c") == ("lsun_c", protocol.PAPER_OOD_SETS["lsun_c"])
  assert protocol.parse_ood("x=/d/x@as_is") == ("x", protocol.OODSet("/d/x", None, "as_is"))
  assert protocol.parse_ood("synthetic:jigsaw")[0] == "jigsaw"
  with pytest.raises(ValueError, match="unknown OOD set 'cifar11'"):
    protocol.parse_ood("cifar11")
  with pytest.raises(ValueError, match="transform must be one of"):
    protocol.parse_ood("x=/d/x@crop")


def test_per_set_preprocessing_on_small_folders(tmp_path):
  c = config_lib.get_config("cifar10", "pretrain")
  c.data_dir = str(tmp_path)
  # LSUN-C as the ODIN release ships it: 36x36, fed unresized.
  lsun = _folder(tmp_path / "data" / "LSUN" / "test", (36, 36), 3, 0)
  # (The paper's lsun_c fetches the archive by name: a copy on the disk is read as a folder.)
  got = protocol.load_ood_set(c, protocol.OODSet("data/LSUN", None, "as_is"), test=None)
  assert got.images.shape == (3, 36, 36, 3)
  np.testing.assert_array_equal(got.images, np.stack(lsun))
  # A resized set: torchvision's Resize(32) (PIL bilinear, short side to 32) + CenterCrop(32).
  big = _folder(tmp_path / "tex" / "c", (64, 48), 2, 1, mode="L")
  got = protocol.load_ood_set(c, protocol.OODSet("tex"), test=None)
  for a, g in zip(big, got.images):
    small = Image.fromarray(a).resize((42, 32), Image.BILINEAR)     # int(32 * 64 / 48) = 42
    want = np.asarray(small.crop((5, 0, 37, 32)))                  # round((42 - 32) / 2) = 5
    np.testing.assert_array_equal(g, want)
  # Unresized images must share one size.
  _folder(tmp_path / "mixed" / "c", (32, 32), 1, 2)
  _folder(tmp_path / "mixed" / "d", (36, 36), 1, 3)
  with pytest.raises(ValueError, match="must share one size"):
    protocol.load_ood_set(c, protocol.OODSet("mixed", None, "as_is"), test=None)


def test_validation_sets_come_from_the_other_cifar(tmp_path):
  c = config_lib.get_config("cifar10", "pretrain")
  assert c.validation_base == "tfds:cifar100"
  assert config_lib.get_config("cifar100", "pretrain").validation_base == "tfds:cifar10"
  assert "gaussian_noise" not in c.validation_sets
  assert tuple(c.validation_sets) == protocol.REFERENCE_VALIDATION_SETS
  # A stand-in for the other set: all images constant 200; the ID test set: all constant 10.
  other = np.full((30, 32, 32, 3), 200, np.uint8)
  np.save(tmp_path / "other.npy", other)
  c.validation_base, c.validation_base_split = str(tmp_path / "other.npy"), ""
  test = data.ImageSet(np.full((50, 32, 32, 3), 10, np.uint8), np.arange(50) % 10,
                       tuple(map(str, range(10))), "id")
  val = protocol.validation_sets(c, test, seed=0)
  assert list(val) == list(protocol.REFERENCE_VALIDATION_SETS)
  assert all(len(v) == 10 for v in val.values())                   # len(test) // 5
  np.testing.assert_array_equal(val["invert"].images[..., 1:], 55)  # 255 - 200, not 255 - 10
  np.testing.assert_array_equal(val["arithmetic_mean"].images, 200)
  noise = synthetic.make_ood_set("uniform_noise", 10, 0)
  np.testing.assert_array_equal(val["uniform_noise"].images, noise.images)
  c.validation_base = ""                                           # the ID test set instead
  np.testing.assert_array_equal(protocol.validation_sets(c, test)["invert"].images[..., 1:], 245)


def test_a_paper_protocol_evaluation_on_generated_folders(tmp_path):
  """The cifar10 preset's evaluation over the four folder-based sets at the reference's sizes
  (LSUN-C 36x36 unresized, reference pooling), validation included."""
  import jax
  from energy_jax import checkpoints, detectors, models, train
  from energy_jax.data import toy
  from energy_jax.ood import evaluation
  toy_id, _ = toy.make_toy_dataset(str(tmp_path / "toy"), num_classes=10, train_per_class=4,
                                   test_per_class=5, num_outliers=8)
  c = config_lib.get_config("cifar10", "finetune")
  c.in_train = c.in_test = toy_id
  c.model.depth, c.model.widen_factor = 10, 1
  assert c.model.pooling == "reference"
  c.data_dir = str(tmp_path)
  c.validation_base = toy_id                # a stand-in for CIFAR-100's test set
  state = train.create_train_state(c, jax.random.PRNGKey(0), 10)
  ckpts = checkpoints.RunCheckpoints(str(tmp_path / "run"))
  ckpts.save(0, jax.device_get(state), checkpoints.run_meta(c, 0, True, {}))
  ckpts.close()
  _folder(tmp_path / "data" / "LSUN" / "test", (36, 36), 12, 4)
  _folder(tmp_path / "data" / "LSUN_resize" / "test", (32, 32), 12, 5)
  _folder(tmp_path / "data" / "iSUN" / "iSUN_patches", (32, 32), 12, 6)
  sets = {n: protocol.OODSet(f"data/{d}", None, protocol.PAPER_OOD_SETS[n].transform)
          for n, d in (("lsun_c", "LSUN"), ("lsun_r", "LSUN_resize"), ("isun", "iSUN"))}
  out = evaluation.run(c, str(tmp_path / "run"), sets, str(tmp_path / "eval"),
                       [detectors.create("energy"), detectors.create("odin")], num_to_avg=3,
                       validate=True, log=lambda s: None, progress_bar=False)
  assert set(out["results"]["energy (T=1)"]) == {"lsun_c", "lsun_r", "isun", "mean"}
  assert out["results"]["energy (T=1)"]["lsun_c"]["num_ood"] == 10        # len(test) // 5
  # The 36x36 set went through the reference's pooling: the top-left 8x8 of a 9x9 map.
  model = models.from_config(c)
  lsun = protocol.load_ood_set(c, sets["lsun_c"], test=None)
  assert model.apply(state.variables, np.zeros((1, 36, 36, 3), np.float32)).logits.shape == (1, 10)
  assert lsun.images.shape[1:] == (36, 36, 3)
