"""Tables, result files and plots of the OOD evaluation."""

from __future__ import annotations

import io
import json
import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from energy_jax import storage
from energy_jax.ood import metrics


def markdown_table(results, ood_names: Sequence[str]) -> str:
  """The paper's layout: one row per OOD set (and the mean), FPR95 / AUROC / AUPR per detector (%)."""
  labels = list(results)
  head = "| OOD set | " + " | ".join(f"{l} FPR95 ↓ | AUROC ↑ | AUPR ↑" for l in labels) + " |"
  sep = "|---|" + "---|---|---|" * len(labels)
  rows = [head, sep]
  for name in list(ood_names) + ["mean"]:
    cells = []
    for l in labels:
      m = results[l][name]
      cells += [f"{100 * m['fpr']:.2f}", f"{100 * m['auroc']:.2f}", f"{100 * m['aupr_in']:.2f}"]
    rows.append(f"| {'**mean**' if name == 'mean' else name} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def temperature_table(temperatures: Sequence[float], results) -> str:
  """The energy score's mean FPR95 / AUROC / AUPR (%) at each temperature: ``results`` holds one
  detector per temperature, in the same order (see ``evaluation.energy_ablation``)."""
  rows = ["| T | FPR95 | AUROC | AUPR |", "|---|---|---|---|"]
  for t, per_set in zip(temperatures, results.values()):
    m = per_set["mean"]
    rows.append(f"| {t} | {100 * m['fpr']:.2f} | {100 * m['auroc']:.2f} | "
                f"{100 * m['aupr_in']:.2f} |")
  return "\n".join(rows)


def check_output_folder(workdir, what: str = "workdir"):
  """``workdir`` as a path (:func:`storage.check_reachable`), refused naming ``what``, the path
  and the fix where the results could not be written into it: a file, a folder that is not
  writable, a folder whose parent does not exist (a mistyped path, rather than a tree to make).
  Called before anything is loaded, so that the mistake does not surface after the scoring."""
  p = storage.check_reachable(workdir, what)
  if storage.is_url(p):
    return p
  if p.exists():
    if not p.is_dir():
      raise ValueError(f"{what} {p} is a file, not a folder: name another folder for the "
                       "results, or move the file away")
    if not os.access(p, os.W_OK | os.X_OK):
      raise ValueError(f"{what} {p} is not writable: name a folder you can write to, "
                       "or make it writable")
    return p
  parent = p.parent
  if not parent.exists():
    raise ValueError(f"{what} {p}: its parent folder {parent} does not exist: create it "
                     f"(mkdir -p {parent}) or name another folder")
  if not parent.is_dir():
    raise ValueError(f"{what} {p}: {parent} is a file, not a folder: name another folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{what} {p} cannot be made: its parent folder {parent} is not writable: "
                     "name a folder you can write to")
  return p


def save_results(results, workdir, extra: Optional[Dict] = None):
  """Writes ``ood_results.json`` and ``ood_results.csv`` into ``workdir`` (a folder or a
  ``gs://`` URL)."""
  workdir = storage.location(workdir)
  storage.write_text(workdir / "ood_results.json",
                     json.dumps({"results": results, **(extra or {})}, indent=1))
  rows = ["detector,ood_set,fpr95,auroc,aupr_in,aupr_out,detection_error\n"]
  for label, per_set in results.items():
    for name, m in per_set.items():
      rows.append(f"\"{label}\",{name},{m['fpr']:.6f},{m['auroc']:.6f},{m['aupr_in']:.6f},"
                  f"{m['aupr_out']:.6f},{m['detection_error']:.6f}\n")
  storage.write_text(workdir / "ood_results.csv", "".join(rows))


def plot_energy_histograms(scores_in: np.ndarray, scores_out: Mapping[str, np.ndarray],
                           path: str, title: str = "negative energy -E(x)"):
  """Histogram of ``-E(x)`` for ID vs each OOD set, with the 95%-TPR threshold marked."""
  plt = _pyplot()
  n = len(scores_out)
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
  threshold = np.quantile(scores_in, 0.05)      # 95% of ID scores lie above it
  for ax, (name, s_out) in zip(axes[0], scores_out.items()):
    bins = np.histogram_bin_edges(np.r_[scores_in, s_out], bins=60)
    ax.hist(scores_in, bins=bins, alpha=0.6, density=True, label="in-distribution")
    ax.hist(s_out, bins=bins, alpha=0.6, density=True, label=name)
    ax.axvline(threshold, color="k", ls="--", lw=1, label="TPR 95% threshold")
    ax.set_xlabel(title)
    ax.legend(fontsize=7)
  _save_figure(plt, fig, path)


def plot_roc_curves(scores_in: np.ndarray, scores_out: Mapping[str, np.ndarray], path: str):
  """ROC curves (ID positive) of one score against each OOD set, saved as PNG."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4))
  for name, s_out in scores_out.items():
    roc = metrics.roc_points(np.asarray(scores_in, np.float64), np.asarray(s_out, np.float64))
    ax.plot(np.r_[0, roc.fps / len(s_out)], np.r_[0, roc.tps / len(scores_in)],
            label=f"{name} (AUROC {100 * metrics.auroc(scores_in, s_out):.1f})")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("FPR (OOD accepted)")
  ax.set_ylabel("TPR (ID accepted)")
  ax.legend(fontsize=7)
  _save_figure(plt, fig, path)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")                   # files only: no display on servers and in CI
  import matplotlib.pyplot as plt
  return plt


def _save_figure(plt, fig, path):
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())
