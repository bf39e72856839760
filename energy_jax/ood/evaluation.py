"""The paper's OOD evaluation: detectors x OOD sets -> FPR95 / AUROC / AUPR tables.

Protocol of the reference (``CIFAR/test.py``): the whole ID test set is scored once; for each
OOD set, ``num_to_avg`` draws of ``len(test) // 5`` OOD images are scored and measured against
it, and the mean (and std) over draws is reported, then the mean over OOD sets. Detectors are
deterministic, so each OOD image is scored once and the draws pick among the scores (same
numbers, less compute). Draws are seeded: a run can be repeated exactly.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from energy_jax import detectors as detector_registry
from energy_jax import inference, models, parallel
from energy_jax.data import augment
from energy_jax.data.image_set import ImageSet
from energy_jax.detectors import Detector
from energy_jax.ood import metrics, report, scores

TEMPERATURES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Names of the paper's six test sets: TFDS names or the ODIN release's folders.
PAPER_OOD_SETS = {"textures": "tfds:dtd", "svhn": "tfds:svhn_cropped",
                  "places365": "tfds:places365_small", "lsun_c": "data/LSUN",
                  "lsun_r": "data/LSUN_resize", "isun": "data/iSUN"}
# What --validate tunes, and how: each detector's own grid.
TUNED = ("odin", "mahalanobis")


class Scorer:
  """Scores uint8 image sets with one model and any registered detector, batched on the devices
  of a mesh. ``head`` is the classifier's ``(W, b)`` (see :func:`energy_jax.models.head`)."""

  def __init__(self, model, variables, batch_size: int = 500, mesh=None, head=None):
    self.model = model
    self.variables = variables
    self.batch_size = batch_size
    self.mesh = mesh or parallel.make_mesh()
    self.head = head
    self._outputs: List[Tuple[np.ndarray, models.ModelOutput]] = []
    self._fitted: Dict[Detector, Any] = {}

  @classmethod
  def from_config(cls, config, variables, batch_size: int = 500, mesh=None) -> "Scorer":
    """The scorer of ``config``'s model around ``variables``."""
    return cls(models.from_config(config), variables, batch_size, mesh,
               models.head(config, variables["params"]))

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

  def fit(self, detectors: Sequence[Detector], train: ImageSet):
    """Fits each detector that needs fitting on the training set's outputs."""
    needing = [d for d in detectors if d.fit_needs and d not in self._fitted]
    if not needing:
      return
    out = self.outputs(train.images, any("train_blocks" in d.fit_needs for d in needing))
    inputs = {"train_logits": out.logits, "train_features": out.features,
              "train_blocks": out.blocks, "train_labels": train.labels, "head": self.head}
    for d in needing:
      self._fitted[d] = d.fit(**{k: inputs[k] for k in d.fit_needs})

  def score(self, detector: Detector, images: np.ndarray) -> np.ndarray:
    """``[N]`` float64 scores of ``detector`` for uint8 ``images`` (higher = more ID)."""
    if detector.fit_needs and detector not in self._fitted:
      raise RuntimeError(f"call fit([{detector.label}], train_set) before scoring with it")
    params = self._fitted.get(detector, {})
    if "images" not in detector.needs:
      out = self.outputs(images, "blocks" in detector.needs)
      inputs = {"logits": out.logits, "features": out.features, "blocks": out.blocks}
      return np.asarray(detector.score(params, **{k: inputs[k] for k in detector.needs}),
                        np.float64)
    model = (models.inference_fn(self.model), self.variables)
    parts = []
    for start, stop in inference.batch_bounds(len(images), self.batch_size):
      x = augment.normalize(images[start:stop])
      parts.append(np.asarray(detector.score(params, images=x, model=model), np.float64))
    return np.concatenate(parts)


def draw_metrics(scores_in: np.ndarray, scores_out: np.ndarray, num_draw: int, num_to_avg: int,
                 seed: int, log: Callable[[str], None] = print, name: str = "") -> Dict[str, float]:
  """Mean and std over ``num_to_avg`` seeded draws of ``num_draw`` OOD scores."""
  rng = np.random.default_rng(seed)
  if len(scores_out) < num_draw:
    log(f"note: OOD set {name} has {len(scores_out)} images, fewer than {num_draw}: using all")
    num_draw = len(scores_out)
  runs = [metrics.ood_metrics(scores_in, scores_out[rng.permutation(len(scores_out))[:num_draw]])
          for _ in range(num_to_avg)]
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
             log: Callable[[str], None] = print) -> Dict[str, Dict[str, Dict[str, float]]]:
  """``results[detector.label][ood_name] = metrics`` plus ``results[label]["mean"]``."""
  if not ood_sets:
    raise ValueError("no OOD sets to evaluate")
  num_draw = len(test) // 5
  results: Dict[str, Dict[str, Dict[str, float]]] = {}
  for det in detectors:
    s_in = scorer.score(det, test.images)
    per_set = {}
    for i, (name, ood) in enumerate(ood_sets.items()):
      s_out = scorer.score(det, ood.images)
      per_set[name] = draw_metrics(s_in, s_out, num_draw, num_to_avg, seed + i, log, name)
    keys = [k for k in next(iter(per_set.values())) if not k.endswith("_std") and k != "num_ood"]
    per_set["mean"] = {k: float(np.mean([per_set[n][k] for n in ood_sets])) for k in keys}
    results[det.label] = per_set
  return results


