"""Shared entry point of the scripts (pretrain.py, finetune.py, evaluate.py): ``--help``, the
checks of the command line before any work, and one short message per mistake.

``--help`` lists every config field with the default of the chosen preset and its meaning.

A mistake on the command line (an unknown flag or config field, a bad value, an unknown preset,
objective, model or detector, a path that does not exist) ends before anything is read or
compiled in ``SCRIPT: error: WHAT`` and a line on where to look, on stderr, with exit status 1.
An error the library raises for the user once the run has started (a finished run in the
workdir, a checkpoint of another model, ...) ends the same way; ``ENERGY_JAX_TRACEBACK=1``
shows its traceback instead.
"""

import functools
import importlib.util
import os
import re
import sys
from typing import NoReturn, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from energy_jax.tf_support import quiet_environment  # noqa: E402

quiet_environment()

TRACEBACK_ENV = "ENERGY_JAX_TRACEBACK"

# The exception types of the library's messages to the user that a run can end in once it has
# started; shown as one line when the library raised them itself (see guarded()).
USER_ERRORS = (ValueError, OSError, ImportError, RuntimeError, FloatingPointError)


def script() -> str:
  return os.path.basename(sys.argv[0]) or "energy-jax"


def fail(message, hint: Optional[str] = None) -> NoReturn:
  """Exits with status 1 after ``SCRIPT: error: MESSAGE`` (one line) and a hint on stderr."""
  name = script()
  text = " ".join(str(message).split())
  help_hint = f"python {os.path.relpath(sys.argv[0])} --help lists every flag and config field"
  print(f"{name}: error: {text}\n{name}: {hint or help_hint}", file=sys.stderr)
  sys.exit(1)


def error_text(e: BaseException) -> str:
  """The message of ``e`` (a KeyError's without the quotes of its repr)."""
  if isinstance(e, KeyError) and len(e.args) == 1:
    return str(e.args[0])
  return str(e) or type(e).__name__


def refuse_renamed_keys(argv):
  """Exits naming the new path of any key of an earlier version given as ``--config.KEY=...``
  (``--config.objective=NAME`` included: the objective is a section since 0.3)."""
  from energy_jax.config import renamed_key
  for arg in argv[1:]:
    key = arg.split("=", 1)[0][len("--config."):] if arg.startswith("--config.") else None
    renamed = key and renamed_key(key)
    if renamed:
      fail(f"--config.{renamed.replace(' -> ', ' was renamed --config.', 1)} (CHANGELOG.md: "
           "renamed config keys)")


def config_spec(argv, default: str) -> str:
  """The ``FILE.py:PRESET`` that ``--config`` names in ``argv`` (else ``default``, relative to
  this folder)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return os.path.join(HERE, default)


@functools.lru_cache(maxsize=None)
def _load_config(spec: str):
  """What ``--config=spec`` gives: the file's ``get_config(PRESET)`` (not to be modified)."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such config file {path}")
  module_spec = importlib.util.spec_from_file_location("_help_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config(preset)")
  return module.get_config(preset) if preset else module.get_config()


def config_help(doc: str, spec: str) -> str:
  """``doc`` followed by every config field: its value under ``spec`` and its meaning (a doc
  string for absl's ``--help``, which treats ``%`` as a format character)."""
  from energy_jax import config as config_lib
  try:
    values, source = _load_config(spec), f"--config={os.path.relpath(spec)}"
  except Exception as e:           # a bad --config: reported when the flags are defined
    values, source = None, f"the base config ({type(e).__name__}: {e})"
  text = (f"{doc.rstrip()}\n\nConfig fields, with their values under {source}. Set one with "
          f"--config.NAME=VALUE; another preset with --config=FILE.py:PRESET (presets: "
          f"{', '.join(config_lib.presets())}):\n{config_lib.describe(values)}\n")
  return text.replace("%", "%%")


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def check_config_args(argv, spec: str) -> None:
  """Exits naming the mistake if ``--config`` names no config (a missing file, an unknown
  preset) or an override ``--config.NAME`` names no field of it (with the closest field)."""
  from energy_jax import config as config_lib
  try:
    config = _load_config(spec)
  except (FileNotFoundError, ValueError) as e:
    fail(f"--config={spec}: {error_text(e)}")
  for arg in argv[1:]:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    problem = match and config_lib.unknown_field(config, match.group(1))
    if problem:
      fail(problem)


