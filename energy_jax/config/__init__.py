"""The run configuration: the schema (every field with its default, meaning and check), the
presets, the renamed keys and the validation of a config before any work.

``get_config(preset, stage)`` is the base config with a preset's overrides (the modules in
``energy_jax/config/presets/``) for ``stage`` "pretrain" or "finetune"; command lines override
single fields (``--config.model.depth=16``). Three sections are the fields of parts chosen by
name, declared where the parts are registered: ``config.model`` (the chosen model's fields,
:mod:`energy_jax.models`), ``config.objective`` and ``config.optimizer`` (the fields of every
registered objective / optimiser, :mod:`energy_jax.objectives`, :mod:`energy_jax.optimizers`).
``describe()`` lists every field for ``--help``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections

from energy_jax import models, objectives, optimizers, storage
from energy_jax.config import presets as _presets
from energy_jax.data import sampling, sources, synthetic
from energy_jax.fields import (FLOAT32_MAX, FLOAT32_TINY, INT32_MAX, SEED_LIMIT,  # noqa: F401
                               SEED_WHY, Field, boolean, check_float32, check_seed, choice,
                               did_you_mean, fail, float32_problem, float32_range, integer,
                               positive, real, string)
from energy_jax.objectives import AUTO, AUTO_FIELDS  # noqa: F401

STAGES = ("pretrain", "finetune")
INPUT_PIPELINES = ("device", "tfdata")
# The corruptions and noises the reference tunes on (energy_jax.data.synthetic).
REFERENCE_VALIDATION_SETS = ("uniform_noise", "arithmetic_mean", "geometric_mean", "jigsaw",
                             "speckle", "pixelate", "rgb_shift", "invert")
# The sections of parts chosen by name, and their defaults.
DEFAULT_MODEL, DEFAULT_OBJECTIVE, DEFAULT_OPTIMIZER = "wrn", "ce", "sgd"


def field_names(text: str) -> List[str]:
  """The names in a comma-separated list such as ``resume_override``."""
  return [part.strip() for part in text.split(",") if part.strip()]


def source(name: str, value: Any) -> None:
  """A data source some registered kind reads (``tfds:NAME``, a folder, ``.zip``, ``.npy``)."""
  string(nonempty=True)(name, value)
  try:
    sources.resolve(value)
  except ValueError as e:
    raise ValueError(f"config.{name} = {value!r}: {e}") from None


def optional_source(name: str, value: Any) -> None:
  """A source, or '' for none."""
  string()(name, value)
  if value:
    source(name, value)


def _validation_sets(name: str, value: Any) -> None:
  if not isinstance(value, (tuple, list)) or not value or not all(
      isinstance(v, str) for v in value):
    fail(name, value, "a non-empty tuple of names")
  unknown = [v for v in value if v not in synthetic.VALIDATION_SETS]
  if unknown:
    raise ValueError(f"config.{name} = {tuple(value)!r} holds unknown set(s) "
                     f"{', '.join(map(repr, unknown))}; known (energy_jax.data.synthetic): "
                     f"{', '.join(synthetic.VALIDATION_SETS)}")


def _field_names(name: str, value: Any) -> None:
  """Comma-separated names of config fields ('' for none)."""
  string()(name, value)
  known = [f.name for f in fields()]
  unknown = [f for f in field_names(value) if f not in known]
  if unknown:
    raise ValueError(f"config.{name} = {value!r} names unknown field(s) {', '.join(unknown)}"
                     f"{_closest(unknown[0], known)}")


# The fields outside the sections, in --help order.
TOP_FIELDS: Tuple[Field, ...] = (
    Field("dataset", "cifar10", "name of the in-distribution set (run names, margins of the "
          "presets)", string(nonempty=True)),
    Field("num_classes", 10, "classes of the in-distribution set (logits of the model)",
          integer(2, why="a softmax over one class is constant")),
    Field("image_size", 32, "images are brought to image_size x image_size (Resize + "
          "CenterCrop)", positive),
    Field("data_dir", "", "folder that relative source paths are read from ('' = the current "
          "folder)", string()),
    Field("in_train", "tfds:cifar10", "training set: tfds:NAME, image folder, .zip or .npy",
          source),
    Field("in_train_split", "train", "split (subfolder) of in_train", string()),
    Field("in_test", "tfds:cifar10", "test set, a source as in_train", source),
    Field("in_test_split", "test", "split (subfolder) of in_test", string()),
    Field("outliers", "", "auxiliary outliers of the energy / OE objectives, a source as "
          "in_train", optional_source),
    Field("outliers_split", "", "split (subfolder) of outliers ('' = none)", string()),
    Field("train_subset", 0, "train on this many images drawn with the seed (0 = all)",
          integer(0)),
    Field("validation_base", "", "the set the --validate corruptions are made from (the paper: "
          "the other CIFAR's test set; '' = the ID test set)", optional_source),
    Field("validation_base_split", "test", "split of validation_base", string()),
    Field("validation_sets", REFERENCE_VALIDATION_SETS, "the --validate sets "
          "(energy_jax.data.synthetic; the reference's eight)", _validation_sets),
    Field("drop_remainder", False, "drop the last partial batch of an epoch (False: kept and "
          "padded, as the reference's DataLoader; BatchNorm and the loss see its real images "
          "only)", boolean),
    Field("outlier_sampling", "window", "window: a contiguous window of the outliers from a "
          "random offset each epoch (the reference) | shuffle: fresh permutations",
          choice(lambda: sampling.OUTLIER_SAMPLING)),
    Field("epochs", 100, "training epochs", positive),
    Field("batch_size", 128, "in-distribution images per step (all devices)", positive),
    Field("outlier_batch_size", 256, "outlier images per step (energy / oe), in the same "
          "forward pass", positive),
    Field("pretrained", "", "weights to start from: a run directory, a reference .pt file or a "
          "name (energy_ood:cifar10_pretrained; python -m energy_jax.fetch list)", string()),
    Field("seed", 1, "seed of initialisation, data order, augmentation and dropout",
          integer(0, SEED_LIMIT, why=SEED_WHY)),
    Field("num_devices", 0, "devices of the data-parallel mesh (0 = all)", integer(0)),
    Field("member_groups", 1, "a sweep's members split over this many groups of the devices (a "
          "second mesh axis; each group trains its share of the members data-parallel); 1 = "
          "every device steps every member", integer(1)),
    Field("input_pipeline", "device", "device (data held on the accelerator) | tfdata (host "
          "stream)", choice(lambda: INPUT_PIPELINES)),
    Field("steps_per_call", 100, "steps fused into one compiled loop (device input)", positive),
    Field("scan_unroll", 0, "unroll of the fused loop (0 = unrolled on CPU, rolled elsewhere)",
          integer(0)),
    Field("eval_batch_size", 1000, "images per batch when evaluating", positive),
    Field("eval_every_epochs", 1, "test-set evaluation cadence (always after the last epoch)",
          integer(1)),
    Field("checkpoint_every_epochs", 1, "checkpoint cadence (always after the last epoch)",
          integer(1)),
    Field("keep_checkpoints", 2, "checkpoints kept in <workdir>/checkpoints",
          integer(1, why="0 would leave no checkpoint")),
    Field("progress_bar", True, "a progress bar per epoch", boolean),
    Field("tensorboard", True, "per-epoch scalars in <workdir>/tensorboard (needs TensorFlow)",
          boolean),
    Field("resume_override", "", "comma-separated fields allowed to differ from the config a "
          "resumed run started with (energy_jax.config.resume)", _field_names),
)


def _in(section: str, declared) -> Tuple[Field, ...]:
  return tuple(Field(f"{section}.{f.name}", f.default, f.meaning, f.check, f.any_type)
               for f in declared)


def fields(model: str = DEFAULT_MODEL) -> Tuple[Field, ...]:
  """Every field of a config of ``model``, with dotted names (``model.depth``): the top-level
  ones, the model's, and those of every registered objective and optimiser."""
  return TOP_FIELDS + _in("model", (
      Field("name", DEFAULT_MODEL, "registered model (energy_jax.models.names())",
            choice(models.names)),
      Field("dtype", "float32", "compute dtype: float32 | bfloat16 (parameters, optimiser and "
            "BatchNorm statistics stay float32)", choice(lambda: tuple(models.DTYPES))),
      *models.fields(model))) + _in("objective", (
          Field("name", DEFAULT_OBJECTIVE, "training objective: "
                f"{' | '.join(objectives.names())} (energy_jax.objectives)",
                choice(objectives.names)),
          *objectives.fields().values())) + _in("optimizer", (
              Field("name", DEFAULT_OPTIMIZER, "optax optimiser: "
                    f"{' | '.join(optimizers.names())} (energy_jax.optimizers)",
                    choice(optimizers.names)),
              *optimizers.fields().values()))


