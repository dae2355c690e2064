#!/usr/bin/env bash
# Issue 22, one GPU call (~9.5 minutes), most wanted first (a call cut short keeps what it measured). fla compiles its
# kernels for minutes per shape, so bench/fla_warm.py compiles them in the background while the foreground checks
# (untimed); every timing runs on an otherwise idle GPU.
#  1. check the defaults that changed in run 12 (DeltaNet at Gated DeltaNet's launch settings) at T = 2085, packed,
#     K = V = 64 and K = 128 / V = 256;
#  2. against fla in one process: DeltaNet at 8K and one 64K sequence (run 12 compared its new settings only with
#     fla's times of earlier runs), RWKV6 and GLA at 8K (their new backward defaults), then the cells no run has
#     measured: DeltaNet packed, GLA at small heads and packed.
B=${BUDGET:-560}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
FLA_CACHE_RESULTS=0 timeout $(left 300) python3 bench/fla_warm.py --families deltanet,rwkv6,gla \
  --shapes 8K,64K > $OUT/warm.txt 2>&1 &
FLA_CACHE_RESULTS=0 timeout $(left 300) python3 bench/fla_warm.py --families deltanet,gla \
  --shapes varlen,heads64 > $OUT/warm2.txt 2>&1 &
step check; timeout $(left 280) $F check --families deltanet --cases "default,varlen [,K=V=64,K=128, V=256" \
  --out $OUT/c > /dev/null 2>&1
grep "FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-300
wait
step bench; timeout $(left 430) $F bench --no-sdpa --families deltanet,rwkv6,gla --shapes 8K,64K --out $OUT/b \
  > /dev/null 2>&1
step bench2; timeout $(left $B) $F bench --no-sdpa --families deltanet,gla --shapes varlen,heads64 --out $OUT/l \
  > /dev/null 2>&1
step done
for d in c b l; do echo "#### $d"; grep "^| \|^###" $OUT/$d/families.md 2>/dev/null | cut -c1-260; done
tail -3 $OUT/warm.txt $OUT/warm2.txt
