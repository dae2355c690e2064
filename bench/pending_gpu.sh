#!/usr/bin/env bash
# What landed without a GPU (2026-12-07, tenth session), checked and timed in one call (~9.5 minutes), most decisive
# first (a call cut short keeps what it measured). fla compiles its kernels for the timed cells in processes of their
# own (bench/fla_warm.py) while the foreground checks:
#  1. the delta template's bf16 check (G held in base 2, exp2 everywhere): Gated DeltaNet, DeltaNet, the vector-decay
#     delta spec, at T = 2085, packed and K = V = 64;
#  2. the element-wise walks' bf16 check: GFW at block_v 8, a sequence and a packed batch the default segment policy
#     cuts (segment maps from the walks' MAP launches, the prefix kernel); GFW's chunk form (new, opt-in; the CPU
#     interpreter cannot run its bf16 products: its tl.dot of bf16 tiles returns garbage, as a bare 16x16 test shows);
#  3. Mamba and GFW (the scan and the chunk form) against their floors and chunk_gla at 2K, 8K and 32K;
#  4. Gated DeltaNet and DeltaNet against fla at 2K and 8K (the exp2 kernels; run 15's ratios are the before);
#  5. Mamba's walk at 8K and 32K: the default policy against whole sequences and forced segment lengths.
# Run 17 ran it at FLA=0 BUDGET=270 (bench/results/run17/): steps 1, 2 and Mamba's rows of step 3; the rest is pending.
B=${BUDGET:-560}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
# FLA=0 (a short call): no fla warm-ups, no step 4
CELLS="gated_deltanet:2K gated_deltanet:8K deltanet:2K deltanet:8K"
[ "${FLA:-1}" = 0 ] && CELLS=""
for cell in $CELLS; do
  FLA_CACHE_RESULTS=0 timeout $(left 300) python3 bench/fla_warm.py --families ${cell%%:*} --shapes ${cell##*:} \
    --memory-fraction 0.05 > $OUT/warm_${cell/:/_}.txt 2>&1 &
done
step check; timeout $(left 150) $F check --families gated_deltanet,deltanet,gated_delta_vector \
  --cases "default,varlen [,K=V=64" --out $OUT/c > /dev/null 2>&1
grep "FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-300
timeout $(left 240) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
grep "^| " $OUT/e/elementwise.md 2>/dev/null | cut -c1-160
wait  # every timing below runs on an otherwise idle GPU
step elementwise; timeout $(left 400) python3 bench/elementwise_gpu.py bench --out $OUT/x > /dev/null 2>&1
[ -n "$CELLS" ] && step bench && timeout $(left 480) $F bench --no-sdpa --families gated_deltanet,deltanet --shapes 2K,8K --out $OUT/b \
  > /dev/null 2>&1
step sweep; timeout $(left $B) python3 bench/elementwise_gpu.py sweep --out $OUT/s > /dev/null 2>&1
step done
for d in c x b s; do echo "#### $d"; grep "^| \|^###" $OUT/$d/*.md 2>/dev/null | grep -v "| ok |" | cut -c1-240; done
tail -qn1 $OUT/warm_*.txt
