#!/usr/bin/env bash
# Run 11, fourth call (what the session had left, ~5.5 minutes): correctness probes.
#  1. which buffer of the vector-decay delta backward goes non-finite (bench/delta_vector_probe_gpu.py);
#  2. Titans at D = 128 with the fp32 walks at one pipeline stage (their three stages needed 310 KB of shared memory:
#     the check's process died there in run 11's third call), and its decode row;
#  3. RWKV6's whole-chunk dq/dk at V block 128 (bench/rwkv6_probe_gpu.py --bv 128).
B=${BUDGET:-330}
. bench/gpu_call.sh
step gdv; timeout $(left 120) python3 bench/delta_vector_probe_gpu.py --out $OUT/p > $OUT/p.txt 2>&1
grep -B1 -A0 "NaN [1-9]\|inf [1-9]\|^###" $OUT/p.txt | head -60
step titans; timeout $(left 240) python3 bench/titans_gpu.py check --cases "D=128" --out $OUT/t > /dev/null 2>&1
grep "^| " $OUT/t/titans.md | cut -c1-220
step rwkv6; timeout $(left $B) python3 bench/rwkv6_probe_gpu.py --bv 128 --out $OUT/r 2>&1 | tail -6
step done
