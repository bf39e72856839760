"""OOD detection metrics, deployment thresholds and the energy margins of fine-tuning.

Scores follow the convention "higher = more in-distribution". ``ood_metrics`` reproduces the
reference's ``utils/display_results.py`` (FPR at 95% TPR, AUROC, AUPR, the in-distribution set as
the positive class) and adds AUPR-Out and the detection error; ``ood_positive=True`` reads the
FPR95 as OpenOOD v1.5 and pytorch-ood do, with OOD as the positive class (docs/detectors.md sets
the two side by side). Everything here is numpy (float64): metrics are computed once per table,
on the host.
"""

from __future__ import annotations

import warnings
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

from energy_jax.arrays import check_plain_real

FPR_METHODS = ("closest", "conservative")


class RocPoints(NamedTuple):
  """ROC at every distinct threshold, in decreasing threshold order."""
  thresholds: np.ndarray
  tps: np.ndarray
  fps: np.ndarray


def _is_float(dtype: np.dtype) -> bool:
  """numpy's floats and ml_dtypes' (bfloat16, the float8s: numpy files them under kind 'V')."""
  if np.issubdtype(dtype, np.floating):
    return True
  try:
    import ml_dtypes
    ml_dtypes.finfo(dtype)
    return True
  except (ImportError, TypeError, ValueError):
    return False


def _as_scores(x, name: str) -> np.ndarray:
  """``x`` as a checked 1-D array: floats of any width as float64 (exact), integers as they are
  (float64 would merge the integers above 2**53 that differ; :func:`_comparable` ranks them).
  Masked and complex arrays are refused (:func:`check_plain_real`)."""
  check_plain_real(x, name)
  arr = np.asarray(x)
  is_int = np.issubdtype(arr.dtype, np.integer)
  if not (is_int or _is_float(arr.dtype)):
    raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
  if arr.ndim > 1:
    raise ValueError(f"{name} must be one-dimensional, got shape {np.shape(x)}")
  arr = arr.reshape(-1) if is_int else arr.astype(np.float64).reshape(-1)
  if arr.size == 0:
    raise ValueError(f"{name} is empty")
  bad = ~np.isfinite(arr)
  if bad.any():
    raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), "
                     f"first at index {int(np.flatnonzero(bad)[0])}")
  return arr


def _comparable(pos: np.ndarray, neg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Two float64 arrays ordered and tied exactly as ``pos`` and ``neg`` are together: floats as
  they are; integer scores replaced by their rank among the distinct values of both (every
  metric here reads the order and the ties only)."""
  if pos.dtype == np.float64 and neg.dtype == np.float64:
    return pos, neg
  if pos.dtype.kind == "f" or neg.dtype.kind == "f":       # integers beside floats
    ints = neg if pos.dtype.kind == "f" else pos
    if np.abs(ints.astype(np.float64)).max() > 2.0 ** 53:
      raise TypeError(f"integer scores beyond 2**53 (here up to {np.abs(ints).max()}) cannot be "
                      "compared exactly with float scores; pass both arrays as integers or both "
                      "as floats")
    return pos.astype(np.float64), neg.astype(np.float64)
  both = np.concatenate([pos, neg])
  if both.dtype.kind == "f":          # int64 with uint64: numpy's common type is float64
    both = np.concatenate([pos.astype(object), neg.astype(object)])
  ranks = np.unique(both, return_inverse=True)[1].reshape(-1).astype(np.float64)
  return ranks[:pos.size], ranks[pos.size:]


def _score_pair(scores_pos, scores_neg, names=("scores_in", "scores_out")):
  return _comparable(_as_scores(scores_pos, names[0]), _as_scores(scores_neg, names[1]))


def _is_fraction(value, low_open: bool = True) -> bool:
  """Whether ``value`` is a real number in ``(0, 1]`` (``[0, 1]`` with ``low_open=False``)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    return False
  return (0.0 < value if low_open else 0.0 <= value) and value <= 1.0


def roc_points(scores_pos: np.ndarray, scores_neg: np.ndarray) -> RocPoints:
  """Cumulative true/false positives at each distinct score, thresholds descending.

  Tied scores form one threshold, so a tie is never split by input order.
  """
  scores = np.concatenate([scores_pos, scores_neg])
  is_pos = np.concatenate([np.ones(scores_pos.size, bool), np.zeros(scores_neg.size, bool)])
  order = np.argsort(-scores, kind="mergesort")
  scores, is_pos = scores[order], is_pos[order]
  last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tps = np.cumsum(is_pos, dtype=np.float64)[last_of_run]
  fps = (last_of_run + 1) - tps
  return RocPoints(scores[last_of_run], tps, fps)


def fpr_at_tpr(scores_in, scores_out, tpr_level: float = 0.95, method: str = "closest") -> float:
  """False-positive rate (OOD accepted as ID) where the TPR (ID accepted) is ``tpr_level``.

  ``method="closest"`` is the reference's rule: among the ROC points up to the first
  that reaches TPR 1, take the one whose TPR is closest to ``tpr_level`` (on a tie,
  the higher TPR). ``method="conservative"`` takes the first threshold whose TPR is
  at least ``tpr_level``.
  """
  if method not in FPR_METHODS:
    raise ValueError(f"unknown FPR method {method!r}; choose one of {FPR_METHODS}")
  if not _is_fraction(tpr_level):
    raise ValueError(f"tpr_level must lie in (0, 1], got {tpr_level!r}")
  pos, neg = _score_pair(scores_in, scores_out)
  roc = roc_points(pos, neg)
  tpr = roc.tps / pos.size
  if method == "conservative":
    idx = int(np.argmax(tpr >= tpr_level - 1e-12))
  else:
    last = int(np.searchsorted(roc.tps, roc.tps[-1]))
    candidates = np.arange(last, -1, -1)          # from full recall downwards
    idx = int(candidates[np.argmin(np.abs(tpr[candidates] - tpr_level))])
  return float(roc.fps[idx] / neg.size)


def auroc(scores_in, scores_out) -> float:
  """Area under the ROC curve (trapezoids; a tie counts one half)."""
  pos, neg = _score_pair(scores_in, scores_out)
  roc = roc_points(pos, neg)
  tpr = np.r_[0.0, roc.tps / pos.size]
  fpr = np.r_[0.0, roc.fps / neg.size]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores_pos, scores_neg) -> float:
  """Area under the precision-recall curve as the step sum ``sum_k (R_k - R_{k-1}) P_k``."""
  pos, neg = _score_pair(scores_pos, scores_neg, ("scores_pos", "scores_neg"))
  roc = roc_points(pos, neg)
  precision = roc.tps / (roc.tps + roc.fps)
  recall = np.r_[0.0, roc.tps / pos.size]
  return float(np.sum(np.diff(recall) * precision))


