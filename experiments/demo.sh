#!/usr/bin/env bash
# Offline demo (a few minutes on 2 CPU cores): a tiny WRN-10-1 on GENERATED toy data (not CIFAR):
# pretrain, energy fine-tune, evaluate. The real CIFAR commands are in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${DEMO_WORKDIR:-workdirs/demo}
rm -rf "$W"
python -m energy_jax.data.toy "$W/data"
common=("--config.in_train=$W/data/toy_id.zip" "--config.in_test=$W/data/toy_id.zip" "--config.outliers=$W/data/toy_outliers.npy")
python experiments/pretrain.py --config=experiments/configs/pretrain.py:demo --workdir="$W/pretrain" "${common[@]}"
python experiments/finetune.py --config=experiments/configs/finetune.py:demo --workdir="$W/finetune" "${common[@]}" --config.pretrained="$W/pretrain"
python experiments/evaluate.py --config=experiments/configs/finetune.py:demo "${common[@]}" --checkpoint="$W/finetune" \
  --ood=noise=synthetic:uniform_noise,jigsaw=synthetic:jigsaw,invert=synthetic:invert --detectors=msp,energy --num_to_avg=3
echo "results, plots and checkpoints: $W"
