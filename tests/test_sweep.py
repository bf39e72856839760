"""Sweeps (energy_jax.train.sweep): member k of a sweep computes what the single run with member
k's config computes, and a member's settings are checked as that run's config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energy_jax import config as config_lib, objectives, parallel, train
from energy_jax.data import sampling, toy
from energy_jax.train import step as step_lib, sweep as sweep_lib

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
  sweep_metrics = []
  for batch in batches:
    sweep, m = sweep_step(sweep, batch)
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
      state, single = step(state, batch)
      # Not bit for bit: a traced number is not folded into the arithmetic as a constant is
      # (the members one by one, as on a CPU; vmap's grouped convolutions also sum in another
      # order, see the pretraining test). Measured (the forward pass's metrics): <= 7.4e-8 of
      # each metric's size.
      assert_close(f"member {k} step {s} metrics",
                   {n: v[k] for n, v in sweep_metrics[s].items()}, single, rtol=1e-6)
    mine = sweep_lib.member_state(sweep, k)
    assert int(mine.step) == int(state.step) == 2
    np.testing.assert_array_equal(mine.rng, state.rng)
    # After two updates, through the backward pass's long sums: measured max|diff| <= 5.9e-7
    # of each tensor's largest entry (weights, BatchNorm statistics, momentum).
    assert_close(f"member {k}", (mine.params, mine.batch_stats, mine.opt_state),
                 (state.params, state.batch_stats, state.opt_state), rtol=2e-5)


def test_pretraining_members_augment_with_their_own_keys_on_device():
  """Pretraining (ce) members differing in seed, learning_rate, weight_decay and momentum, as
  one vmap-ed step (the default on accelerators), over a fused device-resident step: the same
  indices, each member's augmentation and dropout from its own key, against the single run's
  compiled epoch."""
  c = config_lib.get_config("test", "pretrain")
  c.model.dropout_rate = 0.3
  members = [{"seed": c.seed, "optimizer.learning_rate": 0.1},
             {"seed": 5, "optimizer.learning_rate": 0.03, "optimizer.weight_decay": 1e-3,
              "optimizer.momentum": 0.5}]
  pools = toy_pools()
  mesh = parallel.make_mesh(1)
  pools = parallel.put_replicated(pools, mesh)
  idx = parallel.put_global(step_indices(c, pools, 1), mesh, step_lib.step_indices_spec())
  sweep = sweep_lib.create_sweep_state(c, members, total_steps=10, vectorize=True)
  sweep, metrics = sweep_lib.sweep_epoch_fn(mesh)(parallel.put_replicated(sweep, mesh), pools,
                                                   *idx)
  assert metrics["loss"].shape == (1, 2)
  # Member 0: the sweep's own seed, its learning rate traced all the same (member 1's differs);
  # its single run's initial state is the sweep's program, already compiled.
  k = 0
  ck = sweep_lib.member_config(sweep, k)
  state = parallel.put_replicated(train.create_train_state(ck, jax.random.PRNGKey(ck.seed), 10),
                                  mesh)
  state, single = step_lib.device_epoch_fn(ck, mesh)(state, pools, *idx)
  mine = sweep_lib.member_state(sweep, k)
  # vmap turns each convolution into one grouped convolution over the members, which XLA:CPU
  # sums in another order: measured <= 8.7e-8 (metrics), 1.4e-6 (the state) of each tensor's
  # largest entry.
  assert_close("metrics", {n: v[:, k] for n, v in metrics.items()}, single, rtol=1e-6)
  assert_close(f"member {k}", (mine.params, mine.batch_stats, mine.opt_state),
               (state.params, state.batch_stats, state.opt_state), rtol=2e-5)
  # Another seed, other crops, flips and dropout: the members' first losses differ.
  assert metrics["loss"][0, 0] != metrics["loss"][0, 1]


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
