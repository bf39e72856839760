"""Config fields: their declaration (:class:`Field`) and the checks of their values.

Every part chosen by name from the config (a model, an objective, an optimiser) declares the
fields it reads with their defaults, meanings and checks; :mod:`energy_jax.config` builds the
run's config, ``--help`` and validation from those declarations. A check is
``check(name, value)``, raising ``ValueError`` naming ``config.NAME`` and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np

Check = Callable[[str, Any], None]


@dataclasses.dataclass(frozen=True)
class Field:
  """A config field: ``name`` (relative to its section), ``default``, ``meaning`` (one line of
  ``--help``) and ``check``; ``any_type``: the ConfigDict holds any type there (a number or a
  string such as "auto", also from the command line)."""
  name: str
  default: Any
  meaning: str
  check: Check
  any_type: bool = False


def union(declarations: Iterable[Sequence[Field]], kind: str) -> Dict[str, Field]:
  """``{name: field}`` of every field of ``declarations`` (one per part, in order); a name two
  parts declare must have the same default (the config holds one value for both)."""
  out: Dict[str, Field] = {}
  for fields in declarations:
    for f in fields:
      known = out.setdefault(f.name, f)
      if known.default != f.default:
        raise ValueError(f"{kind} field {f.name!r} is declared twice with different defaults "
                         f"({known.default!r}, {f.default!r}); rename one of them")
  return out


def fail(name: str, value: Any, requirement: str) -> None:
  raise ValueError(f"config.{name} must be {requirement}, got {value!r}")


def is_int(value: Any) -> bool:
  # bool is an int to Python, and ConfigDict accepts True for an integer field.
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


# JAX computes with 32-bit integers (step counters, shapes, labels) unless x64 is enabled.
INT32_MAX = 2 ** 31 - 1


def integer(low: Optional[int] = None, high: Optional[int] = None, why: str = "",
            label: str = "") -> Check:
  """An integer in ``[low, high)`` (None: unbounded, but within int32 all the same); ``why`` says
  what is wrong outside, ``label`` names the range instead of ``>= low`` (e.g. "a positive
  integer")."""
  def check(name, value):
    if not is_int(value):
      fail(name, value, "an integer")
    if (low is not None and value < low) or (high is not None and value >= high):
      fail(name, value, (label or (f"in [{low}, {high})" if high is not None else f">= {low}"))
           + (f" ({why})" if why else ""))
    if high is None and not -INT32_MAX - 1 <= value <= INT32_MAX:
      fail(name, value, f"in [{-INT32_MAX - 1 if low is None else low}, {INT32_MAX}] (JAX's "
           "integers are 32-bit)")
  return check


positive = integer(1, label="a positive integer")

# Seeds: numpy takes any non-negative integer, JAX's keys keep 32 bits.
SEED_LIMIT = 2 ** 32
SEED_WHY = ("numpy's seeds are non-negative, and JAX's keys hold 32 bits: PRNGKey(2**32) is "
            "PRNGKey(0)")


def check_seed(value: Any, name: str = "seed") -> None:
  """Raises ``ValueError`` naming ``name`` (e.g. a command-line flag) unless ``value`` is an
  integer seed in ``[0, 2**32)``."""
  if not is_int(value) or not 0 <= value < SEED_LIMIT:
    raise ValueError(f"{name} must be an integer in [0, {SEED_LIMIT}) ({SEED_WHY}), got "
                     f"{value!r}")


# Real fields and the detectors' traced hyper-parameters are computed in float32. XLA flushes
# its subnormal numbers to 0, so that the nonzero values it keeps lie in [TINY, MAX] in magnitude.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def float32_problem(value: float) -> Optional[str]:
  """"overflows" for a finite ``value`` beyond float32's largest finite number, "underflows" for
  a nonzero one that float32 holds below its smallest normal number (computed as 0), else
  None."""
  v = float(value)
  with np.errstate(over="ignore", under="ignore"):
    f = np.float32(v)
  if np.isfinite(v) and np.isinf(f):
    return "overflows"
  if v != 0 and abs(f) < FLOAT32_TINY:
    return "underflows"
  return None


def float32_range(low: float = -np.inf, high: float = np.inf, low_open: bool = False,
                  high_open: bool = False) -> str:
  """The values of the interval ``low .. high`` that float32 holds (see
  :func:`float32_problem`), as what a value "must be": e.g. ``0 or in [1.1754944e-38,
  3.4028235e+38]``."""
  parts = []
  for a, b in ((-FLOAT32_MAX, -FLOAT32_TINY), (FLOAT32_TINY, FLOAT32_MAX)):
    lo, lo_open = (low, low_open) if low > a else (a, False)
    hi, hi_open = (high, high_open) if high < b else (b, False)
    if lo < hi or (lo == hi and not (lo_open or hi_open)):
      parts.append(f"in {'(' if lo_open else '['}{lo:.8g}, {hi:.8g}{')' if hi_open else ']'}")
    if a < 0 and (low < 0 or (low == 0 and not low_open)) and (
        high > 0 or (high == 0 and not high_open)):
      parts.append("0")
  return " or ".join(parts)


def check_float32(name: str, value: Any, low: float = -np.inf, high: float = np.inf,
                  low_open: bool = False, high_open: bool = False) -> None:
  """Raises ``ValueError`` naming ``name``, the value and the float32 values of its interval
  ``low .. high`` when float32 cannot hold the number ``value`` (see :func:`float32_problem`)."""
  problem = float32_problem(value)
  if problem:
    raise ValueError(f"{name} = {value!r} {problem} float32, in which it is computed: it must "
                     f"be {float32_range(low, high, low_open, high_open)}")


def real(low: float = -np.inf, high: float = np.inf, *, low_open: bool = False,
         high_open: bool = False) -> Check:
  """A finite number in the interval ``low .. high`` (ends open or closed) that float32 holds."""
  def check(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
      fail(name, value, "a number")
    if not np.isfinite(value):
      fail(name, value, "finite")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
      fail(name, value, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
           if np.isfinite(low) and np.isfinite(high) else
           f"{'>' if low_open else '>='} {low}" if np.isfinite(low) else
           f"{'<' if high_open else '<='} {high}")
    problem = float32_problem(value)
    if problem:
      fail(name, value, f"{float32_range(low, high, low_open, high_open)} (the run computes in "
           f"float32, where it {problem})")
  return check


def boolean(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    fail(name, value, "True or False")


def string(nonempty: bool = False) -> Check:
  def check(name, value):
    if not isinstance(value, str):
      fail(name, value, "a string")
    if nonempty and not value:
      fail(name, value, "a non-empty string")
  return check


def did_you_mean(name: str, known: Sequence[str], prefix: str = "", quote: bool = True) -> str:
  """``"; did you mean 'X'?"`` for the entry X of ``known`` closest to ``name`` ('' if none is
  close): ``prefix`` goes before X, which is quoted unless ``quote`` is False."""
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  if not close:
    return ""
  return f"; did you mean {prefix}{close[0]!r}?" if quote else f"; did you mean {prefix}{close[0]}?"


def choice(choices: Callable[[], Sequence[str]]) -> Check:
  """One of ``choices()`` (a callable: registries fill in after the field is declared); the
  message names the closest choice to a misspelt one."""
  def check(name, value):
    known = tuple(choices())
    if not isinstance(value, str) or value not in known:
      close = did_you_mean(value, known) if isinstance(value, str) else ""
      raise ValueError(f"config.{name} must be one of {', '.join(map(repr, known))}, got "
                       f"{value!r}{close}")
  return check


def typed_like(default: Any) -> Check:
  """The check of a field declared by its default alone: a value of the default's type."""
  if isinstance(default, bool):
    return boolean
  if isinstance(default, int):
    return integer()
  if isinstance(default, float):
    return real()
  if isinstance(default, str):
    return string()
  return lambda name, value: None
