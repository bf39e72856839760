"""Sweeps: N runs that differ in seed and in numeric hyper-parameters, trained as one program.

A sweep's members share the model, the data and the stream of images (the indices each step
reads, drawn with the sweep's ``config.seed``); each member has its own weights, BatchNorm
statistics, optimiser state and rng, stacked along a leading member axis, and the step is the
single run's :func:`~energy_jax.train.step.train_step` under ``jax.vmap`` (or, on a CPU, once
per member in the same program: see ``vectorize``). A member differs in

* ``seed``: its initialisation, augmentation and dropout (the single run's streams, folded from
  its own ``state.rng``);
* any number of ``config.objective`` and ``config.optimizer`` its objective and optimiser read
  (``objective.m_in``, ``m_out``, ``energy_weight``, ``oe_weight``, ``optimizer.learning_rate``,
  ``weight_decay``, ``momentum``, ...): a field whose value differs between members enters the
  step as a traced ``[N]`` float32 array (one compiled program for every member; the settings
  are static in ``SweepState.overrides``, so a sweep of other values compiles its own), a field
  all members give alike stays a constant of the program, as in a single run.

Member ``k`` computes what the single run with member ``k``'s config computes on the same images
(tests/test_sweep.py states how close); the images come from the sweep's seed, so a member's
data order is that of a single run whose seed is the sweep's.

::

  sweep = create_sweep_state(config, [{"seed": 1, "objective.m_in": -23},
                                      {"seed": 2, "objective.m_in": -25}], total_steps)
  step = sweep_step_fn(mesh)                      # or jax.jit(sweep_train_step)
  sweep, metrics = step(sweep, batch)             # metrics: {name: [N]}
  state_k = member_state(sweep, k)                # a TrainState as any run's
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from energy_jax import config as config_lib, models, objectives, optimizers, parallel
from energy_jax.fields import is_int
from energy_jax.train import loop, step as step_lib
from energy_jax.train.state import TrainState, create_train_state, hashable_config

Array = jax.Array
# The sections whose numbers may differ between members: they enter the step's arithmetic only
# (the loss and the update), never a shape or the model.
SECTIONS = ("objective", "optimizer")


class SweepState(flax.struct.PyTreeNode):
  """The state of a sweep: ``members``, a :class:`TrainState` whose every array has a leading
  member axis ``[N, ...]``; ``hparams``, ``{dotted field: [N] float32}`` for the fields whose
  values differ between members; and, outside the arrays, ``config``, what the members share
  (its ``seed`` draws the stream of images), ``overrides``, what sets each member apart
  (``(("seed", 1), ("objective.m_in", -23.0))``), ``total_steps``, the schedule's length, and
  ``vectorize``: the members' steps run as one ``vmap``-ed step (else one after another in the
  same program)."""
  members: TrainState
  hparams: Dict[str, Array]
  config: ml_collections.FrozenConfigDict = flax.struct.field(pytree_node=False)
  overrides: Tuple[Tuple[Tuple[str, Any], ...], ...] = flax.struct.field(pytree_node=False)
  total_steps: int = flax.struct.field(pytree_node=False)
  vectorize: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def size(self) -> int:
    """The number of members."""
    return len(self.overrides)


# ----------------------------------------------------------------------------------------------
# Members: their settings, checked as a single run's config.

def _not_varying(name: str) -> str:
  return (f"config.{name} cannot differ between the members of a sweep, which share one "
          "compiled program, its model and its stream of images: only seed and the numbers of "
          "config.objective and config.optimizer can (set config."
          f"{name} in the sweep's config)")


def _read_fields(config) -> Dict[str, str]:
  """``{dotted field: what reads it}`` of the fields the chosen objective and optimiser read."""
  objective, optimizer = config.objective.name, config.optimizer.name
  read = {f"objective.{f.name}": f"objective {objective!r}"
          for f in objectives.get(objective).fields}
  read.update({f"optimizer.{f.name}": f"optimizer {optimizer!r}"
               for f in (*optimizers.SCHEDULE_FIELDS, *optimizers.get(optimizer).fields)})
  return read


def check_member_field(config, name: Any, value: Any, member: int = 0) -> None:
  """Raises ``ValueError`` naming the field and value unless member ``member`` of a sweep of
  ``config`` may set ``name`` to ``value``: ``seed`` or a number of ``config.objective`` /
  ``config.optimizer`` that the chosen objective or optimiser reads, valid as that field."""
  problem = member_field_problem(config, name, value)
  if problem:
    raise ValueError(f"sweep member {member}: {problem}")


def member_field_problem(config, name: Any, value: Any) -> Optional[str]:
  """Why a member of a sweep of ``config`` cannot set ``name`` to ``value`` (None if it can):
  see :func:`check_member_field`."""
  if not isinstance(name, str):
    return f"a member's keys are config fields such as 'objective.m_in', got {name!r}"
  unknown = config_lib.unknown_field(config, name)
  if unknown:
    return unknown
  checks = {f.name: f for f in config_lib.fields(config.model.name)}
  if name not in checks:
    return (f"config.{name} is a section of the config: a member sets its fields by their "
            "dotted names, such as 'objective.m_in'")
  if name.endswith(".name") or (
      name != "seed" and name.split(".")[0] not in SECTIONS):
    return _not_varying(name)
  default = checks[name].default
  if isinstance(default, (bool, str)) or not isinstance(default, numbers.Real):
    return (f"config.{name} is not a number ({default!r} by default): members of a sweep differ "
            f"in numbers only, which enter one compiled program as arrays; set config.{name} in "
            "the sweep's config, or sweep it as separate runs")
  if isinstance(value, str) or not isinstance(value, numbers.Real) or isinstance(value, bool):
    extra = (" ('auto' margins are computed per run from the pretrained model: compute them "
             "first, energy_jax.train.margins, and give the numbers)"
             if value == objectives.AUTO else "")
    return f"config.{name} must be a number in a sweep, got {value!r}{extra}"
  try:
    checks[name].check(name, value)
  except ValueError as e:
    return str(e)
  if name != "seed" and name not in _read_fields(config):
    return (f"config.{name} is not read by objective {config.objective.name!r} nor optimizer "
            f"{config.optimizer.name!r}: its members would not differ in it")
  return None


def _set(config, name: str, value: Any) -> None:
  *parents, leaf = name.split(".")
  node = config
  for p in parents:
    node = node[p]
  if isinstance(node[leaf], float) and is_int(value):
    value = float(value)
  setattr(node, leaf, value)


def _get(config, name: str) -> Any:
  node = config
  for p in name.split("."):
    node = node[p]
  return node


def member_configs(config, members: Sequence[Mapping[str, Any]]) -> List[ml_collections.ConfigDict]:
  """Each member's config: ``config`` with the member's overrides (``{"seed": 1,
  "objective.m_in": -23, ...}``), each checked as the field it sets and the whole as a run's
  config (:func:`energy_jax.config.validate`: ``m_in < m_out``, ...), ``member_groups`` 1."""
  if isinstance(members, Mapping) or not members:
    raise ValueError(f"a sweep's members are a non-empty list of dicts of overrides such as "
                     f"[{{'seed': 1}}, {{'seed': 2}}], got {members!r}")
  config_lib.validate(config)
  out = []
  for k, overrides in enumerate(members):
    if not isinstance(overrides, Mapping):
      raise ValueError(f"sweep member {k} must be a dict of overrides such as "
                       f"{{'seed': 1, 'objective.m_in': -23}}, got {overrides!r}")
    c = _run_config(config)
    for name, value in overrides.items():
      check_member_field(c, name, value, k)
      _set(c, name, value)
    try:
      config_lib.validate(c)
    except ValueError as e:
      raise ValueError(f"sweep member {k} ({describe(overrides)}): {e}") from None
    for name in objectives.AUTO_FIELDS:
      if f"objective.{name}" in _read_fields(c) and c.objective[name] == objectives.AUTO:
        raise ValueError(
            f"sweep member {k}: config.objective.{name} = {objectives.AUTO!r}: a sweep takes "
            "numbers (the margins a single run computes from the pretrained model: compute "
            "them first, energy_jax.train.margins, and give them to the sweep)")
    out.append(c)
  return out


def describe(overrides: Mapping[str, Any]) -> str:
  """A member's overrides as one short label, e.g. ``seed=1,m_in=-23``."""
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


