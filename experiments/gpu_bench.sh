#!/usr/bin/env bash
# One short accelerator session (<= 8 minutes on one GPU), in order of importance, each step
# under a time limit and the whole under BUDGET seconds (a step that would not fit is skipped,
# so the figures gathered so far always come back):
#   1. paper-preset SFT steps (bfloat16, 4 x 4,096 packed rows) with and without remat="block"
#      and with the blocked and the fused (cuDNN) attention: tokens/s, fraction of a bfloat16
#      matmul peak measured in the same run, the compiled step's peak memory
#      (experiments/bench_scale.py);
#   2. a few paper-preset GRPO steps end to end (rollouts with the engine, batch, remat update;
#      random weights, 8 problems x 5 APR rollouts at context 1,024);
#   3. decode: the sampler suite at the paper preset, batch 64 (slot engine vs no-cache full
#      forward vs Hugging Face generate, prefill's fraction of the peak);
#   4. the memory planner on this GPU for the paper SFT step at 4 rows (compiled here), to set
#      beside step 1's figure.
#
#   OUT=/tmp/gpu_bench BUDGET=470 bash experiments/gpu_bench.sh
#
# Logs and JSON go to $OUT (all.log, scale_sft.json, scale_grpo.json, sampler_b64.json; the plan in all.log).
# PRESET=tiny runs the same steps at the tiny preset (a CPU smoke run of this script);
# DRY_RUN=1 prints each step's command instead of running it (tests/test_bench_flags.py).
set -u
OUT=${OUT:-/tmp/gpu_bench}
BUDGET=${BUDGET:-470}
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
  if [ -n "${DRY_RUN:-}" ]; then echo "== $name: $*"; return; fi
  echo "== $name (limit ${limit} s, at $(($(date +%s) - START)) s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  grep -v "^[IW][0-9]\{4\} " "$LOG" | sed -n "/^== $name (/,\$p" | sed 1d | tail -n 25
  echo "== $name: rc $rc, at $(($(date +%s) - START)) s" | tee -a "$LOG"
}

if [ -z "${DRY_RUN:-}" ]; then
  {
    echo "== environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
    $PY -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  } 2>&1 | tee -a "$LOG"
fi

SEQ=4096 CTX=1024
[ "$PRESET" = paper ] || { SEQ=256; CTX=128; }
step scale_sft 200 $PY -m experiments.bench_scale --preset="$PRESET" --what=sft --sft_batch=4 --sft_seq=$SEQ \
  --variants=none/blocked,block/blocked,none/fused,block/fused --repeats=3 --out="$OUT/scale_sft.json"
step scale_grpo 120 $PY -m experiments.bench_scale --preset="$PRESET" --what=grpo --grpo_steps=3 \
  --grpo_problems=8 --grpo_group=5 --grpo_context=$CTX --grpo_slots=64 --grpo_remat=block --out="$OUT/scale_grpo.json"
step sampler_b64 150 $PY -m experiments.bench --repeats=2 --suite=sampler --sampler_presets="$PRESET" \
  --sampler_batches=64 --out="$OUT/sampler_b64.json"
step plan_sft 90 $PY -m experiments.plan --config=experiments/configs/sft.py:"$PRESET" --config.batch_size=4 \
  --config.seq_len=$SEQ --config.remat=block
echo "== done at $(($(date +%s) - START)) s" | tee -a "$LOG"
