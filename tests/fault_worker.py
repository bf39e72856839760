"""One run of the fault-injection tests (tests/test_faults.py): the test preset on toy data, with
an optional fault injected from inside, then (on success) its final variables in ``<workdir>.npz``.

  python tests/fault_worker.py --workdir DIR --data DIR [--kill_in_save N] [--nan_at_step S]
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", required=True)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--kill_in_save", type=int, default=0,
                 help="SIGKILL this process inside its Nth save, after Orbax wrote the files")
  p.add_argument("--nan_at_step", type=int, default=-1,
                 help="turn the parameters NaN in the state saved at this step")
  args = p.parse_args()
  import jax
  import numpy as np
  from energy_jax import checkpoints, compilation_cache, config as config_lib, train
  compilation_cache.enable()           # as the scripts do: the tests' shared cache

  if args.kill_in_save:
    saves = {"n": 0}
    record = checkpoints.RunCheckpoints.save

    def save_then_die(self, step, state, meta):
      saves["n"] += 1
      if saves["n"] == args.kill_in_save:
        self.manager.save(step, args=checkpoints.ocp.args.Composite(
            state=checkpoints.ocp.args.StandardSave(state),
            meta=checkpoints.ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)      # the files are there, their record is not
      return record(self, step, state, meta)
    checkpoints.RunCheckpoints.save = save_then_die
  if args.nan_at_step >= 0:
    original = checkpoints.RunCheckpoints.save

    def save_nan(self, step, state, meta):
      if step == args.nan_at_step:
        state = state.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, state.params))
      return original(self, step, state, meta)
    checkpoints.RunCheckpoints.save = save_nan

  c = config_lib.get_config("test", "pretrain")
  c.in_train = c.in_test = os.path.join(args.data, "toy_id.zip")
  c.model.dropout_rate = 0.3
  c.epochs, c.steps_per_call, c.num_devices = args.epochs, 1, 1
  row = train.train_and_evaluate(c, args.workdir)
  print("RESULT", row.get("train_loss"), row.get("preempted", False), flush=True)
  if not row.get("preempted"):
    variables = checkpoints.load_variables(args.workdir, c)
    np.savez(args.workdir + ".npz", **{jax.tree_util.keystr(k): np.asarray(v)
                                       for k, v in jax.tree_util.tree_leaves_with_path(variables)})


if __name__ == "__main__":
  main()
