"""Benchmarks of the project's own costs against what a user would otherwise run.

``python -m bench.run [NAME ...] [--quick] [--device cpu|cuda] [--precision P] [--shape S]``: fusion
speed (our k-means vs scikit-learn), NTK metric (vmap vs a per-sample loop), fine-tuning cost (fused
vs full model against the FLOP bound, at MiniLM's size or a GPU's), framework overhead (Lightning vs
a bare PyTorch loop), inference speed (compressed vs original model in PyTorch and ONNX Runtime
against the FLOP bound) and scale (compression and approximation metrics of a 1B and an 8B Llama on a
GPU). Each comparison runs both sides in one process, alternating, and reports medians after a warm-up.
"""
