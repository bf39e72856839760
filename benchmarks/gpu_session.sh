#!/usr/bin/env bash
# One prepared GPU call (the device machines have JAX/Flax/optax/orbax/torch, no TensorFlow).
#   bash benchmarks/gpu_session.sh tuned       # sweep the pretraining step's XLA/PRNG/unroll
#                                              # variants, then the end-to-end reproduction
#                                              # with the pick (at most ~9.5 min)
#   bash benchmarks/gpu_session.sh reproduce   # the reproduction with reproduce.py's settings
#                                              # (convolutions in CUDA graphs), then the step
#                                              # profile (~5 min)
#   bash benchmarks/gpu_session.sh trace       # a profiler trace of the pretraining step (~1 min)
#   bash benchmarks/gpu_session.sh sweep       # the variants alone (~4 min)
#   bash benchmarks/gpu_session.sh bench       # the step benchmark against PyTorch, torch.compile
#                                              # included (~3 min)
# Several modes in one call: bash benchmarks/gpu_session.sh trace bench
# Expects .data/*.zip.gz and .whl/ml_collections-*.whl, both git-ignored; make them once with
#   mkdir -p .data && for f in cifar10 tin32-outliers tin32-ood; do gzip -9 -c ../shared/data/$f.zip > .data/$f.zip.gz; done
#   pip download --no-deps -d .whl ml_collections==1.1.0
# and name both in the call's `carry`. Logs go to $OUT. A warm machine goes back after ~30 s
# idle (status: idle_release_s): send the next call right after one returns.
# CPU dry runs: OUT=/tmp/o REPRO_ARGS="--smoke" SWEEP_ARGS="--small --steps 2" bash benchmarks/gpu_session.sh tuned
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
quiet() { grep -v -E "^(W0000|I0000|I1|WARNING)"; }
nvidia-smi -L 2>/dev/null; date -u
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

reproduce() {  # $1: log name; the rest: extra reproduce.py arguments
  local log=$1; shift
  [[ -f /tmp/d/tin32-ood.zip ]] || { mkdir -p /tmp/d && for f in cifar10 tin32-outliers tin32-ood; do
    gunzip -c .data/$f.zip.gz > /tmp/d/$f.zip; done; }
  # A fresh work directory per call: a warm machine keeps /tmp, and reproduce.py refuses old runs.
  timeout "${REPRO_TIMEOUT:-330}" python3 benchmarks/reproduce.py --data /tmp/d \
    --workdir "$(mktemp -d /tmp/repro.XXXX)" --overlap-compile ${REPRO_ARGS:-} "$@" 2>&1 \
    | quiet | grep -v -E "^Epoch +[0-9]*[1-9] \|" | tee "$OUT/$log"   # every 10th epoch shown
}

for mode in "${@:-reproduce}"; do
  echo "=== $mode"
  case $mode in
    reproduce)
      reproduce reproduce.log
      timeout 120 python3 benchmarks/profile_step.py --steps 40 2>&1 | quiet | tee "$OUT/profile_step.log" ;;
    tuned)
      # Each variant in its own process (flags are read at start); the pick is written as
      # export lines, sourced here for the reproduction. The baseline, then the variants in
      # their order on the H200 (docs/performance.md), ~40 s each, at most 60: a sweep cut at
      # 230 s loses the last. The sweep times pretraining only, so a picked variant first runs
      # a few fine-tuning steps (shapes of 384 images) and is dropped if they fail. The reproduction (~225 s) gets what is left
      # of ~570 s, at least 265 s, and runs the pick's XLA_FLAGS as they are.
      start=$SECONDS; rm -f /tmp/best.sh
      timeout 230 python3 benchmarks/sweep.py --best-env /tmp/best.sh \
        --variants "${SWEEP_VARIANTS:-default,cmd_buffer_conv,cmd_buffer_conv_while,graph_min2}" \
        ${SWEEP_ARGS:-} 2>&1 | quiet | tee "$OUT/sweep.log"
      [[ -f /tmp/best.sh ]] && . /tmp/best.sh && cat /tmp/best.sh
      pick=$(sed -n 's/^# sweep pick: //p' /tmp/best.sh 2>/dev/null)
      if [[ -n "$pick" && "$pick" != default ]]; then
        timeout 75 python3 benchmarks/train_step.py --no-torch --dtypes bfloat16 --stages finetune \
          --steps 8 --unroll "${REPRO_UNROLL:-0}" ${CHECK_ARGS:-} 2>&1 | quiet | tee "$OUT/pick_check.log"
        if [[ ${PIPESTATUS[0]} != 0 ]]; then
          echo "the pick failed the fine-tuning check: the reproduction runs with default settings"
          export XLA_FLAGS= JAX_DEFAULT_PRNG_IMPL=threefry2x32 REPRO_UNROLL=0
        fi
      fi
      REPRO_TIMEOUT=$((570 - (SECONDS - start))) reproduce reproduce_tuned.log --unroll "${REPRO_UNROLL:-0}" \
        --no-gpu-conv-graphs ;;
    sweep)
      timeout 300 python3 benchmarks/sweep.py ${SWEEP_ARGS:-} 2>&1 | quiet | tee "$OUT/sweep.log" ;;
    trace)
      # Busy fraction, kernels per step, time by kernel kind; the perfetto file comes back too.
      timeout 120 python3 benchmarks/trace_step.py --out /tmp/trace --stage pretrain --steps 20 \
        ${TRACE_ARGS:-} 2>&1 | quiet | tee "$OUT/trace_step.log"
      cp "$(ls -t /tmp/trace/plugins/profile/*/perfetto_trace.json.gz | head -1)" \
        "$OUT/trace_pretrain.json.gz" 2>/dev/null ;;
    bench)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/train_step.py --steps "${BENCH_STEPS:-40}" \
        --torch-compile 2>&1 | quiet | tee "$OUT/train_step.log" ;;
    *) echo "unknown mode $mode (reproduce, tuned, sweep, trace, bench)"; exit 2 ;;
  esac
done
