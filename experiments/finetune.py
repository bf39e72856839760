"""Energy-bounded fine-tuning (``--config.objective.name=oe`` for Outlier Exposure):
``python experiments/finetune.py --config=experiments/configs/finetune.py:PRESET --workdir=DIR``."""

import _main

if __name__ == "__main__":
  _main.run("configs/finetune.py:cifar10", "workdirs/{preset}_finetune")
