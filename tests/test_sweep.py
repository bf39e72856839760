"""Sweeps (energy_jax.train.sweep): member k of a sweep computes what the single run with member
k's config computes, and a member's settings are checked as that run's config."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score, roc_curve

from energy_jax import (checkpoints, config as config_lib, data, inference, models, objectives,
                        parallel, train)
from energy_jax.data import sampling, toy
from energy_jax.ood import protocol
from energy_jax.train import loop, step as step_lib, sweep as sweep_lib, sweep_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import _main  # noqa: E402  the scripts' command-line checks

MEASURE = False      # True: print the measured differences (pytest -s) instead of failing on them


def toy_pools(n_per_class=8, n_out=64, classes=4, seed=0):
  """The test preset's toy data as device-resident pools: uint8 images, labels, outliers."""
  rng = np.random.default_rng(seed)
  images = np.concatenate([toy.class_images(k, n_per_class, rng) for k in range(classes)])
  labels = np.repeat(np.arange(classes, dtype=np.int32), n_per_class)
  return step_lib.device_data(images, labels, toy.outlier_images(n_out, rng))


def step_indices(c, pools, steps):
  in_idx, out_idx = sampling.epoch_indices(c.seed, 0, len(pools["label"]), c.batch_size,
                                           len(pools["outlier"]), c.outlier_batch_size)
  return in_idx[:steps], out_idx[:steps]


