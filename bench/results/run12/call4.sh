#!/usr/bin/env bash
# Run 12, fourth call (~2.5 minutes left): Titans against lmoec's Gated DeltaNet, output captured.
. bench/gpu_call.sh
timeout 140 python3 bench/titans_gpu.py bench --out $OUT/t > $OUT/t.txt 2>&1; echo rc=$?; grep "^|" $OUT/t.txt
