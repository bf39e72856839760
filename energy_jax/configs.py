"""Defaults shared by the experiment configs (``experiments/configs/*.py``).

Presets: ``cifar10`` / ``cifar100`` (TFDS, the paper's setting), ``offline`` (the
CIFAR-10 and Tiny-ImageNet packs of ``../shared/data``), ``demo`` (a tiny WRN on
generated data, minutes on a laptop CPU) and ``test`` (seconds, for the tests).
"""

from __future__ import annotations

import os

import ml_collections

# The paper's energy margins (Section 4.1): m_in / m_out per in-distribution set.
MARGINS = {"cifar10": (-23.0, -5.0), "cifar100": (-27.0, -5.0),
           # 4 toy classes: logsumexp of a confident tiny model sits near -8, not -23.
           "toy": (-8.0, -2.0)}
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                            "data"))
PRESETS = ("cifar10", "cifar100", "offline", "demo", "test")


def base_config() -> ml_collections.ConfigDict:
  """The paper's pretraining recipe on CIFAR-10 (TFDS); presets and CLI flags override it."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.num_classes = 10
  c.in_train = "tfds:cifar10"
  c.in_train_split = "train"
  c.in_test = "tfds:cifar10"
  c.in_test_split = "test"
  c.outliers = ""
  c.outliers_split = ""
  c.train_subset = 0              # 0 = the whole training set
  # WRN-40-2, dropout 0.3 (the reference).
  c.depth = 40
  c.widen_factor = 2
  c.dropout_rate = 0.3
  c.dtype = "float32"             # "bfloat16": bf16 compute, fp32 params / optimiser / BN stats
  # SGD as torch.optim.SGD(nesterov=True); cosine per step from lr to lr * min_lr_ratio.
  c.score = "ce"
  c.epochs = 100
  c.batch_size = 128
  c.outlier_batch_size = 256
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.min_lr_ratio = 1e-6
  c.m_in, c.m_out = MARGINS["cifar10"]
  c.energy_weight = 0.1
  c.oe_weight = 0.5
  c.pretrained = ""
  c.seed = 1
  c.num_devices = 0               # 0 = all local devices
  c.input_pipeline = "device"     # "device" (data held on the accelerator) or "tfdata"
  c.steps_per_call = 100          # steps fused into one compiled lax.scan
  c.eval_batch_size = 1000
  c.eval_every_epochs = 1         # test-set evaluation cadence (always after the last epoch)
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.progress_bar = True
  c.tensorboard = True            # per-epoch scalars in <workdir>/tensorboard (needs TensorFlow)
  return c


def apply_preset(c: ml_collections.ConfigDict, preset: str, stage: str) -> ml_collections.ConfigDict:
  """Fills data sources and sizes for ``preset``; ``stage`` is "pretrain" or "finetune"."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  if preset == "cifar100":
    c.dataset, c.num_classes = "cifar100", 100
    c.in_train = c.in_test = "tfds:cifar100"
  if preset in ("cifar10", "cifar100"):
    # The Outlier Exposure "300K random images" file stands in for 80M Tiny Images.
    c.outliers = "data/300K_random_images.npy"
    c.pretrained = f"workdirs/{c.dataset}_pretrain" if stage == "finetune" else ""
  elif preset == "offline":
    c.in_train = c.in_test = os.path.join(SHARED_DATA, "cifar10.zip")
    c.outliers = os.path.join(SHARED_DATA, "tin32-outliers.zip")
    c.pretrained = "workdirs/offline_pretrain" if stage == "finetune" else ""
  elif preset in ("demo", "test"):
    root = "workdirs/demo/data" if preset == "demo" else "DATA"
    c.in_train = c.in_test = os.path.join(root, "toy_id.zip")
    c.outliers = os.path.join(root, "toy_outliers.npy")
    c.dataset = "toy"
    c.depth, c.widen_factor, c.dropout_rate = 10, 1, 0.0
    c.num_classes = 4
    c.batch_size, c.outlier_batch_size = 32, 64
    c.epochs = 6 if stage == "pretrain" else 2
    c.steps_per_call = 20
    c.eval_batch_size = 256
    c.pretrained = "workdirs/demo/pretrain" if stage == "finetune" else ""
    if preset == "test":
      c.batch_size, c.outlier_batch_size = 16, 32
      c.epochs = 2
      c.progress_bar = False
      c.tensorboard = False       # importing TensorFlow costs each test process seconds
  c.m_in, c.m_out = MARGINS.get(c.dataset, MARGINS["cifar10"])
  if stage == "finetune":
    c.score = "energy"
    c.learning_rate = 0.001
    c.epochs = 10 if preset in ("cifar10", "cifar100", "offline") else c.epochs
  return c
