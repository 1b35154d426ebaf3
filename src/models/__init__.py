"""Models: loading (build, source, gguf), per-architecture MLP read/write (mlp_io), the modules that replace compressed projections (replacements)."""
