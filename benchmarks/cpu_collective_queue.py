"""Do programs with collectives that queue up unfinished deadlock across CPU processes?

Starts 2 local processes of 2 CPU devices (jax.distributed on 127.0.0.1, XLA:CPU's Gloo
collectives) on a ("members", "batch") mesh and, per mode, dispatches 120 programs over 120
arrays split along "members"; a run that has not ended after ``--timeout`` seconds counts as
hung. The rule energy_jax/parallel.py states rests on it.

  device_put    jax.device_put of the 120 arrays to every device (one program per array)
  independent   a one-psum shard_map program on each array, not waited for
  chained       the same program 120 times, each on the one before's output
  waited        the same 120 programs, each waited for before the next
  one_program   one jitted identity over all 120 arrays, replicated out_shardings

  python benchmarks/cpu_collective_queue.py [--modes device_put,one_program] [--runs 3]
"""

import argparse
import os
import random
import subprocess
import sys
import time

MODES = ("device_put", "independent", "chained", "waited", "one_program")


def worker(mode: str, process_id: int, port: int, iterations: int) -> None:
  import jax
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("members", "batch"))
  split, everywhere = NamedSharding(mesh, P("members")), NamedSharding(mesh, P())
  shapes = ([(2, 16)] * 120 if mode in ("independent", "chained", "waited") else
            [(2, 3, 3, 16, 16), (2, 16), (2, 16), (2, 3, 3, 16, 32), (2, 32), (2, 10)] * 20)
  tree = [jax.make_array_from_callback(s, split, lambda i, s=s: np.ones(s, np.float32)[i])
          for s in shapes]
  psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, ("members", "batch")) * 0.25,
                               mesh=mesh, in_specs=P("members", "batch"),
                               out_specs=P("members", "batch")))
  gather = jax.jit(lambda t: t, out_shardings=everywhere)
  for _ in range(iterations):
    if mode == "device_put":
      out = jax.device_put(tree, everywhere)
    elif mode == "independent":
      out = [psum(x) for x in tree]
    elif mode == "chained":
      out = tree[0]
      for _ in tree:
        out = psum(out) * 0.5
    elif mode == "waited":
      out = [jax.block_until_ready(psum(x)) for x in tree]
    else:
      out = gather(tree)
    jax.block_until_ready(out)


def run(mode: str, iterations: int, timeout: float) -> bool:
  """One run of ``mode`` on 2 processes; whether it ended in ``timeout`` seconds."""
  port = random.randint(20000, 40000)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, str(i), str(port),
                             str(iterations)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL) for i in range(2)]
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    return all(p.returncode == 0 for p in procs)
  except subprocess.TimeoutExpired:
    return False
  finally:
    for p in procs:          # SIGKILL: JAX's preemption notifier catches SIGTERM
      if p.poll() is None:
        p.kill()
        p.wait()


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    return
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--iterations", type=int, default=5, help="of the 120 programs, per run")
  p.add_argument("--timeout", type=float, default=60.0, help="seconds before a run is hung")
  args = p.parse_args()
  for mode in args.modes.split(","):
    if mode not in MODES:
      sys.exit(f"--modes: {mode!r} is none of {', '.join(MODES)}")
  for mode in args.modes.split(","):
    hung = sum(not run(mode, args.iterations, args.timeout) for _ in range(args.runs))
    print(f"{mode}: hung {hung} of {args.runs} runs ({args.iterations} x 120 programs, "
          f"{args.timeout:.0f} s limit)", flush=True)


if __name__ == "__main__":
  main()