def define_config(default: str, help_string: str) -> None:
  """``--config`` (``FILE.py:PRESET``, default ``default`` relative to this folder) and its
  ``--config.NAME=VALUE`` overrides, after :func:`check_config_args`."""
  from absl import flags
  from ml_collections import config_flags
  refuse_renamed_keys(sys.argv)
  check_config_args(sys.argv, config_spec(sys.argv, default))
  try:       # without --config on the command line, the overrides are parsed here
    config_flags.DEFINE_config_file("config", os.path.join(HERE, default), help_string)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    fail(error_text(e))


def parse_flags(argv):
  """absl's flag parsing (``--help`` as absl prints it), a mistake in one line (absl would print
  the whole help)."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    fail(error_text(e) + config_field_hint(e.flagname))
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    fail(error_text(e))


def config_field_hint(flag: str) -> str:
  """For an unknown flag ``--NAME`` where NAME is (the last part of) a config field: how to set
  that field."""
  from energy_jax import config as config_lib
  fields = [f.name for f in config_lib.fields()]
  match = next((f for f in fields if flag in (f, f.rsplit(".", 1)[-1])), None)
  return f"; config fields are set as --config.{match}=VALUE" if match else ""


def check_config(config) -> None:
  """Exits naming the field and its value for any value a run cannot start with."""
  from energy_jax import config as config_lib
  try:
    config_lib.validate(config)
  except ValueError as e:
    fail(e)


def _raised_by_energy_jax(e: BaseException) -> bool:
  """Whether ``e`` was raised by this project's code (a message written for the user), not
  inside a library it calls."""
  import energy_jax
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  roots = (os.path.dirname(os.path.abspath(energy_jax.__file__)), HERE)
  return any(path.startswith(root + os.sep) for root in roots)


def guarded(main):
  """``main`` with its usage errors, and the errors the library raises for the user, ended by
  :func:`fail` instead of absl's whole help or a traceback."""
  def run_main(argv):
    from absl import app
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e)
    except USER_ERRORS as e:
      if os.environ.get(TRACEBACK_ENV) or not _raised_by_energy_jax(e):
        raise
      fail(e, f"{TRACEBACK_ENV}=1 shows where it was raised")
    except KeyboardInterrupt:     # Ctrl-C before training began, or a second one during it
      if os.environ.get(TRACEBACK_ENV):
        raise
      print(f"{script()}: interrupted (Ctrl-C); a run continues from its last checkpoint",
            file=sys.stderr)
      sys.exit(INTERRUPTED)
  return run_main


def start(main) -> None:
  """``app.run(main)`` with the flag parsing and error messages above."""
  from absl import app
  app.run(guarded(main), flags_parser=parse_flags)


def check_local_path(path: str, message: str) -> None:
  """Exits with ``message`` if ``path`` is a local path that does not exist (a name of
  :mod:`energy_jax.fetch` is fetched when it is read)."""
  from energy_jax import fetch, storage
  if path and not storage.is_url(path) and not fetch.is_name(path) and not os.path.exists(path):
    fail(message)


def check_workdir(workdir: str, what: str = "--workdir") -> None:
  """Exits if ``workdir`` is a local file (a run's folder cannot be made there)."""
  from energy_jax import storage
  if workdir and not storage.is_url(workdir) and os.path.isfile(workdir):
    fail(f"{what} {workdir} is a file, not a folder: name another folder")


def check_run_paths(config, workdir: str) -> None:
  """Exits naming the field if a source the run reads, or its pretrained weights, are missing."""
  from energy_jax import config as config_lib
  from energy_jax import objectives
  uses_outliers = objectives.get(config.objective.name).uses_outliers
  try:
    config_lib.check_sources_exist(config, ("in_train", "in_test")
                                   + (("outliers",) if uses_outliers else ()))
  except FileNotFoundError as e:
    fail(e)
  check_workdir(workdir)
  resuming = os.path.isdir(os.path.join(workdir, "checkpoints"))
  if config.pretrained and not resuming:
    check_local_path(config.pretrained, f"config.pretrained = {config.pretrained!r}: no such run "
                     "directory or .pt file; set it to a --workdir of experiments/pretrain.py "
                     "or a reference .pt file")


def sweep_members(config, sweep_flags):
  """The members of the ``--sweep`` flags (none: an empty list), or an exit naming the flag and
  value of a mistake (:func:`energy_jax.train.sweep.parse_sweep_flags`)."""
  if not sweep_flags:
    return []
  from energy_jax.train import sweep
  try:
    return sweep.parse_sweep_flags(config, sweep_flags)
  except ValueError as e:
    fail(e, "docs/sweeps.md: what a sweep's members may set")


_CONFIG_ARG = re.compile(r"^--?(?:no)?config(?:[.=]|$)")


