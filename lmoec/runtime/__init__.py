"""Runtime support the emitted packages import: the op contract, loading, MoE, training, distribution."""
