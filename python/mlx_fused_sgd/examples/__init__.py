"""Runnable examples (python -m mlx_fused_sgd.examples.<name>)."""