SECTIONS = ("model", "objective", "optimizer")

# Keys of earlier versions: {old key: (where it went, the version that moved it)}.
RENAMED = {
    "score": ("objective.name", "0.2"), "depth": ("model.depth", "0.2"),
    "widen_factor": ("model.widen_factor", "0.2"),
    "dropout_rate": ("model.dropout_rate", "0.2"), "dtype": ("model.dtype", "0.2"),
    "min_lr_ratio": ("optimizer.min_learning_rate (absolute: learning_rate * min_lr_ratio)",
                     "0.2"),
    **{k: (f"objective.{k}", "0.3") for k in ("m_in", "m_out", "auto_margins", "energy_weight",
                                              "oe_weight")},
    **{k: (f"optimizer.{k}", "0.3") for k in ("learning_rate", "min_learning_rate", "momentum",
                                              "nesterov", "weight_decay")},
}


def renamed_key(key: str, value: Any = None) -> Optional[str]:
  """``"KEY -> NEW (energy-jax V)"`` for a key of an earlier version (the string ``objective``
  of 0.2 included, which ``value`` tells from the section); None for a key of this one."""
  if key in RENAMED:
    new, version = RENAMED[key]
    return f"{key} -> {new} (energy-jax {version})"
  if key == "objective" and not isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return "objective -> objective.name (energy-jax 0.3: config.objective is a section)"
  return None