def tune(scorer: Scorer, test: ImageSet, validation_sets: Mapping[str, ImageSet],
         detector: Detector, train: Optional[ImageSet] = None, seed: int = 0,
         log: Callable[[str], None] = print) -> Detector:
  """The point of ``detector``'s grid with the lowest mean FPR95 on ``validation_sets``
  (``train``: what detectors that need fitting are fitted on)."""
  grid = list(detector.grid_points())
  if train is not None:
    scorer.fit(grid, train)
  res = evaluate(scorer, test, validation_sets, grid, 1, seed, log)
  best = min(grid, key=lambda g: res[g.label]["mean"]["fpr"])
  log(f"validation chose {best.label}")
  return best


def run(config, checkpoint: str, ood_sources: Mapping[str, str], workdir: str,
        detectors: Sequence[Detector], num_to_avg: int = 1, seed: int = 0,
        validate: bool = False, temperature_ablation: bool = False,
        log: Callable[[str], None] = print) -> Dict:
  """Loads the model and data, prints the markdown tables, writes JSON/CSV/plots to ``workdir``.

  ``ood_sources`` maps a name to a source (``tfds:NAME``, folder, zip, .npy) or
  ``synthetic:NAME``. With ``validate``, the detectors named in ``TUNED`` take the point of their
  grid with the lowest mean FPR95 on the synthetic validation sets, never the test sets.
  """
  from energy_jax import checkpoints
  from energy_jax.data import sources, synthetic
  variables = checkpoints.load_variables(checkpoint, config)
  size = int(config.image_size)
  at = lambda source: sources.under(config.data_dir, source)
  test = sources.load(at(config.in_test), config.in_test_split or None, size)
  if test.num_classes != config.num_classes:
    raise ValueError(f"{test.source} has {test.num_classes} classes, the model {config.num_classes}")
  ood = {}
  for name, src in ood_sources.items():
    ood[name] = (synthetic.make_ood_set(src.split(":", 1)[1], 2 * (len(test) // 5), seed, test)
                 if src.startswith("synthetic:") else sources.load(at(src), None, size))
  scorer = Scorer.from_config(config, variables)
  logits = scorer.outputs(test.images).logits
  result = classification_report(logits, test.labels)
  log(f"ID test error {100 * result['error']:.2f}%; misclassification detection (MSP): "
      f"FPR95 {100 * result.get('misclassification_fpr', float('nan')):.2f}, AUROC "
      f"{100 * result.get('misclassification_auroc', float('nan')):.2f}")
  chosen = list(detectors)
  train = None
  if any(d.fit_needs for d in chosen):
    train = sources.load(at(config.in_train), config.in_train_split or None, size)
    scorer.fit(chosen, train)
  if validate:
    val = {n: synthetic.make_ood_set(n, len(test) // 5, seed, test)
           for n in synthetic.VALIDATION_SETS}
    chosen = [tune(scorer, test, val, d, train, seed, log) if d.name in TUNED else d
              for d in chosen]
  results = evaluate(scorer, test, ood, chosen, num_to_avg, seed, log)
  log(report.markdown_table(results, list(ood)))
  extra = {"classification": result, "checkpoint": checkpoint, "num_to_avg": num_to_avg,
           "seed": seed}
  if temperature_ablation:
    abl = evaluate(scorer, test, ood,
                   [detector_registry.create("energy", temperature=float(t)) for t in TEMPERATURES],
                   num_to_avg, seed, log)
    log("| T | FPR95 | AUROC | AUPR |\n|---|---|---|---|")
    for t, (label, per_set) in zip(TEMPERATURES, abl.items()):
      m = per_set["mean"]
      log(f"| {t} | {100 * m['fpr']:.2f} | {100 * m['auroc']:.2f} | {100 * m['aupr_in']:.2f} |")
    extra["temperature_ablation"] = abl
  report.save_results(results, workdir, extra)
  energy = detector_registry.create("energy")
  s_in = scorer.score(energy, test.images)
  s_out = {n: scorer.score(energy, o.images) for n, o in ood.items()}
  report.plot_energy_histograms(s_in, s_out, os.path.join(workdir, "energy_histograms.png"))
  report.plot_roc_curves(s_in, s_out, os.path.join(workdir, "roc_energy.png"))
  return {"results": results, **extra}
