"""Benchmarks of the grid attention gate and the Attention U-Net (run as ``python -m benchmarks.<name>``)."""
