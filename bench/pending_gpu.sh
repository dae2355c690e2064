#!/usr/bin/env bash
# What landed without a GPU (2026-12-07 and -08, tenth and eleventh sessions), checked and timed in one call (~9.5
# minutes), most decisive first (a call cut short keeps what it measured). fla compiles its kernels for the timed
# cells in processes of their own (bench/fla_warm.py) while the foreground checks:
#  1. the element-wise kind's bf16 check: GFW's chunk form as revised in the eleventh session (gate gradients within
#     the chunk, tf32 forward products, segments: a 3000-token row in 2 segments), which passes on CPU with the
#     interpreter rounding as the GPU does (tests/test_triton_bf16.py); the scan walks as run 17 checked them;
#  2. Mamba and GFW (the scan, the chunk form segmented and whole, bf16 forward products) against their floors and
#     chunk_gla at 2K, 8K and 32K;
#  3. Gated DeltaNet and DeltaNet against fla at 2K and 8K (the exp2 kernels, whose bf16 check passed in run 17;
#     run 15's ratios are the before);
#  4. the vector-decay delta spec's backward, not finite on the H100 (runs 10-17) but finite on CPU at the same shape
#     with the interpreter rounding as the GPU does: which buffer turns NaN / inf (bench/probes_gpu.py);
#  5. Mamba's walk at 8K and 32K: the default policy against whole sequences and forced segment lengths.
# Run 17 ran the tenth session's version at FLA=0 BUDGET=270 (bench/results/run17/): the checks and Mamba's rows.
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
step check; timeout $(left 240) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
grep "^| " $OUT/e/elementwise.md 2>/dev/null | cut -c1-160
wait  # every timing below runs on an otherwise idle GPU
step elementwise; timeout $(left 400) python3 bench/elementwise_gpu.py bench --out $OUT/x > /dev/null 2>&1
[ -n "$CELLS" ] && step bench && timeout $(left 480) $F bench --no-sdpa --families gated_deltanet,deltanet --shapes 2K,8K --out $OUT/b \
  > /dev/null 2>&1
step probe; timeout $(left 150) python3 bench/probes_gpu.py delta-vector --out $OUT/p > $OUT/probe.txt 2>&1
grep SUMMARY $OUT/probe.txt
step sweep; timeout $(left $B) python3 bench/elementwise_gpu.py sweep --out $OUT/s > /dev/null 2>&1
step done
for d in e x b s; do echo "#### $d"; grep "^| \|^###" $OUT/$d/*.md 2>/dev/null | grep -v "| ok |" | cut -c1-240; done
tail -qn1 $OUT/warm_*.txt
