"""The toy preset: a tiny WRN-10-1 on generated toy data (``python -m energy_jax.data.toy``):
minutes on a laptop CPU. 4 classes: the logsumexp of a confident tiny model sits near -8, so
m_in -8, m_out -2."""


def override(c, stage: str) -> None:
  c.dataset, c.num_classes = "toy", 4
  c.in_train = c.in_test = "workdirs/toy/data/toy_id.zip"
  c.outliers = "workdirs/toy/data/toy_outliers.npy"
  c.model.depth, c.model.widen_factor, c.model.dropout_rate = 10, 1, 0.0
  c.batch_size, c.outlier_batch_size = 32, 64
  c.epochs = 6 if stage == "pretrain" else 2
  c.steps_per_call = 20
  c.eval_batch_size = 256
  c.objective.m_in, c.objective.m_out = -8.0, -2.0
  if stage == "finetune":
    c.pretrained = "workdirs/toy_pretrain"      # experiments/pretrain.py's --workdir
    c.objective.name = "energy"
    c.optimizer.learning_rate = 0.001
