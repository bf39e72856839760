"""The paper's OOD evaluation: detectors x OOD sets -> FPR95 / AUROC / AUPR tables.

Protocol of the reference (``CIFAR/test.py``): the whole ID test set is scored once; for each
OOD set, ``num_to_avg`` draws of ``len(test) // 5`` OOD images are scored and measured against
it, and the mean (and std) over draws is reported, then the mean over OOD sets. Detectors are
deterministic, so each OOD image is scored once and the draws pick among the scores (same
numbers, less compute). Draws are seeded: a run can be repeated exactly.
"""

from __future__ import annotations

import os
import time
import zipfile
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from energy_jax import detectors as detector_registry
from energy_jax import inference, models, parallel, progress
from energy_jax.batching import map_batches
from energy_jax.data import augment
from energy_jax.data.image_set import ImageSet
from energy_jax.detectors import Detector, scores
from energy_jax.ood import metrics, protocol, report

TEMPERATURES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Scorer:
  """Scores uint8 image sets with one model and any registered detector. The model's outputs are
  computed once per image array, batched on the devices of a mesh; detectors score fixed-shape
  batches of ``batch_size`` (the last one padded), so each compiles once per detector (and once
  for a whole grid of its traced hyper-parameters). ``head`` is the classifier's ``(W, b)`` (see
  :func:`energy_jax.models.head`); ``progress_bar`` shows a bar per long step."""

  def __init__(self, model, variables, batch_size: int = 500, mesh=None, head=None,
               progress_bar: bool = False):
    self.model = model
    self.variables = variables
    self.batch_size = batch_size
    self.mesh = mesh or parallel.make_mesh()
    self.head = head
    self.progress_bar = progress_bar
    self.fit_seconds: Dict[Detector, float] = {}
    self._outputs: List[Tuple[np.ndarray, models.ModelOutput]] = []
    self._fitted: Dict[Detector, Any] = {}
    self._device_variables = None

  @classmethod
  def from_config(cls, config, variables, batch_size: int = 500, mesh=None,
                  progress_bar: bool = False) -> "Scorer":
    """The scorer of ``config``'s model around ``variables``."""
    return cls(models.from_config(config), variables, batch_size, mesh,
               models.head(config, variables["params"]), progress_bar)

  def outputs(self, images: np.ndarray, blocks: bool = False) -> models.ModelOutput:
    """The model's outputs for uint8 ``images`` (``blocks`` too if asked for), computed once
    per array."""
    for i, (cached, out) in enumerate(self._outputs):   # identity: ids are reused after GC
      if cached is images:
        if blocks and not out.blocks:
          out = inference.predict(self.model, self.variables, images, self.batch_size,
                                  self.mesh, blocks=True)
          self._outputs[i] = (images, out)
        return out
    out = inference.predict(self.model, self.variables, images, self.batch_size, self.mesh,
                            blocks)
    self._outputs.append((images, out))
    return out

  def apply_fn_and_variables(self):
    """``(apply_fn, variables)``, the ``model`` input of detectors that take images (the
    variables on the device)."""
    if self._device_variables is None:
      self._device_variables = jax.device_put(self.variables)
    return models.inference_fn(self.model), self._device_variables

  def fit(self, detectors: Sequence[Detector], train: ImageSet,
          validation: Optional[Tuple[ImageSet, Mapping[str, ImageSet]]] = None):
    """Fits each detector that needs fitting on the training set's outputs (and, for those
    fitted on validation data, on ``validation = (id_set, {name: ood_set})``)."""
    needing = [d for d in detectors if d.fit_needs and d not in self._fitted]
    if not needing:
      return
    out = self.outputs(train.images, any("train_blocks" in d.fit_needs for d in needing))
    inputs = {"train_logits": out.logits, "train_features": out.features,
              "train_blocks": out.blocks, "train_labels": train.labels, "head": self.head}
    if any("validation" in d.fit_needs for d in needing):
      if validation is None:
        names = [d.label for d in needing if "validation" in d.fit_needs]
        raise ValueError(f"{names} are fitted on validation sets: pass validation=(id_set, "
                         "{name: ood_set})")
      id_set, ood_sets = validation
      inputs["validation"] = (
          np.asarray(augment.normalize(id_set.images)),
          np.asarray(augment.normalize(np.concatenate([o.images for o in ood_sets.values()]))))
    if any("model" in d.fit_needs for d in needing):
      inputs["model"] = self.apply_fn_and_variables()
    bar = progress.bar(len(needing), "fit detectors", self.progress_bar)
    for d in needing:
      bar.set_postfix(detector=d.label)
      t0 = time.perf_counter()
      self._fitted[d] = jax.block_until_ready(d.fit(**inputs))
      self.fit_seconds[d] = time.perf_counter() - t0
      bar.update()
    bar.close()

  def score(self, detector: Detector, images: np.ndarray) -> np.ndarray:
    """``[N]`` float64 scores of ``detector`` for uint8 ``images`` (higher = more ID)."""
    if detector.fit_needs and detector not in self._fitted:
      raise RuntimeError(f"call fit([{detector.label}], train_set) before scoring with it")
    params = self._fitted.get(detector, {})
    if "images" in detector.needs:
      model = self.apply_fn_and_variables()
      fn = lambda x: detector.score(params, images=augment.normalize(x), model=model)
      return map_batches(fn, images, self.batch_size).astype(np.float64)
    out = self.outputs(images, "blocks" in detector.needs)
    available = {"logits": out.logits, "features": out.features, "blocks": tuple(out.blocks)}
    inputs = {k: available[k] for k in detector.needs}
    return map_batches(lambda batch: detector.score(params, **batch), inputs, self.batch_size,
                       num=len(images)).astype(np.float64)