def check_renamed(config) -> None:
  """Raises naming the new path of every key of an earlier version that ``config`` still sets."""
  old = [m for k in config.keys() if (m := renamed_key(k, config[k]))]
  if old:
    raise ValueError("config keys renamed: " + ", ".join(old) + " (see CHANGELOG.md)")


def base_config() -> ml_collections.ConfigDict:
  """Every field at its default: the paper's pretraining recipe on CIFAR-10 (TFDS)."""
  c = ml_collections.ConfigDict()
  for f in fields():
    node = c
    *parents, leaf = f.name.split(".")
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    # A field of any type takes a number or a string such as "auto", also from the command line
    # (where ml_collections' config_flags reads its value as a Python literal, else a string).
    node[leaf] = (ml_collections.FieldReference(f.default, field_type=object) if f.any_type
                  else f.default)
  return c


def presets() -> Tuple[str, ...]:
  """The preset names (modules of ``energy_jax/config/presets``)."""
  return tuple(m.name for m in pkgutil.iter_modules(_presets.__path__))


# Presets of earlier versions: {old name: its name now}.
RENAMED_PRESETS = {"demo": "toy"}


def get_config(preset: str = "cifar10", stage: str = "pretrain") -> ml_collections.ConfigDict:
  """The base config with ``preset``'s overrides for ``stage``."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
  if preset in RENAMED_PRESETS and preset not in presets():
    raise ValueError(f"the preset {preset!r} is called {RENAMED_PRESETS[preset]!r} since "
                     "energy-jax 0.3")
  if preset not in presets():
    raise ValueError(f"unknown preset {preset!r}; choose one of {presets()}"
                     f"{did_you_mean(preset, presets())}")
  c = base_config()
  importlib.import_module(f"{_presets.__name__}.{preset}").override(c, stage)
  return c


# ----------------------------------------------------------------------------------------------
# Validation: each field's check, then the fields that must agree, before any work.

def flat_items(config, prefix: str = "") -> List[Tuple[str, Any]]:
  """``(dotted.name, value)`` of every leaf of ``config``."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += flat_items(v, f"{prefix}{k}.")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def _closest(name: str, known: Sequence[str]) -> str:
  return did_you_mean(name, known, "config.", quote=False)