def varying_fields(configs: Sequence[Any]) -> List[str]:
  """The objective and optimizer fields whose values differ between ``configs``."""
  names = [n for n, _ in config_lib.flat_items(configs[0]) if n.split(".")[0] in SECTIONS]
  return [n for n in names if len({repr(_get(c, n)) for c in configs}) > 1]


# ----------------------------------------------------------------------------------------------
# The command line: --sweep=FIELD=V1,V2,... flags, their grid.

def short_names(config) -> Dict[str, str]:
  """``{name a user types: dotted field}`` of the fields a member may set: ``seed``, and each
  field of ``config.objective`` and ``config.optimizer`` by its own name (``m_in``,
  ``learning_rate``, ...) where no other field of the two sections shares it."""
  fields_ = [n for n, _ in config_lib.flat_items(config)
             if n.split(".")[0] in SECTIONS and not n.endswith(".name")]
  by_leaf: Dict[str, List[str]] = {}
  for n in fields_:
    by_leaf.setdefault(n.rsplit(".", 1)[1], []).append(n)
  return {"seed": "seed", **{leaf: ns[0] for leaf, ns in by_leaf.items() if len(ns) == 1}}


def _flag_value(text: str) -> Any:
  """A number of the command line: an int where the text is one, else a float; else the text."""
  try:
    return int(text)
  except ValueError:
    pass
  try:
    return float(text)
  except ValueError:
    return text


