#!/usr/bin/env bash
# Run 11, one GPU call (~9.5 minutes): no kernel changed since run 10's checks passed, so this call skips them.
#  1. the vector-decay delta spec's illegal memory access in _ut_kernel (run 10): one process per UT setting, with
#     CUDA_LAUNCH_BLOCKING, to tell which part faults (w, u formed in their own kernel; the whole K in one block;
#     ieee products; one warp; one pipeline stage);
#  2. issue 22's timing (bench/issue22_gpu.sh's steps after its checks): Gated DeltaNet and DeltaNet against fla
#     with sweep rows, the cells no run has measured (packed uneven sequences, V = 256), RWKV6's and GLA's rows.
B=${BUDGET:-570}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
step probe
for s in 'wu="kernel"' 'BK_ut=128' 'ut_dot="ieee"' 'warps_ut=1' 'stages_fwd=1' 'wu="walk"'; do
  CUDA_LAUNCH_BLOCKING=1 timeout $(left 150) $F check --families gated_delta_vector --cases default --set "$s" \
    --out $OUT/p > /dev/null 2>&1
  echo "-- $s: $(grep -o 'FAIL\|ALL PASS\|illegal memory access\|RuntimeError[^|]*' $OUT/p/families.md 2>/dev/null | sort -u | tr '\n' ' ')"
  grep "^| gated" $OUT/p/families.md 2>/dev/null | cut -c1-200
  rm -rf $OUT/p
done
step gdn; timeout $(left 290) $F bench sweep --no-sdpa --families gated_deltanet --shapes 8K,64K,2K,heads64 \
  --sweep-shapes 8K --variants "run 8 kernels,UT ieee,UT K block 128,output K block 128" --out $OUT/g > /dev/null 2>&1
step rows; timeout $(left 400) $F bench --no-sdpa --shapes varlen,V256 --out $OUT/v > /dev/null 2>&1
step deltanet; timeout $(left 480) $F bench sweep --no-sdpa --families deltanet --shapes 8K,64K --sweep-shapes 64K \
  --variants "run 8 kernels,scalar decay's settings" --out $OUT/d > /dev/null 2>&1
step sweep; timeout $(left $B) $F sweep --families rwkv6,gla --sweep-shapes 8K \
  --variants "default,bonus whole-chunk,dq/dk K blocks of 64" --out $OUT/r > /dev/null 2>&1
step done
for d in g v d r; do echo "#### $d"; grep -v "^$" $OUT/$d/families.md 2>/dev/null | cut -c1-260; done
