"""The detector interface and registry: every OOD detector is ``fit`` once, then ``score``s.

    det = detectors.create("react", percentile=90)
    params = det.fit(train_features=..., head=(W, b))      # a pytree; {} if nothing to fit
    s = det.score(params, logits=..., features=...)        # [N] float32, higher = more ID

A detector is a frozen dataclass whose fields are its hyper-parameters. It declares:

* ``needs``: the score inputs it reads, from ``logits [N, C]``, ``features [N, D]`` (penultimate),
  ``blocks`` (a tuple of per-stage feature means ``[N, D_l]``, see :mod:`energy_jax.models.base`)
  and ``images`` (normalised ``[N, H, W, 3]``; then ``score`` also takes ``model=(apply_fn,
  variables)``, where ``apply_fn(variables, images)`` returns the model's
  :class:`~energy_jax.models.ModelOutput` in inference mode, for detectors that need input
  gradients);
* ``fit_needs``: what ``fit`` reads, from ``train_logits``, ``train_features``, ``train_blocks``,
  ``train_labels``, ``head`` (the classifier's ``(W [D, C], b [C])``), ``validation`` (normalised
  validation images ``(images_in, images_out)``: ID and OOD, for detectors whose weights are
  fitted on the evaluation protocol's validation sets) and ``model`` (as for ``score``);
* ``grid``: the values of each hyper-parameter that validation walks (OpenOOD v1.5's sweep), and
  ``reference_grid``: the reference's (``CIFAR/run.sh`` of wetliu/energy_ood) where it has one.

Fitted parameters are nested dicts of arrays (they save with Orbax, see :mod:`energy_jax.export`).

**Scoring is jitted once per input shape, not once per hyper-parameter value.** A detector writes
its formula as :meth:`Detector.compute` ``(params, hp, **inputs)``: ``hp`` holds the traced
hyper-parameters (floats such as a temperature or a percentile), ``self`` the static ones (the
fields declared ``hparam(..., static=True)``: those that fix a shape, such as KNN's K). The base
class checks the inputs (names, ranks, dtypes, sizes; a clear error before any work), then calls
one jitted function per (detector class, static values, model): walking a grid of temperatures
and noise magnitudes compiles once. A simple detector may instead override :meth:`score` itself
(then nothing is checked or jitted for it).

A new detector is one file under ``energy_jax/detectors/`` (every module there is imported) or in
the user's own code: a subclass with ``@register("name")``.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterator, Mapping, Optional, Sequence
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax.fields import check_float32
from energy_jax.arrays import check_plain_real, widen_host_half
from energy_jax.registry import Registry

Array = jax.Array

SCORE_INPUTS = frozenset({"logits", "features", "blocks", "images"})
FIT_INPUTS = frozenset({"train_logits", "train_features", "train_blocks", "train_labels", "head",
                        "validation", "model"})
GRID_SOURCES = ("openood", "reference")

DETECTORS: Registry[type] = Registry("detector")


def hparam(default, *, static: bool = False, label: bool = True, saved: bool = True, doc: str = ""):
  """A hyper-parameter field. ``static``: fixes a shape (each value compiles once; otherwise the
  value is traced); ``label``: shown in :attr:`Detector.label`; ``saved``: written into exported
  artifacts (a device mesh is not)."""
  return dataclasses.field(default=default, metadata={"static": static, "label": label,
                                                      "saved": saved, "doc": doc})


@dataclasses.dataclass(frozen=True)
class Detector:
  """Base class: subclasses are frozen dataclasses of hyper-parameters (see module docstring)."""

  name: ClassVar[str] = ""
  needs: ClassVar[FrozenSet[str]] = frozenset({"logits"})
  fit_needs: ClassVar[FrozenSet[str]] = frozenset()
  grid: ClassVar[Dict[str, Sequence[Any]]] = {}
  reference_grid: ClassVar[Optional[Dict[str, Sequence[Any]]]] = None

  # ----- what a detector implements --------------------------------------------------------

  def fit_params(self, **inputs) -> Any:
    """Fitted parameters (a nested dict of arrays) from the inputs named in ``fit_needs``."""
    return {}

  def compute(self, params, hp: Dict[str, Array], **inputs) -> Array:
    """The score formula, traced: ``hp`` holds the non-static hyper-parameters as arrays."""
    raise NotImplementedError(f"detector {self.name!r} implements neither compute nor score")

  def check(self, params, inputs: Mapping[str, Any]) -> None:
    """Detector-specific checks of the score inputs against ``params`` (raise ``ValueError``)."""

  def __post_init__(self):
    """Checks the hyper-parameters' values (subclasses add theirs in :meth:`check_hparams`; the
    traced ones must be numbers that float32 holds, in which they are computed); the error names
    the detector, as several share hyper-parameter names."""
    try:
      self.check_hparams()
      check_traced_hparams(self)
    except (TypeError, ValueError) as e:
      if type(e) not in (TypeError, ValueError):
        raise
      raise type(e)(f"detector {self.name!r}: {e}") from None

  def check_hparams(self) -> None:
    """Raises ``ValueError`` naming a hyper-parameter whose value is out of range."""

  # ----- the interface ---------------------------------------------------------------------

  def score(self, params, **inputs) -> Array:
    """``[N]`` float32 scores, higher = more in-distribution (jitted once per input shape)."""
    inputs = check_score_inputs(self, params, inputs)
    model = inputs.pop("model", None)
    apply_fn = None
    if model is not None:
      apply_fn, variables = model
      inputs["variables"] = variables
    return _jitted(self, apply_fn)(self.traced_hparams(), params, inputs)

  def fit(self, **inputs) -> Any:
    """Fitted parameters (a pytree; ``{}`` for detectors that need no fitting) from the inputs
    named in ``fit_needs`` (others are ignored, so one dict of everything can be passed),
    checked first."""
    unknown = sorted(set(inputs) - FIT_INPUTS)
    if unknown:
      raise ValueError(f"unknown fit input(s) {unknown}; known: {sorted(FIT_INPUTS)}")
    missing = sorted(k for k in self.fit_needs if inputs.get(k) is None)
    if missing:
      raise ValueError(f"detector {self.name!r} is fitted on {sorted(self.fit_needs)}; missing "
                       f"{missing}")
    chosen = {k: inputs[k] for k in self.fit_needs}
    check_fit_inputs(chosen)
    return self.fit_params(**chosen)

  @property
  def hparams(self) -> Dict[str, Any]:
    """The hyper-parameters, by field name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @property
  def saved_hparams(self) -> Dict[str, Any]:
    """The hyper-parameters a user sets, written into results and exported artifacts (those
    declared ``hparam(..., saved=False)``, such as a device mesh, are not)."""
    return {name: getattr(self, name) for name in _saved_fields(type(self))}

  def traced_hparams(self) -> Dict[str, Array]:
    """The non-static hyper-parameters as float32 arrays (what :meth:`compute` gets as ``hp``)."""
    return {f.name: jnp.asarray(getattr(self, f.name), jnp.float32)
            for f in dataclasses.fields(self) if not f.metadata.get("static", False)}

  def static_hparams(self) -> Tuple[Tuple[str, Any], ...]:
    """``(name, value)`` of the static hyper-parameters: what a compiled score depends on."""
    return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.metadata.get("static", False))

  @property
  def label(self) -> str:
    """The column name in tables, e.g. ``energy (T=1)``."""
    shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.metadata.get("label", True)}
    if not shown:
      return self.name
    inner = ", ".join(f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}"
                      for k, v in shown.items())
    return f"{self.name} ({inner})"

  def with_hparams(self, **hparams) -> "Detector":
    """A copy with other hyper-parameters."""
    return dataclasses.replace(self, **hparams)

  def grid_for(self, source: str = "openood") -> Dict[str, Sequence[Any]]:
    """The grid validation walks: OpenOOD v1.5's, or with ``source="reference"`` the reference's
    where it has one (else OpenOOD's)."""
    if source not in GRID_SOURCES:
      raise ValueError(f"unknown grid source {source!r}; choose one of {GRID_SOURCES}")
    if source == "reference" and self.reference_grid is not None:
      return self.reference_grid
    return self.grid

  def grid_points(self, grid: Dict[str, Sequence[Any]] = None,
                  source: str = "openood") -> Iterator["Detector"]:
    """This detector at every point of ``grid`` (default: :meth:`grid_for` ``(source)``)."""
    grid = self.grid_for(source) if grid is None else grid
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
      yield self.with_hparams(**dict(zip(keys, values)))


