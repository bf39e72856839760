"""Pretraining of the baseline classifier: ``--config=experiments/configs/pretrain.py:PRESET``.

PRESET: cifar10 (default) | cifar100 | offline | demo | test. The paper's recipe:
WRN-40-2, 100 epochs, batch 128, SGD nesterov 0.9, lr 0.1 cosine, weight decay 5e-4.
"""

from energy_jax import configs


def get_config(preset: str = "cifar10"):
  return configs.apply_preset(configs.base_config(), preset or "cifar10", "pretrain")