def assert_close(name, a, b, rtol, atol=0.0):
  """Every leaf of ``a`` within ``atol + rtol * max|b|`` of ``b`` (the leaf's scale: the long
  float32 sums of a gradient round relative to its largest terms, not to each entry)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), name
  for path, x, y in zip([jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_flatten_with_path(b)[0]],
                        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err, scale = float(np.max(np.abs(x - y), initial=0.0)), float(np.max(np.abs(y), initial=0.0))
    if MEASURE:
      print(f"{name}{path}: max|diff| {err:.3g}, relative to max|b| {err / max(scale, 1e-30):.3g}")
    else:
      assert err <= atol + rtol * scale, (name + path, err, scale)


def test_finetuning_members_equal_their_single_runs():
  """Two energy fine-tuning members differing in seed, m_in, m_out, energy_weight, learning_rate
  and weight_decay, each with its own dropout, over two steps on the same toy batches, against
  the single run's ``train_step`` with each member's config."""
  c = config_lib.get_config("test", "finetune")
  c.model.dropout_rate = 0.3                  # per-member dropout keys are part of the check
  members = [{"seed": c.seed, "objective.m_in": -8, "optimizer.learning_rate": 0.05},
             {"seed": 7, "objective.m_in": -6.5, "objective.m_out": -1,
              "objective.energy_weight": 0.3, "optimizer.learning_rate": 0.02,
              "optimizer.weight_decay": 1e-3}]
  pools = toy_pools()
  in_idx, out_idx = step_indices(c, pools, 2)
  batches = [step_lib.device_batch(jax.random.PRNGKey(s), pools, in_idx[s], out_idx[s],
                                   jnp.float32) for s in range(2)]
  sweep = sweep_lib.create_sweep_state(c, members, total_steps=10)
  assert not sweep.vectorize                  # on a CPU, the members one by one (the default)
  assert sorted(sweep.hparams) == ["objective.energy_weight", "objective.m_in",
                                   "objective.m_out", "optimizer.learning_rate",
                                   "optimizer.weight_decay"]
  assert sweep.config.optimizer.learning_rate == 0.05 and sweep.size == 2
  sweep_step = jax.jit(sweep_lib.sweep_train_step)
  sweeps, sweep_metrics = [sweep], []
  for batch in batches:
    sweep, m = sweep_step(sweep, batch)
    sweeps.append(sweep)
    sweep_metrics.append(m)
  for k in range(len(members)):
    ck = sweep_lib.member_config(sweep, k)
    assert ck.seed == members[k]["seed"] and ck.objective.m_in == members[k]["objective.m_in"]
    state = train.create_train_state(ck, jax.random.PRNGKey(ck.seed), 10)
    start = jax.tree_util.tree_map(lambda x: x[k], sweep_lib.create_sweep_state(
        c, members, 10).members)
    # The same program (create_train_state's) from the same seed: bit for bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, (start.params, start.opt_state),
                           (state.params, state.opt_state))
    step = jax.jit(lambda s, b, ck=ck: train.train_step(s, b, config=ck, axis_name=None))
    for s, batch in enumerate(batches):
      # Each step from the member's own state before it, so that each check is of one update:
      # over two updates a difference of 1e-7 can grow to half a percent on some draws of
      # these toy batches (measured: a 1e-7 relative nudge of the single run's weights after
      # its first step moved the second step's momentum by 5.0e-3 of a tensor's largest entry
      # on the draw used here, by 1.2e-6 on another).
      before = sweep_lib.member_state(sweeps[s], k)
      assert int(before.step) == int(state.step) == s    # the member's own key and step count
      np.testing.assert_array_equal(before.rng, state.rng)
      state, single = step(state.replace(params=before.params, batch_stats=before.batch_stats,
                                         opt_state=before.opt_state), batch)
      # Not bit for bit: a traced number is not folded into the arithmetic as a constant is
      # (the members one by one, as on a CPU; vmap's grouped convolutions also sum in another
      # order, see the pretraining test). Measured (the forward pass's metrics), XLA:CPU with
      # AVX-512 and held to SSE4_2: equal.
      assert_close(f"member {k} step {s} metrics",
                   {n: v[k] for n, v in sweep_metrics[s].items()}, single, rtol=1e-6)
      mine = sweep_lib.member_state(sweeps[s + 1], k)
      assert int(mine.step) == int(state.step) == s + 1
      np.testing.assert_array_equal(mine.rng, state.rng)
      # One update, through the backward pass's long sums: measured max|diff| <= 1.3e-7 of
      # each tensor's largest entry (weights, BatchNorm statistics, momentum; AVX-512 and held
      # to SSE4_2).
      assert_close(f"member {k} step {s}", (mine.params, mine.batch_stats, mine.opt_state),
                   (state.params, state.batch_stats, state.opt_state), rtol=5e-6)


def test_pretraining_members_augment_with_their_own_keys_on_device():
  """Pretraining (ce) members differing in seed, learning_rate, weight_decay and momentum, as
  on accelerators by default: one vmap-ed step, the fused steps in a loop, a call padded with a
  row it does not run. The same indices, each member's augmentation and dropout from its own
  key, against the single run's compiled epoch on the same padded call."""
  c = config_lib.get_config("test", "pretrain")
  c.model.dropout_rate = 0.3
  c.scan_unroll = 1
  assert step_lib.fixed_length_calls(c)
  members = [{"seed": c.seed, "optimizer.learning_rate": 0.1},
             {"seed": 5, "optimizer.learning_rate": 0.03, "optimizer.weight_decay": 1e-3,
              "optimizer.momentum": 0.5}]
  pools = toy_pools()
  mesh = parallel.make_mesh(1)
  pools = parallel.put_replicated(pools, mesh)
  idx = parallel.put_global(step_lib.pad_call(*step_indices(c, pools, 1), 2), mesh,
                            step_lib.step_indices_spec())
  sweep = sweep_lib.create_sweep_state(c, members, total_steps=10, vectorize=True)
  sweep, metrics = sweep_lib.sweep_epoch_fn(mesh)(parallel.put_replicated(sweep, mesh), pools,
                                                   *idx)
  # The row of SKIP_STEP is not run: one step counted, its metrics left at 0.
  assert metrics["loss"].shape == (2, 2) and not np.any(np.asarray(metrics["loss"][1]))
  assert np.asarray(sweep.members.step).tolist() == [1, 1]
  metrics = {n: v[:1] for n, v in metrics.items()}
  # Member 0: the sweep's own seed, its learning rate traced all the same (member 1's differs);
  # its single run's initial state is the sweep's program, already compiled.
  k = 0
  ck = sweep_lib.member_config(sweep, k)
  state = parallel.put_replicated(train.create_train_state(ck, jax.random.PRNGKey(ck.seed), 10),
                                  mesh)
  state, single = step_lib.device_epoch_fn(ck, mesh)(state, pools, *idx)
  single = {n: v[:1] for n, v in single.items()}
  mine = sweep_lib.member_state(sweep, k)
  # vmap turns each convolution into one grouped convolution over the members, which XLA:CPU
  # sums in another order: measured (2026-12-07, XLA:CPU with AVX-512 and held to SSE4_2)
  # <= 9.0e-8 (metrics), 2.1e-6 (the state) of each tensor's largest entry.
  assert_close("metrics", {n: v[:, k] for n, v in metrics.items()}, single, rtol=1e-6)
  assert_close(f"member {k}", (mine.params, mine.batch_stats, mine.opt_state),
               (state.params, state.batch_stats, state.opt_state), rtol=2e-5)
  # Another seed, other crops, flips and dropout: the members' first losses differ.
  assert metrics["loss"][0, 0] != metrics["loss"][0, 1]


