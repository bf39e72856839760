"""A profiler trace of the fused training step, and where its device time goes.

  python benchmarks/trace_step.py --out /tmp/trace                 # pretraining step, batch 128
  python benchmarks/trace_step.py --out /tmp/trace --stage finetune   # 128 + 256 images

Compiles and runs one call of ``--steps`` fused steps (the device-resident path, synthetic
data), then traces a second call with ``jax.profiler`` (perfetto JSON in ``--out``) and prints
the summary of ``benchmarks/trace_summary.py``: busy fraction of the device, kernels per step,
time by kernel category, top kernels. On CPU there are no device kernels: only the trace is
written.
"""

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from energy_jax import configs  # noqa: E402
import trace_summary  # noqa: E402
import train_step  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for the trace")
  p.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune"))
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--small", action="store_true", help="WRN-10-1 (a CPU check of the script)")
  args = p.parse_args()
  c = configs.apply_preset(configs.base_config(), "cifar10", args.stage)
  c.dtype = args.dtype
  if args.small:
    c.depth, c.widen_factor = 10, 1
  fn, state, data, idx_in, idx_out = train_step.fused_step_inputs(c, args.steps)
  t0 = time.perf_counter()
  state, m = fn(state, data, idx_in, idx_out)
  jax.block_until_ready(m)
  print(f"device: {jax.devices()[0].device_kind}, WRN-{c.depth}-{c.widen_factor}, {c.dtype}, "
        f"{args.stage} step of {idx_in.shape[1] + idx_out.shape[1]} images; first call "
        f"(compile) {time.perf_counter() - t0:.1f} s; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  jax.profiler.start_trace(args.out, create_perfetto_trace=True)
  t0 = time.perf_counter()
  state, m = fn(state, data, idx_in, idx_out)
  jax.block_until_ready(m)
  wall = time.perf_counter() - t0
  jax.profiler.stop_trace()
  print(f"traced call: {args.steps} steps in {1e3 * wall:.1f} ms wall "
        f"({1e3 * wall / args.steps:.3f} ms/step, profiler on)")
  path = max(glob.glob(os.path.join(args.out, "plugins", "profile", "*", "perfetto_trace.json.gz")),
             key=os.path.getmtime)
  print(f"trace: {path}")
  try:
    print(trace_summary.report(trace_summary.summarize(
        trace_summary.device_kernels(trace_summary.load(path)), args.steps)))
  except ValueError as e:
    print(f"no summary: {e}")


if __name__ == "__main__":
  main()