def evaluate_command(argv, default_config: str, checkpoint: str) -> str:
  """The ``evaluate.py`` command line of ``checkpoint`` with this command's config flags."""
  import shlex
  args, given = [], False
  for i, arg in enumerate(argv[1:], 1):
    if _CONFIG_ARG.match(arg):
      args.append(arg)
      # The split form `--config.x VALUE` (a flag without `=` followed by a value; a boolean
      # field given as `--config.flag` is followed by the next flag instead).
      if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        args.append(argv[i + 1])
      given = given or arg == "--config" or arg.startswith("--config=")
  if not given:
    args.insert(0, f"--config={os.path.relpath(os.path.join(HERE, default_config))}")
  script_path = os.path.relpath(os.path.join(HERE, "evaluate.py"))
  return " ".join(shlex.quote(a) for a in
                  ["python", script_path, *args, f"--checkpoint={checkpoint}"])


# The exit status of a run stopped by SIGTERM (saved; the same command continues it): BSD's
# EX_TEMPFAIL, "try again later"; stopped by Ctrl-C (SIGINT), the shell's 128 + 2.
PREEMPTED = 75
INTERRUPTED = 130


def define_process_flags() -> None:
  """The flags that set up JAX before any work: the processes of a multi-process run
  (docs/training.md: several hosts) and the persistent compilation cache."""
  from absl import flags
  from energy_jax import compilation_cache
  flags.DEFINE_string("compilation_cache", None, "folder of JAX's persistent compilation cache, "
                      "'off' for none (default: $" + compilation_cache.ENV + ", else "
                      "~/.cache/energy_jax/" + compilation_cache.FOLDER + ")")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, to run as one of "
                      "--num_processes processes (jax.distributed); unset: one process")
  flags.DEFINE_integer("num_processes", None, "processes of the run (with --coordinator_address)")
  flags.DEFINE_integer("process_id", None, "this process's index in [0, --num_processes)")
  flags.DEFINE_bool("distributed", False, "join a multi-process run whose processes JAX finds "
                    "itself (a TPU pod slice, SLURM)")


def join_processes() -> None:
  """Turns the compilation cache on and joins the run's processes as the flags say (before
  anything compiles or touches a device)."""
  from absl import app, flags
  from energy_jax import compilation_cache, distributed
  F = flags.FLAGS
  try:
    compilation_cache.enable(F.compilation_cache)
    distributed.initialize(F.coordinator_address, F.num_processes, F.process_id,
                           auto=F.distributed)
  except ValueError as e:
    raise app.UsageError(str(e))


def run(default_config: str, default_workdir: str):
  from absl import app, flags
  from ml_collections import config_flags

  main_module = sys.modules["__main__"]
  workdir = default_workdir.format(preset="PRESET")
  doc = (f"{(main_module.__doc__ or '').rstrip()}\n\nFlags: --config=FILE.py:PRESET (default "
         f"experiments/{default_config}), --workdir=DIR (default {workdir}; a run there "
         f"resumes), --config.NAME=VALUE for any field below.")
  main_module.__doc__ = config_help(doc, config_spec(sys.argv, default_config))
  define_config(default_config, "experiment config (file.py:preset)")
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, CSV); default per preset")
  flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,...: train the grid of these values (the "
                            "product over the --sweep flags) as one sweep, a run per member in "
                            "WORKDIR/members/ (docs/sweeps.md); FIELD: seed, m_in, m_out, "
                            "energy_weight, oe_weight, learning_rate, weight_decay, ... or a "
                            "dotted config name")
  define_process_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging
    logging.set_verbosity(logging.WARNING)     # Orbax logs every save at INFO
    config = flags.FLAGS.config
    check_config(config)
    join_processes()
    workdir = flags.FLAGS.workdir or default_workdir.format(preset=_preset())
    members = sweep_members(config, flags.FLAGS.sweep)
    check_run_paths(config, workdir)
    from energy_jax import train
    if members:
      from energy_jax.train import sweep_loop
      result = sweep_loop.train_and_evaluate_sweep(config, members, workdir)
    else:
      result = train.train_and_evaluate(config, workdir)
    if result.get("preempted"):     # not 0: a script that chains stages must not go on
      return INTERRUPTED if result.get("signal") == "SIGINT" else PREEMPTED
    if members:
      print("the chosen member's table on the OOD test sets:\n  "
            + evaluate_command(sys.argv, default_config, result["chosen_workdir"]))

  def _preset():
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    return spec.split(":", 1)[1] if ":" in spec else "cifar10"

  start(main)
