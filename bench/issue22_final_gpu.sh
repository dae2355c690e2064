#!/usr/bin/env bash
# Issue 22, one GPU call (~4 minutes): Gated DeltaNet's new defaults (wu auto, UT 1 warp, forward stages 3) and
# RWKV6's whole-chunk bonus backward checked in bf16 against the float32 torch backend, then Gated DeltaNet timed
# against fla in one process (the previous defaults as a sweep row), and DeltaNet at Gated DeltaNet's settings.
set -u
OUT=${OUT:-out}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit
fi
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
F="python3 bench/families_gpu.py"
step check; timeout $(left 45) $F check --families gated_deltanet,deltanet \
  --cases "default,varlen [,K=V=48" --out $OUT/c > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/c/families.md | head
timeout $(left 70) $F check --families rwkv6 --set bonus_whole_chunk=true --cases "default" --out $OUT/cb > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cb/families.md | head
step bench; timeout $(left 190) $F bench sweep --no-sdpa --families gated_deltanet --shapes 8K,64K,2K,heads64 \
  --sweep-shapes 8K,64K --variants "previous default" --out $OUT/g > /dev/null 2>&1
step deltanet; timeout $(left 240) $F sweep --families deltanet --sweep-shapes 8K,64K \
  --variants "default,scalar decay's settings" --out $OUT/d > /dev/null 2>&1
step done
for d in c cb g d; do echo "#### $d"; grep -v "^$" $OUT/$d/families.md 2>/dev/null; done
