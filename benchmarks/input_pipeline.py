"""Images/s of the augmented ID + outlier tf.data training stream on this host.

  python benchmarks/input_pipeline.py [--data ../shared/data] [--batches 200]

Prints the rate with all cores and per core, and whether 16 such cores could feed a GPU step
at 50,000 images/s (the device-resident path needs no host feeding at all).
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from energy_jax import data  # noqa: E402
from energy_jax.data import host_stream, sources  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data", default=SHARED_DATA)
  p.add_argument("--batches", type=int, default=200)
  args = p.parse_args()
  zip_path = os.path.join(args.data, "cifar10.zip")
  if os.path.exists(zip_path):
    t0 = time.time()
    train = sources.load_image_folder(zip_path, "train")
    out = sources.load_image_folder(os.path.join(args.data, "tin32-outliers.zip"))
    print(f"decoded {len(train) + len(out)} JPEGs in {time.time() - t0:.1f} s")
  else:
    rng = np.random.default_rng(0)
    train = data.ImageSet(rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                              rng.integers(0, 10, 50000).astype(np.int32),
                              tuple(map(str, range(10))), "random")
    out = data.ImageSet(train.images[:40000], np.zeros(40000, np.int32), ("",), "random")
  stream = host_stream.train_stream(train, out, 128, 256, seed=0)
  for _ in range(10):
    next(stream)
  t0 = time.time()
  for _ in range(args.batches):
    next(stream)
  rate = args.batches * 384 / (time.time() - t0)
  cores = os.cpu_count() or 1
  print(f"tf.data ID+outlier stream: {rate:.0f} images/s on {cores} cores, {rate / cores:.0f} per core")
  print(f"16 cores at this rate: ~{16 * rate / cores:.0f} images/s -> "
        f"{'can' if 16 * rate / cores >= 50000 else 'cannot'} feed 50,000 images/s")


if __name__ == "__main__":
  main()
