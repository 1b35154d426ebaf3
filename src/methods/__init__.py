"""Compression methods: pure functions ``compress(w, mid_dim, *, seed, **options)`` of one MLP.

Each module ``src/methods/<method>.py`` takes an :class:`MLPWeights` (and, where it declares it, the
layer's :class:`MLPCalibration`) and returns a :class:`FusedMLP` (width ``mid_dim``) or, for ``svd``,
a :class:`LowRankMLP`, on the device of the weights. They know nothing of models, Lightning or Hydra:
``src.pipeline`` reads the weights out of a model and writes the result back. What a module provides
(``VERSION``, ``compress``, optionally ``check`` and ``needs_calibration``) is ``method.MethodModule``;
``method.Method`` reads it once. ``refit`` re-fits a result's down projection on calibration data.
The registry of methods is the ``ffn_mode`` config group (``conf/ffn_mode/<method>.yaml``, see
``src.utils.config.ffn_modes``), not this package.
"""
