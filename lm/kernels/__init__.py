"""Hand-written GPU kernels, imported only where they can run (see lm.attention)."""
