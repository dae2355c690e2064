#!/usr/bin/env bash
# Issues 17, 18 and 19, one GPU call (~6 minutes): correctness only, of every kernel set no GPU has run yet, so
# that backend="auto" can take them (their `auto_torch_reason` is cleared only after these pass). Each check in
# bf16 (and fp32 where the script has it) against its float32/float64 torch path; timing is in the kinds' own
# scripts (bench/kinds_gpu.sh, bench/titans_gpu.py bench, bench/ttt_gpu.py bench).
#   Titans (bench/titans_gpu.py check), TTT-Linear (bench/ttt_gpu.py check), the element-wise kind: Mamba, GFW
#   (bench/elementwise_gpu.py check), Mixture-of-Memories (bench/mom_gpu.py check).
B=${BUDGET:-360}  # seconds the call may use, split evenly between the four checks
. bench/gpu_call.sh
step titans; timeout $(left $(( B / 4 ))) python3 bench/titans_gpu.py check --out $OUT/t > /dev/null 2>&1
step ttt; BUDGET=$(( B / 4 - 10 )) timeout $(left $(( B / 2 ))) python3 bench/ttt_gpu.py check --out $OUT/tt > /dev/null 2>&1
step elementwise; timeout $(left $(( 3 * B / 4 ))) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
step mom; timeout $(left $B) python3 bench/mom_gpu.py check --out $OUT/m > /dev/null 2>&1
step done
for f in t/titans tt/ttt e/elementwise m/mom; do echo "#### $f"; grep -v "^$" $OUT/$f.md 2>/dev/null | cut -c1-300; done
