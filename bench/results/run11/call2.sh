#!/usr/bin/env bash
# Run 11, second call: fla's kernels compile in the background from the start (bench/fla_warm.py; the first call
# spent its timing steps compiling them), while the foreground checks the two backward settings the first call
# timed fastest (RWKV6's whole-chunk dq/dk in K blocks: 10.98 -> 5.04 ms fwd+bwd at 8K; GLA's dq/dk in K blocks of
# 64: 5.61 -> 4.04 ms) and finishes the vector-decay probe; then issue 22's timing.
B=${BUDGET:-570}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
FLA_CACHE_RESULTS=0 timeout $(left 300) python3 bench/fla_warm.py --families gated_deltanet,deltanet,simple_gla,gla \
  --shapes 64K,2K,heads64,varlen,V256 > $OUT/warm.txt 2>&1 &
step check
timeout $(left 120) $F check --families rwkv6 --set bonus_whole_chunk=true --cases "default,varlen [,K=V=64" \
  --out $OUT/cb > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cb/families.md | head -5
timeout $(left 200) $F check --families gla --set 'grad_qk={"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2}' \
  --cases "default,varlen [" --out $OUT/cg > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cg/families.md | head -5
step probe
for s in 'stages_fwd=1' 'wu="walk"'; do
  CUDA_LAUNCH_BLOCKING=1 timeout $(left 260) $F check --families gated_delta_vector --cases default --set "$s" \
    --out $OUT/p > /dev/null 2>&1
  echo "-- $s: $(grep -o 'ALL PASS\|illegal memory access' $OUT/p/families.md 2>/dev/null | sort -u | tr '\n' ' ')"
  rm -rf $OUT/p
done
wait
step gdn; timeout $(left 380) $F bench --no-sdpa --families gated_deltanet --shapes 64K,2K,heads64,varlen,V256 \
  --out $OUT/g > /dev/null 2>&1
step rest; timeout $(left $B) $F bench --no-sdpa --families deltanet,simple_gla,gla --shapes 64K,varlen \
  --out $OUT/v > /dev/null 2>&1
step done
for d in cb cg g v; do echo "#### $d"; grep "^| \|FAIL" $OUT/$d/families.md 2>/dev/null | cut -c1-250; done
tail -3 $OUT/warm.txt
