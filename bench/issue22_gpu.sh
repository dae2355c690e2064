#!/usr/bin/env bash
# Issue 22, one GPU call (~9 minutes), most wanted first (a call cut short keeps what it measured):
#  1. the delta kernels' new defaults (UT transform over K blocks with tf32 tile products, output kernel over K
#     blocks) checked in bf16 against the float32 torch backend (Gated DeltaNet, DeltaNet and the vector-decay delta
#     spec, which no GPU has run yet; T = 2085, varlen, K = 48);
#  2. every decay family at its default launch (this session changed dg_chunk for all of them, GLA's and RWKV6's
#     dq/dk grid, and RWKV6's default sub-chunk backward: plain stores instead of atomics; none GPU-run yet), then
#     RWKV6's whole-chunk dq/dk, now in K blocks of 64 without atomics (its whole-K version failed at K = 128);
#  3. Gated DeltaNet, then DeltaNet, against fla in one process, with the run-8 kernels (and for DeltaNet Gated
#     DeltaNet's launch settings) as sweep rows;
#  4. RWKV6 whole-chunk / whole K / default timed (sweep at 8K);
#  5. the cells no run has measured: every family against its fla op on packed uneven sequences (varlen) and at
#     V = 256 (expand_v = 2); GLA's dq/dk in K blocks checked and timed.
B=${BUDGET:-550}  # seconds the call may use: the later steps get what the earlier left
. bench/gpu_call.sh
F="python3 bench/families_gpu.py"
step check; timeout $(left 80) $F check --families gated_deltanet,deltanet,gated_delta_vector \
  --cases "default,varlen [,K=V=48" --out $OUT/c > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/c/families.md | head
step decay; timeout $(left 150) $F check --families bla,retnet,simple_gla,gla,rwkv6 --cases "default,varlen [" \
  --out $OUT/cd > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cd/families.md | head
step rwkv6; timeout $(left 210) $F check --families rwkv6 --set bonus_whole_chunk=true --cases "default,varlen [,K=V=64" \
  --out $OUT/cb > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cb/families.md | head
step gdn; timeout $(left 330) $F bench sweep --no-sdpa --families gated_deltanet --shapes 8K,64K,2K,heads64 \
  --sweep-shapes 8K --variants "run 8 kernels,UT ieee,UT K block 128,output K block 128" --out $OUT/g > /dev/null 2>&1
step deltanet; timeout $(left 420) $F bench sweep --no-sdpa --families deltanet --shapes 8K,64K --sweep-shapes 64K \
  --variants "run 8 kernels,scalar decay's settings" --out $OUT/d > /dev/null 2>&1
step sweep; timeout $(left 460) $F sweep --families rwkv6 --sweep-shapes 8K \
  --variants "default,bonus whole-chunk,bonus whole-chunk whole K" --out $OUT/r > /dev/null 2>&1
step rows; timeout $(left $(( B - 40 ))) $F bench --no-sdpa --shapes varlen,V256 --out $OUT/v > /dev/null 2>&1
step gla; timeout $(left $B) $F check --families gla --set 'grad_qk={"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2}' \
  --cases "default,varlen [" --out $OUT/cg > /dev/null 2>&1
grep -i "fail\|error\|ALL PASS" $OUT/cg/families.md | head
timeout $(left $B) $F sweep --families gla --sweep-shapes 8K --variants "default,dq/dk K blocks of 64" --out $OUT/rg > /dev/null 2>&1
step done
for d in c cd cb g d r v cg rg; do echo "#### $d"; grep -v "^$" $OUT/$d/families.md 2>/dev/null; done
