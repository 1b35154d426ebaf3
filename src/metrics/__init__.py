"""Approximation metrics: empirical NTK kernels of a probe output and relative output errors."""
