"""Members per second of a sweep (energy_jax.train.sweep) against one run.

Each row times the device-resident fused steps (``steps`` per call, after a first call that
compiles): the single run's ``device_epoch_fn``, then sweeps of N members (seeds 1..N, and a
learning rate or m_in that differs per member, so that the hyper-parameters are traced arrays).
``x one run`` is the time of a sweep step over that of a single run's step; ``member-steps/s``
is N sweep steps a second, the rate at which the sweep trains runs. With ``--devices D`` every
row runs on a mesh of D devices: the single run data-parallel, each sweep once per
``--member-groups`` G that divides D and N (G = 1: every device steps every member on its
share of the batch; G > 1: config.member_groups, each group of D/G devices steps N/G members).

  python benchmarks/sweep.py                          # WRN-10-1, toy preset batches (CPU)
  python benchmarks/sweep.py --preset cifar10 --depth 40 --widen 2 --dtype bfloat16 \
      --members 4,8 --steps 20                                                 # a GPU
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/sweep.py --devices 2 \
      --members 2 --member-groups 1,2        # 2 of XLA's virtual CPU devices
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from energy_jax import config as config_lib, objectives, parallel, train  # noqa: E402
from energy_jax.train import step as step_lib, sweep as sweep_lib  # noqa: E402

SCHEDULE_STEPS = 10_000   # the cosine schedule's length (its value is immaterial here)
POOL = 2048               # images in the synthetic uint8 pools


def members_of(stage: str, n: int):
  """N members: seeds 1..N, and the number the stage's sweeps search, different per member."""
  if stage == "pretrain":
    return [{"seed": 1 + k, "optimizer.learning_rate": 0.1 / (1 + k)} for k in range(n)]
  return [{"seed": 1 + k, "objective.m_in": -8.0 - k} for k in range(n)]


def inputs(config, steps: int, mesh):
  rng = np.random.default_rng(0)
  n_out = config.outlier_batch_size if objectives.get(config.objective.name).uses_outliers else 0
  data = parallel.put_replicated(step_lib.device_data(
      rng.integers(0, 256, (POOL, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, config.num_classes, POOL).astype(np.int32),
      rng.integers(0, 256, (POOL, 32, 32, 3), dtype=np.uint8)), mesh)
  n_out = max(n_out, mesh.shape[parallel.AXIS])       # pretraining reads no outlier index
  idx = (rng.integers(0, POOL, (steps, config.batch_size)).astype(np.int32),
         rng.integers(0, POOL, (steps, n_out)).astype(np.int32))
  return data, parallel.put_global(idx, mesh, step_lib.step_indices_spec())


def timed(fn, state, data, idx, repeats: int):
  """``(seconds per call, seconds of the first call)``: the best of ``repeats`` calls."""
  t0 = time.perf_counter()
  state, m = fn(state, data, *idx)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = fn(state, data, *idx)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t0)
  return best, first


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="toy", help="config preset (batch sizes, classes)")
  parser.add_argument("--stages", default="pretrain,finetune")
  parser.add_argument("--members", default="1,2,4", help="sweep sizes to time")
  parser.add_argument("--depth", type=int, default=10)
  parser.add_argument("--widen", type=int, default=1)
  parser.add_argument("--dtype", default="", help="model.dtype (default: the preset's)")
  parser.add_argument("--steps", type=int, default=3, help="fused steps per timed call")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls (the best counts)")
  parser.add_argument("--vectorize", default="auto", choices=("auto", "yes", "no"),
                      help="members as one vmap-ed step (yes), one after another in the program "
                           "(no), or the default of the device (auto: no on a CPU)")
  parser.add_argument("--devices", type=int, default=1, help="devices of the mesh")
  parser.add_argument("--member-groups", default="1",
                      help="config.member_groups values to time each sweep with (those that "
                           "divide --devices and the member count)")
  args = parser.parse_args()
  mesh = parallel.make_mesh(args.devices)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}) x{args.devices}, jax "
        f"{jax.__version__}; WRN-{args.depth}-{args.widen} {args.dtype or 'preset dtype'}, preset "
        f"{args.preset}, {args.steps} "
        f"fused steps per call, best of {args.repeats} calls, vectorize {args.vectorize}")
  rows = []
  for stage in args.stages.split(","):
    c = config_lib.get_config(args.preset, stage)
    c.model.depth, c.model.widen_factor = args.depth, args.widen
    if args.dtype:
      c.model.dtype = args.dtype
    c.pretrained = ""
    data, idx = inputs(c, args.steps, mesh)
    state = parallel.put_replicated(
        train.create_train_state(c, jax.random.PRNGKey(0), SCHEDULE_STEPS), mesh)
    one, first = timed(train.device_epoch_fn(c, mesh), state, data, idx, args.repeats)
    batch = c.batch_size + (c.outlier_batch_size if stage == "finetune" else 0)
    rows.append((stage, "one run", batch, args.steps / one, args.steps / one, 1.0, first))
    print(f"  {stage} one run: {args.steps / one:.2f} steps/s (first call {first:.1f} s)",
          flush=True)
    for n in map(int, args.members.split(",")):
      for groups in map(int, args.member_groups.split(",")):
        if n % groups or args.devices % groups:
          continue
        c.member_groups = groups
        grouped = sweep_lib.sweep_mesh(c, n, mesh)
        sweep = sweep_lib.put_sweep(
            sweep_lib.create_sweep_state(c, members_of(stage, n), SCHEDULE_STEPS,
                                         vectorize={"auto": None, "yes": True,
                                                    "no": False}[args.vectorize]), grouped)
        dt, first = timed(sweep_lib.sweep_epoch_fn(grouped), sweep,
                          *inputs(c, args.steps, grouped), args.repeats)
        what = f"sweep of {n}" + (f", {groups} member groups" if groups > 1 else "")
        rows.append((stage, what, batch, args.steps / dt, n * args.steps / dt, dt / one, first))
        print(f"  {stage} {what}: {args.steps / dt:.2f} steps/s (first call {first:.1f} s)",
              flush=True)
  print()
  print("| stage | run | images/step | steps/s | member-steps/s | x one run (time/step) "
        "| first call (s) |")
  print("|---|---|---|---|---|---|---|")
  for stage, what, batch, sps, msps, ratio, first in rows:
    print(f"| {stage} | {what} | {batch} | {sps:.2f} | {msps:.2f} | {ratio:.2f} | {first:.1f} |")


if __name__ == "__main__":
  main()
