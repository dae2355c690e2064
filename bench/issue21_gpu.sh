#!/usr/bin/env bash
# Issue 21, one GPU call (~9.5 minutes), most wanted first (a call cut short keeps what it measured):
#  1. decoding: the compiled step's check against a float32 step (run 15 timed it, 1.34-4.93 ms, but checked it
#     against eager bf16 logits), prefill tokens/s, and transformers' Qwen2-MoE decode row;
#  2. training: GLA eager and compiled with linear_cross_entropy's gradients formed in the forward and the clipping
#     folded into the fused AdamW (both new since run 15; compiled+clip-pass is the same step with the clipping pass
#     of before, in the same process), and Qwen2-MoE eager (out of memory in run 15) and with its gradient checkpointing;
#  3. the MoE layer against its bare grouped GEMMs, eager and compiled (the table in bench/results/moe.md is stale).
B=${BUDGET:-560}
. bench/gpu_call.sh
export PYTHONPATH=.:$PYTHONPATH
M="python3 bench/model_gpu.py"
step decode; timeout $(left 260) $M --part decode --variants "GLA,hybrid GLA LLLN,Qwen2-MoE (transformers)" \
  --budget 240 --out $OUT/d 2>&1 | grep "decode \|FAIL\|skipped\|ok:\|MISMATCH\|SYNC"
step train; timeout $(left 480) $M --part train --variants "GLA,Qwen2-MoE (transformers)" --modes eager,compiled,compiled+clip-pass \
  --budget 200 --out $OUT/t 2>&1 | grep "train \|FAIL\|skipped\|ok:\|MISMATCH\|out of memory"
step moe; timeout $(left $B) python3 bench/moe_gpu.py --out $OUT/moe.md > /dev/null 2>&1
grep "^| \|Targets" $OUT/moe.md 2>/dev/null | cut -c1-300
step done
