"""Compression methods: pure functions ``compress(w, mid_dim, *, seed, **options)`` of one MLP.

Each module ``src/compress/<method>.py`` takes an :class:`MLPWeights` and returns a
:class:`FusedMLP` (width ``mid_dim``) or, for ``svd``, a :class:`LowRankMLP`, on the device of the
weights. What a module provides (``VERSION``, ``compress``, optionally ``check`` and
``needs_calibration``) is ``method.MethodModule``; ``method.Method`` reads it once, and
``settings.CompressionSettings`` holds a run's method with its layers, width and the other shared
options. The registry of methods is the ``ffn_mode`` config group (``conf/ffn_mode/<method>.yaml``,
see ``src.utils.config.ffn_modes``), not this package.
"""
