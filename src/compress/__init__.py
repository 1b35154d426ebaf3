"""Compression methods: pure functions ``compress(w, mid_dim, *, seed, **options)`` of one MLP.

Each module ``src/compress/<method>.py`` takes an :class:`MLPWeights` and returns a
:class:`FusedMLP` (width ``mid_dim``) or, for ``svd``, a :class:`LowRankMLP`; none needs data, all
run on the device of the weights. Each has a ``VERSION`` (part of the cache key) and may have a
``check`` hook for its own options. The registry of methods is the ``ffn_mode`` config group
(``conf/ffn_mode/<method>.yaml``, see ``src.utils.config.ffn_modes``), not this package.
"""
