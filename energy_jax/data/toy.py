"""Generated data for the offline demo and the tests (clearly not CIFAR).

``toy_id.zip`` holds ``train/<class>/*.png`` and ``test/<class>/*.png`` of
``num_classes`` classes, each a stripe orientation (jittered so that classes
overlap a little) in a random colour with noise;
``toy_outliers.npy`` holds uint8 ``[N, 32, 32, 3]`` blobs and checkerboards that
belong to no class. Usage: ``python -m energy_jax.data.toy DIR``.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile

import numpy as np

COLORS = np.array([[220, 60, 60], [60, 200, 80], [70, 90, 230], [230, 200, 50],
                   [200, 80, 220], [60, 210, 210], [240, 140, 40], [140, 140, 140]], np.float64)


def class_images(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """``n`` uint8 ``[32, 32, 3]`` images of class ``label``: oriented stripes, random colour, noise."""
  yy, xx = np.mgrid[0:32, 0:32]
  angle = np.pi * label / 4 + rng.normal(0, 0.2, size=(n, 1, 1))
  freq = rng.uniform(0.35, 0.6, size=(n, 1, 1))
  phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
  wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
  color = COLORS[rng.integers(0, len(COLORS), n)][:, None, None, :]   # colour says nothing
  img = 128 + wave[..., None] * (color - 128) * 0.8
  img += rng.normal(0, 30, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def outlier_images(n: int, rng: np.random.Generator) -> np.ndarray:
  """``n`` tinted, noisy checkerboards: images of no class."""
  yy, xx = np.mgrid[0:32, 0:32]
  cells = rng.integers(2, 8, size=(n, 1, 1))
  checker = ((xx // cells + yy // cells) % 2).astype(np.float64)
  tint = rng.uniform(0, 255, size=(n, 1, 1, 3))
  img = checker[..., None] * tint + rng.normal(0, 30, size=(n, 32, 32, 3)) + 40
  return np.clip(img, 0, 255).astype(np.uint8)


def make_toy_dataset(directory: str, num_classes: int = 4, train_per_class: int = 256,
                     test_per_class: int = 64, num_outliers: int = 1024, seed: int = 0):
  """Writes ``toy_id.zip`` and ``toy_outliers.npy`` into ``directory``; returns their paths."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  zip_path = os.path.join(directory, "toy_id.zip")
  with zipfile.ZipFile(zip_path + ".tmp", "w", zipfile.ZIP_STORED) as zf:
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
      for label in range(num_classes):
        for i, img in enumerate(class_images(label, per_class, rng)):
          buf = io.BytesIO()
          Image.fromarray(img).save(buf, format="PNG")
          zf.writestr(f"{split}/class_{label}/{i:05d}.png", buf.getvalue())
  os.replace(zip_path + ".tmp", zip_path)
  npy_path = os.path.join(directory, "toy_outliers.npy")
  np.save(npy_path, outlier_images(num_outliers, rng))
  return zip_path, npy_path


if __name__ == "__main__":
  paths = make_toy_dataset(sys.argv[1] if len(sys.argv) > 1 else "workdirs/toy/data")
  print("wrote", *paths)
