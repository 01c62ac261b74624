#!/usr/bin/env bash
# One short accelerator session, in order of importance, each step under a time limit and the
# whole under BUDGET seconds (a step that would not fit is skipped, so the figures gathered so
# far always come back):
#   1. the sampler suite at the paper preset (bfloat16), batch 64: slot engine vs no-cache
#      full forward vs Hugging Face generate (torch on the same GPU), and prefill's fraction of a
#      bfloat16 matmul peak measured in the same run;
#   2. the SFT step at the paper preset (tokens/s, fraction of the bfloat16 peak);
#   3. the sampler at batch 1 and 256 (HF at 256);
#   4. the engine's tests on the accelerator (float32 matmuls at full precision).
#
#   OUT=/tmp/gpu_bench BUDGET=420 bash experiments/gpu_bench.sh
#
# Logs and JSON go to $OUT (all.log, sampler_b64.json, train_paper.json, sampler_b1_256.json).
# PRESET=tiny runs the same steps at the tiny preset (a CPU dry run of this script).
set -u
OUT=${OUT:-/tmp/gpu_bench}
BUDGET=${BUDGET:-420}
PRESET=${PRESET:-paper}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
LOG="$OUT/all.log"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2 left
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 40 ]; then echo "== $name: skipped ($left s of the budget left)" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, at $(($(date +%s) - START)) s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  grep -v "^[IW][0-9]\{4\} " "$LOG" | sed -n "/^== $name (/,\$p" | sed 1d | tail -n 25
  echo "== $name: rc $rc, at $(($(date +%s) - START)) s" | tee -a "$LOG"
}

{
  echo "== environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
  $PY -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

BENCH=($PY -m experiments.bench --repeats=2)
step sampler_b64 240 "${BENCH[@]}" --suite=sampler --sampler_presets="$PRESET" --sampler_batches=64 \
  --out="$OUT/sampler_b64.json"
step train_paper 120 "${BENCH[@]}" --suite=train --train_presets="$PRESET" --notrain_grpo --repeats=3 \
  --out="$OUT/train_paper.json"
step sampler_b1_256 200 "${BENCH[@]}" --suite=sampler --sampler_presets="$PRESET" --sampler_batches=1,256 \
  --sampler_hf_batches=256 --out="$OUT/sampler_b1_256.json"
# conftest makes CPU the default platform (8 fake devices); here the tests run on the GPU,
# where the 8-device sharding test does not apply.
step engine_tests 150 env JAX_PLATFORMS="${TEST_PLATFORM:-cuda}" JAX_DEFAULT_MATMUL_PRECISION=highest \
  $PY -m pytest -q -p no:cacheprovider tests/test_engine.py -k "not sharded"
echo "== done at $(($(date +%s) - START)) s" | tee -a "$LOG"
