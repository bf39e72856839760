"""Shared entry point of the training scripts: parse --config / --workdir, call the library."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def refuse_renamed_keys(argv):
  """Exits naming the new path of any energy-jax 0.1 key given as ``--config.KEY=...``."""
  from energy_jax.config import RENAMED
  for arg in argv[1:]:
    key = arg.split("=", 1)[0][len("--config."):] if arg.startswith("--config.") else None
    if key in RENAMED:
      sys.exit(f"--config.{key} was renamed --config.{RENAMED[key]} in energy-jax 0.2 "
               "(README: renamed config keys)")


def run(default_config: str, default_workdir: str):
  from absl import app, flags
  from ml_collections import config_flags

  refuse_renamed_keys(sys.argv)
  here = os.path.dirname(os.path.abspath(__file__))
  config_flags.DEFINE_config_file("config", os.path.join(here, default_config),
                                  "experiment config (file.py:preset)")
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, CSV); default per preset")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging
    logging.set_verbosity(logging.WARNING)     # Orbax logs every save at INFO
    from energy_jax import train
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir.format(preset=_preset())
    train.train_and_evaluate(config, workdir)

  def _preset():
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    return spec.split(":", 1)[1] if ":" in spec else "cifar10"

  app.run(main)
