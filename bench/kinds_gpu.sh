#!/usr/bin/env bash
# Issues 17 and 19, one GPU call (~9 minutes): the element-wise kind's Triton kernels (Mamba, GFW) and the
# Mixture-of-Memories layer checked in bf16 against their float32 torch backends, then timed (Mamba vs its memory
# floor and mamba_ssm where it imports, GFW vs fla's chunk_gla; MoM vs fla's MomAttention and a plain Gated DeltaNet).
B=${BUDGET:-555}  # seconds the call may use: the benches get what the checks left
. bench/gpu_call.sh
step elementwise; timeout $(left 150) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
step mom; timeout $(left 270) python3 bench/mom_gpu.py check --out $OUT/m > /dev/null 2>&1
step benches; timeout $(left $(( B - 135 ))) python3 bench/elementwise_gpu.py bench --out $OUT/eb > /dev/null 2>&1
timeout $(left $B) python3 bench/mom_gpu.py bench --shapes 8K,2K,32K --out $OUT/mb > /dev/null 2>&1
step done
for f in e/elementwise m/mom eb/elementwise mb/mom; do echo "#### $f"; grep -v "^$" $OUT/$f.md 2>/dev/null | cut -c1-400; done
