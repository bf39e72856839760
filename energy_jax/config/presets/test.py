"""The toy preset's model and data for the tests: seconds per run."""

from energy_jax.config.presets import toy


def override(c, stage: str) -> None:
  toy.override(c, stage)
  c.in_train = c.in_test = "DATA/toy_id.zip"
  c.outliers = "DATA/toy_outliers.npy"
  c.batch_size, c.outlier_batch_size = 16, 32
  c.epochs = 2
  # One step a call: XLA:CPU compiles fused steps unrolled, in time proportional to their number
  # (4 steps: 8 s, the toy preset's 16: 43 s), and every epoch length then runs one program.
  c.steps_per_call = 1
  c.progress_bar = False
  c.tensorboard = False       # importing TensorFlow costs each test process seconds
