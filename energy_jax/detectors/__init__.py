"""OOD detectors behind one fit / score interface (:mod:`energy_jax.detectors.base`).

    from energy_jax import detectors
    detectors.names()                       # ('msp', 'max_logit', 'energy', ..., 'knn')
    det = detectors.create("react", percentile=90)
    params = det.fit(train_features=..., head=(W, b))
    scores = det.score(params, features=...)      # jitted, higher = more in-distribution

The scores as plain jitted functions (``energy_score``, ``odin_score``, ...) are
:mod:`energy_jax.detectors.scores`.

The list, the formulas and their papers, the conventions: docs/detectors.md.
"""

import importlib
import pkgutil

from energy_jax.detectors.base import (DETECTORS, FIT_INPUTS, GRID_SOURCES, SCORE_INPUTS,
                                       Detector, create, create_from_strings, hparam, names,
                                       register)

# Every module of this package registers its detectors on import: a new one is one new file.
# The paper's own detectors (logit.py: MSP, energy; gradient.py: ODIN, Mahalanobis) come first
# in names(), the rest alphabetically by module.
_FIRST = ("logit", "gradient")
for _name in sorted((m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"),
                    key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n)):
  importlib.import_module(f"{__name__}.{_name}")

__all__ = ["DETECTORS", "FIT_INPUTS", "GRID_SOURCES", "SCORE_INPUTS", "Detector", "create",
           "create_from_strings", "hparam", "names", "register"]