def _not_a_field(name: str, model: Any, known: Sequence[str]) -> str:
  """The message for ``config.NAME``, which is none of the ``known`` fields of a config of
  ``model``."""
  if name.startswith("model."):
    own = sorted(k[len("model."):] for k in known if k.startswith("model.")
                 and k not in ("model.name", "model.dtype"))
    where = f"not a field of model {model!r} (its fields: {', '.join(own)})"
  elif name.split(".")[0] in SECTIONS:
    section = name.split(".")[0]
    where = (f"not a field of any registered {section} (energy_jax.{section}s.register "
             "declares them)")
  else:
    where = "not a config field"
  return f"config.{name} is {where}{_closest(name, known)}"


def _known_names(model: Any) -> List[str]:
  return [f.name for f in fields(model if model in models.names() else DEFAULT_MODEL)]


def unknown_field(config, name: str) -> Optional[str]:
  """The message for an override ``--config.NAME=...`` that ``config`` has no field for (None
  when it has one, or a group of them such as ``model``)."""
  values = dict(flat_items(config))
  groups = {n.rsplit(".", i)[0] for n in values for i in range(1, n.count(".") + 1)}
  if name in values or name in groups:
    return None
  return _not_a_field(name, values.get("model.name"), list(values))


def _required(values: Dict[str, Any]) -> List[str]:
  """The fields a config must hold: all but those of the objectives and optimisers it does not
  choose (a config made before one of them was registered lacks its fields)."""
  objective = objectives.get(values["objective.name"])
  optimizer = optimizers.get(values["optimizer.name"])
  own = {f"objective.{f.name}" for f in objective.fields} | {
      f"optimizer.{f.name}" for f in (*optimizers.SCHEDULE_FIELDS, *optimizer.fields)}
  return [n for n in _known_names(values["model.name"])
          if n.split(".")[0] not in ("objective", "optimizer") or n.endswith(".name")
          or n in own]


def _check_keys(config) -> Dict[str, Any]:
  """``{dotted name: value}`` of ``config``, after refusing unknown and missing fields."""
  for section in SECTIONS:
    if not isinstance(config.get(section), ml_collections.ConfigDict):
      raise ValueError(f"config.{section} must be a ConfigDict of the {section}'s fields (name, "
                       f"...), got {config.get(section)!r}")
  values = dict(flat_items(config))
  choice(models.names)("model.name", values.get("model.name"))
  choice(objectives.names)("objective.name", values.get("objective.name"))
  choice(optimizers.names)("optimizer.name", values.get("optimizer.name"))
  known = _known_names(values["model.name"])
  for name in values:
    if name not in known:
      raise ValueError(_not_a_field(name, values["model.name"], known))
  missing = [name for name in _required(values) if name not in values
             and not (name.startswith("model.") and name not in ("model.name", "model.dtype"))]
  if missing:
    raise ValueError(f"config has no field {', '.join(missing)}: start from "
                     "energy_jax.config.get_config() or base_config(), which hold every field")
  return values


