"""In-memory image sets: decoded ``uint8`` images with integer labels."""

from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Decoded images ``uint8 [N, H, W, 3]`` with ``int32 [N]`` labels.

  ``class_names[k]`` names label ``k`` (``("",)`` for unlabelled sources such as outliers);
  ``source`` says where the images came from, for messages.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: Tuple[str, ...]
  source: str

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f"{self.source}: images must be [N, H, W, 3], got {self.images.shape}")
    if self.images.dtype != np.uint8:
      raise ValueError(f"{self.source}: images must be uint8, got {self.images.dtype}")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"{self.source}: {self.labels.shape[0]} labels for "
                       f"{self.images.shape[0]} images")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    """Number of classes (1 for unlabelled sources)."""
    return len(self.class_names)

  @property
  def image_size(self) -> int:
    """The images' height (sources make them square)."""
    return int(self.images.shape[1])

  def subset(self, keep: np.ndarray, what: str) -> "ImageSet":
    """The images at the indices ``keep``; ``what`` is appended to ``source``."""
    return ImageSet(self.images[keep], self.labels[keep], self.class_names,
                    f"{self.source}[{what}]")