def parse_sweep_flags(config, flags_: Sequence[str]) -> List[Dict[str, Any]]:
  """The members of the ``--sweep=FIELD=V1,V2,...`` flags: the grid of their values (the product
  over the flags, the first flag's values outermost), each member a dict ``{dotted field:
  value}`` for :func:`create_sweep_state`. ``FIELD`` is a dotted config name or its short name
  (:func:`short_names`: ``m_in``, ``learning_rate``, ``seed``, ...). Raises ``ValueError``
  naming the flag and value for an unknown field, a field members cannot set, a value that is no
  finite number or is not valid for the field, an empty or repeated value, a field given twice,
  and members whose whole config is invalid (``m_in < m_out``)."""
  check_sweep_config(config)
  shorts = short_names(config)
  names: List[str] = []
  grid: List[List[Any]] = []
  for flag in flags_:
    where = f"--sweep={flag}"
    field, sep, text = flag.partition("=")
    field = field.strip()
    if not sep or not field:
      raise ValueError(f"{where}: expected FIELD=V1,V2,... (e.g. --sweep=m_in=-23,-25,-27)")
    name = shorts.get(field, field)
    if "." not in name and name not in dict(config_lib.flat_items(config)):
      read = ["seed"] + [leaf for leaf, n in shorts.items() if n in _read_fields(config)
                         and member_field_problem(config, n, _get(config, n)) is None]
      raise ValueError(f"{where}: {field!r} is no config field; a sweep varies seed and the "
                       f"numbers the objective and optimizer read ({', '.join(read)}; or their "
                       f"dotted names){config_lib.did_you_mean(field, sorted(shorts))}")
    if name in names:
      raise ValueError(f"{where}: config.{name} is swept by an earlier --sweep flag too: give "
                       "all its values in one flag")
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(parts):
      raise ValueError(f"{where}: an empty value; give the values as FIELD=V1,V2,...")
    values = [_flag_value(p) for p in parts]
    for part, value in zip(parts, values):
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {part!r} is not a finite number")
      problem = member_field_problem(config, name, value)
      if problem:
        raise ValueError(f"{where}: {problem}")
    seen: Dict[float, str] = {}
    for part, value in zip(parts, values):
      if float(value) in seen:
        raise ValueError(f"{where}: the value {part!r} is given twice ({seen[float(value)]!r} "
                         f"and {part!r}): each member of a sweep differs from the others")
      seen[float(value)] = part
    names.append(name)
    grid.append(values)
  if not names:
    raise ValueError("--sweep: no flag given; e.g. --sweep=m_in=-23,-25,-27 --sweep=seed=1,2")
  members = [dict(zip(names, combo)) for combo in itertools.product(*grid)]
  try:
    member_configs(config, members)
  except ValueError as e:
    raise ValueError(f"--sweep: {e}") from None
  return members


