#!/usr/bin/env bash
# Issue 22, one GPU call (~9.5 minutes), most wanted first (a call cut short keeps what it measured). fla compiles its
# kernels for minutes per shape (run 11's first call spent its timing steps there), so bench/fla_warm.py compiles
# them in the background while the foreground checks (untimed); every timing runs on an otherwise idle GPU.
#  1. time the defaults run 11 changed against the previous ones (lmoec only, 8K): RWKV6's dq/dk through the
#     whole-chunk kernel at V block 128, GLA's dq/dk in K blocks of 64; DeltaNet at Gated DeltaNet's settings;
#     Gated DeltaNet's 8K forward with the output in its own kernel;
#  2. check them (RWKV6's whole-chunk default agreed with the sub-chunk kernel in a probe; no family check has run it),
#     and Gated DeltaNet, whose walks now give padded rows the chunk's whole decay;
#  3. against fla at the cells no run has measured: Gated DeltaNet and DeltaNet at small heads (H = 32, K = V = 64),
#     packed uneven sequences and V = 256, then simple GLA and GLA at small heads and packed sequences.
B=${BUDGET:-560}
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
# lmoec alone first, on an idle GPU: the new defaults against the previous ones (8K), and DeltaNet at Gated
# DeltaNet's launch settings (never timed for DeltaNet; they took Gated DeltaNet's 64K forward from 2.46 to 1.76 ms)
step sweep; timeout $(left 100) $F sweep --families rwkv6,gla --sweep-shapes 8K \
  --variants "default,bonus sub-chunk,dq/dk whole K" --out $OUT/s > /dev/null 2>&1
timeout $(left 170) $F sweep --families deltanet --sweep-shapes 64K,8K \
  --variants "default,scalar decay's settings,wu kernel" --out $OUT/d > /dev/null 2>&1
# Gated DeltaNet's 8K forward (1.14x fla): its 128 walks fuse the output; unfused, and with twice the walks
timeout $(left 210) $F sweep --families gated_deltanet --sweep-shapes 8K --variants \
  "default,output unfused,output unfused + V block halved while < 256 programs,walks 8 warps" --out $OUT/g > /dev/null 2>&1
# fla compiles ~140 s per family and new head dims (run 11): two processes, the most wanted cells only, while the
# foreground checks (untimed)
FLA_CACHE_RESULTS=0 timeout $(left 410) python3 bench/fla_warm.py --families gated_deltanet,deltanet \
  --shapes heads64,varlen,V256 > $OUT/warm.txt 2>&1 &
FLA_CACHE_RESULTS=0 timeout $(left 410) python3 bench/fla_warm.py --families simple_gla,gla \
  --shapes heads64,varlen > $OUT/warm2.txt 2>&1 &
step check; timeout $(left 340) $F check --families gated_deltanet,rwkv6,gla --cases "default,varlen [,K=V=64,K=128, V=256" \
  --out $OUT/c > /dev/null 2>&1
grep "FAIL\|ALL PASS" $OUT/c/families.md | cut -c1-300
wait
step bench; timeout $(left $(( B - 70 ))) $F bench --no-sdpa --families gated_deltanet,deltanet --shapes heads64,varlen,V256 \
  --out $OUT/b > /dev/null 2>&1
step bench2; timeout $(left $B) $F bench --no-sdpa --families simple_gla,gla --shapes heads64,varlen --out $OUT/l \
  > /dev/null 2>&1
step done
for d in c s d g b l; do echo "#### $d"; grep "^| \|^###" $OUT/$d/families.md 2>/dev/null | cut -c1-260; done
tail -3 $OUT/warm.txt $OUT/warm2.txt