# Short names of hyper-parameters in labels, as the papers write them.
_SHORT = {"temperature": "T", "epsilon": "eps", "k": "K", "percentile": "p", "sparsity": "p",
          "top_classes": "M"}


def _short(key: str) -> str:
  return _SHORT.get(key, key)


# One jitted function per (class, static hyper-parameters, apply_fn): traced hyper-parameters
# and the inputs' shapes are the jit's own cache key below that.
_COMPILED: Dict[Any, Callable] = {}


def _jitted(detector: Detector, apply_fn) -> Callable:
  key = (type(detector), detector.static_hparams(), apply_fn)
  fn = _COMPILED.get(key)
  if fn is None:
    def run(hp, params, inputs):
      inputs = dict(inputs)
      if "variables" in inputs:
        inputs["model"] = (apply_fn, inputs.pop("variables"))
      return detector.compute(params, hp, **inputs).astype(jnp.float32)
    fn = _COMPILED[key] = jax.jit(run)
  return fn


# ----- input checks: a clear error naming the input before any work ---------------------------

def _float_array(name: str, x, ndim: int, what: str):
  check_plain_real(x, name)
  shape = np.shape(x)
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if len(shape) != ndim:
    raise ValueError(f"{name} must be {what}, got shape {tuple(shape)}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {dtype}")
  if 0 in shape[1:]:
    raise ValueError(f"{name} has an empty axis: shape {tuple(shape)}")
  return widen_host_half(x)


