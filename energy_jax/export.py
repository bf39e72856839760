"""A deployable OOD detector as one Orbax artifact: the model, a fitted detector and its
threshold; :func:`load` returns a jitted ``is_ood(images)``.

    params = det.fit(train_features=..., ...)
    t = metrics.threshold_at_tpr(det.score(params, ...on held-out ID data...), tpr=0.95)
    export.save("ood_detector", config=config, variables=variables, detector=det, params=params,
                threshold=t)
    is_ood = export.load("ood_detector")       # in another process
    flags = is_ood(images_uint8)               # [N] bool: score < threshold

The folder holds ``arrays`` (the model's variables and the detector's fitted params, Orbax
``StandardSave``) and ``meta`` (JSON: the run config, the detector's name and hyper-parameters,
the threshold, the package version). Detectors that take a device mesh are saved without it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from energy_jax import __version__, detectors, models, storage
from energy_jax.data import augment

ARTIFACT_FORMAT = 1


class Artifact(NamedTuple):
  """What an artifact holds: ``config`` (an ``ml_collections.ConfigDict``), the model's
  ``variables``, the ``detector``, its fitted ``params`` and the ``threshold``."""
  config: Any
  variables: Dict[str, Any]
  detector: detectors.Detector
  params: Any
  threshold: float


def _saved_hparams(detector: detectors.Detector) -> Dict[str, Any]:
  return {f.name: getattr(detector, f.name) for f in dataclasses.fields(detector)
          if f.metadata.get("saved", True)}


def _checkpointer():
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(path: str, *, config, variables, detector: detectors.Detector, params,
         threshold: float) -> str:
  """Writes the artifact to the new folder ``path`` (a ``gs://`` URL too; refused if it exists);
  returns its path."""
  path = storage.check_reachable(path, "artifact")
  if path.exists():
    raise FileExistsError(f"{path} exists: give a new folder for the artifact")
  if detector.name not in detectors.names():
    raise ValueError(f"detector {detector.name!r} is not registered: it could not be loaded")
  if not np.isfinite(float(threshold)):
    raise ValueError(f"threshold must be finite, got {threshold!r}")
  if detector.fit_needs and not jax.tree_util.tree_leaves(params):
    raise ValueError(f"detector {detector.label!r} needs fitted params; got {params!r}")
  meta = {"format": ARTIFACT_FORMAT, "version": __version__, "config": config.to_dict(),
          "detector": {"name": detector.name, "hparams": _saved_hparams(detector)},
          "threshold": float(threshold)}
  # Empty containers (params of a detector that fits nothing, a model without batch
  # statistics) are not arrays to save: the meta says they are empty.
  arrays = {"variables": {k: v for k, v in variables.items() if jax.tree_util.tree_leaves(v)}}
  if jax.tree_util.tree_leaves(params):
    arrays["params"] = params
  meta["empty_variables"] = sorted(set(variables) - set(arrays["variables"]))
  _checkpointer().save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                meta=ocp.args.JsonSave(meta)))
  return str(path)


def load_artifact(path: str) -> Artifact:
  """The :class:`Artifact` saved at ``path``."""
  import ml_collections
  path = storage.check_reachable(path, "artifact")
  if not path.is_dir():
    raise FileNotFoundError(f"no OOD-detector artifact at {path}")
  restored = _checkpointer().restore(path, ocp.args.Composite(
      arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  meta, arrays = restored["meta"], restored["arrays"]
  if meta.get("format") != ARTIFACT_FORMAT:
    raise ValueError(f"{path} has artifact format {meta.get('format')}, this energy-jax reads "
                     f"{ARTIFACT_FORMAT}")
  config = ml_collections.ConfigDict(meta["config"])
  variables = dict(arrays["variables"])
  for name in meta.get("empty_variables", []):
    variables[name] = {}
  detector = detectors.create(meta["detector"]["name"], **meta["detector"]["hparams"])
  return Artifact(config, variables, detector, arrays.get("params", {}), meta["threshold"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scores(model, detector, variables, params, images_uint8):
  x = augment.normalize(images_uint8)
  if "images" in detector.needs:
    return detector.score(params, images=x, model=(models.inference_fn(model), variables))
  out = model.apply(variables, x.astype(model.dtype), train=False)
  out = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), out)
  inputs = {"logits": out.logits, "features": out.features, "blocks": tuple(out.blocks)}
  return detector.score(params, **{k: inputs[k] for k in detector.needs})


def load(path: str) -> Callable[[Any], jax.Array]:
  """``is_ood(images)``: ``[N]`` bool, True where the detector's score falls below the saved
  threshold, for uint8 ``[N, H, W, 3]`` images of the model's input size (jitted; one compile
  per batch shape). ``is_ood.scores(images)`` gives the scores, ``is_ood.artifact`` the rest."""
  artifact = load_artifact(path)
  model = models.from_config(artifact.config)
  size = int(artifact.config.image_size)
  variables = jax.device_put(artifact.variables)
  params = jax.device_put(artifact.params)
  threshold = jnp.float32(artifact.threshold)

  def scores(images) -> jax.Array:
    shape, dtype = np.shape(images), getattr(images, "dtype", None)
    if dtype != np.uint8 or len(shape) != 4 or shape[1:] != (size, size, 3):
      raise ValueError(f"is_ood takes uint8 images [N, {size}, {size}, 3], got {dtype} "
                       f"{tuple(shape)}")
    return _scores(model, artifact.detector, variables, params, images)

  def is_ood(images) -> jax.Array:
    return scores(images) < threshold

  is_ood.scores = scores
  is_ood.artifact = artifact
  return is_ood
