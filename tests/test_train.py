import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energy_jax import config as config_lib, data, models, optimizers, parallel, train
from energy_jax.data import toy
from energy_jax.train import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(stage="pretrain", **overrides):
  return _with(config_lib.get_config("test", stage), **overrides)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("toy")
  toy.make_toy_dataset(str(d), train_per_class=64, test_per_class=16, num_outliers=256)
  return str(d)


def _batch(rng, n_in, n_out, classes=4):
  return {"image": rng.normal(size=(n_in, 32, 32, 3)).astype(np.float32),
          "label": rng.integers(0, classes, n_in).astype(np.int32),
          "outlier": rng.normal(size=(n_out, 32, 32, 3)).astype(np.float32)}


def test_eight_devices_equal_one_device_and_trace_once():
  assert jax.device_count() >= 8, "conftest forces 8 CPU devices"
  c = tiny_config("finetune", **{"optimizer.learning_rate": 0.1})
  c.model.dropout_rate = 0.0
  state0 = train.create_train_state(c, jax.random.PRNGKey(0), 100)
  batch = _batch(np.random.default_rng(0), 16, 32)
  results = []
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    chex.clear_trace_counter()                 # one trace per mesh, none on the second call
    step = chex.assert_max_traces(n=1)(
        lambda s, b: train.train_step(s, b, config=c))
    fn = parallel.data_parallel(step, mesh, (jax.sharding.PartitionSpec(),
                                             jax.sharding.PartitionSpec(parallel.AXIS)),
                                (jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec()))
    state, metrics = fn(parallel.put_replicated(state0, mesh), parallel.put_sharded(batch, mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
    fn(state, parallel.put_sharded(batch, mesh))          # a second call must not retrace
  (s1, m1), (s8, m8) = results
  # Two programs (one device, eight): equal up to float32 summation order. The loss (forward)
  # agrees to 8.7e-8; the weights after a step at lr 0.1 come through the backward pass's long
  # sums, which XLA:CPU's one-device program held to AVX rounds far more: measured max |a - b|
  # 6.9e-5 (AVX), 1.2e-7 (SSE4_2), 2.4e-7 (AVX2; 2026-12-06). test_distributed holds the
  # tighter check.
  for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.batch_stats)),
                  jax.tree_util.tree_leaves((s8.params, s8.batch_stats))):
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)


def test_optimizer_matches_torch_sgd_nesterov_weight_decay():
  torch = pytest.importorskip("torch")
  c = tiny_config(**{"optimizer.learning_rate": 0.1})
  w0 = np.array([1.0, -2.0, 3.0], np.float32)
  grads = [np.array([0.5, 0.1, -0.3], np.float32), np.array([-0.2, 0.4, 0.05], np.float32)]
  tx = optimizers.from_config(c, total_steps=10).tx
  params, opt = jnp.asarray(w0), tx.init(jnp.asarray(w0))
  p = torch.nn.Parameter(torch.tensor(w0))
  sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
  sched = torch.optim.lr_scheduler.LambdaLR(      # the reference's: its factor ends at 1e-6 / lr
      sgd, lambda k: 1e-6 / 0.1 + (1 - 1e-6 / 0.1) * 0.5 * (1 + np.cos(k / 10 * np.pi)))
  for g in grads:
    updates, opt = tx.update(jnp.asarray(g), opt, params)
    params = params + updates
    sched.step()                                 # the reference steps the schedule first
    p.grad = torch.tensor(g)
    sgd.step()
  # Two float32 implementations (optax, torch) of two updates: measured equal (SSE4_2, AVX, AVX2).
  np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-6)


