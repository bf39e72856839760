"""The paper's evaluation sets, built as the reference builds them (``CIFAR/test.py``, ``run.sh``).

* The six OOD test sets, each with the reference's preprocessing: Textures (all 5,640 DTD
  images) and Places365 are resized (``Resize(32)`` + ``CenterCrop(32)``, PIL); SVHN, LSUN-C,
  LSUN-R and iSUN are fed as they are. Public reports give the ODIN release's LSUN-C images as
  36x36 (LSUN-R and iSUN 32x32): the reference network's ``avg_pool2d(8)`` then pools the top-left
  8x8 of a 9x9 map, which ``config.model.pooling = "reference"`` reproduces.
* The validation sets of ``--validate``: uniform noise and the corruptions of the OTHER CIFAR's
  test set (arithmetic and geometric means of pairs, jigsaw, speckle, pixelate, RGB shift,
  inversion), no Gaussian noise; ``config.validation_base`` names that set ("" = the ID test set).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Dict, Iterable, Optional, Sequence, Tuple

from energy_jax.config import REFERENCE_VALIDATION_SETS  # noqa: F401  (config's default)
from energy_jax.data import sources, synthetic
from energy_jax.data.image_set import ImageSet

TRANSFORMS = ("resize", "as_is")

# Most draws of len(test) // 5 OOD images averaged per set (the reference's run.sh makes 10):
# past a thousand the mean no longer moves, and each draw costs a sort of the ID scores.
MAX_NUM_TO_AVG = 1000
# The name of the tables' and results' row of the mean over the OOD sets: no set may take it.
MEAN = "mean"


@dataclasses.dataclass(frozen=True)
class OODSet:
  """A source, its split, and how its images are prepared: ``resize`` (Resize on the short side +
  CenterCrop to ``config.image_size``) or ``as_is`` (their own size, one for the whole set)."""
  source: str
  split: Optional[str] = None
  transform: str = "resize"

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(f"OOD set {self.source}: transform must be one of {TRANSFORMS}, got "
                       f"{self.transform!r}")


# Each fetched once by name (energy_jax.fetch: the official archives, checked); a copy on the
# disk or in TFDS is read with e.g. --ood lsun_c=data/LSUN@as_is or svhn=tfds:svhn_cropped@as_is.
PAPER_OOD_SETS: Dict[str, OODSet] = {
    "textures": OODSet("energy_ood:textures"),             # all 5,640 DTD images
    "svhn": OODSet("energy_ood:svhn", None, "as_is"),      # the 26,032 test images
    "places365": OODSet("energy_ood:places365"),           # the 36,500 of val_256
    "lsun_c": OODSet("energy_ood:lsun_c", None, "as_is"),
    "lsun_r": OODSet("energy_ood:lsun_r", None, "as_is"),
    "isun": OODSet("energy_ood:isun", None, "as_is"),
}


def parse_ood(item: str) -> Tuple[str, OODSet]:
  """``(name, set)`` of a command-line OOD set: a paper name (``svhn``), ``NAME=SOURCE``
  (resized), ``NAME=SOURCE@as_is``, or ``synthetic:NAME``."""
  name, sep, rest = item.partition("=")
  if not sep:
    if item.startswith("synthetic:"):
      return item.split(":", 1)[1], OODSet(item)
    if item not in PAPER_OOD_SETS:
      raise ValueError(f"unknown OOD set {item!r}: use one of {sorted(PAPER_OOD_SETS)}, "
                       "NAME=SOURCE[@as_is] or synthetic:NAME")
    return item, PAPER_OOD_SETS[item]
  source, at, transform = rest.partition("@")
  if not name or not source:
    raise ValueError(f"OOD set {item!r}: expected NAME=SOURCE[@as_is]")
  return name, OODSet(source, None, transform if at else "resize")


def parse_ood_list(items: Sequence[str]) -> Dict[str, OODSet]:
  """``{name: set}`` of the command line's OOD sets (:func:`parse_ood` each); a name given
  twice is refused, as a mapping would keep only the last of them."""
  sets: Dict[str, OODSet] = {}
  given: Dict[str, str] = {}
  for item in items:
    name, spec = parse_ood(item)
    if name in given:
      raise ValueError(f"the OOD set name {name!r} is given twice ({given[name]!r} and "
                       f"{item!r}): give each set its own name, NAME=SOURCE")
    given[name] = item
    sets[name] = spec
  check_ood_names(sets)
  return sets


def check_ood_names(names: Iterable[str]) -> None:
  """Raises if a name is empty or the mean row's (its metrics would overwrite the mean's)."""
  for name in names:
    if not name:
      raise ValueError("an OOD set has an empty name: give it one, NAME=SOURCE")
    if name == MEAN:
      raise ValueError(f"an OOD set cannot be named {MEAN!r}, the name of the tables' row of "
                       "the mean over the sets: give it another name, NAME=SOURCE")


def check_num_to_avg(num_to_avg: int, what: str = "num_to_avg") -> None:
  """Raises naming ``what`` unless ``num_to_avg`` is an integer in [1, MAX_NUM_TO_AVG]."""
  if isinstance(num_to_avg, bool) or not isinstance(num_to_avg, numbers.Integral) or not (
      1 <= num_to_avg <= MAX_NUM_TO_AVG):
    raise ValueError(f"{what} = {num_to_avg!r}: the draws averaged per OOD set must be an "
                     f"integer in [1, {MAX_NUM_TO_AVG}] (the reference makes 10)")


def load_config_set(config, field: str, image_size: Optional[int]) -> ImageSet:
  """The image set that ``config.<field>`` names (``in_test``, ``in_train``,
  ``validation_base``), its split ``config.<field>_split`` ("" = the source's own), a relative
  path read from ``config.data_dir``."""
  source = sources.join_data_dir(config.data_dir, getattr(config, field))
  return sources.load(source, getattr(config, f"{field}_split") or None, image_size)


def load_ood_set(config, spec: OODSet, test: ImageSet, seed: int = 0) -> ImageSet:
  """The images of ``spec``: relative paths read from ``config.data_dir``; a synthetic set has
  ``2 * len(test) // 5`` images made from ``test``."""
  if spec.source.startswith("synthetic:"):
    return synthetic.make_ood_set(spec.source.split(":", 1)[1], 2 * (len(test) // 5), seed, test)
  size = int(config.image_size) if spec.transform == "resize" else None
  return sources.load(sources.join_data_dir(config.data_dir, spec.source), spec.split, size)


def validation_sets(config, test: ImageSet, seed: int = 0) -> Dict[str, ImageSet]:
  """``config.validation_sets``, ``len(test) // 5`` images each, the corruptions made from
  ``config.validation_base`` (the other CIFAR's test set under the paper presets) or, when that
  is empty, from ``test``."""
  base = test
  if config.validation_base:
    base = load_config_set(config, "validation_base", int(config.image_size))
  return {name: synthetic.make_ood_set(name, len(test) // 5, seed, base)
          for name in config.validation_sets}
