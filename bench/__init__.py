"""Benchmarks of the project's own costs against what a user would otherwise run.

``python -m bench.run [NAME ...] [--quick] [--device cpu|cuda] [--precision P] [--shape S]``: fusion
speed (our k-means vs scikit-learn), NTK metric (vmap vs a per-sample loop), fine-tuning cost (fused
vs full model against the FLOP bound, at MiniLM's size or a GPU's), framework overhead (Lightning vs
a bare PyTorch loop), inference speed (compressed vs original model in PyTorch and ONNX Runtime
against the FLOP bound) and scale (compression and approximation metrics of a 1B and an 8B Llama on a
GPU). Each comparison times its sides in several fresh processes (``bench.timing``), paired call by
call, and reports each ratio's median over the processes with a 95 % interval.
"""
