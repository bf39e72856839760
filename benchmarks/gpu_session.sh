#!/usr/bin/env bash
# One prepared GPU session (the device machines have JAX/Flax/optax/orbax/torch, no TensorFlow):
# the train-step benchmark, then the end-to-end reproduction on the offline packs.
# Expects .data/*.zip.gz (gzip -9 of ../shared/data/*.zip) and .whl/ml_collections-*.whl.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
mkdir -p /tmp/d && for f in cifar10 tin32-outliers tin32-ood; do gunzip -c .data/$f.zip.gz > /tmp/d/$f.zip; done
nvidia-smi -L; date -u
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
timeout "${REPRO_TIMEOUT:-390}" python3 benchmarks/reproduce.py --data /tmp/d --workdir /tmp/repro \
  ${REPRO_ARGS:-} 2>&1 | grep -v -E "^(W0000|I0000|I1|WARNING)" | tee "$OUT/reproduce.log"
timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/train_step.py --steps "${BENCH_STEPS:-40}" 2>&1 \
  | grep -v -E "^(W0000|I0000|WARNING)" | tee "$OUT/train_step.log"