def test_tiny_wrn_loss_falls(toy_dir, tmp_path, monkeypatch):
  decoded = []
  load = data.sources.load
  monkeypatch.setattr(data.sources, "load", lambda src, split=None, size=32: decoded.append(
      (src, split)) or load(src, split, size))
  cache = {}
  c = tiny_config(in_train=f"{toy_dir}/toy_id.zip", in_test=f"{toy_dir}/toy_id.zip",
                  epochs=3, num_devices=1, eval_every_epochs=2,
                  tensorboard=True, **{"optimizer.learning_rate": 0.05})
  train.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None, data_cache=cache)
  rows = [l.split(",") for l in open(tmp_path / "run" / "training_results.csv").read().split()[1:]]
  losses = [float(r[2]) for r in rows]
  # The TensorBoard scalars, read back from the event files, are the JSONL rows' numbers.
  tb = writer.read_scalars(str(tmp_path / "run" / "tensorboard"))
  jsonl = [json.loads(l) for l in open(tmp_path / "run" / "results.jsonl")]
  # The event files hold float32: within its rounding (measured 4.4e-8) of the JSONL floats.
  assert tb["train/loss"] == pytest.approx({r["epoch"]: r["train_loss"] for r in jsonl}, rel=1e-6)
  assert tb["test/error"] == pytest.approx({2: jsonl[1]["test_error"], 3: jsonl[2]["test_error"]},
                                           rel=1e-6)
  assert tb["train/mean_accuracy"][3] == pytest.approx(jsonl[2]["mean_accuracy"], rel=1e-6)
  assert tb["learning_rate"] == pytest.approx({r["epoch"]: r["learning_rate"] for r in jsonl})
  steps = len(data.load_run_data(c, False, cache).train) // c.batch_size
  lr_min = c.optimizer.min_learning_rate                         # cosine at update 3 * steps (the last)
  # optax's float32 schedule against float64: measured 2.5e-9 and 2.9e-8.
  assert tb["learning_rate"][3] == pytest.approx(lr_min, rel=1e-3)
  assert tb["learning_rate"][1] == pytest.approx(
      lr_min + (c.optimizer.learning_rate - lr_min) * 0.5 * (1 + np.cos(np.pi * steps / (3 * steps))),
      rel=1e-5)
  assert [int(r[0]) for r in rows] == [1, 2, 3] and losses[-1] < losses[0]
  # The resolved config is saved beside the rows.
  assert json.load(open(tmp_path / "run" / "config.json")) == json.loads(c.to_json())
  # Evaluated at epoch 2 (the cadence) and 3 (the last), not at epoch 1.
  assert rows[0][3:] == ["", ""] and all(r[3] and r[4] for r in rows[1:])
  assert float(rows[-1][4]) < 75.0                     # better than chance (4 classes)
  # A second run of the same process (fine-tuning after pretraining) decodes nothing again.
  assert sorted(decoded) == [(f"{toy_dir}/toy_id.zip", "test"), (f"{toy_dir}/toy_id.zip", "train")]
  outliers = f"{toy_dir}/toy_outliers.npy"
  data.load_run_data(tiny_config("finetune", in_train=c.in_train, in_test=c.in_test,
                                 outliers=outliers), True, cache)
  assert len(decoded) == 3 and decoded[-1] == (outliers, None)
  with pytest.raises(ValueError, match="eval_every_epochs must be >= 1, got 0"):
    train.train_and_evaluate(_with(c, eval_every_epochs=0), str(tmp_path / "bad"))


def test_shorter_calls_run_in_the_longest_calls_program_with_skipped_rows(toy_dir):
  """Steps in a loop (``scan_unroll = 1``, the accelerators' way): 2 steps as one call, and as two
  calls of 1 each padded with a row of SKIP_STEP, run the same compiled program and end bit for
  bit alike (one executable, the same steps on the same inputs); the skipped rows advance
  nothing and their metrics are 0."""
  from energy_jax.data import sampling
  from energy_jax.train import step as step_lib
  c = tiny_config("finetune", in_train=f"{toy_dir}/toy_id.zip", scan_unroll=1, num_devices=1)
  c.model.dropout_rate = 0.3
  assert step_lib.fixed_length_calls(c)
  assert not step_lib.fixed_length_calls(tiny_config())    # XLA:CPU's default: steps unrolled
  train_set, outliers = data.load(c.in_train, "train"), data.load(f"{toy_dir}/toy_outliers.npy")
  mesh = parallel.make_mesh(1)
  pools = parallel.put_replicated(step_lib.device_data(train_set.images, train_set.labels,
                                                       outliers.images), mesh)
  in_idx, out_idx = sampling.epoch_indices(c.seed, 0, len(train_set), c.batch_size,
                                           len(outliers), c.outlier_batch_size)
  fn = train.device_epoch_fn(c, mesh)
  state0 = jax.device_get(train.create_train_state(c, jax.random.PRNGKey(0), 20))

  def call(state, rows, length=2):
    idx = step_lib.pad_call(in_idx[rows], out_idx[rows], length)
    return fn(parallel.put_replicated(state, mesh), pools,
              *parallel.put_global(idx, mesh, step_lib.step_indices_spec()))

  whole, m_whole = jax.device_get(call(state0, slice(0, 2)))
  half, m_first = jax.device_get(call(state0, slice(0, 1)))
  assert int(half.step) == 1
  half, m_second = jax.device_get(call(half, slice(1, 2)))
  assert int(half.step) == int(whole.step) == 2
  assert fn._cache_size() == 1                   # one program for both lengths
  for m in (m_first, m_second):
    assert np.all(m["loss"][1:] == 0) and np.all(np.isfinite(m["loss"][:1]))
  np.testing.assert_array_equal(np.concatenate([m_first["loss"][:1], m_second["loss"][:1]]),
                                m_whole["loss"])
  chex.assert_trees_all_equal(half.params, whole.params)
  chex.assert_trees_all_equal(half.batch_stats, whole.batch_stats)
  # The steps did something: 2 steps moved the weights.
  assert not np.array_equal(whole.params["fc"]["kernel"], state0.params["fc"]["kernel"])
  with pytest.raises(ValueError, match="a call of 3 steps does not fit a program of 2"):
    step_lib.pad_call(in_idx[:3], out_idx[:3], 2)


