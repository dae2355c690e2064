#!/usr/bin/env bash
# Issue 22, one GPU call (~9.5 minutes), most wanted first (a call cut short keeps what it measured). fla compiles its
# kernels for minutes per shape, so bench/fla_warm.py compiles them in the background while the foreground checks
# (untimed); every timing runs on an otherwise idle GPU. The rows are the cells no same-process run has measured at
# the current defaults (see bench/results/issue22.md, "Run 13"):
#  1. check Gated DeltaNet and GLA at their defaults (T = 2085, packed, K = V = 64, K = 128 / V = 256);
#  2. against fla in one process: Gated DeltaNet and GLA at 8K, small heads, packed and V = 256; DeltaNet, RWKV6,
#     GLA and Gated DeltaNet at one 64K sequence; RWKV7 and SDPA at 32K;
#  3. what limits the cells below 1.5x: Gated DeltaNet's and GLA's forward kernel by kernel against fla's (8K, packed).
B=${BUDGET:-560}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
FLA_CACHE_RESULTS=0 timeout $(left 300) python3 bench/fla_warm.py --families gated_deltanet,gla \
  --shapes 8K,heads64,varlen,V256 > $OUT/warm.txt 2>&1 &
FLA_CACHE_RESULTS=0 timeout $(left 300) python3 bench/fla_warm.py --families deltanet,rwkv6,gla,gated_deltanet,rwkv7 \
  --shapes 64K,32K > $OUT/warm2.txt 2>&1 &
step check; timeout $(left 240) $F check --families gated_deltanet,gla --cases "default,varlen [,K=V=64,K=128, V=256" \
  --out $OUT/c > /dev/null 2>&1
grep "FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-300
wait
step bench; timeout $(left 420) $F bench --no-sdpa --families gated_deltanet,gla --shapes 8K,heads64,varlen,V256 \
  --out $OUT/b > /dev/null 2>&1
step bench2; timeout $(left $B) $F bench --families deltanet,rwkv6,gla,gated_deltanet,rwkv7 --shapes 64K,32K \
  --out $OUT/l > /dev/null 2>&1
step profile; timeout $(left $B) $F profile --profile-fwd --families gated_deltanet,gla --profile-shapes 8K,varlen \
  --out $OUT/p > /dev/null 2>&1
step done
for d in c b l p; do echo "#### $d"; grep "^| \|^###\|speedup" $OUT/$d/families.md 2>/dev/null | cut -c1-260; done
tail -3 $OUT/warm.txt $OUT/warm2.txt
