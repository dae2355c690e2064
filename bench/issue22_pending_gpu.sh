#!/usr/bin/env bash
# Issue 22, what awaits a GPU (bench/results/issue22.md): RWKV6's whole-chunk bonus backward (bonus_whole_chunk)
# and the delta UT kernel's wide w/u products (wide_wu), checked against the float32 torch backend in bf16, then
# timed against the defaults in one process. About 3 minutes on an H100; results under $OUT (default ./out).
# fla is not needed. Where lark/pydantic are missing, put their wheels in .whl/ (see the device README).
set -u
OUT=${OUT:-out}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit
fi
export PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
timeout $(left 60) python3 bench/families_gpu.py check --families rwkv6 --set bonus_whole_chunk=true \
  --cases "default,varlen [,K=V=48" --out $OUT/c > /dev/null 2>&1
echo "check rwkv6 $(( $(date +%s) - T0 )) s"; grep -i "fail\|error\|ALL PASS" $OUT/c/families.md
timeout $(left 100) python3 bench/families_gpu.py check --families gated_deltanet --set wide_wu=true \
  --cases "default,varlen [" --out $OUT/w > /dev/null 2>&1
echo "check wide $(( $(date +%s) - T0 )) s"; grep -i "fail\|error\|ALL PASS" $OUT/w/families.md
timeout $(left 165) python3 bench/families_gpu.py sweep --families rwkv6,gated_deltanet \
  --variants "default,wide wu,bonus whole-chunk" --sweep-shapes 2K,32K --out $OUT/s > /dev/null 2>&1
echo "sweep $(( $(date +%s) - T0 )) s"
cat $OUT/s/families.md
