#!/usr/bin/env bash
# Issue 22, one GPU call (~9.5 minutes), most wanted first (a call cut short keeps what it measured). fla compiles and
# autotunes its kernels for 1-2 minutes per (op, shape) in one process (run 15: two warm-up processes compiled two
# cells in 300 s), so bench/fla_warm.py compiles each cell in a process of its own, all at once, while the
# foreground checks (untimed; each warm-up may take 5% of the GPU's memory, a cell that needs more fails alone);
# every timing runs on an otherwise idle GPU. The rows are the cells no same-process
# run has measured at the current defaults (bench/results/issue22.md, "Run 15"):
#  1. check RWKV7 and DeltaNet at their defaults (T = 2085, packed, K = V = 64, K = 128 / V = 256);
#  2. against fla in one process: Gated DeltaNet at small heads, packed and V = 256; GLA at 8K and V = 256;
#     GLA, Gated DeltaNet and RWKV7 at one 64K sequence; every family and SDPA at 32K;
#  3. what limits the cells below 1.5x: Gated DeltaNet's and GLA's forward kernel by kernel against fla's (8K, packed).
# PART=2 (the next call): the cells whose newest same-process row timed kernels that changed since (the starred rows
# of bench/results/issue22_floors.md) at 2K and small heads, and the decay families' packed rows, against fla; while
# fla compiles, the checks of the delta template (exp2) and the element-wise kind (segment policy, GFW's block_v 8).
B=${BUDGET:-560}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
CELLS="gated_deltanet:heads64 gated_deltanet:varlen gated_deltanet:V256 gla:8K gla:V256 gla:64K gated_deltanet:64K
rwkv7:64K deltanet:32K rwkv6:32K gla:32K gated_deltanet:32K rwkv7:32K gated_deltanet:8K gla:varlen"
if [ "${PART:-1}" = 2 ]; then
  CELLS="deltanet:2K gla:2K rwkv6:2K gated_deltanet:2K gla:heads64 rwkv6:heads64 simple_gla:varlen rwkv6:varlen rwkv7:varlen"
  for cell in $CELLS; do
    FLA_CACHE_RESULTS=0 timeout $(left 330) python3 bench/fla_warm.py --families ${cell%%:*} --shapes ${cell##*:} \
      --memory-fraction 0.05 > $OUT/warm_${cell/:/_}.txt 2>&1 &
  done
  # untimed while fla compiles: the delta template's check (its exp2 walks), the element-wise kind's (issue 17);
  # SKIP_CHECK=1 where bench/pending_gpu.sh has just run them
  if [ -z "${SKIP_CHECK:-}" ]; then
    step check; timeout $(left 170) $F check --families gated_deltanet,deltanet,gated_delta_vector \
      --cases "default,varlen [,K=V=64" --out $OUT/c > /dev/null 2>&1
    grep "FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-300
    timeout $(left 300) python3 bench/elementwise_gpu.py check --out $OUT/e > /dev/null 2>&1
    grep "| NO |" $OUT/e/elementwise.md | cut -c1-200
  fi
  wait
  step bench; timeout $(left $(( B - 150 ))) $F bench --no-sdpa --families deltanet,gla,rwkv6,gated_deltanet --shapes 2K,heads64 \
    --out $OUT/b > /dev/null 2>&1
  step varlen; timeout $(left $B) $F bench --no-sdpa --families simple_gla,rwkv6,rwkv7 --shapes varlen --out $OUT/v > /dev/null 2>&1
  step done
  for d in c b v; do echo "#### $d"; grep "^| \|^###" $OUT/$d/families.md 2>/dev/null | cut -c1-260; done
  echo "#### e"; grep "^| " $OUT/e/elementwise.md 2>/dev/null | cut -c1-200
  tail -qn1 $OUT/warm_*.txt
  exit 0
fi
for cell in $CELLS; do
  FLA_CACHE_RESULTS=0 timeout $(left 330) python3 bench/fla_warm.py --families ${cell%%:*} --shapes ${cell##*:} \
    --memory-fraction 0.05 > $OUT/warm_${cell/:/_}.txt 2>&1 &
done
step check; timeout $(left 200) $F check --families rwkv7,deltanet --cases "default,varlen [,K=V=64,K=128, V=256" \
  --out $OUT/c > /dev/null 2>&1
grep "FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-300
wait
step bench; timeout $(left 360) $F bench --no-sdpa --families gated_deltanet,gla --shapes heads64,varlen,V256,8K \
  --out $OUT/b > /dev/null 2>&1
step bench2; timeout $(left $(( B - 70 ))) $F bench --families gla,gated_deltanet,rwkv7,deltanet,rwkv6 --shapes 64K,32K \
  --out $OUT/l > /dev/null 2>&1
step profile; timeout $(left $B) $F profile --profile-fwd --families gated_deltanet,gla --profile-shapes 8K,varlen \
  --out $OUT/p > /dev/null 2>&1
step done
for d in c b l p; do echo "#### $d"; grep "^| \|^###\|speedup" $OUT/$d/families.md 2>/dev/null | cut -c1-260; done
tail -qn1 $OUT/warm_*.txt
