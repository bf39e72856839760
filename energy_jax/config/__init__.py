"""The run configuration: every field with its default and meaning, the presets, and the renames.

``get_config(preset, stage)`` is the base config with a preset's overrides (the modules in
``energy_jax/config/presets/``) for ``stage`` "pretrain" or "finetune"; command lines override
single fields (``--config.model.depth=16``). ``describe()`` lists every field for ``--help``.
"""

from __future__ import annotations

import difflib
import importlib
import numbers
import os
import pkgutil
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from energy_jax.config import presets as _presets

STAGES = ("pretrain", "finetune")

# (field, default, meaning): the one definition of the config's fields.
FIELDS: Tuple[Tuple[str, Any, str], ...] = (
    ("dataset", "cifar10", "name of the in-distribution set (run names, margins of the presets)"),
    ("num_classes", 10, "classes of the in-distribution set (logits of the model)"),
    ("image_size", 32, "images are brought to image_size x image_size (Resize + CenterCrop)"),
    ("data_dir", "", "folder that relative source paths are read from ('' = the current folder)"),
    ("in_train", "tfds:cifar10", "training set: tfds:NAME, image folder, .zip or .npy"),
    ("in_train_split", "train", "split (subfolder) of in_train"),
    ("in_test", "tfds:cifar10", "test set, a source as in_train"),
    ("in_test_split", "test", "split (subfolder) of in_test"),
    ("outliers", "", "auxiliary outliers of the energy / OE objectives, a source as in_train"),
    ("outliers_split", "", "split (subfolder) of outliers ('' = none)"),
    ("train_subset", 0, "train on this many images drawn with the seed (0 = all)"),
    ("validation_base", "", "the set the --validate corruptions are made from (the paper: the "
     "other CIFAR's test set; '' = the ID test set)"),
    ("validation_base_split", "test", "split of validation_base"),
    ("validation_sets", ("uniform_noise", "arithmetic_mean", "geometric_mean", "jigsaw",
                         "speckle", "pixelate", "rgb_shift", "invert"),
     "the --validate sets (energy_jax.data.synthetic; the reference's eight)"),
    ("drop_remainder", False, "drop the last partial batch of an epoch (False: kept and padded, "
     "as the reference's DataLoader; BatchNorm and the loss see its real images only)"),
    ("outlier_sampling", "window", "window: a contiguous window of the outliers from a random "
     "offset each epoch (the reference) | shuffle: fresh permutations"),
    ("model.name", "wrn", "registered model (energy_jax.models.names())"),
    ("model.depth", 40, "WRN depth, 6n+4"),
    ("model.widen_factor", 2, "WRN channel multiplier k"),
    ("model.dropout_rate", 0.3, "dropout inside each WRN block"),
    ("model.pooling", "mean", "WRN final pooling: mean (global) | reference (avg_pool2d(8): the "
     "top-left 8x8 of a larger map)"),
    ("model.dtype", "float32", "compute dtype: float32 | bfloat16 (parameters, optimiser and "
     "BatchNorm statistics stay float32)"),
    ("objective", "ce", "training objective: ce | energy | oe (energy_jax.train.objectives)"),
    ("epochs", 100, "training epochs"),
    ("batch_size", 128, "in-distribution images per step (all devices)"),
    ("outlier_batch_size", 256, "outlier images per step (energy / oe), in the same forward pass"),
    ("learning_rate", 0.1, "peak learning rate of the per-step cosine schedule"),
    ("momentum", 0.9, "SGD momentum"),
    ("nesterov", True, "Nesterov momentum, as torch.optim.SGD(nesterov=True)"),
    ("weight_decay", 5e-4, "L2 decay added to the gradient of every parameter"),
    ("min_learning_rate", 1e-6, "the cosine ends at this rate (absolute, as the reference's "
     "LambdaLR floor 1e-6 / learning_rate)"),
    ("m_in", -23.0, "energy objective: in-distribution energies are pushed below m_in ('auto': "
     "from the pretrained model's energies, energy_jax.train.margins)"),
    ("m_out", -5.0, "energy objective: outlier energies are pushed above m_out ('auto': as m_in)"),
    ("auto_margins", "", "which of m_in, m_out the run computed from 'auto' (comma-separated; "
     "the run fills it in and saves the numbers it computed)"),
    ("energy_weight", 0.1, "weight of the energy-bounded term"),
    ("oe_weight", 0.5, "weight of the Outlier Exposure term"),
    ("pretrained", "", "weights to start from: a run directory, a reference .pt file or a name "
     "(energy_ood:cifar10_pretrained; python -m energy_jax.fetch list)"),
    ("seed", 1, "seed of initialisation, data order, augmentation and dropout"),
    ("num_devices", 0, "devices of the data-parallel mesh (0 = all)"),
    ("input_pipeline", "device", "device (data held on the accelerator) | tfdata (host stream)"),
    ("steps_per_call", 100, "steps fused into one compiled loop (device input)"),
    ("scan_unroll", 0, "unroll of the fused loop (0 = unrolled on CPU, rolled elsewhere)"),
    ("eval_batch_size", 1000, "images per batch when evaluating"),
    ("eval_every_epochs", 1, "test-set evaluation cadence (always after the last epoch)"),
    ("checkpoint_every_epochs", 1, "checkpoint cadence (always after the last epoch)"),
    ("keep_checkpoints", 2, "checkpoints kept in <workdir>/checkpoints"),
    ("progress_bar", True, "a progress bar per epoch"),
    ("tensorboard", True, "per-epoch scalars in <workdir>/tensorboard (needs TensorFlow)"),
    ("resume_override", "", "comma-separated fields allowed to differ from the config a resumed "
     "run started with (energy_jax.config.resume)"),
)

