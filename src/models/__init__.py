"""Models: loading (build), per-architecture MLP read/write (mlp_io), compression of whole models (fuse), export."""
