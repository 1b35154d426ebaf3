"""Benchmarks of the project's own costs against what a user would otherwise run.

``python -m bench.run [--quick] [--device cpu|cuda] [--only NAME]``: fusion speed (our k-means vs
scikit-learn), NTK metric (vmap vs a per-sample loop), fine-tuning cost (fused vs full model against
the FLOP bound) and framework overhead (Lightning vs a bare PyTorch loop). Each comparison runs both
sides in one process, alternating, and reports medians after a warm-up.
"""
