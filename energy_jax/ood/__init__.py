"""OOD scoring and its evaluation: the jitted scores (:mod:`~energy_jax.ood.scores`), the metrics
(:mod:`~energy_jax.ood.metrics`), the paper's protocol (:mod:`~energy_jax.ood.evaluation`) and
its tables and plots (:mod:`~energy_jax.ood.report`). The detectors themselves are
:mod:`energy_jax.detectors`."""

from energy_jax.ood import metrics, scores

__all__ = ["metrics", "scores"]