def check_sweep_config(config) -> None:
  """Raises unless ``config`` can train as a sweep: device-resident input (every member reads
  the same pools in one compiled program)."""
  if config.input_pipeline != "device":
    raise ValueError(f"config.input_pipeline = {config.input_pipeline!r}: a sweep reads its "
                     "images from the device-resident pools (one compiled program steps every "
                     "member); set --config.input_pipeline=device")


# ----------------------------------------------------------------------------------------------
# The state.

def create_sweep_state(config, members: Sequence[Mapping[str, Any]], total_steps: int,
                       variables: Optional[Mapping[str, Any]] = None,
                       vectorize: Optional[bool] = None) -> SweepState:
  """The sweep of ``members`` (a list of dicts of overrides of ``config``, see
  :func:`member_configs`) over ``total_steps`` updates, each member as
  :func:`~energy_jax.train.state.create_train_state` makes a run of its config (fresh from its
  seed, or around ``variables``, the pretrained weights every member fine-tunes).

  ``vectorize``: the members' steps as one ``jax.vmap``-ed step (the default on accelerators),
  or one member after another within the compiled program (the default on a CPU: vmap turns
  each convolution into a grouped one over the members, which XLA:CPU runs several times slower
  than the members' convolutions one by one; docs/sweeps.md)."""
  configs = member_configs(config, members)
  varying = varying_fields(configs)
  shared = copy.deepcopy(configs[0])
  shared.seed = config.seed
  # Initialisation reads the seed and the model alone: one compiled program for every member.
  init = {}
  for c in configs:
    if c.seed not in init:
      init[c.seed] = create_train_state(shared, jax.random.PRNGKey(c.seed), total_steps,
                                        variables)
  states = [init[c.seed] for c in configs]
  stacked = stack_members(states)
  hparams = {n: jnp.asarray([_get(c, n) for c in configs], jnp.float32) for n in varying}
  overrides = tuple((("seed", c.seed),) + tuple((n, _get(c, n)) for n in varying)
                    for c in configs)
  if vectorize is None:
    vectorize = jax.default_backend() != "cpu"
  return SweepState(members=stacked, hparams=hparams, config=hashable_config(shared),
                    overrides=overrides, total_steps=total_steps, vectorize=bool(vectorize))


@jax.jit
def stack_members(states: Sequence[TrainState]) -> TrainState:
  """The states of the members (of one structure), stacked along a leading member axis: one
  compiled program (leaf by leaf, each shape would compile its own)."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


@jax.jit
def take_member(members: TrainState, k) -> TrainState:
  """Member ``k``'s arrays of the stacked ``members``: one compiled program for every ``k``."""
  return jax.tree_util.tree_map(lambda x: x[k], members)