def draws(num_images: int, num_draw: int, num_to_avg: int, seed: int) -> List[np.ndarray]:
  """The indices of the ``num_to_avg`` seeded draws of ``num_draw`` of ``num_images`` OOD images
  (all of them when there are fewer) that :func:`draw_metrics` reads."""
  rng = np.random.default_rng(seed)
  return [rng.permutation(num_images)[:num_draw] for _ in range(num_to_avg)]


def score_drawn(scorer: "Scorer", detector: Detector, images: np.ndarray, num_draw: int,
                num_to_avg: int, seed: int) -> np.ndarray:
  """``[len(images)]`` scores of the images the draws of :func:`draws` take, NaN for the others
  (no metric reads them, and one that did would refuse NaN): an OOD set larger than its draws
  is scored only where it is read."""
  needed = np.unique(np.concatenate(draws(len(images), num_draw, num_to_avg, seed)))
  if len(needed) == len(images):
    return np.asarray(scorer.score(detector, images))
  part = np.asarray(scorer.score(detector, images[needed]))
  out = np.full((len(images),), np.nan, np.result_type(part.dtype, np.float32))
  out[needed] = part
  return out


def draw_metrics(scores_in: np.ndarray, scores_out: np.ndarray, num_draw: int, num_to_avg: int,
                 seed: int, log: Callable[[str], None] = print, name: str = "",
                 ood_positive: bool = False, bar=None) -> Dict[str, float]:
  """Mean and std over ``num_to_avg`` seeded draws of ``num_draw`` OOD scores (``bar``: a
  :func:`progress.bar` advanced once per draw)."""
  if len(scores_out) < num_draw:
    log(f"note: OOD set {name} has {len(scores_out)} images, fewer than {num_draw}: using all")
    num_draw = len(scores_out)
  runs = []
  for drawn in draws(len(scores_out), num_draw, num_to_avg, seed):
    runs.append(metrics.ood_metrics(scores_in, scores_out[drawn], ood_positive=ood_positive))
    if bar is not None:
      bar.update()
  out = {}
  for key in runs[0]:
    vals = np.array([r[key] for r in runs])
    out[key], out[key + "_std"] = float(vals.mean()), float(vals.std())
  out["num_ood"] = num_draw
  return out


