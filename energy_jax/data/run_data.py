"""A run's data sets as its config names them: the training set, the test set and, for the
objectives that use them, the outliers."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

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
  in_data_dir = lambda source: sources.join_data_dir(config.data_dir, source)
  return ((in_data_dir(config.in_train), config.in_train_split or None),
          (in_data_dir(config.in_test), config.in_test_split or None),
          (in_data_dir(config.outliers), config.outliers_split or None) if uses_outliers
          else None)


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
  check_same_classes(train.class_names, test.class_names)
  if config.train_subset:
    check_subset(config.train_subset, len(train), train.source)
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(train))[:config.train_subset])
    train = train.subset(keep, f"subset {len(keep)}")
  outliers = None
  if outlier_src:
    outliers = sources.load_cached(cache, *outlier_src, size)
    if len(outliers) < config.outlier_batch_size:
      raise ValueError(f"outlier source {outliers.source} has {len(outliers)} images, fewer "
                       f"than one batch of {config.outlier_batch_size}")
  return RunData(train, test, outliers)


def check_same_classes(train_classes: Sequence[str], test_classes: Sequence[str]) -> None:
  """Raises unless label ``k`` names the same class in the training and the test set.

  Labels index the sorted class names of each set on its own: a class folder missing from one
  set would shift every later label by one, and the test error would be measured against the
  wrong classes.
  """
  train_classes, test_classes = list(train_classes), list(test_classes)
  if train_classes == test_classes:
    return
  missing = [c for c in train_classes if c not in test_classes]
  extra = [c for c in test_classes if c not in train_classes]
  detail = ", ".join(part for part in (
      f"missing {', '.join(map(repr, missing))}" if missing else "",
      f"extra {', '.join(map(repr, extra))}" if extra else "") if part) or (
      "the same names in another order: labels would mean other classes")
  raise ValueError(f"config.in_test classes {test_classes} differ from config.in_train classes "
                   f"{train_classes}: {detail}")


def check_subset(train_subset: int, num_train: int, source: str) -> None:
  """Raises if ``config.train_subset`` asks for more images than the training set holds."""
  if train_subset > num_train:
    raise ValueError(f"config.train_subset = {train_subset} exceeds the {num_train} images of "
                     f"config.in_train ({source}); 0 trains on all of them")


def count_run_data(config, uses_outliers: bool) -> Tuple[int, int, int]:
  """``(train after train_subset, test, outliers or 0)`` image counts, from the sources'
  listings where they have one (nothing decoded)."""
  train_src, test_src, outlier_src = run_sources(config, uses_outliers)
  num_train = sources.count(*train_src)
  if config.train_subset:
    check_subset(config.train_subset, num_train, train_src[0])
    num_train = config.train_subset
  num_outliers = sources.count(*outlier_src) if outlier_src else 0
  return num_train, sources.count(*test_src), num_outliers
