#!/usr/bin/env bash
# Every GPU check no GPU has run yet, in one call (~9.5 minutes), before any timing: default kernels first (they
# run for every user on a GPU), then the opt-in kinds (their `auto_torch_reason` is cleared only after they pass).
#  1. every decay family at its default launch (bla, retnet, simple_gla, gla, rwkv6: dg_chunk, GLA's and RWKV6's
#     dq/dk grid and RWKV6's sub-chunk backward changed in session 5), default case and varlen;
#  2. the delta kernels' defaults (UT transform and output over K blocks: Gated DeltaNet, DeltaNet, the vector-decay
#     delta spec), default, varlen and K = V = 48;
#  3. Titans, TTT-Linear, the element-wise kind (Mamba, GFW) and Mixture-of-Memories (bench/new_kinds_check_gpu.sh's
#     four checks), splitting what is left.
# Timing follows in bench/issue22_gpu.sh (its first steps repeat 1 and 2 quickly from the compile cache) and
# bench/kinds_gpu.sh.
B=${BUDGET:-570}  # seconds the call may use
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
step decay; timeout $(left 150) $F check --families bla,retnet,simple_gla,gla,rwkv6 --cases "default,varlen [" \
  --out $OUT/cd > /dev/null 2>&1
step delta; timeout $(left 240) $F check --families gated_deltanet,deltanet,gated_delta_vector \
  --cases "default,varlen [,K=V=48" --out $OUT/c > /dev/null 2>&1
rest=$(( B - 240 ))
step titans; timeout $(left $(( 240 + rest / 4 ))) python3 bench/titans_gpu.py check --out $OUT/t > /dev/null 2>&1
step ttt; BUDGET=$(( rest / 4 - 10 )) timeout $(left $(( 240 + rest / 2 ))) python3 bench/ttt_gpu.py check --out $OUT/tt \
  > /dev/null 2>&1
step elementwise; timeout $(left $(( 240 + 3 * rest / 4 ))) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
step mom; timeout $(left $B) python3 bench/mom_gpu.py check --out $OUT/m > /dev/null 2>&1
step done
for f in cd/families c/families t/titans tt/ttt e/elementwise m/mom; do
  echo "#### $f"; grep -v "^$" $OUT/$f.md 2>/dev/null | grep -i "fail\|error\|NO \|pass\|^| " | cut -c1-240 | head -40
done
