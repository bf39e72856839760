"""The run configuration: every field with its default and meaning, the presets, and the renames.

``get_config(preset, stage)`` is the base config with a preset's overrides (the modules in
``energy_jax/config/presets/``) for ``stage`` "pretrain" or "finetune"; command lines override
single fields (``--config.model.depth=16``). ``describe()`` lists every field for ``--help``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, List, Tuple

import ml_collections

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
    ("m_in", -23.0, "energy objective: in-distribution energies are pushed below m_in"),
    ("m_out", -5.0, "energy objective: outlier energies are pushed above m_out"),
    ("energy_weight", 0.1, "weight of the energy-bounded term"),
    ("oe_weight", 0.5, "weight of the Outlier Exposure term"),
    ("pretrained", "", "weights to start from: a run directory or a reference .pt file"),
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
)

# Keys of energy-jax 0.1 and where they went.
RENAMED = {"score": "objective", "depth": "model.depth", "widen_factor": "model.widen_factor",
           "dropout_rate": "model.dropout_rate", "dtype": "model.dtype",
           "min_lr_ratio": "min_learning_rate (absolute: learning_rate * min_lr_ratio)"}


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
    node[leaf] = default
  return c


def presets() -> Tuple[str, ...]:
  """The preset names (modules of ``energy_jax/config/presets``)."""
  return tuple(m.name for m in pkgutil.iter_modules(_presets.__path__))


def get_config(preset: str = "cifar10", stage: str = "pretrain") -> ml_collections.ConfigDict:
  """The base config with ``preset``'s overrides for ``stage``."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
  if preset not in presets():
    raise ValueError(f"unknown preset {preset!r}; choose one of {presets()}")
  c = base_config()
  importlib.import_module(f"{_presets.__name__}.{preset}").override(c, stage)
  return c


def check_renamed(config) -> None:
  """Raises naming the new path of every 0.1 key ``config`` still sets."""
  old = [k for k in RENAMED if k in config]
  if old:
    raise ValueError("config keys renamed in energy-jax 0.2: " + ", ".join(
        f"{k} -> {RENAMED[k]}" for k in old) + " (see the README's table)")


def validate(config) -> None:
  """Raises, naming the field, for any value of ``config`` a run cannot start with."""
  check_renamed(config)


def flat_items(config, prefix: str = "") -> List[Tuple[str, Any]]:
  """``(dotted.name, value)`` of every leaf of ``config``."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += flat_items(v, f"{prefix}{k}.")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def describe(config=None) -> str:
  """One line per field: ``--config.NAME (default): meaning``, with ``config``'s values."""
  values = dict(flat_items(config if config is not None else base_config()))
  width = max(len(name) for name, _, _ in FIELDS)
  return "\n".join(f"  --config.{name:<{width}}  {values.get(name, default)!r:>14}  {text}"
                   for name, default, text in FIELDS)