# Keys of energy-jax 0.1 and where they went.
RENAMED = {"score": "objective", "depth": "model.depth", "widen_factor": "model.widen_factor",
           "dropout_rate": "model.dropout_rate", "dtype": "model.dtype",
           "min_lr_ratio": "min_learning_rate (absolute: learning_rate * min_lr_ratio)"}


# The fields that take a number or "auto" (computed by the run: energy_jax.train.margins).
AUTO = "auto"
AUTO_FIELDS = ("m_in", "m_out")


def base_config() -> ml_collections.ConfigDict:
  """Every field at its default: the paper's pretraining recipe on CIFAR-10 (TFDS)."""
  c = ml_collections.ConfigDict()
  for name, default, _ in FIELDS:
    node = c
    *parents, leaf = name.split(".")
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    # A field of type object takes a number or "auto", also from the command line (where
    # ml_collections' config_flags reads its value as a Python literal, else a string).
    node[leaf] = (ml_collections.FieldReference(default, field_type=object)
                  if name in AUTO_FIELDS else default)
  return c


def presets() -> Tuple[str, ...]:
  """The preset names (modules of ``energy_jax/config/presets``)."""
  return tuple(m.name for m in pkgutil.iter_modules(_presets.__path__))


def get_config(preset: str = "cifar10", stage: str = "pretrain") -> ml_collections.ConfigDict:
  """The base config with ``preset``'s overrides for ``stage``."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
  if preset not in presets():
    raise ValueError(f"unknown preset {preset!r}; choose one of {presets()}"
                     f"{did_you_mean(preset, presets())}")
  c = base_config()
  importlib.import_module(f"{_presets.__name__}.{preset}").override(c, stage)
  return c


def check_renamed(config) -> None:
  """Raises naming the new path of every 0.1 key ``config`` still sets."""
  old = [k for k in RENAMED if k in config]
  if old:
    raise ValueError("config keys renamed in energy-jax 0.2: " + ", ".join(
        f"{k} -> {RENAMED[k]}" for k in old) + " (see the README's table)")


# ----------------------------------------------------------------------------------------------
# Validation: a check per field of FIELDS, run before any work.

Check = Callable[[str, Any], None]


def _fail(name: str, value: Any, requirement: str) -> None:
  raise ValueError(f"config.{name} must be {requirement}, got {value!r}")


def _is_int(value: Any) -> bool:
  # bool is an int to Python, and ConfigDict accepts True for an integer field.
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


# JAX computes with 32-bit integers (step counters, shapes, labels) unless x64 is enabled.
INT32_MAX = 2 ** 31 - 1


def integer(low: Optional[int] = None, high: Optional[int] = None, why: str = "",
            label: str = "") -> Check:
  """An integer in ``[low, high)`` (None: unbounded, but within int32 all the same); ``why`` says
  what is wrong outside, ``label`` names the range instead of ``>= low`` (e.g. "a positive
  integer")."""
  def check(name, value):
    if not _is_int(value):
      _fail(name, value, "an integer")
    if (low is not None and value < low) or (high is not None and value >= high):
      _fail(name, value, (label or (f"in [{low}, {high})" if high is not None else f">= {low}"))
            + (f" ({why})" if why else ""))
    if high is None and not -INT32_MAX - 1 <= value <= INT32_MAX:
      _fail(name, value, f"in [{-INT32_MAX - 1 if low is None else low}, {INT32_MAX}] (JAX's "
            "integers are 32-bit)")
  return check


# Seeds: numpy takes any non-negative integer, JAX's keys keep 32 bits.
SEED_LIMIT = 2 ** 32
SEED_WHY = ("numpy's seeds are non-negative, and JAX's keys hold 32 bits: PRNGKey(2**32) is "
            "PRNGKey(0)")


def check_seed(value: Any, name: str = "seed") -> None:
  """Raises ``ValueError`` naming ``name`` (e.g. a command-line flag) unless ``value`` is an
  integer seed in ``[0, 2**32)``."""
  if not _is_int(value) or not 0 <= value < SEED_LIMIT:
    raise ValueError(f"{name} must be an integer in [0, {SEED_LIMIT}) ({SEED_WHY}), got "
                     f"{value!r}")


positive = integer(1, label="a positive integer")


# Real fields and the detectors' traced hyper-parameters are computed in float32. XLA flushes
# its subnormal numbers to 0, so that the nonzero values it keeps lie in [TINY, MAX] in magnitude.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def float32_problem(value: float) -> Optional[str]:
  """"overflows" for a finite ``value`` beyond float32's largest finite number, "underflows" for
  a nonzero one that float32 holds below its smallest normal number (computed as 0), else
  None."""
  v = float(value)
  with np.errstate(over="ignore", under="ignore"):
    f = np.float32(v)
  if np.isfinite(v) and np.isinf(f):
    return "overflows"
  if v != 0 and abs(f) < FLOAT32_TINY:
    return "underflows"
  return None


def float32_range(low: float = -np.inf, high: float = np.inf, low_open: bool = False,
                  high_open: bool = False) -> str:
  """The values of the interval ``low .. high`` that float32 holds (see
  :func:`float32_problem`), as what a value "must be": e.g. ``0 or in [1.1754944e-38,
  3.4028235e+38]``."""
  parts = []
  for a, b in ((-FLOAT32_MAX, -FLOAT32_TINY), (FLOAT32_TINY, FLOAT32_MAX)):
    lo, lo_open = (low, low_open) if low > a else (a, False)
    hi, hi_open = (high, high_open) if high < b else (b, False)
    if lo < hi or (lo == hi and not (lo_open or hi_open)):
      parts.append(f"in {'(' if lo_open else '['}{lo:.8g}, {hi:.8g}{')' if hi_open else ']'}")
    if a < 0 and (low < 0 or (low == 0 and not low_open)) and (
        high > 0 or (high == 0 and not high_open)):
      parts.append("0")
  return " or ".join(parts)


def check_float32(name: str, value: Any, low: float = -np.inf, high: float = np.inf,
                  low_open: bool = False, high_open: bool = False) -> None:
  """Raises ``ValueError`` naming ``name``, the value and the float32 values of its interval
  ``low .. high`` when float32 cannot hold the number ``value`` (see :func:`float32_problem`)."""
  problem = float32_problem(value)
  if problem:
    raise ValueError(f"{name} = {value!r} {problem} float32, in which it is computed: it must "
                     f"be {float32_range(low, high, low_open, high_open)}")


def real(low: float = -np.inf, high: float = np.inf, *, low_open: bool = False,
         high_open: bool = False) -> Check:
  """A finite number in the interval ``low .. high`` (ends open or closed) that float32 holds."""
  def check(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
      _fail(name, value, "a number")
    if not np.isfinite(value):
      _fail(name, value, "finite")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
      _fail(name, value, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            if np.isfinite(low) and np.isfinite(high) else
            f"{'>' if low_open else '>='} {low}" if np.isfinite(low) else
            f"{'<' if high_open else '<='} {high}")
    problem = float32_problem(value)
    if problem:
      _fail(name, value, f"{float32_range(low, high, low_open, high_open)} (the run computes in "
            f"float32, where it {problem})")
  return check


def margin(name: str, value: Any) -> None:
  """A finite number, or "auto"."""
  if isinstance(value, str) and value == AUTO:
    return
  if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
    _fail(name, value, f"a number or {AUTO!r}")
  real()(name, value)


def _auto_margins(name: str, value: Any) -> None:
  """'' or some of AUTO_FIELDS, comma-separated."""
  string()(name, value)
  if any(f not in AUTO_FIELDS for f in field_names(value)):
    _fail(name, value, f"'' or some of {', '.join(AUTO_FIELDS)}, comma-separated")


def boolean(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    _fail(name, value, "True or False")


def string(nonempty: bool = False) -> Check:
  def check(name, value):
    if not isinstance(value, str):
      _fail(name, value, "a string")
    if nonempty and not value:
      _fail(name, value, "a non-empty string")
  return check


def choice(choices: Callable[[], Sequence[str]]) -> Check:
  """One of ``choices()`` (a callable: registries fill in after this module is imported); the
  message names the closest choice to a misspelt one."""
  def check(name, value):
    known = tuple(choices())
    if not isinstance(value, str) or value not in known:
      close = did_you_mean(value, known) if isinstance(value, str) else ""
      raise ValueError(f"config.{name} must be one of {', '.join(map(repr, known))}, got "
                       f"{value!r}{close}")
  return check


def source(name: str, value: Any) -> None:
  """A data source some registered kind reads (``tfds:NAME``, a folder, ``.zip``, ``.npy``)."""
  string(nonempty=True)(name, value)
  from energy_jax.data import sources
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
  from energy_jax.data import synthetic
  if not isinstance(value, (tuple, list)) or not value or not all(
      isinstance(v, str) for v in value):
    _fail(name, value, "a non-empty tuple of names")
  unknown = [v for v in value if v not in synthetic.VALIDATION_SETS]
  if unknown:
    raise ValueError(f"config.{name} = {tuple(value)!r} holds unknown set(s) "
                     f"{', '.join(map(repr, unknown))}; known (energy_jax.data.synthetic): "
                     f"{', '.join(synthetic.VALIDATION_SETS)}")


def _objectives():
  from energy_jax.train import objectives
  return objectives.names()


def _models():
  from energy_jax import models
  return models.names()


def _dtypes():
  from energy_jax import models
  return tuple(models.DTYPES)


def _outlier_sampling():
  from energy_jax.data import sampling
  return sampling.OUTLIER_SAMPLING


def _poolings():
  from energy_jax.models import wrn
  return wrn.POOLINGS


def _input_pipelines():
  from energy_jax.train import loop
  return loop.INPUT_PIPELINES


def field_names(text: str) -> List[str]:
  """The names in a comma-separated list such as ``resume_override``."""
  return [part.strip() for part in text.split(",") if part.strip()]


def _field_names(name: str, value: Any) -> None:
  """Comma-separated names of fields of FIELDS ('' for none)."""
  string()(name, value)
  known = [field for field, _, _ in FIELDS]
  unknown = [f for f in field_names(value) if f not in known]
  if unknown:
    raise ValueError(f"config.{name} = {value!r} names unknown field(s) {', '.join(unknown)}"
                     f"{_closest(unknown[0], known)}")


def _wrn_depth(name: str, value: Any) -> None:
  integer(10)(name, value)
  if (value - 4) % 6:
    _fail(name, value, "6n+4 (10, 16, 22, 28, 40, ...: n blocks per group of the WRN)")


# The check of each field of FIELDS (tests/test_validation.py holds the two tables in step).
CHECKS: Dict[str, Check] = {
    "dataset": string(nonempty=True),
    "num_classes": integer(2, why="a softmax over one class is constant"),
    "image_size": positive,
    "data_dir": string(),
    "in_train": source,
    "in_train_split": string(),
    "in_test": source,
    "in_test_split": string(),
    "outliers": optional_source,
    "outliers_split": string(),
    "train_subset": integer(0),
    "validation_base": optional_source,
    "validation_base_split": string(),
    "validation_sets": _validation_sets,
    "drop_remainder": boolean,
    "outlier_sampling": choice(_outlier_sampling),
    "model.name": choice(_models),
    "model.depth": _wrn_depth,
    "model.widen_factor": positive,
    "model.dropout_rate": real(0.0, 1.0, high_open=True),
    "model.pooling": choice(_poolings),
    "model.dtype": choice(_dtypes),
    "objective": choice(_objectives),
    "epochs": positive,
    "batch_size": positive,
    "outlier_batch_size": positive,
    "learning_rate": real(0.0, low_open=True),
    "momentum": real(0.0, 1.0, high_open=True),
    "nesterov": boolean,
    "weight_decay": real(0.0),
    "min_learning_rate": real(0.0),
    "m_in": margin,
    "m_out": margin,
    "auto_margins": _auto_margins,
    "energy_weight": real(0.0),
    "oe_weight": real(0.0),
    "pretrained": string(),
    "seed": integer(0, SEED_LIMIT, why=SEED_WHY),
    "num_devices": integer(0),
    "input_pipeline": choice(_input_pipelines),
    "steps_per_call": positive,
    "scan_unroll": integer(0),
    "eval_batch_size": positive,
    "eval_every_epochs": integer(1),
    "checkpoint_every_epochs": integer(1),
    "keep_checkpoints": integer(1, why="0 would leave no checkpoint"),
    "progress_bar": boolean,
    "tensorboard": boolean,
    "resume_override": _field_names,
}

# The model fields of FIELDS are those of the default model (the WRN); another registered model's
# own fields are checked against the types of its factory's defaults.
DEFAULT_MODEL = dict((name, default) for name, default, _ in FIELDS)["model.name"]


def _typed_like(default: Any) -> Check:
  if isinstance(default, bool):
    return boolean
  if isinstance(default, int):
    return integer()
  if isinstance(default, float):
    return real()
  if isinstance(default, str):
    return string()
  return lambda name, value: None


def did_you_mean(name: str, known: Sequence[str], prefix: str = "", quote: bool = True) -> str:
  """``"; did you mean 'X'?"`` for the entry X of ``known`` closest to ``name`` ('' if none is
  close): ``prefix`` goes before X, which is quoted unless ``quote`` is False."""
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  if not close:
    return ""
  return f"; did you mean {prefix}{close[0]!r}?" if quote else f"; did you mean {prefix}{close[0]}?"


def _closest(name: str, known: Sequence[str]) -> str:
  return did_you_mean(name, known, "config.", quote=False)


def _not_a_field(name: str, model: Any, model_fields: Sequence[str], known: Sequence[str]) -> str:
  """The message for ``config.NAME``, which is none of the ``known`` fields (``model_fields``:
  those of ``model``, dotted)."""
  where = (f"not a field of model {model!r} (its fields: "
           f"{', '.join(sorted(k[len('model.'):] for k in model_fields))})"
           if name.startswith("model.") else "not a config field")
  return f"config.{name} is {where}{_closest(name, known)}"


def unknown_field(config, name: str) -> Optional[str]:
  """The message for an override ``--config.NAME=...`` that ``config`` has no field for (None
  when it has one, or a group of them such as ``model``)."""
  values = dict(flat_items(config))
  groups = {n.rsplit(".", i)[0] for n in values for i in range(1, n.count(".") + 1)}
  if name in values or name in groups:
    return None
  model_fields = [n for n in values if n.startswith("model.") and n not in ("model.name",
                                                                           "model.dtype")]
  return _not_a_field(name, values.get("model.name"), model_fields, list(values))


def _check_keys(config) -> Dict[str, Any]:
  """``{dotted name: value}`` of ``config``, after refusing unknown and missing fields."""
  if not isinstance(config.get("model"), ml_collections.ConfigDict):
    raise ValueError(f"config.model must be a ConfigDict of the model's fields (name, dtype, ...), "
                     f"got {config.get('model')!r}")
  values = dict(flat_items(config))
  model = values.get("model.name")
  choice(_models)("model.name", model)
  from energy_jax import models
  model_fields = {f"model.{k}": v for k, v in models.spec_fields(model).items()}
  known = [name for name, _, _ in FIELDS if not name.startswith("model.")] + [
      "model.name", "model.dtype", *model_fields]
  for name in values:
    if name not in known:
      raise ValueError(_not_a_field(name, model, list(model_fields), known))
  missing = [name for name in known if name not in values and name not in model_fields]
  if missing:
    raise ValueError(f"config has no field {', '.join(missing)}: start from "
                     "energy_jax.config.get_config() or base_config(), which hold every field")
  return values


def validate(config) -> None:
  """Raises ``ValueError`` naming the field and its value for any value of ``config`` a run cannot
  start with; no data is read and nothing is written.

  Checks: renamed and unknown fields (naming the closest field), missing fields, each field's
  type and range or choices (:data:`CHECKS`; another model's fields by the types of its
  factory's defaults), sources some registered kind reads, and the fields that must agree: an
  outlier objective has ``outliers``, the energy objective ``m_in < m_out`` (once neither is
  "auto", which only the energy objective takes), and ``min_learning_rate <= learning_rate``
  (the cosine falls from one to the other).
  """
  check_renamed(config)
  values = _check_keys(config)
  from energy_jax import models
  own_model = values["model.name"] == DEFAULT_MODEL
  model_defaults = models.spec_fields(values["model.name"])
  for name, value in values.items():
    field = name[len("model."):] if name.startswith("model.") else None
    if field in (None, "name", "dtype") or (own_model and name in CHECKS):
      CHECKS[name](name, value)
    else:
      _typed_like(model_defaults[field])(name, value)
  from energy_jax.train import objectives
  if objectives.get(values["objective"]).uses_outliers and not values["outliers"]:
    raise ValueError(f"config.outliers is empty, but config.objective = {values['objective']!r} "
                     "trains on outlier images: set it to a source of them")
  auto = [name for name in AUTO_FIELDS if values[name] == AUTO]
  if auto and values["objective"] != "energy":
    raise ValueError(f"config.{auto[0]} = {AUTO!r} is computed for the energy objective, but "
                     f"config.objective = {values['objective']!r}: set a number, or "
                     "objective 'energy'")
  if values["objective"] == "energy" and not auto and not values["m_in"] < values["m_out"]:
    raise ValueError(f"config.m_in = {values['m_in']} must lie below config.m_out = "
                     f"{values['m_out']}: the energy objective pushes in-distribution energies "
                     "below m_in and outlier energies above m_out")
  if values["min_learning_rate"] > values["learning_rate"]:
    raise ValueError(f"config.min_learning_rate = {values['min_learning_rate']} must not exceed "
                     f"config.learning_rate = {values['learning_rate']} (the cosine schedule "
                     "falls from the one to the other)")


def flat_items(config, prefix: str = "") -> List[Tuple[str, Any]]:
  """``(dotted.name, value)`` of every leaf of ``config``."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += flat_items(v, f"{prefix}{k}.")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def missing_source(source: str, data_dir: str = "") -> Optional[str]:
  """Why ``source`` cannot be read, for a source of a path kind (folder, ``.zip``, ``.npy``)
  that is not on the disk (relative paths read from ``data_dir``); None otherwise. Other kinds
  (``tfds:``, ``sklearn:``) and URLs are checked when they are read."""
  from energy_jax import storage
  from energy_jax.data import sources
  path = sources.join_data_dir(data_dir, source)
  kind, location = sources.resolve(path)
  if (sources.SOURCES.get(kind).claims is None or storage.is_url(location)
      or os.path.exists(location)):
    return None
  where = f" (read from config.data_dir: {path})" if path != source else ""
  prefixed = [k for k in sources.SOURCES.names() if sources.SOURCES.get(k).claims is None]
  kinds = ", ".join(f"{k}:NAME" for k in prefixed) + ", or a path: folder, .zip or .npy"
  prefix = re.match(r"^([A-Za-z][\w.-]+):(?!//)", source)
  if prefix:
    return (f"{source!r}{where}: no such file or folder, and {prefix.group(1)!r} is no source "
            f"kind{did_you_mean(prefix.group(1), prefixed)} (sources: {kinds})")
  return f"{source!r}{where}: no such file or folder"


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
  width = max(len(name) for name, _, _ in FIELDS)
  return "\n".join(f"  --config.{name:<{width}}  {values.get(name, default)!r:>14}  {text}"
                   for name, default, text in FIELDS)
