"""The compression pipeline: a whole model's chosen layers compressed with one method (no Lightning, no Hydra).

- ``settings``: a run's compression settings, resolved once from ``conf/ffn_mode`` and the model's shape;
- ``fuse``: ``compress_model`` reads each layer through ``src.models.mlp_io``, runs the method
  (``src.methods``), writes the result back and records the new structure (``apply_spec`` rebuilds it);
- ``calibration``: each layer's calibration inputs and outputs, collected through ``mlp_io`` hooks;
- ``budget``: per-layer widths under one parameter budget;
- ``cache``: the on-disk cache of compressed layers.
"""
