"""The persistent compilation cache, measured: the same pretraining run twice, each in a new
process, over one empty cache folder; the second run loads the programs the first compiled.

  python benchmarks/compilation_cache.py [--preset digits] [--epochs 1]

Prints each run's own time line (``setup`` includes building and compiling the train state,
``first epoch`` its compile) and the seconds from launch to exit, then a one-line summary.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = re.compile(r"setup ([\d.]+) s, first epoch ([\d.]+) s \(incl\. compile\)")


def run(preset: str, epochs: int, workdir: str, cache: str):
  """One pretraining run in a new process: (setup s, first epoch s, launch-to-exit s)."""
  cmd = [sys.executable, os.path.join(REPO, "experiments", "pretrain.py"),
         f"--config={os.path.join(REPO, 'experiments', 'configs', 'pretrain.py')}:{preset}",
         f"--config.epochs={epochs}", "--config.progress_bar=False",
         "--config.tensorboard=False", f"--workdir={workdir}", f"--compilation_cache={cache}"]
  start = time.perf_counter()
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
  found = TIMES.search(out.stdout + out.stderr)
  if not found:
    sys.exit(f"no time line in the output of {' '.join(cmd)}")
  return float(found.group(1)), float(found.group(2)), wall


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="digits")
  p.add_argument("--epochs", type=int, default=1)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    rows = [run(args.preset, args.epochs, os.path.join(tmp, f"run{i}"), cache) for i in (1, 2)]
    entries = len(os.listdir(cache))
  print(f"preset {args.preset}, {args.epochs} epoch(s); cache: {entries} programs")
  print("| run | setup s | first epoch s | launch to exit s |")
  print("|---|---|---|---|")
  for name, (setup, first, wall) in zip(("first (empty cache)", "second (same config)"), rows):
    print(f"| {name} | {setup:.1f} | {first:.1f} | {wall:.1f} |")
  saved = rows[0][2] - rows[1][2]
  print(f"the second run took {saved:.1f} s less from launch to exit")


if __name__ == "__main__":
  main()
