"""The determinism contract: a run's numbers do not depend on the device or process count.
Augmentation, outlier draws and dropout are keyed by an example's position in the global batch,
so 8 devices compute what 1 computes, dropout on, on both input paths."""

import jax
import numpy as np

from energy_jax import config as config_lib, parallel, train
from energy_jax.data import sampling

P = jax.sharding.PartitionSpec


def _config():
  c = config_lib.get_config("test", "finetune")
  c.model.dropout_rate = 0.3
  c.optimizer.learning_rate = 0.01     # at 0.05 float summation differences grow ~1000x in three steps
  return c


def _pools(rng, n_train=40, n_out=64):
  return {"image": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
          "label": rng.integers(0, 4, n_train).astype(np.int32),
          "outlier": rng.integers(0, 256, (n_out, 32, 32, 3), dtype=np.uint8)}


def _assert_close(a, b, scale_tol=1e-4, atol=1e-5):
  """Each tensor within ``scale_tol`` of its largest entry plus ``atol``: 1 and 8 devices are two
  programs, equal up to float summation order (other dropout masks or crops move a tensor by tens
  of percent). Measured 2026-12-07 (XLA:CPU with AVX-512, held to AVX2, AVX, SSE4_2): tensors
  reaching 1e-2 within 4.3e-6 of their largest entry (SSE4_2; 1.9e-7 with the others), the small
  ones (BatchNorm biases below 4e-3, whose sums cancel) 5.4e-7 apart (SSE4_2; 3.5e-10 with the
  others)."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.max(np.abs(x - y)) <= scale_tol * np.max(np.abs(y)) + atol


def _epoch(c, n, in_idx, out_idx, pools, step_rng=None):
  mesh = parallel.make_mesh(n)
  state = train.create_train_state(c, jax.random.PRNGKey(1), 30)
  if step_rng is not None:
    state = state.replace(rng=step_rng)
  state = parallel.put_replicated(state, mesh)
  fn = train.device_epoch_fn(c, mesh, padded=True)
  state, metrics = fn(state, parallel.put_replicated(pools, mesh), in_idx, out_idx)
  return jax.device_get(state.params), jax.device_get(state.batch_stats), jax.device_get(metrics)


def test_device_resident_epoch_with_dropout_is_the_same_on_1_and_8_devices():
  assert jax.device_count() >= 8, "conftest forces 8 CPU devices"
  c = _config()
  pools = _pools(np.random.default_rng(0))
  # 40 images at batch 16: 3 steps, the last with 8 real images (padded).
  in_idx, out_idx = sampling.epoch_indices(c.seed, 0, 40, 16, 64, 32)
  assert sampling.has_partial_batch(40, 16)
  one, eight = _epoch(c, 1, in_idx, out_idx, pools), _epoch(c, 8, in_idx, out_idx, pools)
  _assert_close(one, eight)
  # Other dropout masks and crops (same weights, another step rng) move them far more.
  other = _epoch(c, 1, in_idx, out_idx, pools, step_rng=jax.random.PRNGKey(99))
  kernel = lambda r: np.asarray(r[0]["fc"]["kernel"], np.float64)
  assert np.max(np.abs(kernel(other) - kernel(one))) > 20 * np.max(np.abs(kernel(eight) -
                                                                          kernel(one)))


def test_host_batch_step_with_dropout_is_the_same_on_1_and_8_devices():
  c = _config()
  rng = np.random.default_rng(2)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 4, 16).astype(np.int32),
           "outlier": rng.normal(size=(32, 32, 32, 3)).astype(np.float32),
           "mask": np.arange(16) < 11}
  state0 = train.create_train_state(c, jax.random.PRNGKey(3), 30)
  finals = []
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    fn = parallel.data_parallel(lambda s, b: train.train_step(s, b, config=c), mesh,
                                (P(), P(parallel.AXIS)), (P(), P()))
    state, metrics = fn(parallel.put_replicated(state0, mesh), parallel.put_sharded(batch, mesh))
    finals.append((jax.device_get(state.params), jax.device_get(metrics)))
  _assert_close(finals[0], finals[1])


def test_augmentation_depends_on_the_global_position_only():
  from energy_jax.data import augment
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  key = jax.random.PRNGKey(5)
  whole = np.asarray(augment.random_crop_flip(key, images))
  halves = np.concatenate([np.asarray(augment.random_crop_flip(key, images[:4], np.arange(4))),
                           np.asarray(augment.random_crop_flip(key, images[4:], np.arange(4, 8)))])
  np.testing.assert_array_equal(whole, halves)     # exact: crops and flips only move pixels
  shifted = np.asarray(augment.random_crop_flip(key, images, np.arange(1, 9)))
  assert not np.array_equal(whole, shifted)


def test_the_mains_refuse_process_flags_without_a_coordinator():
  import os
  import subprocess
  import sys
  from conftest import REPO
  for args in (["pretrain.py"], ["evaluate.py", "--checkpoint=/nowhere"]):
    out = subprocess.run([sys.executable, f"experiments/{args[0]}", *args[1:],
                          "--num_processes=2", "--process_id=1"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert ("num_processes=2, process_id=1 need a coordinator address (or auto=True on a TPU "
            "pod slice / SLURM)") in out.stderr, out.stderr[-2000:]
