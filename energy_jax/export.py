"""A deployable OOD detector as one Orbax artifact: the model, a fitted detector and its
threshold; :func:`load` returns a jitted ``is_ood(images)``.

    params = det.fit(train_features=..., ...)
    t = metrics.threshold_at_tpr(det.score(params, ...on held-out ID data...), tpr=0.95)
    export.save("ood_detector", config=config, variables=variables, detector=det, params=params,
                threshold=t)
    is_ood = export.load("ood_detector")       # in another process
    flags = is_ood(images_uint8)               # [N] bool: score < threshold

The folder holds ``arrays`` (the model's variables and the detector's fitted params, Orbax
``StandardSave``), ``meta`` (JSON: the run config, the detector's name and hyper-parameters,
the threshold, the package version) and ``sha256.json``, the integrity record of every other file
(:func:`energy_jax.checkpoints.integrity_record`, as for a training run's checkpoints), written
last. Detectors that take a device mesh are saved without it.

Nothing non-finite is saved or loaded (weights, fitted params, threshold), and :func:`load`
verifies the record before reading anything, then checks the meta and that the arrays fit the
model its config builds (the class count included): a damaged artifact raises ``ValueError``
saying ``is damaged`` and naming the part, a folder of something else ``is not an OOD-detector
artifact``.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from energy_jax import __version__, checkpoints, detectors, distributed, models, storage
from energy_jax.data import augment

# 2: the integrity record RECORD beside arrays/ and meta/.
ARTIFACT_FORMAT = 2
RECORD = "sha256.json"

# What each top-level folder of an artifact holds, to name the part a damaged file belongs to.
_PARTS = {"arrays": "arrays (the model's variables, the detector's params)",
          "meta": "meta (config, detector, threshold)"}


class Artifact(NamedTuple):
  """What an artifact holds: ``config`` (an ``ml_collections.ConfigDict``), the model's
  ``variables``, the ``detector``, its fitted ``params`` and the ``threshold``."""
  config: Any
  variables: Dict[str, Any]
  detector: detectors.Detector
  params: Any
  threshold: float


def _checkpointer():
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _damaged(path, problem: str) -> ValueError:
  return ValueError(f"OOD-detector artifact {path} is damaged: {problem}.\n"
                    "Its flags cannot be trusted: export the detector again (export.save).")


def _model_mismatch(config, variables) -> Optional[str]:
  """None if ``variables`` have the tensors, of the same shapes, that ``config``'s model
  initialises, else what differs, the class count first."""
  model = models.from_config(config)
  size = int(config.image_size)
  want = jax.eval_shape(lambda: models.lazy_init_variables(model, jax.random.PRNGKey(0),
                                                           (size, size, 3)))
  shapes = lambda tree: {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(x))
                         for k, x in jax.tree_util.tree_leaves_with_path(tree)}
  want, have = shapes(want), shapes(variables)
  diff = [f"{name}: saved {have.get(name, 'nothing')} vs {want.get(name, 'nothing')} from the "
          "config" for name in sorted(set(want) | set(have)) if want.get(name) != have.get(name)]
  if not diff:
    return None
  try:
    classes = np.shape(models.head(config, variables["params"])[1])[0]
  except (KeyError, TypeError, IndexError):       # no head where the model keeps it
    classes = None
  head = (f"config.num_classes is {int(config.num_classes)} but the classifier head has "
          f"{classes} outputs; " if classes is not None and classes != int(config.num_classes)
          else "")
  return f"{head}{len(diff)} tensor(s) differ, the first {diff[0]}"


def save(path: str, *, config, variables, detector: detectors.Detector, params,
         threshold: float) -> str:
  """Writes the artifact to the new folder ``path`` (a ``gs://`` URL too; refused if it exists);
  returns its path. Refused, before anything is written: non-finite weights, params or threshold
  (``FloatingPointError`` for arrays, as for checkpoints), and variables that do not fit the
  model ``config`` builds."""
  path = storage.check_reachable(path, "artifact")
  if path.exists():
    raise FileExistsError(f"{path} exists: give a new folder for the artifact")
  if detector.name not in detectors.names():
    raise ValueError(f"detector {detector.name!r} is not registered: it could not be loaded")
  if not np.isfinite(float(threshold)):
    raise ValueError(f"threshold must be finite, got {threshold!r}")
  if detector.fit_needs and not jax.tree_util.tree_leaves(params):
    raise ValueError(f"detector {detector.label!r} needs fitted params; got {params!r}")
  checkpoints.check_finite(variables, "the model to export")
  checkpoints.check_finite(params, f"the fitted detector {detector.label!r}")
  mismatch = _model_mismatch(config, variables)
  if mismatch:
    raise ValueError(f"the variables do not fit the model of the config ({mismatch}); the "
                     "artifact could not be loaded, so it is not saved")
  meta = {"format": ARTIFACT_FORMAT, "version": __version__, "config": config.to_dict(),
          "detector": {"name": detector.name, "hparams": detector.saved_hparams},
          "threshold": float(threshold)}
  # Empty containers (params of a detector that fits nothing, a model without batch
  # statistics) are not arrays to save: the meta says they are empty.
  arrays = {"variables": {k: v for k, v in variables.items() if jax.tree_util.tree_leaves(v)}}
  if jax.tree_util.tree_leaves(params):
    arrays["params"] = params
  meta["empty_variables"] = sorted(set(variables) - set(arrays["variables"]))
  _write(path, arrays, meta)
  return str(path)


def _write(path, arrays: Dict[str, Any], meta: Dict[str, Any]) -> None:
  """Writes ``arrays`` and ``meta`` as it stands, then the integrity record of the files."""
  _checkpointer().save(path, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                meta=ocp.args.JsonSave(meta)))
  # Written last, so that an export cut short leaves a folder without one: refused at load.
  failed = ""
  if distributed.is_main_process():
    try:
      storage.write_text(path / RECORD, json.dumps(checkpoints.integrity_record(path), indent=0,
                                                   sort_keys=True))
    except OSError as e:
      failed = f"could not write the integrity record {path / RECORD}: {e}"
  if distributed.any_process(bool(failed)):
    raise OSError(failed or f"process 0 could not write the integrity record {path / RECORD}")


def _verify(path) -> None:
  """Raises unless every file the integrity record names is as it was saved."""
  record_path = path / RECORD
  if not record_path.exists():
    if not (path / "arrays").exists():
      found = sorted(p.name for p in path.iterdir())[:6]
      kind = (" (it holds a training run: export.save makes an artifact of a run's model)"
              if "checkpoints" in found else
              " (it is a training checkpoint)" if "state" in found else "")
      raise ValueError(f"{path} is not an OOD-detector artifact{kind}: it has neither {RECORD} "
                       f"nor arrays/, only {found}")
    raise _damaged(path, f"it has no integrity record {RECORD} (the export was cut short or the "
                   "file removed, or an energy-jax before artifact format 2 wrote it)")
  try:
    record = json.loads(storage.read_text(record_path))
  except (OSError, ValueError) as e:            # a decoding error is a ValueError too
    raise _damaged(path, f"its integrity record {RECORD} cannot be read ({_first_line(e)})"
                   ) from None
  if not (isinstance(record, dict) and record
          and all(isinstance(k, str) and isinstance(v, str) for k, v in record.items())):
    raise _damaged(path, f"its integrity record {RECORD} is not a JSON object of SHA-256 digests")
  missing, changed = checkpoints.record_differences(record, path)
  bad = [(name, "missing") for name in missing] + [(name, "changed") for name in changed]
  if bad:
    parts = sorted({_PARTS.get(name.split("/")[0], "Orbax checkpoint records")
                    for name, _ in bad})
    files = ", ".join(f"{name} {how}" for name, how in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise _damaged(path, f"in its {' and its '.join(parts)}, {files}{more} since the export "
                   f"(by its integrity record {RECORD})")


def _restore(path, part: str, args) -> Any:
  try:
    return _checkpointer().restore(path, ocp.args.Composite(**{part: args}))[part]
  except Exception as e:         # Orbax, TensorStore and json raise many types on bad files
    raise _damaged(path, f"Orbax cannot read its {_PARTS[part]} ({_first_line(e)})") from None


def _check_meta(path, meta) -> None:
  if not isinstance(meta, dict):
    raise _damaged(path, f"its meta is a {type(meta).__name__}, not a JSON object")
  if meta.get("format") != ARTIFACT_FORMAT:
    raise ValueError(f"{path} has artifact format {meta.get('format')}, this energy-jax reads "
                     f"{ARTIFACT_FORMAT}: load it with the energy-jax that exported it "
                     f"({meta.get('version')})")
  lacking = [k for k in ("config", "detector", "threshold") if k not in meta]
  if lacking:
    raise _damaged(path, f"its meta lacks {lacking}")
  t = meta["threshold"]
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
    raise _damaged(path, f"its meta's threshold is {t!r}, not a finite number")
  det = meta["detector"]
  if not (isinstance(det, dict) and isinstance(det.get("name"), str)
          and isinstance(det.get("hparams"), dict)):
    raise _damaged(path, f"its meta's detector is {det!r}, not a name and hyper-parameters")


def load_artifact(path: str) -> Artifact:
  """The :class:`Artifact` saved at ``path``, verified (see the module's doc)."""
  import ml_collections
  path = storage.check_reachable(path, "artifact")
  if not path.exists():
    raise FileNotFoundError(f"no OOD-detector artifact at {path}")
  if not path.is_dir():
    raise ValueError(f"{path} is not an OOD-detector artifact: it is a file, not a folder")
  _verify(path)
  meta = _restore(path, "meta", ocp.args.JsonRestore())
  _check_meta(path, meta)
  name, hparams = meta["detector"]["name"], meta["detector"]["hparams"]
  try:
    detector = detectors.create(name, **hparams)
  except (KeyError, TypeError, ValueError) as e:
    raise _damaged(path, f"its meta's detector {name!r} {hparams} cannot be made "
                   f"({_first_line(e)})") from None
  try:
    config = ml_collections.ConfigDict(meta["config"])
    models.from_config(config)
  except Exception as e:        # a missing or mistyped field: KeyError, AttributeError, ...
    raise _damaged(path, f"its meta's config builds no model ({_first_line(e)})") from None
  arrays = _restore(path, "arrays", ocp.args.StandardRestore())
  if not isinstance(arrays, dict) or not isinstance(arrays.get("variables"), dict):
    raise _damaged(path, "its arrays hold no model variables")
  variables = dict(arrays["variables"])
  for empty in meta.get("empty_variables", []):
    variables[empty] = {}
  params = arrays.get("params", {})
  if detector.fit_needs and not jax.tree_util.tree_leaves(params):
    raise _damaged(path, f"its arrays hold no fitted params for detector {detector.label!r}")
  try:
    checkpoints.check_finite(variables, "the model in its arrays", "it is not loaded")
    checkpoints.check_finite(params, "the fitted detector in its arrays", "it is not loaded")
  except FloatingPointError as e:
    raise _damaged(path, str(e)) from None
  mismatch = _model_mismatch(config, variables)
  if mismatch:
    raise _damaged(path, f"its arrays do not fit the model of its meta's config ({mismatch})")
  return Artifact(config, variables, detector, params, float(meta["threshold"]))


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
