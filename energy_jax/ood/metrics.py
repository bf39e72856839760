"""OOD detection metrics with the in-distribution set as the positive class.

Scores follow the convention "higher = more in-distribution". ``ood_metrics``
reproduces the reference's ``utils/display_results.py`` (FPR at 95% TPR, AUROC,
AUPR) and adds AUPR-Out and the detection error. Everything here is numpy
(float64): metrics are computed once per table, on the host.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import numpy as np

FPR_METHODS = ("closest", "conservative")


class RocPoints(NamedTuple):
  """ROC at every distinct threshold, in decreasing threshold order."""
  thresholds: np.ndarray
  tps: np.ndarray
  fps: np.ndarray


def _as_scores(x, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                 or np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
  arr = arr.astype(np.float64).reshape(-1) if arr.ndim <= 1 else None
  if arr is None:
    raise ValueError(f"{name} must be one-dimensional, got shape {np.shape(x)}")
  if arr.size == 0:
    raise ValueError(f"{name} is empty")
  bad = ~np.isfinite(arr)
  if bad.any():
    raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), "
                     f"first at index {int(np.flatnonzero(bad)[0])}")
  return arr


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
  if not 0.0 < tpr_level <= 1.0:
    raise ValueError(f"tpr_level must lie in (0, 1], got {tpr_level}")
  pos = _as_scores(scores_in, "scores_in")
  neg = _as_scores(scores_out, "scores_out")
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
  pos = _as_scores(scores_in, "scores_in")
  neg = _as_scores(scores_out, "scores_out")
  roc = roc_points(pos, neg)
  tpr = np.r_[0.0, roc.tps / pos.size]
  fpr = np.r_[0.0, roc.fps / neg.size]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores_pos, scores_neg) -> float:
  """Area under the precision-recall curve as the step sum ``sum_k (R_k - R_{k-1}) P_k``."""
  pos = _as_scores(scores_pos, "scores_pos")
  neg = _as_scores(scores_neg, "scores_neg")
  roc = roc_points(pos, neg)
  precision = roc.tps / (roc.tps + roc.fps)
  recall = np.r_[0.0, roc.tps / pos.size]
  return float(np.sum(np.diff(recall) * precision))


def detection_error(scores_in, scores_out) -> float:
  """``min_threshold 0.5 * (1 - TPR) + 0.5 * FPR`` (equal priors)."""
  pos = _as_scores(scores_in, "scores_in")
  neg = _as_scores(scores_out, "scores_out")
  roc = roc_points(pos, neg)
  errors = 0.5 * (1 - roc.tps / pos.size) + 0.5 * roc.fps / neg.size
  return float(min(0.5, errors.min()))     # 0.5: the threshold above every score


def ood_metrics(scores_in, scores_out, recall_level: float = 0.95,
                fpr_method: str = "closest") -> Dict[str, float]:
  """Detection metrics of ID (positive) against OOD scores, all as fractions in [0, 1].

  Args:
    scores_in: ``[N_in]`` scores of in-distribution examples (higher = more ID).
    scores_out: ``[N_out]`` scores of OOD examples.
    recall_level: the TPR at which the FPR is read (0.95 for FPR95).
    fpr_method: ``"closest"`` (the reference's) or ``"conservative"``.

  Returns:
    ``{"fpr": ..., "auroc": ..., "aupr_in": ..., "aupr_out": ..., "detection_error": ...}``;
    ``aupr_in`` is the reference's "AUPR".
  """
  pos = _as_scores(scores_in, "scores_in")
  neg = _as_scores(scores_out, "scores_out")
  return {
      "fpr": fpr_at_tpr(pos, neg, recall_level, fpr_method),
      "auroc": auroc(pos, neg),
      "aupr_in": average_precision(pos, neg),
      "aupr_out": average_precision(-neg, -pos),
      "detection_error": detection_error(pos, neg),
  }
