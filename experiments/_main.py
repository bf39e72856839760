"""Shared entry point of the training scripts: parse --config / --workdir, call the library.

``--help`` lists every config field with the default of the chosen preset and its meaning.
"""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from energy_jax.tf_support import quiet_environment  # noqa: E402

quiet_environment()


def refuse_renamed_keys(argv):
  """Exits naming the new path of any energy-jax 0.1 key given as ``--config.KEY=...``."""
  from energy_jax.config import RENAMED
  for arg in argv[1:]:
    key = arg.split("=", 1)[0][len("--config."):] if arg.startswith("--config.") else None
    if key in RENAMED:
      sys.exit(f"--config.{key} was renamed --config.{RENAMED[key]} in energy-jax 0.2 "
               "(README: renamed config keys)")


def config_spec(argv, default: str) -> str:
  """The ``FILE.py:PRESET`` that ``--config`` names in ``argv`` (else ``default``, relative to
  this folder)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return os.path.join(HERE, default)


def _load_config(spec: str):
  """What ``--config=spec`` gives: the file's ``get_config(PRESET)``."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_help_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def config_help(doc: str, spec: str) -> str:
  """``doc`` followed by every config field: its value under ``spec`` and its meaning (a doc
  string for absl's ``--help``, which treats ``%`` as a format character)."""
  from energy_jax import config as config_lib
  try:
    values, source = _load_config(spec), f"--config={os.path.relpath(spec)}"
  except Exception as e:           # a bad --config: absl reports it; list the base defaults
    values, source = None, f"the base config ({type(e).__name__}: {e})"
  text = (f"{doc.rstrip()}\n\nConfig fields, with their values under {source}. Set one with "
          f"--config.NAME=VALUE; another preset with --config=FILE.py:PRESET (presets: "
          f"{', '.join(config_lib.presets())}):\n{config_lib.describe(values)}\n")
  return text.replace("%", "%%")


# The exit status of a run stopped by SIGTERM (saved; the same command continues it): BSD's
# EX_TEMPFAIL, "try again later".
PREEMPTED = 75


def define_process_flags() -> None:
  """The flags that join a multi-process run (README: several hosts)."""
  from absl import flags
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, to run as one of "
                      "--num_processes processes (jax.distributed); unset: one process")
  flags.DEFINE_integer("num_processes", None, "processes of the run (with --coordinator_address)")
  flags.DEFINE_integer("process_id", None, "this process's index in [0, --num_processes)")
  flags.DEFINE_bool("distributed", False, "join a multi-process run whose processes JAX finds "
                    "itself (a TPU pod slice, SLURM)")


def join_processes() -> None:
  """Joins the run's processes as the flags say (before anything touches a device)."""
  from absl import app, flags
  from energy_jax import distributed
  F = flags.FLAGS
  try:
    distributed.initialize(F.coordinator_address, F.num_processes, F.process_id,
                           auto=F.distributed)
  except ValueError as e:
    raise app.UsageError(str(e))


def run(default_config: str, default_workdir: str):
  from absl import app, flags
  from ml_collections import config_flags

  refuse_renamed_keys(sys.argv)
  main_module = sys.modules["__main__"]
  workdir = default_workdir.format(preset="PRESET")
  doc = (f"{(main_module.__doc__ or '').rstrip()}\n\nFlags: --config=FILE.py:PRESET (default "
         f"experiments/{default_config}), --workdir=DIR (default {workdir}; a run there "
         f"resumes), --config.NAME=VALUE for any field below.")
  main_module.__doc__ = config_help(doc, config_spec(sys.argv, default_config))
  config_flags.DEFINE_config_file("config", os.path.join(HERE, default_config),
                                  "experiment config (file.py:preset)")
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, CSV); default per preset")
  define_process_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging
    logging.set_verbosity(logging.WARNING)     # Orbax logs every save at INFO
    join_processes()
    from energy_jax import train
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir.format(preset=_preset())
    result = train.train_and_evaluate(config, workdir)
    if result.get("preempted"):
      return PREEMPTED      # not 0: a script that chains stages must not go on from here

  def _preset():
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    return spec.split(":", 1)[1] if ":" in spec else "cifar10"

  app.run(main)
