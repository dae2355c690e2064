#!/usr/bin/env bash
# Issues 17, 18 and 19: the new kinds' kernels against their peers, in four GPU calls (~9.5 minutes each; every
# kernel here passed its bf16 check in runs 10-12). Each part writes its table a row at a time, so a call cut
# short keeps what it measured. Run 12 learned the costs: fla compiles MomAttention for minutes before its first row,
# Titans' kernels at four launch settings take about two minutes to compile, Mamba's rows about 20 s each.
#   PART=1: the element-wise check (bf16 and fp32; one sequence the default segment policy cuts), then Mamba's walk at
#           the default policy, whole, and in segments of 512 to 8192 tokens, at 8K and 32K (run 16: 2,048-token
#           segments halve the 32K forward and double the 8K one; the policy cuts only the 32K one).
#   PART=4: the MoM layer against fla's MomAttention and a plain Gated DeltaNet layer (issue 19: >= 1.2x fla,
#           <= 1.5x GDN).
#   PART=3: Mamba against its memory floor and GFW against fla's chunk_gla (issue 17), at the default settings; then
#           A0.3B-2B with lsm = mamba training beside GLA (compiled).
#   PART=2: Titans at chunk-start gradients at D = 64 and packed (the check rows that decide its backend="auto"
#           default), Titans against lmoec's Gated DeltaNet (issue 18: <= 2x), TTT-Linear against fla's
#           chunk_ttt_linear (>= 1.0x).
B=${BUDGET:-560}
. bench/gpu_call.sh
if [ "${PART:-1}" = 1 ]; then
  step check; timeout $(left 200) python3 bench/elementwise_gpu.py check --out $OUT/c > /dev/null 2>&1
  step mamba; timeout $(left $B) python3 bench/elementwise_gpu.py sweep --out $OUT/e > /dev/null 2>&1
  files="c/elementwise e/elementwise"
elif [ "$PART" = 4 ]; then
  step mom; timeout $(left $B) python3 bench/mom_gpu.py bench --shapes 8K,2K,32K --out $OUT/m > /dev/null 2>&1
  files="m/mom"
elif [ "$PART" = 3 ]; then
  step elementwise; timeout $(left 380) python3 bench/elementwise_gpu.py bench --out $OUT/e > /dev/null 2>&1
  step model; PYTHONPATH=.:$PYTHONPATH timeout $(left $B) python3 bench/model_gpu.py --part train --variants "Mamba,GLA" \
    --modes compiled --budget $(( $(left $B) - 20 )) --out $OUT/a > /dev/null 2>&1
  files="e/elementwise a/model_gpu_train-Mamba-GLA"
else
  step titans; timeout $(left 330) python3 bench/titans_gpu.py check bench --cases "D=64" --out $OUT/t > /dev/null 2>&1
  step ttt; timeout $(left $B) python3 bench/ttt_gpu.py bench --budget $(( $(left $B) - 15 )) --out $OUT/x > /dev/null 2>&1
  files="t/titans x/ttt"
fi
step done
for f in $files; do echo "#### $f"; grep -v "^$" $OUT/$f.md 2>/dev/null | cut -c1-300; done