def check_score_inputs(detector: Detector, params, inputs: Dict[str, Any]) -> Dict[str, Any]:
  """The inputs ``detector.score`` reads, checked (raises naming the input and its shape)."""
  wanted = set(detector.needs) | ({"model"} if "images" in detector.needs else set())
  missing = sorted(k for k in wanted if inputs.get(k) is None)
  if missing:
    given = sorted(k for k, v in inputs.items() if v is not None)
    raise ValueError(f"detector {detector.name!r} needs {sorted(wanted)}; missing {missing} "
                     f"(given: {given or 'nothing'})")
  if detector.fit_needs and (params is None or (isinstance(params, dict) and not params)):
    raise ValueError(f"detector {detector.name!r} must be fitted first: params = "
                     f"detector.fit({', '.join(sorted(detector.fit_needs))}=...)")
  out = {}
  sizes = {}
  if "logits" in wanted:
    out["logits"] = _float_array("logits", inputs["logits"], 2, "[N, num_classes]")
  if "features" in wanted:
    out["features"] = _float_array("features", inputs["features"], 2, "[N, D]")
  if "blocks" in wanted:
    blocks = inputs["blocks"]
    if not isinstance(blocks, (tuple, list)) or not blocks:
      raise ValueError(f"blocks must be a non-empty tuple of [N, D_l] arrays, got "
                       f"{type(blocks).__name__}")
    out["blocks"] = tuple(_float_array(f"blocks[{i}]", b, 2, "[N, D_l]")
                          for i, b in enumerate(blocks))
  if "images" in wanted:
    out["images"] = _float_array("images", inputs["images"], 4,
                                 "normalised [N, H, W, C] (see energy_jax.data.augment.normalize)")
    model = inputs["model"]
    if not (isinstance(model, tuple) and len(model) == 2 and callable(model[0])):
      raise TypeError("model must be (apply_fn, variables) with apply_fn(variables, images) -> "
                      "ModelOutput")
    out["model"] = model
  for name, x in out.items():
    if name == "model":
      continue
    for i, arr in enumerate(x if name == "blocks" else (x,)):
      sizes[name if name != "blocks" else f"blocks[{i}]"] = np.shape(arr)[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(f"inputs disagree on the number of examples N: {sizes}")
  detector.check(params, out)
  return out


def check_fit_inputs(inputs: Mapping[str, Any]) -> None:
  """Shapes, dtypes and agreement of ``fit``'s inputs (raises naming the input)."""
  n = {}
  for name in ("train_logits", "train_features"):
    if inputs.get(name) is not None:
      x = _float_array(name, inputs[name], 2, "[N, C]" if name == "train_logits" else "[N, D]")
      n[name] = np.shape(x)[0]
      if not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"{name} contains NaN or inf")
  if inputs.get("train_blocks") is not None:
    for i, b in enumerate(inputs["train_blocks"]):
      n[f"train_blocks[{i}]"] = np.shape(_float_array(f"train_blocks[{i}]", b, 2, "[N, D_l]"))[0]
  if inputs.get("train_labels") is not None:
    check_plain_real(inputs["train_labels"], "train_labels")
    y = np.asarray(inputs["train_labels"])
    if y.ndim != 1:
      raise ValueError(f"train_labels must be [N], got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
      raise TypeError(f"train_labels must be integers, got dtype {y.dtype}")
    n["train_labels"] = y.shape[0]
  if len(set(n.values())) > 1:
    raise ValueError(f"fit inputs disagree on the number of examples N: {n}")
  if inputs.get("head") is not None:
    head = inputs["head"]
    if not (isinstance(head, (tuple, list)) and len(head) == 2):
      raise ValueError("head must be (W [D, C], b [C])")
    check_plain_real(head[0], "the head's W")
    check_plain_real(head[1], "the head's b")
    w_shape, b_shape = np.shape(head[0]), np.shape(head[1])
    if len(w_shape) != 2 or b_shape != (w_shape[1],):
      raise ValueError(f"head must be (W [D, C], b [C]), got W {w_shape} and b {b_shape}")
    if inputs.get("train_features") is not None and np.shape(inputs["train_features"])[1] != \
        w_shape[0]:
      raise ValueError(f"train_features have D={np.shape(inputs['train_features'])[1]}, the "
                       f"head's W is {w_shape} ([D, C])")
    if inputs.get("train_labels") is not None and np.size(inputs["train_labels"]):
      y = np.asarray(inputs["train_labels"])
      if y.min() < 0 or y.max() >= w_shape[1]:
        raise ValueError(f"train_labels must lie in [0, {w_shape[1]}) (the head's classes), got "
                         f"[{y.min()}, {y.max()}]")
  if inputs.get("validation") is not None:
    val = inputs["validation"]
    if not (isinstance(val, (tuple, list)) and len(val) == 2):
      raise ValueError("validation must be (images_in, images_out), normalised [N, H, W, C]")
    for name, x in zip(("validation images_in", "validation images_out"), val):
      _float_array(name, x, 4, "normalised [N, H, W, C]")


def head_params(head) -> Dict[str, Array]:
  """``{"weight": W [D, C], "bias": b [C]}`` as float32 arrays: the head in fitted params."""
  w, b = head
  return {"weight": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}


def check_feature_size(params, inputs, key: str = "weight") -> None:
  """Raises if the score's features do not have the D that ``params[key]`` was fitted with."""
  if "features" in inputs and key in params:
    d_fit, d = np.shape(params[key])[0], np.shape(inputs["features"])[1]
    if d != d_fit:
      raise ValueError(f"features have D={d}, the detector was fitted on D={d_fit}")


def check_range(name: str, value, low, high, *, low_open: bool = False,
                high_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``low <(=) value <(=) high`` and float32, in which traced
  hyper-parameters are computed, holds ``value`` (no overflow to inf, no underflow to 0)."""
  v = float(value)
  ok = np.isfinite(v) and (v > low if low_open else v >= low) and (
      v < high if high_open else v <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value!r}")
  check_float32(name, value, low, high, low_open, high_open)


def check_traced_hparams(detector: Detector) -> None:
  """Raises for a non-static hyper-parameter that :meth:`Detector.traced_hparams` would turn into
  a float32 it does not hold (1e39 -> inf, 1e-40 -> 0, without a word): a number float32 cannot
  hold, or anything but a number where the base class's :meth:`Detector.score` traces them (a
  detector with its own ``score`` may keep other values there)."""
  traced = type(detector).score is Detector.score
  for f in dataclasses.fields(detector):
    if f.metadata.get("static", False):
      continue
    value = getattr(detector, f.name)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
      if not np.isfinite(float(value)):
        raise ValueError(f"{f.name} must be finite, got {value!r}")
      check_float32(f.name, value)
    elif traced and not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{f.name} must be a real number (it is traced as float32), got {value!r}")


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


def _saved_fields(cls) -> Dict[str, dataclasses.Field]:
  """The hyper-parameters a user sets (a device mesh is none)."""
  return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("saved", True)}


def _parse_hparam(name: str, field: dataclasses.Field, text: str):
  """``text`` as the type of ``field``'s default: int (a whole number, ``1e3`` too), float or
  bool (``1/true/yes``, ``0/false/no``)."""
  kind = type(field.default)
  try:
    if kind is bool:
      word = text.strip().lower()
      if word not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(text)
      return word in ("1", "true", "yes")
    if kind is int:
      if not float(text).is_integer():
        raise ValueError(text)
      return int(float(text))
    return kind(text)
  except (TypeError, ValueError):
    raise ValueError(f"{name}.{field.name}={text}: expected a {kind.__name__}") from None


def create_from_strings(name: str, strings: Mapping[str, str]) -> Detector:
  """The detector ``name`` with hyper-parameters given as text (``{"temperature": "1000"}``, as a
  command line gives them), each read as the type of its default; raises ``ValueError`` naming
  ``name.field=text`` for a value that type cannot read, or the fields ``name`` has."""
  fields = _saved_fields(DETECTORS.get(name))
  unknown = sorted(set(strings) - set(fields))
  if unknown:
    raise ValueError(f"detector {name!r} has no hyper-parameter(s) {unknown}; it has "
                     f"{sorted(fields) or 'none'}")
  return create(name, **{key: _parse_hparam(name, fields[key], text)
                         for key, text in strings.items()})


def names() -> Tuple[str, ...]:
  """The registered detector names."""
  return DETECTORS.names()
