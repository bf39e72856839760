import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from energy_jax import data
from energy_jax.data import sources, synthetic
from conftest import shared_pack


def _write_folder(root, classes=("b", "a"), n=3, size=(32, 32), mode="RGB"):
  for c in classes:
    os.makedirs(root / "train" / c, exist_ok=True)
    for i in range(n):
      Image.new(mode, size, color=(10 * i) if mode == "L" else (10 * i, 0, 0)).save(
          root / "train" / c / f"{i}.png")


def test_folder_and_zip_are_read_the_same_with_sorted_classes(tmp_path):
  _write_folder(tmp_path / "f")
  a = sources.load_image_folder(str(tmp_path / "f"), "train")
  with zipfile.ZipFile(tmp_path / "f.zip", "w") as zf:
    for root, _, files in os.walk(tmp_path / "f"):
      for name in files:
        full = os.path.join(root, name)
        zf.write(full, os.path.relpath(full, tmp_path / "f"))
  b = sources.load_image_folder(str(tmp_path / "f.zip"), "train")
  assert a.class_names == b.class_names == ("a", "b")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, [0, 0, 0, 1, 1, 1])
  # Counting reads the listing only: the same number as decoding, split by split.
  _write_folder(tmp_path / "f2", classes=("a",), n=2)
  os.rename(tmp_path / "f2" / "train", tmp_path / "f" / "test")
  assert data.count(str(tmp_path / "f"), "train") == 6
  assert data.count(str(tmp_path / "f"), "test") == len(data.load(str(tmp_path / "f"), "test")) == 2
  assert data.count(str(tmp_path / "f.zip"), "train") == len(b)
  np.save(tmp_path / "o.npy", np.zeros((5, 32, 32, 3), np.uint8))
  assert data.count(str(tmp_path / "o.npy")) == 5
  assert data.sources.resolve("tfds:cifar10") == ("tfds", "cifar10")
  assert data.sources.under("/d", "o.npy") == "/d/o.npy"
  assert data.sources.under("/d", "tfds:cifar10") == "tfds:cifar10"


def test_resize_center_crop_and_grayscale(tmp_path):
  img = np.zeros((64, 96), np.uint8)
  img[:, 40:56] = 255                       # a bright band at the centre
  os.makedirs(tmp_path / "g" / "c")
  Image.fromarray(img).save(tmp_path / "g" / "c" / "x.png")
  s = sources.load_image_folder(str(tmp_path / "g"))
  assert s.images.shape == (1, 32, 32, 3)
  assert np.all(s.images[0, :, 16, 0] > 200) and np.all(s.images[0, :, 2, 0] < 30)


def test_bad_sources_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    data.load(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="missing"):
    data.count(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no images"):
    sources.load_image_folder(str(tmp_path / "empty"))
  _write_folder(tmp_path / "h", classes=("a",))
  os.makedirs(tmp_path / "h" / "train" / "z")
  with pytest.raises(ValueError, match=r"without images: \['z'\]"):
    sources.load_image_folder(str(tmp_path / "h"), "train")
  _write_folder(tmp_path / "k", classes=("a",))
  (tmp_path / "k" / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="bad.jpg"):
    sources.load_image_folder(str(tmp_path / "k"), "train")
  np.save(tmp_path / "w.npy", np.zeros((4, 32, 32), np.uint8))
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(4, 32, 32\)"):
    data.load(str(tmp_path / "w.npy"))
  np.save(tmp_path / "f.npy", np.zeros((4, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="float32"):
    data.load(str(tmp_path / "f.npy"))


def test_synthetic_sets_follow_reference_transforms():
  rng = np.random.default_rng(0)
  base = data.ImageSet(rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                           np.zeros(10, np.int32), ("",), "t")
  x = base.images
  inv = synthetic.invert(x)
  np.testing.assert_array_equal(inv[..., 0], x[..., 0])
  np.testing.assert_array_equal(inv[..., 1:], 255 - x[..., 1:])
  sh = synthetic.rgb_shift(x)
  np.testing.assert_array_equal(sh[..., 0], x[:, :, ::-1, 1])
  jig = synthetic.jigsaw(x)
  np.testing.assert_array_equal(jig[:, :8, :16], x[:, 8:16, :16])
  np.testing.assert_array_equal(jig[:, 16:, 16:24], x[:, :16, 24:])
  assert sorted(jig.reshape(-1)) == sorted(x.reshape(-1))
  for name in synthetic.VALIDATION_SETS:
    s = synthetic.make_ood_set(name, 6, seed=1, base=base)
    assert s.images.shape == (6, 32, 32, 3) and s.images.dtype == np.uint8
  with pytest.raises(ValueError, match="unknown synthetic"):
    synthetic.make_ood_set("fog", 3)


def test_real_cifar10_pack_counts():
  path = shared_pack("cifar10.zip")
  test = sources.load_image_folder(path, "test")
  assert len(test) == 10_000 and test.num_classes == 10
  assert data.count(path, "test") == 10_000
  assert data.count(path, "train") == 50_000
  assert np.all(np.bincount(test.labels) == 1000)
  assert test.class_names[0] == "airplane" and test.class_names[-1] == "truck"


@pytest.mark.slow
def test_real_cifar10_train_split():
  train = sources.load_image_folder(shared_pack("cifar10.zip"), "train")
  assert len(train) == 50_000 and np.all(np.bincount(train.labels) == 5000)
