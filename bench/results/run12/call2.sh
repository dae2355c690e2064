#!/usr/bin/env bash
# Issues 17, 18 and 19, one GPU call (~9.5 minutes): the new kinds' kernels all passed their bf16 checks (runs 10-11:
# Mamba, GFW, MoM, TTT, Titans per token), so this call times them against their peers, most wanted first (a call
# cut short keeps what it measured; each part writes its table a row at a time):
#  1. the MoM layer against fla's MomAttention and a plain Gated DeltaNet layer (issue 19: >= 1.2x fla, <= 1.5x GDN);
#  2. Mamba's selective scan against its memory floor, GFW against fla's chunk_gla (issue 17);
#  3. Titans at chunk-start gradients at D = 64 and packed (the rows that decide its backend="auto" default), then
#     Titans against lmoec's Gated DeltaNet (issue 18: <= 2x) and TTT-Linear against fla's chunk_ttt_linear (>= 1.0x).
B=${BUDGET:-560}
. bench/gpu_call.sh
step mom; timeout $(left 170) python3 bench/mom_gpu.py bench --shapes 8K,2K,32K --out $OUT/m > /dev/null 2>&1
step elementwise; timeout $(left 290) python3 bench/elementwise_gpu.py bench --out $OUT/e > /dev/null 2>&1
step titans; timeout $(left 420) python3 bench/titans_gpu.py check bench --cases "D=64" --out $OUT/t > /dev/null 2>&1
step ttt; timeout $(left $B) python3 bench/ttt_gpu.py bench --budget $(( $(left $B) - 15 )) --out $OUT/x > /dev/null 2>&1
step done
for f in m/mom e/elementwise t/titans x/ttt; do echo "#### $f"; grep -v "^$" $OUT/$f.md 2>/dev/null | cut -c1-300; done
