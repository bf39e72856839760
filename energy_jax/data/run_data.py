"""A run's data sets as its config names them: the training set, the test set and, for the
objectives that use them, the outliers."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from energy_jax.data import sources
from energy_jax.data.image_set import ImageSet


class RunData(NamedTuple):
  """``train`` (after ``config.train_subset``), ``test`` and ``outliers`` (None without them)."""
  train: ImageSet
  test: ImageSet
  outliers: Optional[ImageSet]


def run_sources(config, uses_outliers: bool):
  """``(source, split)`` of the training set, the test set and the outliers (None without an
  outlier objective), relative paths read from ``config.data_dir``: one definition for loading
  and for counting."""
  at = lambda source: sources.under(config.data_dir, source)
  return ((at(config.in_train), config.in_train_split or None),
          (at(config.in_test), config.in_test_split or None),
          (at(config.outliers), config.outliers_split or None) if uses_outliers else None)


def load_run_data(config, uses_outliers: bool,
                  cache: Optional[Dict[Tuple[str, Optional[str], int], Any]] = None) -> RunData:
  """Decodes the run's sets into memory and checks them against ``config``.

  ``cache``: a dict the caller keeps between runs of one process (e.g. pretraining then
  fine-tuning on the same data), so each source is decoded once.
  """
  train_src, test_src, outlier_src = run_sources(config, uses_outliers)
  size = int(config.image_size)
  train = sources.load_cached(cache, *train_src, size)
  test = sources.load_cached(cache, *test_src, size)
  for name, ds in (("in_train", train), ("in_test", test)):
    if ds.num_classes != config.num_classes:
      raise ValueError(f"config.{name} = {ds.source} has {ds.num_classes} classes, but "
                       f"config.num_classes = {config.num_classes}")
  if config.train_subset:
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(train))[:config.train_subset])
    train = train.subset(keep, f"subset {len(keep)}")
  outliers = None
  if outlier_src:
    outliers = sources.load_cached(cache, *outlier_src, size)
    if len(outliers) < config.outlier_batch_size:
      raise ValueError(f"outlier source {outliers.source} has {len(outliers)} images, fewer "
                       f"than one batch of {config.outlier_batch_size}")
  return RunData(train, test, outliers)


def count_run_data(config, uses_outliers: bool) -> Tuple[int, int, int]:
  """``(train after train_subset, test, outliers or 0)`` image counts, from the sources'
  listings where they have one (nothing decoded)."""
  train_src, test_src, outlier_src = run_sources(config, uses_outliers)
  num_train = sources.count(*train_src)
  if config.train_subset:
    num_train = min(num_train, config.train_subset)
  num_outliers = sources.count(*outlier_src) if outlier_src else 0
  return num_train, sources.count(*test_src), num_outliers
