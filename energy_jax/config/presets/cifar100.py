"""The paper's CIFAR-100 recipe: as CIFAR-10's, 100 classes, m_in -27."""

from energy_jax.config.presets import cifar10


def override(c, stage: str) -> None:
  c.dataset, c.num_classes = "cifar100", 100
  c.in_train = c.in_test = "tfds:cifar100"
  c.objective.m_in, c.objective.m_out = -27.0, -5.0
  cifar10.override(c, stage)            # validation corruptions of CIFAR-10
