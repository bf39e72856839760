#!/usr/bin/env bash
# The GPU checks of a session on the lent device machine (no TensorFlow, no internet there).
# Carry .data (the offline packs gzipped: `gzip -9 -c ../shared/data/X.zip > .data/X.zip.gz` for
# cifar10, tin32-outliers, tin32-ood) and .whl (ml_collections, which the machine lacks:
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections`).
#
#   bash benchmarks/device_run.sh reproduce   # reproduction, then every detector on its models
#   bash benchmarks/device_run.sh ab          # benchmarks/reference_ab.py, AB_EPOCHS="15 2", AB_SEEDS=1,2,3,4
#   bash benchmarks/device_run.sh compile     # the epoch programs' compile, each suspect alone
#   bash benchmarks/device_run.sh sweep       # benchmarks/sweep.py, WRN-40-2 bf16, 4 and 8 members
#
# Logs and JSON go to $OUT (default /tmp/out). On CPU, SMOKE=1 runs the same steps tiny.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
D=${DATA_DIR:-/tmp/energy_jax_data}
mkdir -p "$OUT" "$D"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
case "${1:-}" in reproduce|ab)          # the modes that read the offline packs
  for f in cifar10 tin32-outliers tin32-ood; do
    [ -f "$D/$f.zip" ] || gunzip -c ".data/$f.zip.gz" > "$D/$f.zip" || exit 1
  done ;;
esac
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1     # no progress bars in the logs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

case "${1:-}" in
  reproduce)
    W=$(mktemp -d)
    repro=(--data "$D" --workdir "$W" --overlap-compile)
    det=(--data "$D" --dtype bfloat16 --batch-size 1000)
    knn=(--knn-bank 1281167,2048 --knn-queries 10000 --knn-memory-mib 1024)
    if [ -n "${SMOKE:-}" ]; then
      repro+=(--smoke); det=(--data "$D" --dtype bfloat16 --batch-size 256)
      knn=(--knn-bank 20000,128 --knn-queries 500 --knn-memory-mib 16)
    fi
    timeout "${REPRO_TIMEOUT:-300}" python3 benchmarks/reproduce.py "${repro[@]}" 2>&1 \
      | tee "$OUT/reproduce.log"
    timeout "${DET_TIMEOUT:-200}" python3 benchmarks/detectors.py --pretrained "$W/pretrain" \
      --finetuned "$W/finetune" "${det[@]}" --out "$OUT/detectors.json" \
      --save-energies "$OUT/energies_pretrained.npz" 2>&1 | tee "$OUT/detectors.log"
    timeout "${KNN_TIMEOUT:-90}" python3 benchmarks/detectors.py --knn-only "${knn[@]}" \
      --out "$OUT/knn_bank.json" 2>&1 | tee "$OUT/knn_bank.log"
    ;;
  ab)
    # The two arms run side by side on the one GPU (their wall times are not compared, only their
    # numbers): the reference arm's process keeps JAX on the CPU, the energy-jax arm leaves the
    # PyTorch arm room on the GPU.
    read -r pre ft <<< "${AB_EPOCHS:-15 2}"
    ab=(--data "$D" --pretrain-epochs "$pre" --finetune-epochs "$ft" --seeds "${AB_SEEDS:-${AB_SEED:-1}}")
    [ -n "${SMOKE:-}" ] && ab+=(--tiny)
    JAX_PLATFORMS=cpu timeout "${AB_TIMEOUT:-480}" python3 benchmarks/reference_ab.py "${ab[@]}" \
      --arms reference --out "$OUT/ab_reference.json" > "$OUT/ab_reference.log" 2>&1 &
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "${AB_TIMEOUT:-480}" python3 \
      benchmarks/reference_ab.py "${ab[@]}" --arms energy-jax --out "$OUT/ab_jax.json" 2>&1 \
      | tee "$OUT/ab_jax.log"
    wait
    tail -n 5 "$OUT/ab_reference.log"
    python3 benchmarks/reference_ab.py --combine "$OUT/ab_jax.json" "$OUT/ab_reference.json" \
      2>&1 | tee "$OUT/ab.log"
    ;;
  compile)
    # WRN-40-2 bf16 epoch programs as a GPU runs them (the step in a loop), compiled with the
    # persistent cache off: as the run compiles them, then without each suspect of their growth
    # (docs/performance.md): autotuning, the dropout randomness; then with each hash of random
    # bits one kernel (JAX's threefry kernel lowering: the same bits); then compiled while the
    # GPU computes (as --overlap-compile compiles fine-tuning).
    # Five commands of at most COMPILE_TIMEOUT s each: 525 s, under the device's 600 s a call.
    cs=(python3 benchmarks/compile_stats.py --unroll 1 --dtype bfloat16 --no-state)
    if [ -n "${SMOKE:-}" ]; then
      cs+=(--preset test --num-train 100 --num-test 32 --num-outliers 128)
    fi
    t=${COMPILE_TIMEOUT:-105}
    { timeout "$t" "${cs[@]}"
      timeout "$t" "${cs[@]}" --compiler-option xla_gpu_autotune_level=0
      timeout "$t" "${cs[@]}" --stages pretrain --dropout-rate 0
      timeout "$t" "${cs[@]}" --threefry-lowering kernel
      timeout "$t" "${cs[@]}" --stages finetune --busy
    } 2>&1 | tee "$OUT/compile.log"
    ;;
  sweep)
    sw=(python3 benchmarks/sweep.py --preset cifar10 --depth 40 --widen 2 --dtype bfloat16
        --members 4,8 --steps 20 --repeats 3)
    [ -n "${SMOKE:-}" ] && sw=(python3 benchmarks/sweep.py --members 2 --steps 2 --repeats 1)
    timeout "${SWEEP_TIMEOUT:-420}" "${sw[@]}" 2>&1 | tee "$OUT/sweep.log"
    ;;
  *)
    echo "usage: $0 reproduce|ab|compile|sweep" >&2; exit 2 ;;
esac
