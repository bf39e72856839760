"""The reference's training recipe, computed independently: its LambdaLR per step, its
DataLoader's last partial batch, its contiguous outlier window; and the padded batch that keeps
the partial one computes what a smaller batch computes, on one device or eight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energy_jax import checkpoints, config as config_lib, optimizers, parallel, train
from energy_jax.data import sampling

torch = pytest.importorskip("torch")


def reference_rates(lr: float, epochs: int, steps_per_epoch: int):
  """The learning rate of every update of the reference (CIFAR/train.py): SGD under
  LambdaLR(cosine_annealing(step, epochs * len(loader), 1, 1e-6 / lr)), scheduler.step() first."""
  def cosine_annealing(step, total_steps, lr_max, lr_min):
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos(step / total_steps * np.pi))
  total = epochs * steps_per_epoch
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda step: cosine_annealing(step, total, 1, 1e-6 / lr))
  rates = []
  for _ in range(total):
    sched.step()                           # the reference's order: the schedule, then the update
    rates.append(opt.param_groups[0]["lr"])
  return np.array(rates)


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("stage,epochs,lr", [("pretrain", 100, 0.1), ("finetune", 10, 0.001)])
def test_learning_rate_of_every_update_is_the_references(stage, epochs, lr):
  c = config_lib.get_config("cifar10", stage)
  assert (c.epochs, c.optimizer.learning_rate, c.batch_size) == (epochs, lr, 128)
  steps = sampling.steps_per_epoch(50_000, c.batch_size, c.drop_remainder)
  assert steps == 391                      # the DataLoader keeps the last batch of 80
  want = reference_rates(lr, epochs, steps)
  got = np.asarray(optimizers.from_config(c, epochs * steps).learning_rate(
      jnp.arange(epochs * steps)), np.float64)
  # optax's float32 schedule against torch's float64: measured 4.4e-7 (SSE4_2, AVX, AVX2).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  assert got[-1] == pytest.approx(1e-6, rel=1e-4)    # the floor is absolute, whatever the lr


def test_last_partial_batch_is_kept_and_every_image_read_once():
  in_idx, _ = sampling.epoch_indices(3, 0, 50_000, 128, 0, 0)
  assert in_idx.shape == (391, 128)
  real = in_idx[in_idx >= 0]
  assert np.array_equal(np.sort(real), np.arange(50_000))
  assert (in_idx[-1] >= 0).sum() == 80 and np.all(in_idx[:-1] >= 0)
  dropped, _ = sampling.epoch_indices(3, 0, 50_000, 128, 0, 0, drop_remainder=True)
  assert dropped.shape == (390, 128) and np.all(dropped >= 0)


def test_outliers_are_a_contiguous_window_from_a_random_offset_each_epoch():
  n_out, steps, ob = 1_000, 391, 256
  offsets = []
  for epoch in range(4):
    _, out_idx = sampling.epoch_indices(1, epoch, 50_000, 128, n_out, ob)
    flat = out_idx.reshape(-1)
    assert flat.shape == (steps * ob,)
    offset = int(flat[0])                  # the reference: index k reads (k + offset) % len
    np.testing.assert_array_equal(flat, (offset + np.arange(steps * ob)) % n_out)
    offsets.append(offset)
  assert len(set(offsets)) == 4            # a new offset every epoch
  _, shuffled = sampling.epoch_indices(1, 0, 50_000, 128, n_out, ob, outlier_sampling="shuffle")
  first = shuffled.reshape(-1)[:n_out]
  assert sorted(first) == list(range(n_out)) and not np.array_equal(first, np.arange(n_out))
  with pytest.raises(ValueError, match="outlier_sampling must be one of"):
    sampling.epoch_indices(1, 0, 10, 2, 10, 2, outlier_sampling="random")


def _state_and_batches(n_real, n_pad, n_out=32, seed=0):
  c = config_lib.get_config("test", "finetune")
  c.model.dropout_rate = 0.0
  c.optimizer.learning_rate = 0.05
  state = train.create_train_state(c, jax.random.PRNGKey(seed), 100)
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n_real + n_pad, 32, 32, 3)).astype(np.float32)
  label = rng.integers(0, 4, n_real + n_pad).astype(np.int32)
  outlier = rng.normal(size=(n_out, 32, 32, 3)).astype(np.float32)
  padded = {"image": image, "label": label, "outlier": outlier,
            "mask": np.arange(n_real + n_pad) < n_real}
  # The padding holds other images: only the mask may keep them out.
  real = {"image": image[:n_real], "label": label[:n_real], "outlier": outlier}
  return c, state, padded, real


def _step(c, state, batch, mesh=None):
  if mesh is None:
    return jax.jit(lambda s, b: train.train_step(s, b, config=c, axis_name=None))(
        state, batch)
  P = jax.sharding.PartitionSpec
  fn = parallel.data_parallel(lambda s, b: train.train_step(s, b, config=c), mesh,
                              (P(), P(parallel.AXIS)), (P(), P()))
  return fn(parallel.put_replicated(state, mesh), parallel.put_sharded(batch, mesh))


def _assert_same_step(a, b):
  """Two programs (other batch shapes or device counts): equal up to float32 summation order.
  The metrics (the forward pass) agree to 1.7e-7; one padding image let through moves the loss
  by 5e-3 and the cross-entropy by 2e-2 (relative). The weights after the step come through the
  backward pass's long sums (16 images x 32 x 32 positions), which some of XLA:CPU's programs
  round far more: measured max |x - y| 3.4e-5 with XLA:CPU held to SSE4_2, 2.3e-6 to AVX,
  1.2e-7 to AVX2 (2026-12-06); a padding image let through moves a tensor by up to 7e-3."""
  (sa, ma), (sb, mb) = a, b
  for x, y in zip(jax.tree_util.tree_leaves((sa.params, sa.batch_stats)),
                  jax.tree_util.tree_leaves((sb.params, sb.batch_stats))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=5e-4)
  for key in ("loss", "ce", "energy_in", "energy_out", "accuracy"):
    np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=2e-5, atol=1e-6)


def test_a_padded_batch_computes_what_its_real_images_compute():
  """The last batch of an epoch: 10 real + 6 padding images (BatchNorm statistics, the mean
  losses and the metrics over the real ones) against a batch of the 10 alone."""
  c, state, padded, real = _state_and_batches(10, 6)
  _assert_same_step(_step(c, state, padded), _step(c, state, real))


def test_a_padded_batch_on_eight_devices_computes_what_one_device_computes():
  """10 real images of 16 over 8 devices: devices 5-7 hold padding only."""
  assert jax.device_count() >= 8, "conftest forces 8 CPU devices"
  c, state, padded, real = _state_and_batches(10, 6)
  _assert_same_step(_step(c, state, padded, parallel.make_mesh(8)),
                    _step(c, state, real))
  # Full batches too: 8 devices x 2 against one device, no mask.
  c, state, full, _ = _state_and_batches(16, 0)
  full.pop("mask")
  _assert_same_step(_step(c, state, full, parallel.make_mesh(8)), _step(c, state, full))


def test_a_run_of_an_older_run_format_is_not_resumed(tmp_path):
  from energy_jax.data import toy
  toy_id, _ = toy.make_toy_dataset(str(tmp_path / "data"), train_per_class=8, test_per_class=4,
                                   num_outliers=8)
  c = config_lib.get_config("test", "pretrain")
  c.in_train = c.in_test = toy_id
  c.num_devices, c.epochs = 1, 2
  ckpts = checkpoints.RunCheckpoints(str(tmp_path / "run"))
  state = train.create_train_state(c, jax.random.PRNGKey(0), 4)
  meta = checkpoints.run_meta(c, 0, False, {})
  meta.update(format=2, version="0.2.0")
  ckpts.save(0, jax.device_get(state), meta)
  ckpts.close()
  with pytest.raises(ValueError, match=r"saved by energy-jax 0\.2\.0 \(run format 2\).*format "
                                       rf"{checkpoints.RUN_FORMAT}"):
    train.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None)


def test_cifar100_preset_end_to_end_on_a_generated_100_class_set(tmp_path):
  """The :cifar100 preset (100 classes, m_in -27, m_out -5, 391-step epochs' rules) pretrains,
  energy fine-tunes and evaluates; only the sources and the model's size are swapped."""
  from energy_jax import detectors
  from energy_jax.data import toy
  from energy_jax.ood import evaluation
  toy_id, toy_out = toy.make_toy_dataset(str(tmp_path / "data"), num_classes=100,
                                         train_per_class=3, test_per_class=1, num_outliers=128)
  runs = {}
  for stage in ("pretrain", "finetune"):
    c = config_lib.get_config("cifar100", stage)
    assert (c.num_classes, c.objective.m_in, c.objective.m_out) == (100, -27.0, -5.0)
    c.in_train = c.in_test = toy_id
    c.outliers = toy_out
    c.model.depth, c.model.widen_factor = 10, 1
    c.batch_size, c.outlier_batch_size = 32, 64          # 300 images: 10 steps, the last of 12
    c.steps_per_call = 1     # one program for every call (XLA:CPU compiles fused steps unrolled)
    c.epochs, c.num_devices, c.progress_bar, c.tensorboard = 1, 1, False, False
    if stage == "finetune":
      c.pretrained = str(tmp_path / "pretrain")
    row = train.train_and_evaluate(c, str(tmp_path / stage), log=lambda s: None)
    assert np.isfinite(row["train_loss"]) and 0 <= row["test_error"] <= 100
    runs[stage] = c
  out = evaluation.run(runs["finetune"], str(tmp_path / "finetune"),
                       {"noise": "synthetic:uniform_noise"}, str(tmp_path / "eval"),
                       [detectors.create("msp"), detectors.create("energy")], num_to_avg=2,
                       log=lambda s: None)
  assert set(out["results"]) == {"msp", "energy (T=1)"}
  assert out["results"]["energy (T=1)"]["noise"]["num_ood"] == 100 // 5
