#!/usr/bin/env bash
# Issue 22, one GPU call (~8 minutes): the cells no run has measured yet, every family against its fla op in one
# process: packed uneven sequences (varlen: 32K tokens in 7 sequences of 100 to 13K) and V = 256 (expand_v = 2).
set -u
OUT=${OUT:-out}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit
fi
export PYTHONUNBUFFERED=1
timeout 560 python3 bench/families_gpu.py bench --no-sdpa --shapes varlen,V256 --out $OUT/r > $OUT/r.log 2>&1
grep -v "^$" $OUT/r/families.md; tail -5 $OUT/r.log
