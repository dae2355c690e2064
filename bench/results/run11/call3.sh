#!/usr/bin/env bash
# Run 11, third call: correctness only.
#  1. the vector-decay delta spec with inputs of the right shape (the harness fed it a per-head gate where its
#     kernels read one per key: run 10's illegal memory access); the harness now checks inputs against the contract;
#  2. the MoM layer after grouped GEMMs pad narrow outputs (run 10 crashed there);
#  3. where RWKV6's whole-chunk dq/dk departs from the sub-chunk kernel (bench/rwkv6_probe_gpu.py);
#  4. Titans with ieee products as the default, its fp32 D = 128 and decode rows (run 10 ran out of time).
B=${BUDGET:-560}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
step gdv; timeout $(left 130) $F check --families gated_delta_vector --cases "default,varlen [,K=V=48,decode" \
  --out $OUT/c > /dev/null 2>&1
grep "^| gated\|FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-220
step mom; timeout $(left 250) python3 bench/mom_gpu.py check --out $OUT/m > /dev/null 2>&1
grep -v "^$" $OUT/m/mom.md 2>/dev/null | cut -c1-250 | tail -15
step rwkv6; timeout $(left 340) python3 bench/rwkv6_probe_gpu.py --out $OUT/r 2>&1 | tail -12
step titans; timeout $(left $B) python3 bench/titans_gpu.py check --out $OUT/t > /dev/null 2>&1
grep -v "^$" $OUT/t/titans.md 2>/dev/null | cut -c1-250 | tail -25
step done