@jax.jit
def finite_members(members: TrainState) -> Array:
  """``[N]`` bool: whether each member's weights, BatchNorm statistics and optimiser state are
  all finite (a loss can stay finite a step after the update that made them NaN)."""
  leaves = [x for x in jax.tree_util.tree_leaves(
      (members.params, members.batch_stats, members.opt_state))
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack([jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
                    for x in leaves]).all(axis=0)


def _run_config(config) -> ml_collections.ConfigDict:
  """A copy of the sweep's ``config`` as a single run's, before a member's overrides: how the
  sweep lays its members out on the devices (``member_groups``) is not the run's."""
  c = copy.deepcopy(ml_collections.ConfigDict(config))
  c.member_groups = 1
  return c


def member_config(sweep: SweepState, k: int) -> ml_collections.ConfigDict:
  """Member ``k``'s config: the run it equals (its data order aside, which is the sweep's)."""
  c = _run_config(sweep.config)
  for name, value in sweep.overrides[k]:
    _set(c, name, value)
  return c


def member_state(sweep: SweepState, k: int) -> TrainState:
  """Member ``k``'s :class:`TrainState` (its arrays at index ``k``): saved, evaluated or trained
  on as any run's, with the optimiser of member ``k``'s config."""
  state = take_member(sweep.members, k)
  optimizer = optimizers.from_config(member_config(sweep, k), sweep.total_steps)
  return state.replace(tx=optimizer.tx, learning_rate=optimizer.learning_rate)


# ----------------------------------------------------------------------------------------------
# The step.

class _Values:
  """A view of ``config`` in which the dotted fields of ``values`` read those values (a member's
  traced hyper-parameters) and every other field reads ``config``'s: what the single-run step
  and the optimiser registry read as ``config.objective.m_in`` or ``section["momentum"]``."""

  def __init__(self, config, values: Mapping[str, Any], prefix: str = ""):
    self._config, self._values, self._prefix = config, values, prefix

  def __getattr__(self, name: str):
    if name.startswith("_"):
      raise AttributeError(name)
    return self[name]

  def __getitem__(self, name: str):
    path = self._prefix + name
    if path in self._values:
      return self._values[path]
    value = self._config[name]
    if isinstance(value, ml_collections.ConfigDict) and any(
        k.startswith(path + ".") for k in self._values):
      return _Values(value, self._values, path + ".")
    return value

  def __contains__(self, name: str) -> bool:
    return name in self._config


def _member_step(state: TrainState, hparams: Mapping[str, Array], batch, *, config,
                 total_steps: int, axis_name: Optional[str]):
  """One member's step: the single run's ``train_step`` with the member's numbers (traced
  scalars inside ``vmap``) in its config and in the optimiser built from it."""
  values = _Values(config, hparams)
  tx = optimizers.build(values.optimizer, total_steps).tx
  new, metrics = step_lib.train_step(state.replace(tx=tx), batch, config=values,
                                     axis_name=axis_name)
  # The optimiser closes over this trace's values: the state that leaves keeps the shared one.
  return new.replace(tx=state.tx), metrics


def _each_member(fn, sweep: SweepState):
  """``fn(state, hparams) -> (state, metrics)`` of every member this device holds (all of them,
  or its group's share: :func:`sweep_mesh`), stacked: ``vmap``-ed, or (not ``sweep.vectorize``)
  once per member, unrolled in the program."""
  if sweep.vectorize:
    return jax.vmap(fn)(sweep.members, sweep.hparams)
  held = jax.tree_util.tree_leaves(sweep.members)[0].shape[0]
  outs = [fn(*jax.tree_util.tree_map(lambda x, k=k: x[k], (sweep.members, sweep.hparams)))
          for k in range(held)]
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)


def sweep_train_step(sweep: SweepState, batch: Mapping[str, Array], *,
                     axis_name: Optional[str] = None) -> Tuple[SweepState, Dict[str, Array]]:
  """One step of every member on the same ``batch`` (as :func:`train_step`'s: ``image``,
  ``label``, ``outlier``, ``mask``, already augmented); returns the new sweep and the metrics
  ``{name: [N]}``. Per device, as ``train_step``: ``axis_name`` sums over the devices of a
  mesh (:func:`sweep_step_fn`), None for one device under ``jax.jit``."""
  step = functools.partial(_member_step, batch=batch, config=sweep.config,
                           total_steps=sweep.total_steps, axis_name=axis_name)
  members, metrics = _each_member(step, sweep)
  return sweep.replace(members=members), metrics


def sweep_device_steps(sweep: SweepState, data: Mapping[str, Array], in_idx: Array,
                       out_idx: Array, *, padded: bool = False,
                       axis_name: Optional[str] = None) -> Tuple[SweepState, Dict[str, Array]]:
  """``S`` steps of every member on the device-resident pools ``data`` (see
  :func:`~energy_jax.train.step.device_epoch_fn`): each step's images are the same indices
  ``in_idx [S, B]``, ``out_idx [S, B_out]`` for every member, augmented with the member's own
  keys, as its single run would; metrics ``{name: [S, N]}``. Rows of
  :data:`~energy_jax.train.step.SKIP_STEP` are not run where the steps run in a loop
  (:func:`~energy_jax.train.step.run_call_steps`)."""
  config = sweep.config
  dtype = models.from_config(config).dtype
  uses_outliers = objectives.get(config.objective.name).uses_outliers

  def member(state, hparams, i_in, i_out):
    batch = step_lib.device_batch(jax.random.fold_in(state.rng, state.step), data, i_in,
                                  i_out if uses_outliers else None, dtype, padded, axis_name)
    return _member_step(state, hparams, batch, config=config, total_steps=sweep.total_steps,
                        axis_name=axis_name)

  def body(sweep, idx):
    members, metrics = _each_member(functools.partial(member, i_in=idx[0], i_out=idx[1]),
                                    sweep)
    return sweep.replace(members=members), metrics

  return step_lib.run_call_steps(body, sweep, in_idx, out_idx, config)


