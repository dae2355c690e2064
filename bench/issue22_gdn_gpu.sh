#!/usr/bin/env bash
# Issue 22, one GPU call (~9 minutes): check the delta UT variants (wu = kernel | walk) and RWKV6's whole-chunk bonus
# backward in bf16 against the float32 torch backend, sweep Gated DeltaNet's forward launch settings, profile its
# forward per kernel next to fla's, and time it against fla in one process. Results under $OUT (default ./out).
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
step check; timeout $(left 70) $F check --families gated_deltanet,deltanet --set 'wu="kernel"' --cases "default,varlen [,K=V=48" \
  --out $OUT/ck > /dev/null 2>&1; grep -i "fail\|error\|ALL PASS" $OUT/ck/families.md | head
timeout $(left 110) $F check --families gated_deltanet,deltanet --set 'wu="walk"' --cases "default,varlen [,segments,K=V=48" \
  --out $OUT/cw > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cw/families.md | head
timeout $(left 160) $F check --families rwkv6 --set bonus_whole_chunk=true --cases "default,varlen [,K=V=48" \
  --out $OUT/cb > /dev/null 2>&1; grep -i "fail\|error\|ALL PASS" $OUT/cb/families.md | head
step sweep; timeout $(left 330) $F sweep --families gated_deltanet --sweep-shapes 8K,64K,heads64 --variants "default,\
wu kernel,wu kernel + UT 2 warps,wu kernel + UT 8 warps,wu kernel 8 warps + BK 128,wu in walk,wu in walk + output BV 64,\
wide wu,output BV 64,output 8 warps,stages 3,V block halved while < 256 programs" --out $OUT/s > /dev/null 2>&1
timeout $(left 380) $F sweep --families deltanet,rwkv6 --sweep-shapes 8K,64K \
  --variants "default,output fused,wu kernel,wu in walk,output BV 64,bonus whole-chunk" --out $OUT/s2 > /dev/null 2>&1
step profile; timeout $(left 470) $F profile --profile-fwd --families gated_deltanet --profile-shapes 8K --out $OUT/p > /dev/null 2>&1
step bench; timeout $(left 590) $F bench --no-sdpa --families gated_deltanet,deltanet --shapes 8K,64K,heads64,2K,32K,varlen \
  --out $OUT/b > /dev/null 2>&1
step done
for d in ck cw cb s s2 p b; do echo "#### $d"; cat $OUT/$d/families.md 2>/dev/null | grep -v "^$"; done
