"""OOD detectors behind one fit / score interface (:mod:`energy_jax.detectors.base`).

    from energy_jax import detectors
    detectors.names()                       # ('msp', 'max_logit', 'energy', 'odin', ...)
    det = detectors.create("energy", temperature=1.0)
"""

import importlib
import pkgutil

from energy_jax.detectors.base import (DETECTORS, FIT_INPUTS, SCORE_INPUTS, Detector, create,
                                       names, register)

# Every module of this package registers its detectors on import: a new one is one new file.
for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base":
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DETECTORS", "FIT_INPUTS", "SCORE_INPUTS", "Detector", "create", "names", "register"]
