"""The detector interface and registry: every OOD detector is ``fit`` once, then ``score``s.

    det = detectors.create("energy", temperature=1.0)
    params = det.fit(train_features=..., train_labels=..., head=(W, b))   # {} if nothing to fit
    s = det.score(params, logits=..., features=...)                        # [N], higher = more ID

A detector is a frozen dataclass whose fields are its hyper-parameters. It declares:

* ``needs``: the score inputs it reads, from ``logits [N, C]``, ``features [N, D]`` (penultimate),
  ``blocks`` (per-stage feature means, see :mod:`energy_jax.models.base`) and ``images``
  (normalised ``[N, H, W, 3]``; then ``score`` also takes ``model=(apply_fn, variables)``, where
  ``apply_fn(variables, images)`` returns the model's :class:`~energy_jax.models.ModelOutput`
  in inference mode, for detectors that need input gradients);
* ``fit_needs``: what ``fit`` reads, from ``train_logits``, ``train_features``,
  ``train_blocks``, ``train_labels`` and ``head`` (the classifier's ``(W, b)``);
* ``grid``: the values of each hyper-parameter that validation walks.

A new detector is one file under ``energy_jax/detectors/`` (every module there is imported) or
in the user's own code: a subclass with ``@register("name")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, FrozenSet, Iterator, Sequence, Tuple

import itertools

from energy_jax.registry import Registry

SCORE_INPUTS = frozenset({"logits", "features", "blocks", "images"})
FIT_INPUTS = frozenset({"train_logits", "train_features", "train_blocks", "train_labels", "head"})

DETECTORS: Registry[type] = Registry("detector")


@dataclasses.dataclass(frozen=True)
class Detector:
  """Base class: subclasses are frozen dataclasses of hyper-parameters (see module docstring)."""

  name: ClassVar[str] = ""
  needs: ClassVar[FrozenSet[str]] = frozenset({"logits"})
  fit_needs: ClassVar[FrozenSet[str]] = frozenset()
  grid: ClassVar[Dict[str, Sequence[Any]]] = {}

  def fit(self, **inputs) -> Any:
    """Fitted parameters (a pytree) from the training set's outputs; ``{}`` by default."""
    return {}

  def score(self, params, **inputs):
    """``[N]`` float32 scores, higher = more in-distribution."""
    raise NotImplementedError

  @property
  def hparams(self) -> Dict[str, Any]:
    """The hyper-parameters, by field name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @property
  def label(self) -> str:
    """The column name in tables, e.g. ``energy (T=1)``."""
    if not self.hparams:
      return self.name
    inner = ", ".join(f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}"
                      for k, v in self.hparams.items())
    return f"{self.name} ({inner})"

  def with_hparams(self, **hparams) -> "Detector":
    """A copy with other hyper-parameters."""
    return dataclasses.replace(self, **hparams)

  def grid_points(self, grid: Dict[str, Sequence[Any]] = None) -> Iterator["Detector"]:
    """This detector at every point of ``grid`` (default: its own ``grid``)."""
    grid = self.grid if grid is None else grid
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
      yield self.with_hparams(**dict(zip(keys, values)))


# Short names of hyper-parameters in labels, as the paper writes them.
_SHORT = {"temperature": "T", "epsilon": "eps"}


def _short(key: str) -> str:
  return _SHORT.get(key, key)


def register(name: str, *, replace: bool = False):
  """Class decorator: registers a :class:`Detector` subclass as ``name``."""
  def add(cls):
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
      raise TypeError(f"detector {name!r} must be a Detector subclass, got {cls!r}")
    unknown = (set(cls.needs) - SCORE_INPUTS) | (set(cls.fit_needs) - FIT_INPUTS)
    if unknown:
      raise ValueError(f"detector {name!r} declares unknown inputs {sorted(unknown)}; known: "
                       f"{sorted(SCORE_INPUTS | FIT_INPUTS)}")
    cls.name = name
    DETECTORS.register(name, replace=replace)(cls)
    return cls
  return add


def create(name: str, **hparams) -> Detector:
  """The detector ``name`` with ``hparams`` (the rest at their defaults)."""
  cls = DETECTORS.get(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(hparams) - fields
  if unknown:
    raise ValueError(f"detector {name!r} has no hyper-parameter(s) {sorted(unknown)}; it has "
                     f"{sorted(fields) or 'none'}")
  return cls(**hparams)


def names() -> Tuple[str, ...]:
  """The registered detector names."""
  return DETECTORS.names()
