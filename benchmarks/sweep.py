"""XLA, PRNG and unroll variants of the bf16 training step, each in a fresh process; picks one.

  python3 benchmarks/sweep.py                          # the pretraining step, every variant (GPU)
  python3 benchmarks/sweep.py --best-env /tmp/best.sh  # and write the pick for reproduce.py
  python benchmarks/sweep.py --small --steps 2         # CPU dry run of the mechanics

Each variant runs ``benchmarks/train_step.py --no-torch --dtypes bfloat16`` with its environment
(XLA reads its flags when it starts, so one process per variant) and reports images/s and the
first call's seconds (trace + compile + autotuning). Each is scored by the seconds it projects for
the stage in the reproduction (its images at that speed, plus the first call). The pick is the
best variant if it beats ``default`` by more than ``--margin`` (3%: about the spread of two
timings of the same variant); otherwise ``default``. ``--best-env`` writes the pick as shell
``export`` lines that ``benchmarks/gpu_session.sh tuned`` sources before it runs
``reproduce.py``; it is rewritten after every variant, so a sweep cut short still leaves the pick
among those that ran.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> environment (and ``unroll`` for the fused loop's lax.scan).
VARIANTS: Dict[str, Dict[str, str]] = {
    "default": {},
    "autotune2": {"XLA_FLAGS": "--xla_gpu_autotune_level=2"},
    "rbg": {"JAX_DEFAULT_PRNG_IMPL": "rbg"},
    "unroll2": {"unroll": "2"},
    "no_cmd_buffer": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
    # XLA captures a run of commands into a CUDA graph only from 5 on (its default); between two
    # convolutions a block has ~2-4 fusions, so most of the step is launched kernel by kernel.
    "graph_min2": {"XLA_FLAGS": "--xla_gpu_graph_min_graph_size=2"},
    # XLA's default command types leave convolutions out (CONVOLUTION is opt-in: not every cuDNN
    # convolution can be captured), so each of the step's ~110 convolutions (forward and both
    # backward) ends a CUDA graph. With them in, a step can be one graph; with WHILE and
    # CONDITIONAL too, a whole epoch (the scan) can. WHILE without CONVOLUTION captures nothing
    # here: a loop is captured only if every command of its body is.
    "cmd_buffer_conv": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+CONVOLUTION"},
    "cmd_buffer_conv_while": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE,"
                                           "+CONDITIONAL"},
}
# Not variants, from the H200 (2026-11-26): --xla_gpu_autotune_level=0 compiled faster but its
# first pretraining epoch did not finish in ~270 s; jaxlib 0.11.2 no longer knows
# --xla_gpu_enable_llvm_module_compilation_parallelism (0.10.2 does), so splitting the LLVM
# module's compilation could not be tried.

# Images each stage trains on in benchmarks/reproduce.py: epochs x 390 steps x images per step.
REPRODUCTION_IMAGES = {"pretrain": 100 * 390 * 128, "finetune": 10 * 390 * (128 + 256)}

RESULT = re.compile(r"(\w+) jax bfloat16: (\d+) img/s; first call \(compile\) ([\d.]+) s")


def parse(output: str, stage: str) -> Optional[Dict[str, float]]:
  """``{'img_s', 'first_call_s'}`` of ``stage`` in ``train_step.py``'s output, or None."""
  for m in RESULT.finditer(output):
    if m.group(1) == stage:
      return {"img_s": float(m.group(2)), "first_call_s": float(m.group(3))}
  return None


def projected_seconds(result: Dict[str, float], stage: str) -> float:
  """The stage's training time in the reproduction at this speed, plus the first call."""
  return REPRODUCTION_IMAGES[stage] / result["img_s"] + result["first_call_s"]


def pick(results: Dict[str, Optional[Dict[str, float]]], stage: str = "pretrain",
         margin: float = 0.03) -> str:
  """The variant with the least :func:`projected_seconds` if it beats ``default`` by more than
  ``margin``, else ``default`` (also when ``default`` itself failed: nothing to compare with)."""
  ran = {name: projected_seconds(r, stage) for name, r in results.items() if r is not None}
  if "default" not in ran:
    return "default"
  best = min(ran, key=ran.get)
  return best if ran[best] < ran["default"] * (1 - margin) else "default"


def export_lines(name: str) -> str:
  """Shell lines that set the environment of variant ``name`` (``unroll`` becomes
  ``REPRO_UNROLL``)."""
  env = VARIANTS[name]
  lines = [f"# sweep pick: {name}",
           f"export XLA_FLAGS={shlex.quote(env.get('XLA_FLAGS', ''))}",
           f"export JAX_DEFAULT_PRNG_IMPL={env.get('JAX_DEFAULT_PRNG_IMPL', 'threefry2x32')}",
           f"export REPRO_UNROLL={env.get('unroll', '0')}"]
  return "\n".join(lines) + "\n"


def run_variant(name: str, stage: str, steps: int, small: bool, timeout: float):
  env = dict(os.environ)
  env.update({k: v for k, v in VARIANTS[name].items() if k != "unroll"})
  env.setdefault("XLA_FLAGS", "")
  cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--no-torch", "--dtypes", "bfloat16",
         "--stages", stage, "--steps", str(steps),
         "--unroll", VARIANTS[name].get("unroll", "0")] + (["--small"] if small else [])
  try:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout:.0f} s"
  if out.returncode != 0:
    return None, f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"
  result = parse(out.stdout, stage)
  return result, None if result else f"no result in its output: {out.stdout[-300:]!r}"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune"))
  p.add_argument("--steps", type=int, default=390, help="fused steps per timed call (an epoch)")
  p.add_argument("--small", action="store_true", help="WRN-10-1 (CPU dry run)")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--timeout", type=float, default=60, help="seconds per variant")
  p.add_argument("--margin", type=float, default=0.03)
  p.add_argument("--best-env", help="write the pick's settings here as shell export lines")
  args = p.parse_args()
  names = args.variants.split(",")
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
  results = {}
  for name in names:
    results[name], problem = run_variant(name, args.stage, args.steps, args.small, args.timeout)
    r = results[name]
    print(f"{name:22s} " + (f"{r['img_s']:9.0f} img/s  first call {r['first_call_s']:6.1f} s  "
                            f"projected {args.stage} {projected_seconds(r, args.stage):6.1f} s"
                            if r else f"FAILED ({problem})"), flush=True)
    if args.best_env:                # the pick so far: a sweep cut short still leaves one
      with open(args.best_env, "w") as f:
        f.write(export_lines(pick(results, args.stage, args.margin)))
  print(f"pick: {pick(results, args.stage, args.margin)}", flush=True)


if __name__ == "__main__":
  main()
