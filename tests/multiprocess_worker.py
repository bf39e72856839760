"""One process of a multi-process test run (tests/test_multiprocess.py): joins the run, trains
the test preset on toy data, and (process 0) writes the final variables to ``<workdir>.npz``.
With ``--sweep_groups G[,G2...]``, then for each G one epoch of a sweep of ``--sweep_members``
members (2 or 4: their own learning rates, some their own seeds) in G member groups, and its
choice, in ``<workdir>_sweep`` for the first G, ``<workdir>_sweep_gG`` for the others (each
member's final variables to ``<that folder>_K.npz``); with ``--sweep_only``, the sweeps alone,
of ``--epochs`` epochs.

  python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num_processes 2 \
      --process_id 0 --workdir DIR --data DIR --pipeline device --epochs 2 [--sweep_groups 2,1]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--coordinator", default="")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True)
  p.add_argument("--pipeline", default="device")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--steps_per_call", type=int, default=1)
  p.add_argument("--sweep_groups", default="")
  p.add_argument("--sweep_only", action="store_true")
  p.add_argument("--sweep_members", type=int, default=2)
  args = p.parse_args()
  from energy_jax import compilation_cache, distributed
  compilation_cache.enable()           # as the scripts do: the tests' shared cache
  distributed.initialize(args.coordinator or None, args.num_processes, args.process_id,
                         timeout_s=120)
  import jax
  import numpy as np
  from energy_jax import checkpoints, config as config_lib, parallel, train
  c = config_lib.get_config("test", "pretrain")
  c.in_train = c.in_test = os.path.join(args.data, "toy_id.zip")
  c.model.dropout_rate = 0.3
  c.input_pipeline = args.pipeline
  c.epochs = args.epochs
  c.steps_per_call = args.steps_per_call
  c.batch_size = 16
  c.optimizer.learning_rate = 0.002
  if not args.sweep_only:
    row = train.train_and_evaluate(c, args.workdir)
    if preempted(row):
      return
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} "
          f"devices: train_loss {row['train_loss']!r}", flush=True)
    variables = checkpoints.load_variables(args.workdir, c)  # every process: Orbax syncs them
    if jax.process_count() > 1:
      try:        # values that differ between processes are refused, on every process
        parallel.put_replicated({"rank": np.array([jax.process_index()])}, parallel.make_mesh())
      except AssertionError as e:
        print(f"put_replicated refused: {e}", flush=True)
    save(args.workdir + ".npz", variables)
  for i, groups in enumerate(int(g) for g in args.sweep_groups.split(",") if g):
    from energy_jax.train import sweep_loop
    folder = args.workdir + ("_sweep" if i == 0 else f"_sweep_g{groups}")
    c.epochs, c.member_groups = (args.epochs if args.sweep_only else 1), groups
    summary = sweep_loop.train_and_evaluate_sweep(c, MEMBERS[:args.sweep_members], folder)
    if preempted(summary):
      return
    print(f"process {jax.process_index()}: sweep in {groups} group(s): members "
          f"{[m['status'] for m in summary['members']]}, chosen {summary['chosen']}", flush=True)
    for k, member in enumerate(summary["members"]):
      save(f"{folder}_{k}.npz",
           checkpoints.load_variables(os.path.join(folder, member["workdir"]), c))


MEMBERS = [{"optimizer.learning_rate": 0.002}, {"optimizer.learning_rate": 0.001, "seed": 3},
           {"optimizer.learning_rate": 0.003, "seed": 5}, {"optimizer.learning_rate": 0.0005}]


def save(path, variables):
  """Process 0 writes ``variables`` to ``path`` (.npz, a key per leaf's path)."""
  import jax
  import numpy as np
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


def preempted(summary) -> bool:
  if summary.get("preempted"):
    import jax
    print(f"process {jax.process_index()} preempted at epoch {summary['epoch']}, step "
          f"{summary['steps_done']}", flush=True)
  return bool(summary.get("preempted"))


if __name__ == "__main__":
  main()
