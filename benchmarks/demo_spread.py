"""The spread of the README's demo table: ``experiments/demo.sh`` run under several seeds and with
XLA:CPU held to smaller instruction sets (standing in for other CPUs), then one table of the
mean of each cell and its range over the runs.

  python benchmarks/demo_spread.py --root /tmp/demo_spread          # runs the variants (~5 min each)
  python benchmarks/demo_spread.py --root /tmp/demo_spread --collect  # the table of runs already there

Each variant is a demo workdir ``ROOT/NAME`` (``NAME`` = isa_seed); ``--collect`` reads those
present.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, --xla_cpu_max_isa or None for the machine's own, seed)
VARIANTS = (("native_s1", None, 1), ("sse42_s1", "SSE4_2", 1), ("native_s2", None, 2),
            ("avx2_s1", "AVX2", 1), ("native_s3", None, 3), ("avx_s2", "AVX", 2))
COLUMNS = (("MSP", "pretrain", "msp"), ("energy", "pretrain", "energy"),
           ("energy fine-tuned", "finetune", "energy"))
METRICS = (("fpr", "FPR95 ↓"), ("auroc", "AUROC ↑"), ("aupr_in", "AUPR ↑"))


def run_variant(root: str, name: str, isa, seed: int) -> None:
  env = dict(os.environ, DEMO_WORKDIR=os.path.join(root, name), PYTHON=sys.executable)
  if isa:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip()
  t0 = time.time()
  with open(os.path.join(root, f"{name}.log"), "w") as log:
    subprocess.run(["bash", "experiments/demo.sh", f"--config.seed={seed}"], cwd=REPO, env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True)
  print(f"{name}: {time.time() - t0:.0f} s", flush=True)


def _results(workdir: str, stage: str) -> dict:
  with open(os.path.join(workdir, stage, "eval", "ood_results.json")) as f:
    return json.load(f)


def collect(root: str):
  """``(names, cells, errors)``: ``cells[(column, set, metric)]`` and ``errors[stage]`` list one
  value per run found under ``root``."""
  names = [n for n, _, _ in VARIANTS
           if os.path.isfile(os.path.join(root, n, "finetune", "eval", "ood_results.json"))]
  cells, errors = {}, {"pretrain": [], "finetune": []}
  for name in names:
    for stage in errors:
      errors[stage].append(100 * _results(os.path.join(root, name), stage)["classification"]["error"])
    for column, stage, detector in COLUMNS:
      results = _results(os.path.join(root, name), stage)["results"]
      label = next(k for k in results if k.split()[0].lower() == detector)
      for ood_set, m in results[label].items():
        for key, _ in METRICS:
          cells.setdefault((column, ood_set, key), []).append(100 * m[key])
  return names, cells, errors


def _cell(values) -> str:
  v = np.asarray(values)
  return f"{v.mean():.1f} ({v.min():.1f}–{v.max():.1f})" if len(v) > 1 else f"{v[0]:.1f}"


def table(root: str) -> str:
  names, cells, errors = collect(root)
  if not names:
    raise SystemExit(f"no finished demo run under {root}")
  sets = list(dict.fromkeys(s for (_, s, _) in cells))
  head = "| OOD set | " + " | ".join(f"{c} {m}" if i == 0 else m for c, _, _ in COLUMNS
                                     for i, (_, m) in enumerate(METRICS)) + " |"
  lines = [f"{len(names)} runs: {', '.join(names)}; each cell: mean (min–max), %",
           f"ID test error: pretrained {_cell(errors['pretrain'])}, fine-tuned "
           f"{_cell(errors['finetune'])}", "", head,
           "|---" * (1 + len(COLUMNS) * len(METRICS)) + "|"]
  for s in sets:
    name = "**mean**" if s == "mean" else s
    lines.append(f"| {name} | " + " | ".join(_cell(cells[(c, s, k)]) for c, _, _ in COLUMNS
                                              for k, _ in METRICS) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="folder of the demo workdirs")
  parser.add_argument("--collect", action="store_true", help="only tabulate the runs there")
  args = parser.parse_args()
  if not args.collect:
    os.makedirs(args.root, exist_ok=True)
    for name, isa, seed in VARIANTS:
      run_variant(args.root, name, isa, seed)
  print(table(args.root))


if __name__ == "__main__":
  main()
