"""Pretraining of the baseline classifier: ``--config=experiments/configs/pretrain.py:PRESET``.

PRESET (``energy_jax/config/presets``): cifar10 (default) | cifar100 | offline | digits | toy | test.
The paper's recipe: WRN-40-2, 100 epochs, batch 128, SGD nesterov 0.9, lr 0.1 cosine, weight
decay 5e-4. ``offline`` reads the packs of this checkout's ``../shared/data``.
"""

import os

from energy_jax import config

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                           "shared", "data")


def get_config(preset: str = "cifar10", stage: str = "pretrain"):
  c = config.get_config(preset or "cifar10", stage)
  if preset == "offline":
    c.data_dir = os.path.normpath(SHARED_DATA)
  return c
