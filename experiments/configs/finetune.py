"""Energy-bounded fine-tuning (or Outlier Exposure with ``--config.objective.name=oe``):
``--config=experiments/configs/finetune.py:PRESET``.

PRESET: as for pretrain.py. The paper's recipe: 10 epochs from the pretrained model, lr 0.001,
128 ID + 256 outliers in one forward pass, loss CE + 0.1 * (relu(E_in - m_in)^2 +
relu(m_out - E_out)^2), m_in / m_out = -23 / -5 (CIFAR-10) or -27 / -5 (CIFAR-100).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain  # noqa: E402


def get_config(preset: str = "cifar10"):
  return pretrain.get_config(preset, "finetune")