def validate(config) -> None:
  """Raises ``ValueError`` naming the field and its value for any value of ``config`` a run cannot
  start with; no data is read and nothing is written.

  Checks: renamed and unknown fields (naming the closest field), missing fields, each field's
  check (declared with it: type and range or choices), sources some registered kind reads, and
  the fields that must agree: an outlier objective has ``outliers``, "auto" only in a field of
  the chosen objective, the chosen objective's own check (energy: ``m_in < m_out``), and
  ``optimizer.min_learning_rate <= optimizer.learning_rate``.
  """
  check_renamed(config)
  values = _check_keys(config)
  checks = {f.name: f.check for f in fields(values["model.name"])}
  for name, value in values.items():
    checks[name](name, value)
  objective = objectives.get(values["objective.name"])
  if objective.uses_outliers and not values["outliers"]:
    raise ValueError(f"config.outliers is empty, but config.objective.name = "
                     f"{values['objective.name']!r} trains on outlier images: set it to a "
                     "source of them")
  own = {f.name for f in objective.fields}
  for name in AUTO_FIELDS:
    if values.get(f"objective.{name}") == AUTO and name not in own:
      owner = next(n for n in objectives.names() if name in {f.name for f in
                                                               objectives.get(n).fields})
      raise ValueError(f"config.objective.{name} = {AUTO!r} is computed for the {owner} "
                       f"objective, but config.objective.name = {values['objective.name']!r}: "
                       f"set a number, or objective.name {owner!r}")
  if objective.check is not None:
    objective.check(config.objective)
  optimizers.check(config.optimizer)


def missing_source(source_: str, data_dir: str = "") -> Optional[str]:
  """Why ``source_`` cannot be read, for a source of a path kind (folder, ``.zip``, ``.npy``)
  that is not on the disk (relative paths read from ``data_dir``); None otherwise. Other kinds
  (``tfds:``, ``sklearn:``) and URLs are checked when they are read."""
  path = sources.join_data_dir(data_dir, source_)
  kind, location = sources.resolve(path)
  if (sources.SOURCES.get(kind).claims is None or storage.is_url(location)
      or os.path.exists(location)):
    return None
  where = f" (read from config.data_dir: {path})" if path != source_ else ""
  prefixed = [k for k in sources.SOURCES.names() if sources.SOURCES.get(k).claims is None]
  kinds = ", ".join(f"{k}:NAME" for k in prefixed) + ", or a path: folder, .zip or .npy"
  prefix = re.match(r"^([A-Za-z][\w.-]+):(?!//)", source_)
  if prefix:
    return (f"{source_!r}{where}: no such file or folder, and {prefix.group(1)!r} is no source "
            f"kind{did_you_mean(prefix.group(1), prefixed)} (sources: {kinds})")
  return f"{source_!r}{where}: no such file or folder"


def check_sources_exist(config, names: Sequence[str]) -> None:
  """Raises ``FileNotFoundError`` naming the field and the path at the first of the fields
  ``names`` (sources; '' is none) that :func:`missing_source` finds missing. Only the disk is
  looked at: the complement of :func:`validate` for a run about to read the sources."""
  for name in names:
    value = config.get(name)
    problem = missing_source(value, config.get("data_dir", "")) if value else None
    if problem:
      raise FileNotFoundError(f"config.{name} = {problem}")


def describe(config=None) -> str:
  """One line per field: ``--config.NAME (default): meaning``, with ``config``'s values."""
  values = dict(flat_items(config if config is not None else base_config()))
  declared = fields(values.get("model.name", DEFAULT_MODEL)
                    if values.get("model.name") in models.names() else DEFAULT_MODEL)
  width = max(len(f.name) for f in declared)
  return "\n".join(f"  --config.{f.name:<{width}}  {values.get(f.name, f.default)!r:>14}  "
                   f"{f.meaning}" for f in declared)
