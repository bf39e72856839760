"""The paper's CIFAR-10 recipe on offline packs: CIFAR-10 as an image-folder zip and
Tiny-ImageNet outliers, read from ``config.data_dir`` (``--config.data_dir=DIR``)."""

from energy_jax.config.presets import cifar10


def override(c, stage: str) -> None:
  cifar10.override(c, stage)
  c.in_train = c.in_test = "cifar10.zip"
  c.outliers = "tin32-outliers.zip"
  c.validation_base = ""                # no CIFAR-100 offline: corruptions of the ID test set
  if stage == "finetune":
    c.pretrained = "workdirs/offline_pretrain"
