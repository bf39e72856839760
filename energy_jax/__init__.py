"""energy-jax: energy-based out-of-distribution detection (Liu et al., NeurIPS 2020) in JAX/Flax."""

from energy_jax.losses import (energy_bounded_loss, outlier_exposure_loss,
                               softmax_cross_entropy)
from energy_jax.metrics import ood_metrics
from energy_jax.models import WideResNet
from energy_jax.scores import (energy_score, free_energy, mahalanobis_score, max_logit_score,
                               msp_score, odin_score)

__version__ = "0.1.0"

__all__ = [
    "WideResNet", "energy_score", "free_energy", "msp_score", "max_logit_score", "odin_score",
    "mahalanobis_score", "energy_bounded_loss", "outlier_exposure_loss",
    "softmax_cross_entropy", "ood_metrics",
]
