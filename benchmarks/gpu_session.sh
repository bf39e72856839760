#!/usr/bin/env bash
# One prepared GPU call (the device machines have JAX/Flax/optax/orbax/torch, no TensorFlow).
#   bash benchmarks/gpu_session.sh reproduce   # end-to-end reproduction, then the fixed profile (~6 min)
#   bash benchmarks/gpu_session.sh sweep       # a profiler trace of the pretraining step, then
#                                              # its bf16 speed and compile time under XLA/PRNG
#                                              # variants (~5 min)
#   bash benchmarks/gpu_session.sh bench       # the step benchmark against PyTorch, torch.compile
#                                              # included (~3 min)
#   bash benchmarks/gpu_session.sh all         # all three (over 10 minutes: one call per mode)
# Expects .data/*.zip.gz and .whl/ml_collections-*.whl, both git-ignored; make them once with
#   mkdir -p .data && for f in cifar10 tin32-outliers tin32-ood; do gzip -9 -c ../shared/data/$f.zip > .data/$f.zip.gz; done
#   pip download --no-deps -d .whl ml_collections==1.1.0
# and name both in the call's `carry`. Logs go to $OUT. A warm machine goes back after ~30 s
# idle (status: idle_release_s): send the next call right after one returns.
set -u
MODE=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
quiet() { grep -v -E "^(W0000|I0000|I1|WARNING)"; }
nvidia-smi -L; date -u
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"

if [[ $MODE == reproduce || $MODE == all ]]; then
  mkdir -p /tmp/d && for f in cifar10 tin32-outliers tin32-ood; do gunzip -c .data/$f.zip.gz > /tmp/d/$f.zip; done
  # A fresh work directory per call: a warm machine keeps /tmp, and reproduce.py refuses old runs.
  timeout "${REPRO_TIMEOUT:-360}" python3 benchmarks/reproduce.py --data /tmp/d --workdir "$(mktemp -d /tmp/repro.XXXX)" \
    ${REPRO_ARGS---overlap-compile} 2>&1 | quiet | tee "$OUT/reproduce.log"
  timeout 120 python3 benchmarks/profile_step.py --steps 40 2>&1 | quiet | tee "$OUT/profile_step.log"
fi

if [[ $MODE == sweep || $MODE == all ]]; then
  # First a profiler trace of the pretraining step: busy fraction, kernels per step, categories.
  timeout 120 python3 benchmarks/trace_step.py --out /tmp/trace --stage pretrain --steps 20 \
    ${SWEEP_ARGS:-} 2>&1 | quiet | tee "$OUT/trace_step.log"
  cp "$(ls -t /tmp/trace/plugins/profile/*/perfetto_trace.json.gz | head -1)" \
    "$OUT/trace_pretrain.json.gz" 2>/dev/null
  # Each variant is its own process (flags are read at start); bf16 only, no torch; the
  # pretraining step only by default (100 of the reproduction's 110 epochs). No autotune level 0:
  # on the H200 (2026-11-26) its first pretraining epoch did not finish in ~270 s.
  for variant in "default|||" "autotune2|--xla_gpu_autotune_level=2||" \
                 "rbg||rbg|" "unroll2|||2" \
                 "no_cmd_buffer|--xla_gpu_enable_command_buffer=||" \
                 "cmd_buffer_while|--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL||"; do
    IFS='|' read -r name flags prng unroll <<< "$variant"
    echo "== $name"
    XLA_FLAGS="$flags" JAX_DEFAULT_PRNG_IMPL="${prng:-threefry2x32}" timeout 100 \
      python3 benchmarks/train_step.py --steps 40 --dtypes bfloat16 --no-torch \
      --unroll "${unroll:-0}" --stages "${SWEEP_STAGES:-pretrain}" ${SWEEP_ARGS:-} 2>&1 | quiet
  done 2>&1 | tee "$OUT/sweep.log"
fi

if [[ $MODE == bench || $MODE == all ]]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/train_step.py --steps "${BENCH_STEPS:-40}" --torch-compile 2>&1 \
    | quiet | tee "$OUT/train_step.log"
fi
