#!/usr/bin/env bash
# Offline demo on real images bundled with scikit-learn (no download; a few minutes on 2 CPU
# cores): a WRN-10-1 learns the 1,797 handwritten digits (8x8, upsampled to 32x32), is
# energy-fine-tuned with patches of the left halves of scikit-learn's two sample photographs as
# outliers, and is evaluated against patches of their right halves and synthetic OOD sets.
# Prints MSP vs energy (pretrained) vs energy (fine-tuned). The CIFAR commands are in README.md.
# DEMO_WORKDIR (default workdirs/demo): a folder this script creates; it refuses any other.
# PYTHON (default python3): the interpreter, e.g. a venv's. Arguments are passed to both training
# scripts (e.g. --config.seed=2).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${DEMO_WORKDIR:-workdirs/demo}
MARK="$W/.energy_jax_demo"
if [ -e "$W" ] && [ ! -e "$MARK" ]; then
  echo "demo.sh: $W exists and was not made by this script; set DEMO_WORKDIR to a new folder" >&2
  exit 1
fi
# A fresh run each time: only the folders an earlier run of this script made go.
[ -e "$MARK" ] && rm -rf "$W/pretrain" "$W/finetune"
mkdir -p "$W" && touch "$MARK"

PYTHON=${PYTHON:-python3}
cfg=experiments/configs
ood="photos=sklearn:photos,noise=synthetic:uniform_noise,gaussian=synthetic:gaussian_noise"
ood="$ood,jigsaw=synthetic:jigsaw,invert=synthetic:invert"
"$PYTHON" experiments/pretrain.py --config=$cfg/pretrain.py:digits --workdir="$W/pretrain" "$@"
"$PYTHON" experiments/finetune.py --config=$cfg/finetune.py:digits --workdir="$W/finetune" \
  --config.pretrained="$W/pretrain" "$@"
for run in pretrain finetune; do
  "$PYTHON" experiments/evaluate.py --config=$cfg/finetune.py:digits --checkpoint="$W/$run" \
    --ood="$ood" --detectors=msp,energy --num_to_avg=5
done
"$PYTHON" - "$W" <<'PY'
import json, sys
from energy_jax.ood import report
w = sys.argv[1]
pre, ft = (json.load(open(f"{w}/{run}/eval/ood_results.json"))["results"]
           for run in ("pretrain", "finetune"))
label = lambda results, name: next(k for k in results if k.split()[0].lower() == name)
table = {"MSP": pre[label(pre, "msp")], "energy": pre[label(pre, "energy")],
         "energy fine-tuned": ft[label(ft, "energy")]}
sets = [k for k in table["MSP"] if k != "mean"]
print("\nFPR95 / AUROC / AUPR (%), the mean of 5 draws per set:\n")
print(report.markdown_table(table, sets))
PY
echo "results, plots and checkpoints: $W"