def detection_error(scores_in, scores_out) -> float:
  """``min_threshold 0.5 * (1 - TPR) + 0.5 * FPR`` (equal priors)."""
  pos, neg = _score_pair(scores_in, scores_out)
  roc = roc_points(pos, neg)
  errors = 0.5 * (1 - roc.tps / pos.size) + 0.5 * roc.fps / neg.size
  return float(min(0.5, errors.min()))     # 0.5: the threshold above every score


def ood_metrics(scores_in, scores_out, recall_level: float = 0.95,
                fpr_method: Optional[str] = None, ood_positive: bool = False) -> Dict[str, float]:
  """Detection metrics of ID against OOD scores, all as fractions in [0, 1].

  Two conventions for the FPR95 (the other metrics do not depend on it):

  * ``ood_positive=False`` (the reference's, the default): ID is the positive class; ``fpr`` is
    the fraction of OOD examples accepted as ID at the threshold that keeps ``recall_level`` of
    the ID examples, by the reference's "closest" rule.
  * ``ood_positive=True`` (OpenOOD v1.5, pytorch-ood): OOD is the positive class; ``fpr`` is the
    fraction of ID examples rejected as OOD at the first threshold that detects at least
    ``recall_level`` of the OOD examples (``fpr[argmax(tpr >= 0.95)]`` of sklearn's
    ``roc_curve(is_ood, -score)``, the "conservative" rule).

  AUROC is the same number under both; ``aupr_in`` takes ID as positive and ``aupr_out`` OOD,
  whatever the convention; the detection error is symmetric.

  Args:
    scores_in: ``[N_in]`` scores of in-distribution examples (higher = more ID).
    scores_out: ``[N_out]`` scores of OOD examples.
    recall_level: the TPR at which the FPR is read (0.95 for FPR95).
    fpr_method: ``"closest"`` or ``"conservative"``; default: the convention's own rule.
    ood_positive: which class is positive for the FPR (see above).

  Returns:
    ``{"fpr": ..., "auroc": ..., "aupr_in": ..., "aupr_out": ..., "detection_error": ...}``;
    ``aupr_in`` is the reference's "AUPR".
  """
  pos, neg = _score_pair(scores_in, scores_out)
  method = fpr_method or ("conservative" if ood_positive else "closest")
  fpr = (fpr_at_tpr(-neg, -pos, recall_level, method) if ood_positive
         else fpr_at_tpr(pos, neg, recall_level, method))
  return {
      "fpr": fpr,
      "auroc": auroc(pos, neg),
      "aupr_in": average_precision(pos, neg),
      "aupr_out": average_precision(-neg, -pos),
      "detection_error": detection_error(pos, neg),
  }


