"""Pretrains the WRN classifier: ``python experiments/pretrain.py --config=...:PRESET --workdir=DIR``."""

import _main

if __name__ == "__main__":
  _main.run("configs/pretrain.py:cifar10", "workdirs/{preset}_pretrain")