def classification_report(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """ID test error and the reference's misclassification detection (wrong = positive, -MSP)."""
  if len(np.unique(labels)) < 2:
    raise ValueError("the ID test set has a single class: neither the error rate nor "
                     "misclassification detection is meaningful")
  msp = np.asarray(scores.msp_score(logits), np.float64)
  wrong = logits.argmax(-1) != labels
  result = {"error": float(wrong.mean())}
  if wrong.any() and (~wrong).any():
    m = metrics.ood_metrics(-msp[wrong], -msp[~wrong])
    result.update({"misclassification_fpr": m["fpr"], "misclassification_auroc": m["auroc"],
                   "misclassification_aupr": m["aupr_in"]})
  return result


def evaluate(scorer: Scorer, test: ImageSet, ood_sets: Mapping[str, ImageSet],
             detectors: Sequence[Detector], num_to_avg: int = 1, seed: int = 0,
             log: Callable[[str], None] = print, ood_positive: bool = False,
             progress_bar: bool = False) -> Dict[str, Dict[str, Dict[str, float]]]:
  """``results[detector.label][ood_name] = metrics`` plus ``results[label]["mean"]``
  (``ood_positive``: the FPR95 with OOD as the positive class, see :func:`metrics.ood_metrics`).
  An OOD set is scored only where its draws read it (:func:`score_drawn`)."""
  if not ood_sets:
    raise ValueError("no OOD sets to evaluate")
  protocol.check_ood_names(ood_sets)
  protocol.check_num_to_avg(num_to_avg)
  num_draw = len(test) // 5
  # The scores first, then the draws: each step has its own bar, in its own unit.
  scored = []
  bar = progress.bar(len(detectors) * (1 + len(ood_sets)), "score", progress_bar)
  for det in detectors:
    bar.set_postfix(detector=det.label)
    s_in = scorer.score(det, test.images)
    bar.update()
    s_out = {}
    for i, (name, ood) in enumerate(ood_sets.items()):
      s_out[name] = score_drawn(scorer, det, ood.images, num_draw, num_to_avg, seed + i)
      bar.update()
    scored.append((det.label, s_in, s_out))
  bar.close()
  results: Dict[str, Dict[str, Dict[str, float]]] = {}
  # A single draw per set takes no time worth a bar.
  bar = progress.bar(len(detectors) * len(ood_sets) * num_to_avg, "draws",
                     progress_bar and num_to_avg > 1, unit="draw")
  for label, s_in, s_out in scored:
    bar.set_postfix(detector=label)
    per_set = {name: draw_metrics(s_in, s_out[name], num_draw, num_to_avg, seed + i, log, name,
                                  ood_positive, bar)
               for i, name in enumerate(ood_sets)}
    keys = [k for k in next(iter(per_set.values())) if not k.endswith("_std") and k != "num_ood"]
    per_set[protocol.MEAN] = {k: float(np.mean([per_set[n][k] for n in ood_sets]))
                              for k in keys}
    results[label] = per_set
  bar.close()
  return results


def tune(scorer: Scorer, test: ImageSet, validation_sets: Mapping[str, ImageSet],
         detector: Detector, train: Optional[ImageSet] = None, seed: int = 0,
         log: Callable[[str], None] = print, grid_source: str = "openood",
         progress_bar: bool = False) -> Detector:
  """The point of ``detector``'s grid (:meth:`Detector.grid_for` ``(grid_source)``) with the
  lowest mean FPR95 on ``validation_sets``, never on the test OOD sets (``train``: what
  detectors that need fitting are fitted on). Traced hyper-parameters make the whole grid one
  compiled program per batch shape."""
  grid = list(detector.grid_points(source=grid_source))
  if len(grid) == 1:
    return grid[0]
  if train is not None and detector.fit_needs:
    fitted = []
    for point in grid:           # a point this training set cannot fit (KNN's K > N) is skipped
      try:
        scorer.fit([point], train, (test, validation_sets))
        fitted.append(point)
      except ValueError as e:
        log(f"validation skips {point.label}: {e}")
    if not fitted:
      raise ValueError(f"no point of {detector.name}'s {grid_source} grid could be fitted")
    grid = fitted
  res = evaluate(scorer, test, validation_sets, grid, 1, seed, log, progress_bar=progress_bar)
  best = min(grid, key=lambda g: res[g.label]["mean"]["fpr"])
  log(f"validation chose {best.label} among {len(grid)} points of its {grid_source} grid")
  return best


# What torch.save writes: a zip archive holding NAME/data.pkl (since PyTorch 1.6), or a pickle
# that starts with torch's magic number (the older format, the reference's .pt files), or a tar
# archive (PyTorch < 0.4).
_TORCH_PICKLE_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _is_torch_file(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(262)
  if head.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as z:      # reads the directory at the end, not the arrays
        return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
      return False
  if head.startswith(b"\x80"):
    return _TORCH_PICKLE_MAGIC in head[:32]
  return head[257:262] == b"ustar"


def check_checkpoint(path: str, what: str = "checkpoint") -> None:
  """Raises naming ``what``, the path and what is expected if ``path`` is a local file that is
  no PyTorch checkpoint (a run's ``config.json``, a CSV, an image set): it is named before
  anything is loaded, rather than in the words of ``torch.load``. Folders and URLs are left to
  :func:`energy_jax.checkpoints.load_variables`."""
  from energy_jax import storage
  if not path or storage.is_url(path) or not os.path.isfile(path):
    return
  try:
    if _is_torch_file(path):
      return
  except OSError as e:
    raise OSError(f"{what} {path} cannot be read: {e.strerror or e}") from e
  folder = os.path.dirname(os.path.abspath(path))
  hint = (f"; its folder is a run folder: {what}={folder}"
          if os.path.isdir(os.path.join(folder, "checkpoints")) else "")
  raise ValueError(f"{what} {path} is a file but no PyTorch checkpoint (torch.save writes a zip "
                   "archive holding data.pkl, or a pickle): name a run folder (the --workdir of "
                   "experiments/pretrain.py or finetune.py, which holds checkpoints/) or a "
                   f"reference .pt file{hint}")


class EvaluationSets(NamedTuple):
  """The image sets of one evaluation: ``validation`` only where detectors are tuned or fitted on
  it, ``train`` only where detectors are fitted."""
  test: ImageSet
  ood: Dict[str, ImageSet]
  validation: Optional[Dict[str, ImageSet]]
  train: Optional[ImageSet]


class Measured(NamedTuple):
  """What :func:`measure` found: ``results[label][ood_name]`` (see :func:`evaluate`), the ID
  classification, the detectors as evaluated (validated ones at their chosen point), the energy
  ablation over :data:`TEMPERATURES` if asked for, and the energy scores the plots show."""
  results: Dict[str, Dict[str, Dict[str, float]]]
  classification: Dict[str, float]
  detectors: List[Detector]
  temperature_ablation: Optional[Dict[str, Dict[str, Dict[str, float]]]]
  energy_in: np.ndarray
  energy_out: Dict[str, np.ndarray]


def check_run_arguments(checkpoint: str, ood_sources: Mapping[str, Any], workdir,
                        num_to_avg: int):
  """``workdir`` as a path; raises ``ValueError`` for the mistakes that would otherwise surface
  after the scoring (the results cannot be written, a set name, the draws) or in PyTorch's words
  (a file that is no checkpoint, :func:`check_checkpoint`)."""
  workdir = report.check_output_folder(workdir)
  protocol.check_num_to_avg(num_to_avg)
  protocol.check_ood_names(ood_sources)
  check_checkpoint(checkpoint)
  return workdir


def load_scorer(config, checkpoint: str, progress_bar: bool = True) -> Scorer:
  """The :class:`Scorer` of ``config``'s model with the variables of ``checkpoint`` (a run folder,
  a reference ``.pt`` file or a fetchable name)."""
  from energy_jax import checkpoints
  variables = checkpoints.load_variables(checkpoint, config)
  return Scorer.from_config(config, variables, progress_bar=progress_bar)


def load_sets(config, ood_sources: Mapping[str, Any], detectors: Sequence[Detector],
              validate: bool = False, seed: int = 0) -> EvaluationSets:
  """The ID test set, the OOD sets of ``ood_sources`` (name -> :class:`protocol.OODSet` or a
  source string), the validation sets where ``validate`` or a detector is fitted on them, and the
  training set where a detector is fitted."""
  size = int(config.image_size)
  test = protocol.load_config_set(config, "in_test", size)
  if test.num_classes != config.num_classes:
    raise ValueError(f"{test.source} has {test.num_classes} classes, the model "
                     f"{config.num_classes}")
  as_set = lambda spec: spec if isinstance(spec, protocol.OODSet) else protocol.OODSet(spec)
  ood = {name: protocol.load_ood_set(config, as_set(spec), test, seed)
         for name, spec in ood_sources.items()}
  validation = None
  if validate or any("validation" in d.fit_needs for d in detectors):
    validation = protocol.validation_sets(config, test, seed)
  train = None
  if any(d.fit_needs for d in detectors):
    train = protocol.load_config_set(config, "in_train", size)
  return EvaluationSets(test, ood, validation, train)


def energy_ablation(scorer: Scorer, sets: EvaluationSets, num_to_avg: int, seed: int,
                    log: Callable[[str], None] = print, ood_positive: bool = False,
                    progress_bar: bool = False) -> Dict[str, Dict[str, Dict[str, float]]]:
  """:func:`evaluate` of the energy score at each temperature of :data:`TEMPERATURES`."""
  energies = [detector_registry.create("energy", temperature=float(t)) for t in TEMPERATURES]
  return evaluate(scorer, sets.test, sets.ood, energies, num_to_avg, seed, log, ood_positive,
                  progress_bar)


def measure(scorer: Scorer, sets: EvaluationSets, detectors: Sequence[Detector],
            num_to_avg: int = 1, seed: int = 0, validate: bool = False,
            temperature_ablation: bool = False, log: Callable[[str], None] = print,
            grid_source: str = "reference", ood_positive: bool = False,
            progress_bar: bool = False) -> Measured:
  """The protocol on loaded sets: the ID classification; with ``validate`` each detector tuned on
  the validation sets (:func:`tune`); the detectors that need it fitted; every detector measured
  on every OOD set over ``num_to_avg`` draws (:func:`evaluate`); the energy ablation."""
  classification = classification_report(scorer.outputs(sets.test.images).logits,
                                         sets.test.labels)
  chosen = list(detectors)
  if validate:
    chosen = [tune(scorer, sets.test, sets.validation, d, sets.train, seed, log, grid_source,
                   progress_bar) for d in chosen]
  if sets.train is not None:
    scorer.fit(chosen, sets.train,
               (sets.test, sets.validation) if sets.validation is not None else None)
  results = evaluate(scorer, sets.test, sets.ood, chosen, num_to_avg, seed, log, ood_positive,
                     progress_bar)
  ablation = None
  if temperature_ablation:
    ablation = energy_ablation(scorer, sets, num_to_avg, seed, log, ood_positive, progress_bar)
  energy = detector_registry.create("energy")
  return Measured(results, classification, chosen, ablation,
                  scorer.score(energy, sets.test.images),
                  {name: scorer.score(energy, o.images) for name, o in sets.ood.items()})


def run_summary(measured: Measured, checkpoint: str, num_to_avg: int, seed: int,
            ood_positive: bool) -> Dict[str, Any]:
  """What :func:`run` returns and ``ood_results.json`` holds: the results, the classification,
  the run's settings and each detector's hyper-parameters (the ablation where there is one)."""
  out = {"results": measured.results, "classification": measured.classification,
         "checkpoint": checkpoint, "num_to_avg": num_to_avg, "seed": seed,
         "ood_positive": ood_positive,
         "detectors": {d.label: {"name": d.name, **d.saved_hparams}
                       for d in measured.detectors}}
  if measured.temperature_ablation is not None:
    out["temperature_ablation"] = measured.temperature_ablation
  return out


def report_run(measured: Measured, summary: Dict[str, Any], workdir,
               log: Callable[[str], None] = print, write: bool = True) -> None:
  """Prints the classification, the markdown table (and the ablation's); with ``write``,
  writes the results (JSON, CSV) and the energy plots into ``workdir``."""
  c = measured.classification
  log(f"ID test error {100 * c['error']:.2f}%; misclassification detection (MSP): "
      f"FPR95 {100 * c.get('misclassification_fpr', float('nan')):.2f}, AUROC "
      f"{100 * c.get('misclassification_auroc', float('nan')):.2f}")
  ood_names = list(measured.energy_out)         # the OOD sets, in the order given
  log(report.markdown_table(measured.results, ood_names))
  if measured.temperature_ablation is not None:
    log(report.temperature_table(TEMPERATURES, measured.temperature_ablation))
  if write:
    report.save_results(summary["results"], workdir,
                        {k: v for k, v in summary.items() if k != "results"})
    report.plot_energy_histograms(measured.energy_in, measured.energy_out,
                                  workdir / "energy_histograms.png")
    report.plot_roc_curves(measured.energy_in, measured.energy_out, workdir / "roc_energy.png")


def run(config, checkpoint: str, ood_sources: Mapping[str, Any], workdir: str,
        detectors: Sequence[Detector], num_to_avg: int = 1, seed: int = 0,
        validate: bool = False, temperature_ablation: bool = False,
        log: Callable[[str], None] = print, grid_source: str = "reference",
        ood_positive: bool = False, progress_bar: bool = True) -> Dict:
  """Loads the model and data, prints the markdown tables, writes JSON/CSV/plots to ``workdir``.

  Any registered model (``config.model``) at any input size (``config.image_size``). ``ood_sources``
  maps a name to a :class:`~energy_jax.ood.protocol.OODSet` (the paper's:
  ``protocol.PAPER_OOD_SETS``) or a source string (``tfds:NAME``, folder, zip, .npy, resized; or
  ``synthetic:NAME``). The validation sets are :func:`protocol.validation_sets` (under the paper
  presets, corruptions of the other CIFAR's test set): with ``validate``, every
  detector whose grid (``grid_source``: "reference" = the reference's grids where it has them,
  OpenOOD v1.5's elsewhere; "openood") has several points takes the one with the lowest mean
  FPR95 on them, never on the test sets; detectors fitted on validation data (the multi-layer
  Mahalanobis) are fitted on them.

  Refused with a ValueError before anything is loaded: a ``workdir`` the results cannot be
  written to (:func:`report.check_output_folder`), ``num_to_avg`` outside [1,
  ``protocol.MAX_NUM_TO_AVG``], an OOD set named ``mean``, a ``checkpoint`` file that is no
  PyTorch checkpoint (:func:`check_checkpoint`).

  Returns :func:`run_summary`.
  """
  from energy_jax import distributed
  # Every process checks first, so that none is left waiting for the others; every process
  # scores its share of each batch (the gathers are collective); process 0 alone prints and
  # writes.
  workdir = check_run_arguments(checkpoint, ood_sources, workdir, num_to_avg)
  log = distributed.main_process_only(log)
  scorer = load_scorer(config, checkpoint, progress_bar)
  sets = load_sets(config, ood_sources, detectors, validate, seed)
  measured = measure(scorer, sets, detectors, num_to_avg, seed, validate, temperature_ablation,
                     log, grid_source, ood_positive, progress_bar)
  result = run_summary(measured, checkpoint, num_to_avg, seed, ood_positive)
  report_run(measured, result, workdir, log, write=distributed.is_main_process())
  return result
