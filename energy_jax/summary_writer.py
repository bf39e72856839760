"""Per-epoch training scalars as TensorBoard event files (``tensorboard --logdir WORKDIR``).

Written with TensorFlow's summary op, accelerators hidden from TensorFlow (as the tf.data
pipeline does) so that JAX keeps them, tagged for TensorBoard's scalars plugin as
``tensorboard.summary.scalar`` would tag them; viewing them needs ``pip install tensorboard``,
writing them does not. Where TensorFlow cannot be imported (the GPU
machines of this project have none) the run says so once and goes on: the CSV and JSONL
logs of :func:`energy_jax.train.train_and_evaluate` hold the same numbers.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

SUBDIR = "tensorboard"


class ScalarWriter:
  """Writes ``{name: value}`` scalars at a step into ``logdir``; flushed after every write."""

  def __init__(self, logdir: str):
    from energy_jax import input_pipeline  # noqa: F401  imports TensorFlow, accelerators hidden
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2
    self._tf = tf
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    self.logdir = logdir
    self._writer = tf.summary.create_file_writer(logdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    tf = self._tf
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step),
                         metadata=self._metadata)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def open_for_run(config, workdir: str, log: Callable[[str], None]) -> Optional[ScalarWriter]:
  """The writer of a run (``workdir/tensorboard``) when ``config.tensorboard`` is on, else None;
  also None, said through ``log``, when TensorFlow is not importable."""
  if not config.get("tensorboard", False):
    return None
  try:
    import tensorflow  # noqa: F401
  except ImportError as e:
    log(f"TensorBoard scalars off: TensorFlow cannot be imported ({e}); the epoch rows still go "
        "to training_results.csv and results.jsonl")
    return None
  return ScalarWriter(os.path.join(workdir, SUBDIR))


def read_scalars(logdir: str):
  """``{name: {step: value}}`` from the event files in ``logdir`` (for tests and notebooks)."""
  import tensorflow as tf
  out = {}
  for name in sorted(os.listdir(logdir)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[int(event.step)] = float(tf.make_ndarray(value.tensor))
  return out