@pytest.mark.parametrize("vectorize", [False, True])
def test_member_groups_step_each_member_on_its_own_devices_as_the_whole_mesh_would(vectorize):
  """Two pretraining members (their own seeds and learning rates, dropout on), one fused step:
  config.member_groups = 2 on 4 devices, a second mesh axis, each group of 2 devices holding
  one of the members and stepping it data-parallel, against the sweep on a mesh of 2 devices
  that steps both members on each: the same images on each device, the same sums. Members one
  by one (the CPU's default) and vmap-ed (the accelerators'). One by one, the data-parallel
  sweep on 2 devices also against the same step on 1: the same images at the same global
  positions, each device's gradients and BatchNorm statistics averaged over the mesh."""
  c = config_lib.get_config("test", "pretrain")
  c.model.dropout_rate = 0.3
  members = [{"seed": c.seed, "optimizer.learning_rate": 0.1},
             {"seed": 3, "optimizer.learning_rate": 0.03}]
  ends = []
  for devices, groups in ((2, 1), (4, 2)) + (() if vectorize else ((1, 1),)):
    c.member_groups = groups
    mesh = sweep_lib.sweep_mesh(c, len(members), parallel.make_mesh(devices))
    assert dict(mesh.shape) == ({"batch": devices} if groups == 1 else
                                {"members": 2, "batch": 2})
    pools = parallel.put_replicated(toy_pools(), mesh)
    idx = parallel.put_global(step_indices(c, pools, 1), mesh, step_lib.step_indices_spec())
    sweep = sweep_lib.put_sweep(sweep_lib.create_sweep_state(c, members, total_steps=10,
                                                             vectorize=vectorize), mesh)
    sweep, metrics = sweep_lib.sweep_epoch_fn(mesh)(sweep, pools, *idx)
    # Each device holds its group's member only.
    kernel = jax.tree_util.tree_leaves(sweep.members.params)[0]
    held = {s.data.shape[0] for s in kernel.addressable_shards}
    assert held == {2 // groups}
    ends.append((jax.device_get(metrics), jax.device_get(sweep.members.variables)))
  # Measured (2026-12-07, XLA:CPU with AVX-512 and held to SSE4_2), of each tensor's largest
  # entry: one by one, the metrics equal, the state at most 6.2e-8 apart; vmap-ed, where each
  # convolution is one grouped convolution over the members a device holds (2 against 1),
  # XLA:CPU sums in another order: the metrics 8.7e-8, the weights and statistics up to 1.1e-6.
  assert_close("metrics", ends[1][0], ends[0][0], rtol=1e-6)
  assert_close("members", ends[1][1], ends[0][1], rtol=1e-5 if vectorize else 1e-6)
  if not vectorize:
    # Two programs that sum the batch in another order (2 partial sums, then the mean over the
    # mesh). Measured (2026-12-07, XLA:CPU with AVX-512 and held to SSE4_2): the metrics within
    # 8.7e-8, the weights and BatchNorm statistics 8.1e-7 of each tensor's largest entry.
    assert_close("metrics, 2 devices against 1", ends[0][0], ends[2][0], rtol=1e-5)
    assert_close("members, 2 devices against 1", ends[0][1], ends[2][1], rtol=1e-5)


def test_a_split_sweep_is_gathered_whole_by_one_program(caplog):
  """``gathered``: every array of a sweep split over 2 member groups, on every device, the same
  values, by one compiled program (across processes on XLA:CPU, programs queued one per array
  can deadlock: see ``parallel.gather_replicated``; in one process jax.device_put compiles none,
  so the count tells the two apart). The deadlock itself is test_multiprocess.py's 2-process
  sweep."""
  parallel._gather_fn.cache_clear()           # compiled anew: the one program is counted
  c = config_lib.get_config("test", "pretrain")
  c.member_groups = 2
  mesh = sweep_lib.sweep_mesh(c, 2, parallel.make_mesh(4))
  sweep = sweep_lib.put_sweep(sweep_lib.create_sweep_state(c, [{"seed": 1}, {"seed": 3}],
                                                           total_steps=10), mesh)
  with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
    held = sweep_lib.gathered(sweep)
  compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
  assert len(compiled) == 1, compiled
  leaves, split = jax.tree_util.tree_leaves(held), jax.tree_util.tree_leaves(sweep)
  assert len(leaves) == len(split) > 50
  assert not jax.tree_util.tree_leaves(sweep.members)[0].sharding.is_fully_replicated
  for x, y in zip(leaves, split):
    assert x.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("devices,groups,members,batch,message", [
    (4, 3, 3, 16, "config.member_groups = 3 does not divide the 4 devices of the mesh"),
    (4, 2, 3, 16, "config.member_groups = 2 does not divide the sweep's 3 members"),
    (8, 2, 2, 6, "batch size 6 is not divisible by the 4 devices of each of the "
                 "config.member_groups = 2 groups (8 devices)"),
])
def test_member_groups_that_do_not_divide_are_refused_naming_the_numbers(
    devices, groups, members, batch, message):
  c = config_lib.get_config("test", "pretrain")
  c.member_groups, c.batch_size = groups, batch
  with pytest.raises(ValueError, match=re.escape(message)):
    sweep_lib.sweep_mesh(c, members, parallel.make_mesh(devices))


def test_a_single_run_refuses_member_groups():
  c = config_lib.get_config("test", "pretrain")
  c.member_groups = 2
  with pytest.raises(ValueError, match=re.escape(
      "config.member_groups = 2 splits the members of a sweep (--sweep) over groups of devices; "
      "a single run has one member: set it to 1")):
    loop.check_config(c)


@pytest.mark.parametrize("name,fields", [
    ("energy", {"m_in": [-9.0, -7.5, -6.0], "m_out": [-3.0, -2.0, -1.0],
                "energy_weight": [0.1, 0.0, 0.7]}),
    ("oe", {"oe_weight": [0.5, 0.0, 1.5]}),
])
def test_objectives_read_traced_member_values(name, fields):
  """The objectives' numbers as traced [N] arrays under vmap: each member's loss is the loss with
  its Python numbers (no model: the objective alone)."""
  c = config_lib.get_config("test", "finetune")
  c.objective.name = name
  rng = np.random.default_rng(0)
  logits_in = jnp.asarray(rng.normal(0, 4, (8, 4)), jnp.float32)
  logits_out = jnp.asarray(rng.normal(0, 1, (16, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 8), jnp.int32)
  fn = objectives.get(name).loss
  kwargs = dict(logits_in=logits_in, logits_out=logits_out, features_in=None, features_out=None,
                labels=labels, mean_in=jnp.mean, mean_out=jnp.mean)

  def traced(values):
    view = sweep_lib._Values(c, {f"objective.{f}": v for f, v in values.items()})
    return fn(view.objective, **kwargs)[0]

  losses = jax.jit(jax.vmap(traced))({f: jnp.asarray(v, jnp.float32) for f, v in fields.items()})
  for k in range(len(next(iter(fields.values())))):
    ck = config_lib.get_config("test", "finetune")
    ck.objective.name = name
    for f, v in fields.items():
      ck.objective[f] = v[k]
    # XLA folds a Python number into the arithmetic, a traced one it does not: measured a
    # float32 rounding apart at most (6.4e-8 relative).
    assert float(losses[k]) == pytest.approx(
        float(jax.jit(lambda: fn(ck.objective, **kwargs)[0])()), rel=5e-7)


# ----------------------------------------------------------------------------------------------
# Members' settings: checked as the fields they set, before any work.

@pytest.mark.parametrize("members,message", [
    ([], "non-empty list of dicts"),
    ({"seed": 1}, "non-empty list of dicts"),
    ([{"seed": 1}, [("seed", 2)]], "sweep member 1 must be a dict of overrides"),
    ([{"objective.m_inn": -20}], r"config.objective.m_inn is not a field.*did you mean "
                                 r"config.objective.m_in"),
    ([{"batch_size": 64}], "config.batch_size cannot differ between the members of a sweep"),
    ([{"model.depth": 16}], "config.model.depth cannot differ"),
    ([{"objective.name": "oe"}], "config.objective.name cannot differ"),
    ([{"objective": {"m_in": -9}}], "config.objective is a section of the config"),
    ([{"optimizer.nesterov": False}], r"config.optimizer.nesterov is not a number \(True by "
                                      r"default\)"),
    ([{"objective.m_in": "auto"}], r"config.objective.m_in must be a number in a sweep, got "
                                   r"'auto' \('auto' margins are computed"),
    ([{"objective.m_in": True}], "config.objective.m_in must be a number in a sweep, got True"),
    ([{"optimizer.learning_rate": -0.1}], r"config.optimizer.learning_rate must be > 0.0, got "
                                          r"-0.1"),
    ([{"optimizer.weight_decay": float("nan")}], "config.optimizer.weight_decay must be finite"),
    ([{"seed": 1}, {"seed": -1}], r"sweep member 1: config.seed must be in \[0, 4294967296\)"),
    ([{"seed": 1.5}], r"seed must be an integer"),
    ([{"seed": 1}, {"objective.m_in": -1, "objective.m_out": -2}],
     r"sweep member 1 \(m_in=-1,m_out=-2\): config.objective.m_in = -1.0 must lie below "
     r"config.objective.m_out = -2.0"),
    ([{"objective.oe_weight": 0.3}], "config.objective.oe_weight is not read by objective "
                                     "'energy' nor optimizer 'sgd'"),
    ([{"optimizer.b1": 0.8}], "config.optimizer.b1 is not read by objective 'energy' nor "
                              "optimizer 'sgd'"),
])
def test_member_settings_are_checked_naming_the_field(members, message):
  c = config_lib.get_config("test", "finetune")
  with pytest.raises(ValueError, match=message):
    sweep_lib.member_configs(c, members)


def test_member_configs_and_what_varies():
  c = config_lib.get_config("test", "finetune")
  configs = sweep_lib.member_configs(c, [{"seed": 1, "objective.m_in": -9},
                                         {"seed": 2, "objective.m_in": -9,
                                          "optimizer.learning_rate": 0.01}])
  assert [x.seed for x in configs] == [1, 2]
  assert configs[0].objective.m_in == -9.0 and isinstance(configs[0].objective.m_in, float)
  assert c.objective.m_in == -8.0                            # the given config is left alone
  # The same value in every member stays a constant of the program; seeds live in the rngs.
  assert sweep_lib.varying_fields(configs) == ["optimizer.learning_rate"]
  assert sweep_lib.describe({"seed": 1, "objective.m_in": -9}) == "seed=1,m_in=-9"


# ----------------------------------------------------------------------------------------------
# The command line: --sweep flags, checked before any work.

def test_sweep_flags_make_the_grid_with_short_and_dotted_names():
  c = config_lib.get_config("test", "finetune")
  members = _main.sweep_members(c, ["m_in=-23,-25,-27", "objective.m_out=-5,-7"])
  assert members == [{"objective.m_in": m_in, "objective.m_out": m_out}
                     for m_in in (-23, -25, -27) for m_out in (-5, -7)]
  assert _main.sweep_members(c, ["seed=1,2,3,4"]) == [{"seed": s} for s in (1, 2, 3, 4)]
  assert _main.sweep_members(c, ["learning_rate=1e-3,0.01", "weight_decay=0,5e-4"])[1] == {
      "optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 5e-4}
  assert _main.sweep_members(c, []) == []


def test_the_chosen_members_evaluate_command_keeps_every_config_flag():
  argv = ["experiments/finetune.py", "--config=experiments/configs/finetune.py:cifar10",
          "--config.objective.m_in", "-25", "--noconfig.progress_bar", "--config.epochs=3",
          "--workdir", "runs/x", "--sweep=m_out=-5,-7"]
  command = _main.evaluate_command(argv, "configs/finetune.py", "runs/x/members/1_m_out=-7")
  assert command.split()[2:] == [
      "--config=experiments/configs/finetune.py:cifar10", "--config.objective.m_in", "-25",
      "--noconfig.progress_bar", "--config.epochs=3", "--checkpoint=runs/x/members/1_m_out=-7"]


def test_sweep_folders_refuse_single_runs_and_other_members_and_name_a_damaged_record(tmp_path):
  c = config_lib.get_config("test", "finetune")
  (tmp_path / "sweep" / "members" / "0_seed=1").mkdir(parents=True)
  (tmp_path / "sweep" / "sweep.json").write_text('{"format": 1, "members": [{"lab')
  with pytest.raises(FileExistsError, match=r"0_seed=1 is a member of the sweep in .*sweep: "
                     "continue the sweep with its --sweep flags"):
    train.train_and_evaluate(c, str(tmp_path / "sweep" / "members" / "0_seed=1"))
  with pytest.raises(ValueError, match=r"sweep.json, the sweep's record, is damaged "
                     r"\(JSONDecodeError: Unterminated string"):
    sweep_loop.read_record(str(tmp_path / "sweep"), [], c)
  (tmp_path / "sweep" / "sweep.json").write_text('{"format": 1}')     # whole JSON, not a record
  with pytest.raises(ValueError, match=r"the sweep's record, is damaged \(KeyError: 'members'\)"):
    sweep_loop.read_record(str(tmp_path / "sweep"), [], c)
  # A folder named members/ outside a sweep is any run's.
  loop.check_not_in_sweep(str(tmp_path / "members" / "run"))
  # The sweep's folder to a single run; the record of other members; a single run's folder.
  with pytest.raises(FileExistsError, match=r"sweep holds a sweep \(sweep.json\): continue it"):
    train.train_and_evaluate(c, str(tmp_path / "sweep"))
  team = sweep_loop.sweep_members(c, [{"seed": 1}, {"seed": 2}], str(tmp_path / "sweep"))
  (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(
      {"format": 1, "step": None, "members": [{"label": "seed=3", "overrides": {"seed": 3}}]}))
  with pytest.raises(ValueError, match=r"holds a sweep of other members \(seed=3\) than these "
                     r"\(seed=1, seed=2\): give the same --sweep flags"):
    sweep_loop.read_record(str(tmp_path / "sweep"), team, c)
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileExistsError, match=r"run holds a single run \(checkpoints/, "):
    sweep_loop.read_record(str(tmp_path / "run"), team, c)


@pytest.mark.parametrize("flags,said", [
    (["m_inn=-23,-25"], "--sweep=m_inn=-23,-25: 'm_inn' is no config field; a sweep varies seed "
                        "and the numbers the objective and optimizer read (seed, energy_weight, "
                        "m_in, m_out,"),
    (["m_inn=-23,-25"], "did you mean 'm_in'?"),
    (["m_in=-23,abc"], "--sweep=m_in=-23,abc: config.objective.m_in must be a number in a sweep, "
                       "got 'abc'"),
    (["m_in=-23,nan"], "--sweep=m_in=-23,nan: 'nan' is not a finite number"),
    (["batch_size=64,128"], "--sweep=batch_size=64,128: config.batch_size cannot differ between "
                            "the members of a sweep"),
    (["nesterov=0,1"], "--sweep=nesterov=0,1: config.optimizer.nesterov is not a number"),
    (["m_in="], "--sweep=m_in=: an empty value"),
    (["m_in=-23,,-25"], "--sweep=m_in=-23,,-25: an empty value"),
    (["m_in"], "--sweep=m_in: expected FIELD=V1,V2,..."),
    (["m_in=-23,-25,-23.0"], "--sweep=m_in=-23,-25,-23.0: the value '-23.0' is given twice "
                             "('-23' and '-23.0')"),
    (["seed=1,2", "seed=3"], "--sweep=seed=3: config.seed is swept by an earlier --sweep flag"),
    (["oe_weight=0.5,1"], "--sweep=oe_weight=0.5,1: config.objective.oe_weight is not read by "
                          "objective 'energy' nor optimizer 'sgd'"),
    (["learning_rate=0.1,-0.1"], "--sweep=learning_rate=0.1,-0.1: config.optimizer.learning_rate "
                                 "must be > 0.0, got -0.1"),
    (["m_in=-23,-1", "m_out=-2"], "--sweep: sweep member 1 (m_in=-1,m_out=-2): "
                                  "config.objective.m_in = -1.0 must lie below "
                                  "config.objective.m_out = -2.0"),
])
def test_a_bad_sweep_flag_ends_in_a_short_message_naming_it(flags, said, capsys):
  """The script's check of the --sweep flags (run before anything is read or compiled): exit
  status 1, the flag and the value named in one line, a pointer in a second, no traceback."""
  c = config_lib.get_config("test", "finetune")
  with pytest.raises(SystemExit) as exit_:
    _main.sweep_members(c, flags)
  assert exit_.value.code == 1
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 2 and lines[0].startswith(f"{_main.script()}: error: "), err
  assert said in lines[0], err
  assert "docs/sweeps.md" in lines[1] and "Traceback" not in err


def test_a_sweep_refuses_host_input():
  c = config_lib.get_config("test", "finetune")
  c.input_pipeline = "tfdata"
  with pytest.raises(ValueError, match="config.input_pipeline = 'tfdata': a sweep reads its "
                                       "images from the device-resident pools"):
    sweep_lib.parse_sweep_flags(c, ["seed=1,2"])


# ----------------------------------------------------------------------------------------------
# A sweep on disk, end to end through the command line.

def fpr_at_95_tpr(scores_in, scores_out):
  """The reference's FPR95 (ID positive): among the ROC points up to the first at TPR 1, the FPR
  of the one whose TPR is closest to 0.95; of several, the last by descending threshold (the
  reference walks the points from full recall down and takes the first minimum)."""
  labels = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
  fpr, tpr, _ = roc_curve(labels, np.r_[scores_in, scores_out], drop_intermediate=False)
  gap = np.abs(tpr[:int(np.argmax(tpr >= 1.0)) + 1] - 0.95)
  return float(fpr[np.flatnonzero(gap == gap.min()).max()])


def test_sweep_command_line_resumes_as_a_whole_stops_a_diverged_member_and_chooses_one(tmp_path):
  """pretrain.py --sweep=learning_rate=0.05,0.02,1e8 on toy data, 2 epochs of 2 steps: started
  on one device, stopped by SIGTERM once training began, then continued by the same command on
  3 devices, each member on its own (config.member_groups = 3). Each member's workdir is a
  run's; the members that finished equal the sweep computed here without a stop on one device;
  the member with the rate of 1e8 diverges in epoch 2 on its own device (its state turns NaN;
  its loss stays finite), is named, keeps its epoch-1 checkpoint; the member chosen is the one
  whose energy scores, recomputed here from its weights, have the lowest mean FPR95 on the
  validation sets."""
  toy.make_toy_dataset(str(tmp_path / "DATA"), train_per_class=8, test_per_class=32,
                       num_outliers=64)
  workdir = tmp_path / "sweep"
  rates = [0.05, 0.02, 1e8]
  command = [sys.executable, "experiments/pretrain.py",
             "--config=experiments/configs/pretrain.py:test", f"--config.data_dir={tmp_path}",
             "--config.num_devices=1", "--config.steps_per_call=1", f"--workdir={workdir}",
             "--sweep=learning_rate=" + ",".join(map(str, rates))]
  env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
  grouped = [a for a in command if a != "--config.num_devices=1"] + [
      "--config.num_devices=3", "--config.member_groups=3"]
  first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in first.stdout:       # the watch is on once training starts: SIGTERM stops it there
    lines.append(line)
    if line.startswith("ce training:"):
      first.send_signal(signal.SIGTERM)
  assert first.wait(timeout=300) == _main.PREEMPTED, "".join(lines)
  assert "stopped by SIGTERM" in "".join(lines)
  second = subprocess.run(grouped, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  out = second.stdout + second.stderr
  assert second.returncode == 0, out
  assert "resuming the sweep at epoch" in out
  assert "steps/epoch, 3 device(s) in 3 member groups x 16" in out

  # The sweep computed here: the same members, images and steps, without a stop.
  c = config_lib.get_config("test", "pretrain")
  c.data_dir, c.num_devices, c.steps_per_call = str(tmp_path), 1, 1
  members = [{"optimizer.learning_rate": r} for r in rates]
  run_data = data.load_run_data(c, False)
  steps = len(run_data.train) // c.batch_size
  assert steps == 2
  mesh = parallel.make_mesh(1)
  pools = parallel.put_replicated(step_lib.device_data(run_data.train.images,
                                                       run_data.train.labels, None), mesh)
  sweep = parallel.put_replicated(sweep_lib.create_sweep_state(c, members, 2 * steps), mesh)
  epoch_fn = sweep_lib.sweep_epoch_fn(mesh)
  losses, after_epoch_1, finite = [], None, []
  for epoch in range(2):
    in_idx, out_idx = sampling.epoch_indices(c.seed, epoch, len(run_data.train), c.batch_size,
                                             0, c.outlier_batch_size)
    for s in range(steps):
      idx = parallel.put_global((in_idx[s:s + 1], out_idx[s:s + 1]), mesh,
                                step_lib.step_indices_spec())
      sweep, m = epoch_fn(sweep, pools, *idx)
      losses.append(np.asarray(m["loss"][0]))
      finite.append(all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(
          sweep_lib.member_state(sweep, 2).variables))))
    if epoch == 0:
      after_epoch_1 = jax.device_get(sweep_lib.member_state(sweep, 2).variables)
  losses = np.stack(losses)                                   # [step, member]
  assert np.isfinite(losses[:, :2]).all() and np.isfinite(losses[:2, 2]).all()
  # The rate of 1e8: NaN weights after epoch 2's first step (epoch 1 finite).
  assert finite == [True, True, False, False]

  record = json.loads((workdir / "sweep.json").read_text())
  assert [m["status"] for m in record["members"]] == ["finished", "finished", "diverged"]
  assert re.match(r"its training state at epoch 2, step [12] holds \d+ non-finite value",
                  record["members"][2]["diverged"]), record["members"][2]["diverged"]
  assert ("member 2 (learning_rate=100000000.0) diverged and is stopped; the others go on: its "
          "training state at epoch 2") in out
  for k, entry in enumerate(record["members"]):
    member_dir = workdir / entry["workdir"]
    assert member_dir.parent.name == "members" and member_dir.name.startswith(f"{k}_learning_rate=")
    ck = config_lib.get_config("test", "pretrain")
    ck.data_dir, ck.num_devices, ck.steps_per_call = str(tmp_path), 3, 1
    ck.optimizer.learning_rate = rates[k]
    # A run's config: the devices it last ran on, but no member groups (a sweep's layout).
    assert json.loads((member_dir / "config.json").read_text()) == json.loads(ck.to_json())
    ck.num_devices = 1
    rows = [json.loads(l) for l in (member_dir / "results.jsonl").read_text().splitlines()]
    csv = (member_dir / "training_results.csv").read_text().splitlines()
    assert len(rows) == len(csv) - 1 == 2
    saved = checkpoints.load_variables(str(member_dir), ck)
    if k < 2:
      # Resumed in the 3-group program against one device's: measured (2026-12-07, AVX-512 and
      # held to SSE4_2) the weights and statistics within 1.9e-7 of each tensor's largest entry.
      assert_close(f"member {k}", saved, jax.device_get(sweep_lib.member_state(sweep, k).variables),
                   rtol=1e-6)
      for epoch in range(2):
        assert rows[epoch]["train_loss"] == pytest.approx(
            loop.reference_average(losses[epoch * steps:(epoch + 1) * steps, k]), rel=1e-6)
      assert "test_error" in rows[1] and "diverged" not in rows[1]
    else:
      assert_close("the diverged member's last good checkpoint", saved, after_epoch_1, rtol=1e-6)
      assert rows[0]["train_loss"] == pytest.approx(loop.reference_average(losses[:2, 2]),
                                                    rel=1e-6)
      assert rows[1]["diverged"] == record["members"][2]["diverged"]
      assert csv[2].startswith("002,") and "diverged" not in rows[0]
      # Its last row's loss is NaN in both files (the loss of its steps stayed finite).
      assert np.isnan(rows[1]["train_loss"]) and csv[2].split(",")[2] == "nan"

  # The choice: recomputed from the members' saved weights and the validation sets.
  table = json.loads((workdir / "validation.json").read_text())
  scores = np.load(workdir / "validation_scores.npz")
  sets = protocol.validation_sets(c, run_data.test, 0)
  assert sorted(table["validation_sets"]) == sorted(sets) == sorted(c.validation_sets)
  mean_fpr, mean_auroc = {}, {}
  for k in (0, 1):
    ck = sweep_lib.member_configs(c, members)[k]
    variables = checkpoints.load_variables(str(workdir / table["members"][k]["workdir"]), ck)
    model = models.from_config(ck)
    energy = lambda images: logsumexp(np.asarray(inference.predict(
        model, variables, images, 256, mesh).logits, np.float64), axis=1)
    s_in = energy(run_data.test.images)
    np.testing.assert_allclose(scores[f"{k}/in"], s_in, rtol=1e-5, atol=1e-5)
    fprs, aurocs = [], []
    for name, images in sets.items():
      s_out = energy(images.images)
      np.testing.assert_allclose(scores[f"{k}/{name}"], s_out, rtol=1e-5, atol=1e-5)
      fprs.append(fpr_at_95_tpr(s_in, s_out))
      aurocs.append(roc_auc_score(np.r_[np.ones(len(s_in)), np.zeros(len(s_out))],
                                  np.r_[s_in, s_out]))
    mean_fpr[k], mean_auroc[k] = np.mean(fprs), np.mean(aurocs)
    assert table["members"][k]["fpr95"] == pytest.approx(mean_fpr[k], abs=1e-9)
    assert table["members"][k]["auroc"] == pytest.approx(mean_auroc[k], abs=1e-9)
  best = min((0, 1), key=lambda k: (mean_fpr[k], -mean_auroc[k]))
  assert table["chosen"] == best and "fpr95" not in table["members"][2]
  chosen_dir = workdir / table["members"][best]["workdir"]
  assert f"| {best} | learning_rate={rates[best]} | finished |" in out
  assert [l for l in out.splitlines() if "**chosen**" in l][0].startswith(f"| {best} |")
  assert f"experiments/evaluate.py --config=experiments/configs/pretrain.py:test" in out
  assert f"--checkpoint={chosen_dir}" in out
  csv = (workdir / "validation.csv").read_text().splitlines()
  assert csv[1 + best].split(",")[6] == "1" and csv[3].split(",")[2] == "diverged"

  # The sweep's folder is refused to a single run, and to the sweep under another data seed
  # (it draws every member's images), before any step.
  c.optimizer.learning_rate = rates[0]
  with pytest.raises(FileExistsError, match=r"holds a sweep \(sweep.json\): continue it with "
                                            "the same --sweep flags"):
    train.train_and_evaluate(c, str(workdir), log=lambda s: None)
  c.seed = 2
  with pytest.raises(ValueError, match="seed"):
    sweep_loop.train_and_evaluate_sweep(c, members, str(workdir), log=lambda s: None)


def test_a_finetuning_sweep_from_a_pretrained_run_writes_members_equal_to_their_single_runs(
    tmp_path):
  """finetune's sweep on disk (the library call the script makes): two members differing in
  m_in fine-tune one pretrained run, each in a member group of its own device; member 1's folder
  holds what the single fine-tuning run of its config on one device computes from the same
  pretrained weights (its seed is the sweep's: the same images), and reads back as any run's;
  one member is chosen on the validation sets."""
  toy.make_toy_dataset(str(tmp_path / "DATA"), train_per_class=8, test_per_class=8,
                       num_outliers=64)
  pre = config_lib.get_config("test", "pretrain")
  pre.data_dir, pre.num_devices, pre.epochs = str(tmp_path), 1, 1
  train.train_and_evaluate(pre, str(tmp_path / "pretrain"), log=lambda s: None)
  c = config_lib.get_config("test", "finetune")
  c.data_dir, c.num_devices, c.member_groups, c.epochs = str(tmp_path), 2, 2, 1
  c.pretrained = str(tmp_path / "pretrain")
  members = [{"objective.m_in": -8.0}, {"objective.m_in": -9.0}]
  summary = sweep_loop.train_and_evaluate_sweep(c, members, str(tmp_path / "sweep"),
                                                log=lambda s: None)
  assert [m["status"] for m in summary["members"]] == ["finished", "finished"]
  assert summary["chosen"] in (0, 1) and (tmp_path / "sweep" / "validation.json").exists()
  member_dir = tmp_path / "sweep" / summary["members"][1]["workdir"]
  single = config_lib.get_config("test", "finetune")
  single.data_dir, single.num_devices, single.epochs = str(tmp_path), 1, 1
  single.pretrained, single.objective.m_in = str(tmp_path / "pretrain"), -9.0
  # The member's config is its single run's on the sweep's 2 devices (member groups are the
  # sweep's layout, not the run's).
  assert json.loads((member_dir / "config.json").read_text()) == dict(
      json.loads(single.to_json()), num_devices=2)
  row = train.train_and_evaluate(single, str(tmp_path / "single"), log=lambda s: None)
  rows = [json.loads(l) for l in (member_dir / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["epoch"] == 1
  # Members one by one (the CPU's default) against the single run's program, the traced m_in
  # against a constant. Measured (2026-12-07, XLA:CPU with AVX-512 / held to SSE4_2): the rows
  # equal; the weights within 1.1e-7 / 9.8e-8 of each tensor's largest entry.
  for name in ("train_loss", "mean_energy_reg", "test_error"):
    if MEASURE:
      print(f"{name}: {rows[0][name]!r} against {row[name]!r}")
    assert rows[0][name] == pytest.approx(row[name], rel=1e-6, abs=1e-7), name
  assert_close("member 1", checkpoints.load_variables(str(member_dir), single),
               checkpoints.load_variables(str(tmp_path / "single"), single), rtol=2e-5)
