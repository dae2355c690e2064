#!/usr/bin/env bash
# Issue 22, one GPU call (~9 minutes), most wanted first (a call cut short keeps what it measured): the delta
# kernels' new defaults (UT transform over K blocks with tf32 tile products, output kernel over K blocks; Gated
# DeltaNet: wu auto, UT 1 warp, forward stages 3) checked in bf16 against the float32 torch backend; Gated DeltaNet
# timed against fla in one process with the new knobs as sweep rows; RWKV6's whole-chunk bonus backward checked and
# timed; DeltaNet at its defaults and at Gated DeltaNet's settings; one Gated DeltaNet forward profiled kernel by
# kernel beside fla's.
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
step check; timeout $(left 60) $F check --families gated_deltanet,deltanet \
  --cases "default,varlen [,K=V=48" --out $OUT/c > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/c/families.md | head
step bench; timeout $(left 260) $F bench sweep --no-sdpa --families gated_deltanet --shapes 8K,64K,2K,heads64,varlen \
  --sweep-shapes 8K,64K --variants "run 8 kernels,UT ieee,UT K block 128,UT K block 32,output K block 128,output 8 warps" \
  --out $OUT/g > /dev/null 2>&1
step rwkv6; timeout $(left 330) $F check --families rwkv6 --set bonus_whole_chunk=true --cases "default" --out $OUT/cb > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cb/families.md | head
timeout $(left 390) $F sweep --families rwkv6 --sweep-shapes 8K,64K --variants "default,bonus whole-chunk" \
  --out $OUT/r > /dev/null 2>&1
step deltanet; timeout $(left 480) $F bench sweep --no-sdpa --families deltanet --shapes 8K,64K --sweep-shapes 8K,64K \
  --variants "run 8 kernels,scalar decay's settings" --out $OUT/d > /dev/null 2>&1
step profile; timeout $(left 550) $F profile --profile-fwd --families gated_deltanet --profile-shapes 8K --out $OUT/p \
  > $OUT/p.log 2>&1; grep "profile " $OUT/p.log | cut -c1-600
step done
for d in c g cb r d p; do echo "#### $d"; grep -v "^$" $OUT/$d/families.md 2>/dev/null; done
