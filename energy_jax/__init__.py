"""energy-jax: energy-based out-of-distribution detection (Liu et al., NeurIPS 2020) in JAX/Flax.

    from energy_jax import energy_score       # jitted; higher = more in-distribution
"""

__version__ = "0.3.0"

from energy_jax.losses import (energy_bounded_loss, outlier_exposure_loss,  # noqa: E402
                               softmax_cross_entropy)
from energy_jax.ood.metrics import ood_metrics  # noqa: E402
from energy_jax.ood.scores import (energy_score, free_energy, mahalanobis_score,  # noqa: E402
                                   max_logit_score, msp_score, odin_score)

__all__ = [
    "energy_score", "free_energy", "msp_score", "max_logit_score", "odin_score",
    "mahalanobis_score", "energy_bounded_loss", "outlier_exposure_loss",
    "softmax_cross_entropy", "ood_metrics",
]
