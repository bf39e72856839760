"""Runs experiments/SCRIPT.py command lines in forked children of one process that has imported
what the scripts import (JAX, Flax, absl, energy_jax): each command line costs a fork, not an
interpreter start and JAX's import (a few seconds each on 2 cores).

A child runs the script as ``python experiments/SCRIPT.py ARGS`` would: ``__main__``, its
``sys.argv``, its folder first on ``sys.path``, the server's working directory and environment;
an exception that escapes prints its traceback and exits 1, as the interpreter does. The
children's stdout and stderr go to files read back after the child ends.

Protocol, one JSON object a line: in ``{"script": PATH, "args": [...]}``, out
``{"status": EXIT_STATUS, "stdout": ..., "stderr": ...}`` on what was fd 1 at the start (fd 1
itself then goes to stderr, so that nothing else lands among the replies). The server ends at
end of input. Forking is safe here because the server starts no JAX backend and no Python
thread (checked before each fork). A child reads no stdin (the server's is the requests).
"""

import json
import os
import runpy
import sys
import tempfile
import threading
import traceback

REPLIES = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)

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
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.dup2(out_fd, 1)
  os.dup2(err_fd, 2)
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
  if threading.active_count() != 1:
    raise RuntimeError(f"the server runs {threading.active_count()} threads: forking it is not "
                       "safe")
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
  for line in sys.stdin:
    request = json.loads(line)
    REPLIES.write(json.dumps(run(request["script"], request["args"])) + "\n")
    REPLIES.flush()


if __name__ == "__main__":
  main()