# ----------------------------------------------------------------------------------------------
# The mesh: every device steps every member, or (``config.member_groups`` > 1) each group of
# devices steps its share of the members, data-parallel over the group.

def sweep_mesh(config, size: int, mesh):
  """The mesh a sweep of ``size`` members trains on: ``mesh`` (1-D, every device steps every
  member), or for ``config.member_groups`` G > 1 its devices as G groups
  (:func:`energy_jax.parallel.member_mesh`), group g holding members ``g*size/G ...``; raises
  unless G divides the devices and the members and each group's devices divide the batches.
  With several processes a group may span processes, or a process hold several groups: every
  process holds all the images (the device input) and every index of a step."""
  groups, devices = config.member_groups, mesh.devices.size
  if devices % groups:
    raise ValueError(f"config.member_groups = {groups} does not divide the {devices} devices of "
                     "the mesh: give a divisor of the device count")
  if size % groups:
    raise ValueError(f"config.member_groups = {groups} does not divide the sweep's {size} "
                     "members: give a divisor of the member count")
  mesh = parallel.member_mesh(mesh, groups)
  loop.check_batches(config, mesh)
  return mesh


def _members_spec(mesh) -> P:
  """Where the member axis of the sweep's arrays lies on ``mesh``."""
  return P(parallel.MEMBERS) if parallel.MEMBERS in mesh.axis_names else P()


def put_sweep(sweep: SweepState, mesh) -> SweepState:
  """``sweep`` (the same values in every process) on ``mesh``: on every device, or split along
  the member axis (:func:`sweep_mesh`)."""
  if parallel.MEMBERS not in mesh.axis_names:
    return parallel.put_replicated(sweep, mesh)
  return parallel.put_split(sweep, mesh, _members_spec(mesh))


def gathered(sweep: SweepState) -> SweepState:
  """``sweep`` with every member on every device: where the members are split over member
  groups (:func:`sweep_mesh`), one program gathers every array, from which :func:`member_state`
  then takes each member without another (indexing the split arrays would gather all of them
  once per member); ``sweep`` itself otherwise."""
  sharding = getattr(jax.tree_util.tree_leaves(sweep.members)[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or parallel.MEMBERS not in mesh.axis_names:
    return sweep
  return parallel.gather_replicated(sweep, mesh)


@functools.lru_cache(maxsize=None)
def sweep_step_fn(mesh):
  """``fn(sweep, batch) -> (sweep, metrics [N])`` over ``mesh``: the batch split over its devices
  (data-parallel, as a single run's :func:`~energy_jax.train.step.host_step_fn`), the sweep on
  every device or split over the member groups of :func:`sweep_mesh`."""
  step = functools.partial(sweep_train_step, axis_name=parallel.AXIS)
  members = _members_spec(mesh)
  return parallel.data_parallel(step, mesh, in_specs=(members, P(parallel.AXIS)),
                                out_specs=(members, members), donate_argnums=(0,))


@functools.lru_cache(maxsize=None)
def sweep_epoch_fn(mesh, padded: bool = False):
  """``fn(sweep, data, in_idx [S, B], out_idx [S, B_out]) -> (sweep, metrics [S, N])``: ``S``
  fused steps of :func:`sweep_device_steps` over ``mesh`` (the index arrays split over its
  batch axis, as :func:`~energy_jax.train.step.device_epoch_fn`'s; the sweep on every device or
  split over the member groups of :func:`sweep_mesh`)."""
  steps = functools.partial(sweep_device_steps, padded=padded, axis_name=parallel.AXIS)
  spec_idx = step_lib.step_indices_spec()
  members = _members_spec(mesh)
  return parallel.data_parallel(steps, mesh, in_specs=(members, P(), spec_idx, spec_idx),
                                out_specs=(members, P(None, *members)), donate_argnums=(0,))