def test_a_one_step_call_runs_every_convolution_in_xla_cpus_fast_layout(toy_dir):
  """XLA:CPU's Eigen convolution takes NHWC inputs and HWIO kernels (``b01f_01io->b01f``); it
  gives convolutions that layout only outside loops, so a one-step call must not be a loop of one
  trip (its gradient convolutions would run in the generic kernel, ~16x slower)."""
  if jax.default_backend() != "cpu":
    pytest.skip("a property of XLA:CPU's compiler")
  from energy_jax.train import step as step_lib
  c = tiny_config("finetune", in_train=f"{toy_dir}/toy_id.zip", num_devices=1)
  mesh = parallel.make_mesh(1)
  state = parallel.put_replicated(train.create_train_state(c, jax.random.PRNGKey(0), 20), mesh)
  pools = parallel.put_replicated(step_lib.device_data(
      np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int32),
      np.zeros((64, 32, 32, 3), np.uint8)), mesh)
  idx = (np.zeros((1, c.batch_size), np.int32), np.zeros((1, c.outlier_batch_size), np.int32))
  idx = parallel.put_global(idx, mesh, step_lib.step_indices_spec())
  fn = train.device_epoch_fn(c, mesh)
  hlo = fn.lower(state, pools, *idx).compile().as_text()
  labels = re.findall(r"dim_labels=([^,}\s]+)", hlo)
  assert labels and set(labels) == {"b01f_01io->b01f"}, collections.Counter(labels)
  _, metrics = fn(state, pools, *idx)
  assert metrics["loss"].shape == (1,) and np.isfinite(float(metrics["loss"][0]))


def test_energy_finetuning_separates_energies():
  """Toy problem: ID and outlier logits from one linear map; the energy loss opens the gap."""
  from energy_jax import losses
  from energy_jax.ood import scores
  rng = np.random.default_rng(0)
  x_in = rng.normal(0.5, 1, size=(64, 8)).astype(np.float32)
  x_out = rng.normal(-0.5, 1, size=(64, 8)).astype(np.float32)
  y = (x_in[:, 0] > 0.5).astype(np.int32)
  w = jnp.asarray(rng.normal(size=(8, 2)) * 0.1, jnp.float32)

  def loss(w):
    li, lo = x_in @ w, x_out @ w
    ce = jnp.mean(losses.softmax_cross_entropy(logits=li, labels=y))
    return ce + 0.1 * losses.energy_bounded_loss(logits_in=li, logits_out=lo, m_in=-8., m_out=-2.)
  e_in0 = float(jnp.mean(scores.free_energy(x_in @ w)))
  e_out0 = float(jnp.mean(scores.free_energy(x_out @ w)))
  for _ in range(200):
    w = w - 0.05 * jax.grad(loss)(w)
  assert float(jnp.mean(scores.free_energy(x_in @ w))) < e_in0 - 1.0
  assert float(jnp.mean(scores.free_energy(x_out @ w))) > e_out0 + 0.2


