"""Runtime support the emitted packages import: the op contract and registration, launch rules, attention, MoE,
memories, short convolutions, recompute, the package loader and the Hugging Face wrapper (training lives in
lmoec.trainer)."""
