"""Returning freed memory between the phases of a run (compression, distillation, fine-tuning, test)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import torch


def release_memory() -> None:
    """Free what the previous phase dropped and hand it back to the operating system.

    ``gc.collect()`` frees objects kept alive only by reference cycles (module trees, hooks).
    glibc keeps freed blocks below its mmap threshold (which rises up to 32 MB as large blocks are
    freed) in its arenas, so the process's RSS stays at the previous phase's peak and fragmented
    gaps may not fit the next phase's tensors; ``malloc_trim(0)`` returns every free page (Linux,
    glibc only; elsewhere a no-op). On CUDA, the caching allocator's unused blocks are released too.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
