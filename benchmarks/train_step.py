"""Images/s of one training step: this project (fp32, bf16) against a PyTorch twin of the reference.

Pretraining step: batch 128. Energy fine-tuning step: 128 ID + 256 outliers in one
forward pass. The PyTorch twin runs eager fp32 (how the reference runs), bf16
autocast + channels_last and, with ``--torch-compile``, torch.compile on top, on the same
device in the same run, when torch is importable.

  python benchmarks/train_step.py            # WRN-40-2 on the default device
  python benchmarks/train_step.py --small    # WRN-10-1, a CPU smoke run (< 1 minute)
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))        # the PyTorch twin of the reference WRN

import jax  # noqa: E402
import numpy as np  # noqa: E402

from energy_jax import config as config_lib, objectives, parallel, train  # noqa: E402


SCHEDULE_STEPS = 10_000   # the cosine schedule's length in the benchmarks (its value is immaterial)


def fused_step_inputs(config, steps: int):
  """``(fn, state, data, idx_in, idx_out)``: the device-resident fused call of ``steps`` steps
  of ``config`` on one device, synthetic uint8 pools, random indices."""
  mesh = parallel.make_mesh(1)
  state = parallel.put_replicated(
      train.create_train_state(config, jax.random.PRNGKey(0), SCHEDULE_STEPS), mesh)
  rng = np.random.default_rng(0)
  n_out = config.outlier_batch_size if objectives.get(config.objective.name).uses_outliers else 0
  data = {"image": rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8),
          "label": rng.integers(0, config.num_classes, 4096).astype(np.int32),
          "outlier": rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)}
  data = parallel.put_replicated(data, mesh)
  fn = train.device_epoch_fn(config, mesh)
  idx_in = rng.integers(0, 4096, (steps, config.batch_size)).astype(np.int32)
  idx_out = rng.integers(0, 4096, (steps, n_out)).astype(np.int32)
  return fn, state, data, idx_in, idx_out


def bench_jax(config, steps: int, warmup: int):
  fn, state, data, idx_in, idx_out = fused_step_inputs(config, steps)
  t0 = time.perf_counter()
  for _ in range(warmup):
    state, m = fn(state, data, idx_in, idx_out)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0     # trace + compile (+ autotuning) + `warmup` calls
  t0 = time.perf_counter()
  state, m = fn(state, data, idx_in, idx_out)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t0
  return steps * (idx_in.shape[1] + idx_out.shape[1]) / dt, first


def bench_torch(depth, widen, classes, n_in, n_out, steps, bf16_channels_last, compile_=False):
  import torch
  import torch.nn.functional as F
  from torch_twin import TwinWRN
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  net = TwinWRN(depth, classes, widen, 0.3).to(dev).train()
  fmt = torch.channels_last if bf16_channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt)
  opt = torch.optim.SGD(net.parameters(), 0.001, momentum=0.9, weight_decay=5e-4, nesterov=True)
  x = torch.randn(n_in + n_out, 3, 32, 32, device=dev).to(memory_format=fmt)
  y = torch.randint(0, classes, (n_in,), device=dev)

  forward = torch.compile(net) if compile_ else net

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16_channels_last):
      out = forward(x)
      loss = F.cross_entropy(out[:n_in], y)
      if n_out:
        e_in = -torch.logsumexp(out[:n_in].float(), 1)
        e_out = -torch.logsumexp(out[n_in:].float(), 1)
        loss = loss + 0.1 * (F.relu(e_in + 23).pow(2).mean() + F.relu(-5 - e_out).pow(2).mean())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  for _ in range(3):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  return steps * (n_in + n_out) / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="WRN-10-1, few steps (CPU smoke run)")
  parser.add_argument("--steps", type=int, default=0)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch-compile", action="store_true",
                      help="also time torch.compile on top of bf16 + channels_last")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="JAX compute dtypes to time")
  parser.add_argument("--stages", default="pretrain,finetune")
  parser.add_argument("--unroll", type=int, default=0,
                      help="config.scan_unroll of the fused steps (0: unrolled on CPU only)")
  args = parser.parse_args()
  steps = args.steps or (3 if args.small else 100)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
        f", prng {jax.config.jax_default_prng_impl}, unroll {args.unroll}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  rows = []
  for stage in args.stages.split(","):
    base = config_lib.get_config("cifar10", stage)
    base.scan_unroll = args.unroll
    if args.small:
      base.model.depth, base.model.widen_factor = 10, 1
    n_in, n_out = base.batch_size, (base.outlier_batch_size if stage == "finetune" else 0)
    results = {}
    for dtype in args.dtypes.split(","):
      cfg = base.copy_and_resolve_references()
      cfg.model.dtype = dtype
      results[f"jax {dtype}"], first = bench_jax(cfg, steps, warmup=1)
      print(f"  {stage} jax {dtype}: {results[f'jax {dtype}']:.0f} img/s; first call (compile) "
            f"{first:.1f} s", flush=True)
    if not args.no_torch:
      try:
        import torch  # noqa: F401
        arch = (base.model.depth, base.model.widen_factor, 10, n_in, n_out, steps)
        results["torch eager fp32"] = bench_torch(*arch, False)
        results["torch bf16+channels_last"] = bench_torch(*arch, True)
        if args.torch_compile:
          results["torch bf16+cl+compile"] = bench_torch(*arch, True, compile_=True)
      except ImportError:
        print("torch is not importable: PyTorch rows skipped")
    best_torch = max([v for k, v in results.items() if k.startswith("torch")], default=None)
    for name, ips in results.items():
      ratio = f"{ips / best_torch:5.2f}x best torch" if best_torch else ""
      rows.append(f"{stage:9s} WRN-{base.model.depth}-{base.model.widen_factor} {n_in}+{n_out:<3d} "
                  f"{name:26s} {ips:10.0f} img/s  {ratio}")
      print(rows[-1], flush=True)


if __name__ == "__main__":
  main()
