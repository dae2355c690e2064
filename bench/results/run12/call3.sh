#!/usr/bin/env bash
# Run 12, third call (the device time left, ~5 minutes): DeltaNet's bf16 check at Gated DeltaNet's launch settings
# (the first call's sweep timed them 39-49% faster), then the element-wise bench with its output captured (the
# second call's bench wrote its table only at its end, which its time limit cut off).
. bench/gpu_call.sh; B=330
timeout 170 python3 bench/families_gpu.py check --families deltanet --cases "default,varlen [,K=V=64" \
  --set 'wu="auto"' --set warps_ut=1 --set stages_fwd=3 --out $OUT/c > $OUT/c.txt 2>&1
grep "^| \|FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-250
timeout 130 python3 bench/elementwise_gpu.py bench --out $OUT/e > $OUT/e.txt 2>&1; echo rc=$?; tail -25 $OUT/e.txt
