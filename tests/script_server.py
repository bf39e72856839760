"""Runs experiments/SCRIPT.py command lines in forked children of one process that has imported
what the scripts import (JAX, Flax, absl, energy_jax): each command line costs a fork, not an
interpreter start and JAX's import (a few seconds each on 2 cores).

A child runs the script as ``python experiments/SCRIPT.py ARGS`` would: ``__main__``, its
``sys.argv``, its folder first on ``sys.path``, the server's working directory and environment;
an exception that escapes prints its traceback and exits 1, as the interpreter does. The
children's stdout and stderr go to files read back after the child ends.

Protocol, one JSON object a line: in ``{"script": PATH, "args": [...]}``, out
``{"status": EXIT_STATUS, "stdout": ..., "stderr": ...}``. The server ends at end of input.
Python's fork is safe here because no JAX backend is started in the server (no threads).
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

# What the scripts' imports cost, paid once.
import absl.app  # noqa: F401
import absl.flags  # noqa: F401
import flax.linen  # noqa: F401
import jax  # noqa: F401
import ml_collections  # noqa: F401
import optax  # noqa: F401

import energy_jax  # noqa: F401
from energy_jax import config, objectives, optimizers  # noqa: F401


def child(script: str, args, out_fd: int, err_fd: int) -> int:
  """Runs the script in this (forked) process; its exit status."""
  os.dup2(out_fd, 1)
  os.dup2(err_fd, 2)
  sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
  sys.argv = [script, *args]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  try:
    runpy.run_path(script, run_name="__main__")
    return 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:    # what the interpreter does with an exception nothing caught
    traceback.print_exc()
    return 1


def run(script: str, args):
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      status = 1
      try:
        status = child(script, args, out.fileno(), err.fileno())
      finally:
        try:
          sys.stdout.flush()
          sys.stderr.flush()
        finally:
          os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    texts = []
    for f in (out, err):
      f.seek(0)
      texts.append(f.read().decode("utf-8", "replace"))
  return {"status": os.waitstatus_to_exitcode(wait_status), "stdout": texts[0],
          "stderr": texts[1]}


def main():
  reply = sys.stdout
  sys.stdout = sys.stderr        # nothing but replies on the reply channel
  for line in sys.stdin:
    request = json.loads(line)
    reply.write(json.dumps(run(request["script"], request["args"])) + "\n")
    reply.flush()


if __name__ == "__main__":
  main()
