"""The public OOD scores under ``energy_jax.ood``, beside the metrics and the evaluation. They are
defined in :mod:`energy_jax.detectors.scores` (the detectors compute them); the Gaussian fit that
``mahalanobis_score`` takes is :mod:`energy_jax.detectors.gaussians`."""

from energy_jax.detectors.gaussians import (MahalanobisParams, SingularCovarianceWarning,
                                            fit_mahalanobis)
from energy_jax.detectors.scores import (energy, energy_score, free_energy, mahalanobis_score,
                                         max_logit_score, msp_score, odin_score)

__all__ = ["energy", "energy_score", "free_energy", "mahalanobis_score", "max_logit_score",
           "msp_score", "odin_score", "MahalanobisParams", "SingularCovarianceWarning",
           "fit_mahalanobis"]
