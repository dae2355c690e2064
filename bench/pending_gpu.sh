#!/usr/bin/env bash
# What landed without a GPU (2026-12-07, ninth session), checked and timed in one call (~9.5 minutes), most decisive
# first (a call cut short keeps what it measured):
#  1. the element-wise walks' bf16 check: exp2 in the default walks (a change to GPU-checked kernels);
#  2. A0.3B-2B GLA training, compiled: the clipping folded into the fused AdamW (clipped_step) against the clipping
#     pass of before (compiled+clip-pass), in one process;
#  3. the compiled decode step's check against a float32 step (GLA), with its timing;
#  4. Mamba's walk with sequences cut into segments of 512 to 8192 tokens, at 8K and 32K.
# Run 16 ran it (bench/results/run16/), when step 1 also checked a forward walked token by token, since removed.
B=${BUDGET:-560}
. bench/gpu_call.sh
export PYTHONPATH=.:$PYTHONPATH
step check; timeout $(left 120) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
grep "^| " $OUT/e/elementwise.md 2>/dev/null | cut -c1-160
step train; timeout $(left 320) python3 bench/model_gpu.py --part train --variants GLA --modes compiled,compiled+clip-pass \
  --budget 180 --out $OUT/t 2>&1 | grep "train \|FAIL\|skipped"
step decode; timeout $(left 430) python3 bench/model_gpu.py --part decode --variants GLA --budget 90 --out $OUT/d 2>&1 \
  | grep "decode \|FAIL\|skipped\|ok:\|MISMATCH\|SYNC"
step sweep; timeout $(left $B) python3 bench/elementwise_gpu.py sweep --out $OUT/s > /dev/null 2>&1
grep "^| " $OUT/s/elementwise.md 2>/dev/null | cut -c1-200
step done
