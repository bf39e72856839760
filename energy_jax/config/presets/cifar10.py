"""The paper's CIFAR-10 recipe (TFDS): WRN-40-2, pretraining 100 epochs at lr 0.1, then energy
fine-tuning 10 epochs at lr 0.001 with 128 ID + 256 outliers per step, m_in -23, m_out -5."""

# The Outlier Exposure "300K random images" file stands in for 80M Tiny Images: fetched once by
# name (energy_jax.fetch); a copy on the disk is read with --config.outliers=PATH.
OUTLIERS = "energy_ood:300k_random_images"


def override(c, stage: str) -> None:
  c.outliers = OUTLIERS
  # The reference's evaluation: validation corruptions of the other CIFAR, and its pooling for
  # the sets it feeds unresized (LSUN-C).
  c.validation_base = "tfds:cifar100" if c.dataset == "cifar10" else "tfds:cifar10"
  c.model.pooling = "reference"
  if stage == "finetune":
    c.pretrained = f"workdirs/{c.dataset}_pretrain"
    c.objective.name = "energy"
    c.optimizer.learning_rate = 0.001
    c.epochs = 10
