"""Energy-bounded fine-tuning (or Outlier Exposure with ``--config.score=oe``):
``--config=experiments/configs/finetune.py:PRESET``.

PRESET: cifar10 (default) | cifar100 | offline | demo | test. The paper's recipe:
10 epochs from the pretrained model, lr 0.001, 128 ID + 256 outliers in one forward
pass, loss CE + 0.1 * (relu(E_in - m_in)^2 + relu(m_out - E_out)^2), m_in / m_out
= -23 / -5 (CIFAR-10) or -27 / -5 (CIFAR-100).
"""

from energy_jax import configs


def get_config(preset: str = "cifar10"):
  return configs.apply_preset(configs.base_config(), preset or "cifar10", "finetune")
