"""Size and compile time of a run's epoch programs: HLO op counts and XLA compile seconds.

  python benchmarks/compile_stats.py                    # cifar10 preset (WRN-40-2), 1-step calls
  python benchmarks/compile_stats.py --steps-per-call 8 # 8 steps unrolled (on CPU) per call
  python benchmarks/compile_stats.py --preset test --steps-per-call 4
  python benchmarks/compile_stats.py --unroll 1 --dtype bfloat16 \
      --compiler-option xla_gpu_autotune_level=0    # on a GPU: without convolution autotuning

For each stage (pretraining, energy fine-tuning) the device-resident epoch program of the
epoch's longest call (``--steps-per-call`` or a divisor of the epoch near it) is lowered for
the given image counts (nothing is decoded: the data are shapes) and compiled with the
persistent compilation cache off; it prints the
StableHLO ops of the lowered module (each function once), the HLO instructions XLA's optimised
module holds (everything inlined, the unrolled steps each counted), and the seconds of lowering
and of compiling. On CPU the fused steps are unrolled, so both counts grow with the steps.

The parts a program's growth is suspected of, each switched off alone: ``--dropout-rate 0``
(no per-example dropout randomness), ``--num-train 49920`` (390 full batches: no padded last
batch, so no mask), ``--compiler-option xla_gpu_autotune_level=0`` (XLA:GPU's DebugOptions for
this compile only: no convolution autotuning), ``--busy`` (the device runs matrix products in a
thread during the compile, as pretraining does while ``--overlap-compile`` compiles fine-tuning).

``--threefry-lowering``: how the random bits' hash (Threefry-2x32: dropout, augmentation) is
compiled. ``default``: the backend's way (JAX lowers it for XLA:CPU as a loop over its rounds,
for GPUs with all 20 rounds inlined); ``inline``: JAX's GPU lowering, compiled by this backend (on
CPU: a stand-in for the GPU's program, fused by XLA:CPU's rules); ``kernel``: one kernel per hash
on a GPU (JAX's ``jax_threefry_gpu_kernel_lowering``: the same bits, written to memory).
"""

import argparse
import contextlib
import os
import re
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from energy_jax import config as config_lib  # noqa: E402
from energy_jax import models, optimizers, train  # noqa: E402
from energy_jax.train import programs, state as state_lib  # noqa: E402

# An op line of StableHLO text: "%x = stablehlo.add ...", "stablehlo.return ...", "func.call".
_MLIR_OP = re.compile(r'^\s*(?:%[^=]+= )?"?(?:stablehlo|func|chlo|mhlo|sdy|shardy)\.[a-z_]+')
# An instruction of optimised HLO text: "name = type opcode(...)" (ROOT ones too).
_HLO_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = ")


def stablehlo_ops(lowered) -> int:
  return sum(1 for line in lowered.as_text().splitlines() if _MLIR_OP.match(line))


def hlo_instructions(compiled) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if _HLO_OP.match(line))


# What each optimised instruction computes, from the op_name of its metadata (first match).
PARTS = (("dropout randomness", ("WideResNet",), ("example_bits",)),
         ("augmentation randomness", (), ("example_bits",)),
         ("BatchNorm", ("/bn",), ()),
         ("rest of the network", ("WideResNet",), ()))


def breakdown(compiled) -> dict:
  """Optimised HLO instructions by what they compute (see :data:`PARTS`)."""
  counts = {}
  for line in compiled.as_text().splitlines():
    if not _HLO_OP.match(line):
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    part = "no op_name (fusion parameters, constants, tuples)"
    if name:
      part = "rest (optimiser, loss, metrics, gathers)"
      for label, within, any_of in PARTS:
        if all(w in name.group(1) for w in within) and (
            not any_of or any(a in name.group(1) for a in any_of)):
          part = label
          break
    counts[part] = counts.get(part, 0) + 1
  return counts


def option(text: str):
  """``NAME=VALUE`` of ``--compiler-option``: an int, a bool or a string value."""
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
  if value.lower() in ("true", "false"):
    return name, value.lower() == "true"
  try:
    return name, int(value)
  except ValueError:
    return name, value


def set_threefry_lowering(how: str) -> None:
  """See the module's doc: ``default``, ``inline`` or ``kernel``."""
  if how == "kernel":
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
  elif how == "inline":
    # JAX's own inlined lowering, registered for every platform (private: a benchmark's probe).
    from jax._src.random import threefry2x32
    from jax.interpreters import mlir
    for platform in ("cpu", "cuda", "rocm"):
      mlir.register_lowering(threefry2x32.threefry2x32_p,
                             threefry2x32._threefry2x32_lowering_rule, platform=platform)


