"""Training and using the emitted models: the trainer (single process and distributed over a (dp, sp, ep) mesh,
with LASP-2 sequence parallelism and expert parallelism applied from outside the model), its data and
checkpoints, and generation from a checkpoint. The emitted packages never import this package."""