def threshold_at_tpr(scores_in, tpr: float = 0.95) -> Union[float, int]:
  """The deployment threshold: the highest ``t`` with ``mean(scores_in >= t) >= tpr``.

  Fit it on held-out in-distribution scores (never the test set), then flag ``score < t`` as
  OOD: on data like the held-out set at least ``tpr`` of the ID inputs are accepted. It is the
  ``ceil(tpr * N)``-th largest held-out score (a float, or an int for integer scores: exact at
  any size).
  """
  if not _is_fraction(tpr):
    raise ValueError(f"tpr must lie in (0, 1], got {tpr!r}")
  s = np.sort(_as_scores(scores_in, "scores_in"))[::-1]
  keep = int(np.ceil(tpr * s.size - 1e-9))
  return s[max(keep, 1) - 1].item()


MARGIN_QUANTILES = (0.05, 0.95)


class InvertedEnergiesWarning(UserWarning):
  """:func:`suggest_margins` was given outliers less energetic than the ID images: the model
  scores the outliers as more in-distribution than the ID data."""


def suggest_margins(energies_in, energies_out,
                    quantiles: Tuple[float, float] = MARGIN_QUANTILES) -> Tuple[float, float]:
  """``(m_in, m_out)`` for the energy-bounded fine-tuning loss, from a pretrained model's free
  energies ``E(x) = -logsumexp f(x)`` on ID training images and on the auxiliary outliers.

  The rule: ``m_in`` is the ``quantiles[0]`` quantile of the ID energies and ``m_out`` the
  ``quantiles[1]`` quantile of the outlier energies (defaults 5% and 95%). Fine-tuning then pulls
  every ID energy down to where only the most confident 5% of ID images are now, and pushes every
  outlier up to where only the least confident 5% of outliers are now: margins in the model's own
  energy scale, beyond the two distributions but not far from them (the authors' advice for new
  data: take them from the pretrained model's energies and do not move them far, wetliu/energy_ood
  issues #13 and #21). They are a starting point for the validation of ``m_in`` / ``m_out``.

  When the outliers' median energy does not lie above the ID images' (the model scores the
  outliers as more in-distribution than the ID data, the case where fine-tuning has the most to
  do; or the arrays are swapped), the outliers' own quantile would put ``m_out`` below the ID
  energies. Both margins then come from the ID energies: ``m_in`` their ``quantiles[0]``
  quantile, ``m_out`` their ``quantiles[1]`` quantile, so that fine-tuning pulls the ID energies
  down and pushes the outliers above nearly all of them; an :class:`InvertedEnergiesWarning`
  says so.

  Returns:
    ``(m_in, m_out)``, ``m_in < m_out``.

  Raises:
    ValueError: for quantiles outside [0, 1], or where the rule gives ``m_in >= m_out`` (e.g.
      ``quantiles[0] >= quantiles[1]``, or ID energies all equal).
  """
  e_in = _as_scores(energies_in, "energies_in")
  e_out = _as_scores(energies_out, "energies_out")
  if np.shape(quantiles) != (2,) or not all(_is_fraction(q, low_open=False) for q in quantiles):
    raise ValueError(f"quantiles must lie in [0, 1] (two of them), got {quantiles!r}")
  q_in, q_out = quantiles
  median_in, median_out = float(np.median(e_in)), float(np.median(e_out))
  inverted = median_out <= median_in
  m_in = float(np.quantile(e_in, q_in))
  m_out = float(np.quantile(e_in if inverted else e_out, q_out))
  if m_in >= m_out:
    of = "the ID energies" if inverted else "the outliers' energies"
    raise ValueError(f"m_in {m_in:.4g} (the {q_in:g} quantile of the ID energies) is not below "
                     f"m_out {m_out:.4g} (the {q_out:g} quantile of {of}): choose "
                     "quantiles[0] lower or quantiles[1] higher")
  if inverted:
    warnings.warn(InvertedEnergiesWarning(
        f"the outliers' energies (median {median_out:.2f}) do not lie above the ID energies "
        f"(median {median_in:.2f}): the model scores the outliers as more in-distribution than "
        "the ID data (or energies_in and energies_out are swapped). The margins are chosen from "
        f"the ID energies alone: m_in {m_in:.2f} = their {100 * q_in:g}% quantile, m_out "
        f"{m_out:.2f} = their {100 * q_out:g}% quantile, so that fine-tuning pulls the ID "
        "energies down and pushes the outliers above nearly all of them"), stacklevel=2)
  return m_in, m_out
