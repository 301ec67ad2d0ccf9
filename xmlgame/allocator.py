"""Keep training's short-lived buffers in the process's heap (glibc only).

A training step allocates and frees dozens of tensors of a few hundred KB to a few MB per
batch (logits, gradients and probabilities of the candidate pairs). glibc's ``malloc`` serves a
block above its *mmap threshold* (128 KB at start) with fresh pages from the kernel, and
returns free memory at the top of its heap to the kernel once more than its *trim threshold*
is free. It raises both thresholds by itself when it sees large blocks freed, so a process that
has happened to free one runs fast, and one that has not pays page faults to zero the same
memory again on every batch. :func:`keep_batch_buffers` fixes the mmap threshold at the most
glibc would raise it to, and the trim threshold above it, once, so that every run gets the fast
case: on debtags a fresh process's epoch takes 3.05 s instead of 3.86 s for the game and 2.77 s
instead of 3.50 s for the baseline (``benchmarks/allocator.py``); where batches are larger, as
on wordnet-hypernyms, the timings stay as they were.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for its own adjustments, on 64-bit systems
TRIM_THRESHOLD = 128 * 2**20  # free heap kept for reuse (glibc's own is twice the mmap one)

_done: bool | None = None


def keep_batch_buffers() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module's docstring), once per process.

    Returns whether they are set. Elsewhere than Linux with glibc nothing changes (the C
    library decides alone) and the reason is logged.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        logger.debug("malloc thresholds left alone: not Linux")
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        logger.info("malloc thresholds left alone: no glibc mallopt (%s)", exc)
        return _done
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not _done:
        logger.info("malloc thresholds left alone: mallopt refused them")
    return _done