def child_xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a child process: ``flags`` plus this process's ``--xla_cpu_max_isa`` (the
  stand-in for another CPU), so that the children of a run held to it are held to it too."""
  isa = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_cpu_max_isa")]
  return " ".join([*flags, *isa])


def _run(script, preset, workdir, toy_dir, *extra):
  cmd = [sys.executable, f"experiments/{script}.py",
         f"--config=experiments/configs/{script}.py:{preset}", f"--workdir={workdir}",
         f"--config.in_train={toy_dir}/toy_id.zip", f"--config.in_test={toy_dir}/toy_id.zip",
         f"--config.outliers={toy_dir}/toy_outliers.npy", "--config.num_devices=1", *extra]
  env = dict(os.environ, XLA_FLAGS=child_xla_flags(), PYTHONPATH=REPO)
  # Output to a file, read while the run goes on (a pipe read only at the end can fill and block).
  log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
  # SIGINT as a terminal gives it: a pytest-xdist worker ignores SIGINT, and an ignored signal
  # stays ignored in its children (the run then rightly leaves it alone).
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  log.close()
  p.log = log.name
  return p


def _output(p, timeout=None) -> str:
  """What ``p`` printed so far (with ``timeout``: after waiting for it to end)."""
  if timeout is not None:
    p.wait(timeout=timeout)
  with open(p.log) as f:
    return f.read()


@pytest.mark.heavy
def test_scripts_pretrain_finetune_and_resume_after_kill_sigint_and_sigterm(toy_dir, tmp_path):
  pre = tmp_path / "pre"
  p = _run("pretrain", "test", pre, toy_dir)
  out = _output(p, timeout=300)
  assert p.returncode == 0, out
  # A finished run is refused, not overwritten.
  p = _run("pretrain", "test", pre, toy_dir)
  out = _output(p, timeout=300)
  assert p.returncode != 0 and "holds a finished run" in out

  # Uninterrupted fine-tuning (3 epochs of one-step calls, the test preset's, so that a stop
  # comes within an epoch) ...
  common = (f"--config.pretrained={pre}", "--config.epochs=3")
  full = tmp_path / "full"
  p = _run("finetune", "test", full, toy_dir, *common)
  out = _output(p, timeout=300)
  assert p.returncode == 0, out
  # ... against one killed for real after its first epoch, then restarted with the same command.
  cut = tmp_path / "cut"
  p = _run("finetune", "test", cut, toy_dir, *common)
  deadline = time.time() + 300
  while not saved_steps(cut) and time.time() < deadline:
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert saved_steps(cut)
  # Restarted (it resumes at epoch 2, or later on busy cores), then sent Ctrl-C (SIGINT), then
  # restarted and sent SIGTERM: each time it stops at its next step boundary, saved, with exit
  # status 130 or 75 so that a `set -e` chain stops there; run again, it finishes.
  for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 75)):
    p = _run("finetune", "test", cut, toy_dir, *common)
    while "resuming" not in _output(p) and p.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    p.send_signal(sig)
    out = _output(p, timeout=300)
    assert p.returncode == status and f"stopped by {sig.name}" in out, out[-3000:]
  p = _run("finetune", "test", cut, toy_dir, *common)
  out = _output(p, timeout=300)
  assert p.returncode == 0 and "resuming" in out, out
  # Epochs after the restored checkpoint ran twice; their first rows were dropped.
  for name in ("training_results.csv", "results.jsonl"):
    epochs = [int(l.split(",")[0]) if name.endswith(".csv") else json.loads(l)["epoch"]
              for l in (cut / name).read_text().splitlines()[name.endswith(".csv"):]]
    assert epochs == [1, 2, 3], (name, epochs)
  from energy_jax import checkpoints
  cfg = tiny_config("finetune")
  a = checkpoints.load_variables(str(full), cfg)
  b = checkpoints.load_variables(str(cut), cfg)
  # Two processes on this machine running the same compiled programs (one device; the runs stop
  # and resume at call boundaries) on the same inputs: bit for bit expected, within 1e-6 claimed.
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def saved_steps(workdir):
  """The checkpoint steps of a run whose save completed (its integrity record is written)."""
  records = workdir / "checkpoints.sha256"
  return sorted(int(n[:-5]) for n in os.listdir(records) if n.endswith(".json")) if (
      records.exists()) else []


def test_bad_inputs(toy_dir, tmp_path):
  from energy_jax import checkpoints
  c = tiny_config("finetune", in_train=f"{toy_dir}/toy_id.zip", in_test=f"{toy_dir}/toy_id.zip",
                  outliers=f"{toy_dir}/toy_outliers.npy", num_devices=1)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train.train_and_evaluate(_with(c, pretrained=str(tmp_path / "nowhere")), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="needs a pretrained model"):
    train.train_and_evaluate(_with(c, pretrained=""), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="fewer than one batch of 4096"):
    train.train_and_evaluate(_with(c, outlier_batch_size=4096), str(tmp_path / "c"))
  with pytest.raises(ValueError, match="has 4 classes, but config.num_classes = 10"):
    train.train_and_evaluate(_with(c, num_classes=10), str(tmp_path / "d"))
  # A checkpoint of another architecture is refused with both shapes named.
  pre = tmp_path / "pre"
  train.train_and_evaluate(_with(c, pretrained="", epochs=1, **{"objective.name": "ce"}), str(pre),
                           log=lambda s: None)
  wide = _with(c)
  wide.model.widen_factor = 2
  with pytest.raises(ValueError, match="widen_factor: checkpoint 1 vs config 2"):
    checkpoints.load_variables(str(pre), wide)
  # A failed start leaves no folder it made (nor its lock); a folder it found stays.
  (tmp_path / "found").mkdir()
  for name in ("made", "found"):
    with pytest.raises(ValueError, match="widen_factor: checkpoint 1 vs config 2"):
      train.train_and_evaluate(_with(wide, pretrained=str(pre)), str(tmp_path / name),
                               log=lambda s: None)
  assert not (tmp_path / "made").exists() and not (tmp_path / "a").exists()
  assert (tmp_path / "found").is_dir()
  # Keys of 0.1 are refused with their new names.
  with pytest.raises(ValueError, match=r"dtype -> model.dtype \(energy-jax 0.2\), score -> "
                                       r"objective.name \(energy-jax 0.2\)"):
    train.train_and_evaluate(_with(c, score="energy", dtype="bfloat16"), str(tmp_path / "old"))
  # NaN loss stops with a clear message and keeps the last good checkpoint.
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    train.train_and_evaluate(_with(c, pretrained=str(pre), epochs=1, **{"optimizer.learning_rate": 1e30}),
                             str(tmp_path / "nan"), log=lambda s: None)


def _with(c, **kw):
  """A copy of ``c`` with the fields ``kw`` (dotted names) set."""
  c = c.copy_and_resolve_references()
  for k, v in kw.items():
    *parents, leaf = k.split(".")
    node = c
    for p in parents:
      node = node[p]
    setattr(node, leaf, v)
  return c


def test_bf16_step_close_to_fp32_and_keeps_fp32_state():
  c32 = tiny_config("finetune")
  c32.model.dropout_rate = 0.0
  c16 = _with(c32)
  c16.model.dtype = "bfloat16"
  state = train.create_train_state(c32, jax.random.PRNGKey(0), 100)
  batch = _batch(np.random.default_rng(1), 16, 32)
  out = {}
  for c in (c32, c16):
    step = jax.jit(lambda s, b, c=c: train.train_step(s, b, config=c, axis_name=None))
    out[c.model.dtype] = step(state, batch)
  (_, m32), (s16, m16) = out["float32"], out["bfloat16"]
  # bfloat16's 8 bits against float32: measured 3.9e-5 (loss), 1.1e-4 (ce).
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
  assert float(m16["ce"]) == pytest.approx(float(m32["ce"]), rel=5e-2, abs=2e-2)
  for leaf in jax.tree_util.tree_leaves((s16.params, s16.batch_stats, s16.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  logits = models.from_config(c16).apply(s16.variables, jnp.asarray(batch["image"])).logits
  assert logits.dtype == jnp.float32


def test_resume_drops_log_rows_after_the_checkpoint_and_cut_rows(tmp_path):
  csv, jsonl = tmp_path / "training_results.csv", tmp_path / "results.jsonl"
  csv.write_text("epoch,time(s),train_loss,test_loss,test_error(%)\n001,00001,0.5,,\n"
                 "002,00001,0.4,0.3,10.00\n003,00001,0.3,,\n00")          # a kill cut the last row
  jsonl.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)) + '{"epo')
  writer.RunWriter(tiny_config(tensorboard=False), str(tmp_path), start_epoch=2, log=print)
  assert csv.read_text() == ("epoch,time(s),train_loss,test_loss,test_error(%)\n"
                             "001,00001,0.5,,\n002,00001,0.4,0.3,10.00\n")
  assert [json.loads(l)["epoch"] for l in jsonl.read_text().splitlines()] == [1, 2]


def test_tensorboard_without_tensorflow_is_said_not_silent(tmp_path, monkeypatch):
  said = []
  monkeypatch.setitem(sys.modules, "tensorflow", None)      # import tensorflow -> ImportError
  assert writer.open_scalar_writer(tiny_config(tensorboard=True), str(tmp_path),
                                   said.append) is None
  assert len(said) == 1 and "TensorFlow cannot be imported" in said[0]
  assert writer.open_scalar_writer(tiny_config(tensorboard=False), str(tmp_path),
                                   said.append) is None and len(said) == 1
