"""XLA:CPU custom calls of our own, for what XLA's CPU backend does slowly (see panel_matmul)."""
