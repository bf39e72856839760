"""``m_in`` / ``m_out`` = "auto": the margins of the energy objective from the pretrained model.

Before the first step, a run whose ``config.objective.m_in`` and/or ``m_out`` is "auto" computes
the free energies ``-logsumexp f(x)`` of the model it starts from on up to :data:`SAMPLE`
training images and :data:`SAMPLE` outliers (drawn with ``config.seed``) and takes
:func:`energy_jax.ood.metrics.suggest_margins` of them. From then on the run holds the numbers:
they are printed, saved in ``config.json`` and in every checkpoint's config, and
``config.objective.auto_margins`` names the fields they replaced. A resumed run takes them from its
checkpoint (a resumed model's energies would give other numbers).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Tuple

import ml_collections
import numpy as np

from energy_jax import config as config_lib, inference, models
from energy_jax.objectives import AUTO, AUTO_FIELDS

# Images of each set (training images, outliers) whose energies set the margins.
SAMPLE = 4096


def auto_fields(config) -> Tuple[str, ...]:
  """The margins ``config`` leaves to the run ("auto")."""
  return tuple(name for name in AUTO_FIELDS if config.objective.get(name) == AUTO)


def sample_indices(num: int, rng: np.random.Generator, limit: int = SAMPLE) -> np.ndarray:
  """All of ``range(num)``, or ``limit`` of them drawn by ``rng`` (sorted)."""
  if num <= limit:
    return np.arange(num)
  return np.sort(rng.choice(num, limit, replace=False))


def energies(config, variables, images: np.ndarray, mesh=None) -> np.ndarray:
  """Free energies ``-logsumexp f(x)`` (float64) of ``config``'s model with ``variables``."""
  logits = inference.predict(models.from_config(config), variables, images,
                             config.eval_batch_size, mesh, progress_bar=False).logits
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=1)
  return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


def with_margins(config, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A new config: ``config`` with the fields ``values`` of ``config.objective`` (types as the
  values)."""
  fields = config.to_dict()
  fields["objective"].update(values)
  return ml_collections.ConfigDict(fields)


def compute(config, variables, train_images: np.ndarray, outlier_images: np.ndarray, mesh=None,
            log: Callable[[str], None] = print) -> ml_collections.ConfigDict:
  """``config`` with its "auto" margins computed from the model ``variables`` (the pretrained
  one) and ``auto_margins`` naming them; ``config`` itself when none is "auto"."""
  from energy_jax.ood import metrics
  fields = auto_fields(config)
  if not fields:
    return (config if not config.objective.get("auto_margins")
            else with_margins(config, {"auto_margins": ""}))
  rng = np.random.default_rng(config.seed)
  take_in = sample_indices(len(train_images), rng)
  take_out = sample_indices(len(outlier_images), rng)
  e_in = energies(config, variables, np.asarray(train_images)[take_in], mesh)
  e_out = energies(config, variables, np.asarray(outlier_images)[take_out], mesh)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", metrics.InvertedEnergiesWarning)
    suggested = dict(zip(("m_in", "m_out"), metrics.suggest_margins(e_in, e_out)))
  for warning in caught:
    log(f"note: {warning.message}")
  resolved = with_margins(config, {**{name: suggested[name] for name in fields},
                                  "auto_margins": ",".join(fields)})
  log(f"margins from the energies of the pretrained model on {len(take_in)} training images "
      f"and {len(take_out)} outliers (energy_jax.ood.metrics.suggest_margins): "
      + ", ".join(f"{name} = {resolved.objective[name]!r}" for name in fields))
  config_lib.validate(resolved)     # m_in < m_out, where one of them was given as a number
  return resolved


def from_checkpoint(config, saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """``config`` of a resumed run with the margins the run computed when it started: its "auto"
  fields take the values of the checkpoint's config ``saved`` and ``auto_margins`` names those
  of the saved record that still hold the computed value
  (:func:`energy_jax.config.resume.check_resumable` has compared the rest)."""
  fields = auto_fields(config)
  saved = saved["objective"]
  values = {**config.objective.to_dict(), **{name: saved[name] for name in fields}}
  record = ",".join(name for name in config_lib.field_names(saved.get("auto_margins", ""))
                    if values.get(name) == saved.get(name))
  if not fields and record == config.objective.get("auto_margins", ""):
    return config
  return with_margins(config, {**{name: saved[name] for name in fields}, "auto_margins": record})


def resolve(config, variables, train_images: np.ndarray, outlier_images: Optional[np.ndarray],
            mesh=None, saved: Optional[Mapping[str, Any]] = None,
            log: Callable[[str], None] = print) -> ml_collections.ConfigDict:
  """The run's config with numbers for its margins: from the checkpoint's config ``saved`` when
  the run resumes, else computed from ``variables`` (:func:`compute`)."""
  if saved is not None:
    return from_checkpoint(config, saved)
  if auto_fields(config) and outlier_images is None:
    raise ValueError(f"config.objective.{auto_fields(config)[0]} = {AUTO!r} needs the outliers "
                     "(config.outliers) and the energy objective")
  return compute(config, variables, train_images, outlier_images, mesh, log)