class Busy:
  """Keeps the default device computing until the block ends: calls of 64 chained matrix
  products (tens of milliseconds on a GPU), two in flight, so that the device does not wait
  for the host between them. ``calls``: how many ran."""

  def __enter__(self):
    self.stop, self.calls = threading.Event(), 0
    products = jax.jit(lambda a: jax.lax.fori_loop(0, 64, lambda _, x: jnp.tanh(x @ x), a))
    a = jnp.full((2048, 2048), 1e-3, jnp.float32)
    jax.block_until_ready(products(a))

    def run(a):
      queued = products(a)
      while not self.stop.is_set():
        following = products(queued)
        jax.block_until_ready(queued)
        queued = following
        self.calls += 1
    self.thread = threading.Thread(target=run, args=(a,), daemon=True)
    self.thread.start()
    return self

  def __exit__(self, *exc):
    alive = self.thread.is_alive()
    self.stop.set()
    self.thread.join()
    if not alive:
      raise RuntimeError("the busy thread ended before the compile did")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="cifar10")
  p.add_argument("--steps-per-call", type=int, default=1)
  p.add_argument("--stages", default="pretrain,finetune")
  p.add_argument("--num-train", type=int, default=50000)
  p.add_argument("--num-test", type=int, default=10000)
  p.add_argument("--num-outliers", type=int, default=300000)
  p.add_argument("--dtype", default="", help="model.dtype (default: the preset's)")
  p.add_argument("--unroll", type=int, default=0,
                 help="config.scan_unroll (0: the steps unrolled on CPU; 1: one step in a loop, "
                      "as on a GPU)")
  p.add_argument("--dropout-rate", type=float, default=None,
                 help="model.dropout_rate (default: the preset's)")
  p.add_argument("--compiler-option", type=option, action="append", default=[],
                 metavar="NAME=VALUE", help="an XLA DebugOptions field for the epoch programs' "
                 "compile (repeatable), e.g. xla_gpu_autotune_level=0")
  p.add_argument("--busy", action="store_true",
                 help="compile the epoch programs while the device computes in a thread")
  p.add_argument("--no-state", action="store_true",
                 help="skip the compile of the training state's creation (two per stage)")
  p.add_argument("--threefry-lowering", choices=("default", "inline", "kernel"),
                 default="default", help="how the random bits' hash is compiled (see above)")
  p.add_argument("--breakdown", action="store_true",
                 help="also the optimised instructions by what they compute")
  args = p.parse_args()
  options = dict(args.compiler_option)
  set_threefry_lowering(args.threefry_lowering)
  jax.config.update("jax_enable_compilation_cache", False)     # every compile is a real one
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"preset {args.preset}, steps_per_call {args.steps_per_call}, unroll {args.unroll}, "
        f"{args.num_train} training images, compiler options {options}, busy device "
        f"{args.busy}, threefry lowering {args.threefry_lowering}", flush=True)
  for stage in args.stages.split(","):
    c = config_lib.get_config(args.preset, stage)
    c.steps_per_call = args.steps_per_call
    c.num_devices = 1
    c.scan_unroll = args.unroll
    if args.dtype:
      c.model.dtype = args.dtype
    if args.dropout_rate is not None:
      c.model.dropout_rate = args.dropout_rate
    length = programs.call_lengths(c, args.num_train)[0]       # the epoch's longest call
    t0 = time.time()
    lowered = train.lower_epoch(c, args.num_train, args.num_outliers)
    t_lower = time.time() - t0
    with Busy() if args.busy else contextlib.nullcontext() as busy:
      t0 = time.time()
      compiled = lowered.compile(compiler_options=options or None)
      t_compile = time.time() - t0
    print(f"{stage}: WRN-{c.model.depth}-{c.model.widen_factor} {c.model.dtype}, dropout "
          f"{c.model.dropout_rate}, "
          f"calls of {length} steps: {stablehlo_ops(lowered)} StableHLO ops, "
          f"{hlo_instructions(compiled)} optimised HLO instructions; lowered in {t_lower:.1f} s, "
          f"compiled in {t_compile:.1f} s"
          f"{f' (the device ran {busy.calls} x 64 products meanwhile)' if busy else ''}",
          flush=True)
    if args.no_state:
      continue
    state = train.lower_create_train_state(c, jax.random.PRNGKey(0), 100)
    t0 = time.time()
    state.compile()
    t_state = time.time() - t0
    plain = jax.jit(state_lib._create_train_state, static_argnums=(0, 1)).lower(
        state_lib.hashable_config(c), optimizers.from_config(c, 100), jax.random.PRNGKey(0), None)
    t0 = time.time()
    plain.compile()                       # XLA's default options
    print(f"  training state: compiled in {t_state:.1f} s with models.init_compiler_options() "
          f"{models.init_compiler_options()}, {time.time() - t0:.1f} s with XLA's defaults",
          flush=True)
    if args.breakdown:
      for part, n in sorted(breakdown(compiled).items(), key=lambda kv: -kv[1]):
        print(f"  {n:7d}  {part}", flush=True)


if __name__ == "__main__":
  main()
