"""The offline demo on real images that ship with scikit-learn (``energy_jax.data.sklearn_images``):
a WRN-10-1 learns the 10 handwritten digits (1,343 training images, 8x8 upsampled to 32x32),
then energy fine-tuning takes patches of one half of scikit-learn's two sample photographs as
outliers; the other half is an OOD test set. Minutes on 2 CPU cores."""

from energy_jax.config.presets import toy


def override(c, stage: str) -> None:
  toy.override(c, stage)          # the WRN-10-1 without dropout; energy fine-tuning
  c.dataset, c.num_classes = "digits", 10
  c.in_train = c.in_test = "sklearn:digits"
  c.outliers, c.outliers_split = "sklearn:photos", "train"
  c.batch_size, c.outlier_batch_size, c.eval_batch_size = 64, 128, 500
  c.epochs = 20 if stage == "pretrain" else 5
  c.steps_per_call = 5             # 20 steps per epoch; XLA:CPU compiles the 5 steps unrolled
  # The pretrained model's ID energies: median -9, 5th percentile -14 (photo patches: -20).
  c.objective.m_in, c.objective.m_out = -10.0, -5.0
  if stage == "finetune":
    c.pretrained = "workdirs/digits_pretrain"
    c.optimizer.learning_rate = 0.01
