"""Process-wide settings that only an entry point may make: importing grid_ipfs changes no global.

The CLIs (`python -m grid_ipfs.worker`, `.pool`, `.chain`, `.demo`) call `quiet_tensorflow()` first
thing; the owner's (`.client`, `.miner`) call `prepare_owner_process()`, which also tunes the
allocator. A program that uses grid_ipfs as a library decides for itself (e.g. by exporting the
variables before it starts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

TENSORFLOW_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
"""TensorFlow's C++ start-up logs off, and oneDNN's reordering (whose float sums differ run to run) off."""


JAX_CHATTY_LOGGERS = ("jax._src.xla_bridge",)
"""JAX's loggers that say at INFO, on every CPU-only start, which accelerators it did not find."""


def quiet_tensorflow(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set `TENSORFLOW_QUIET` where the user has not set them already; call before TensorFlow loads.

    For a worker on another Keras backend (`KERAS_BACKEND=jax`) it also lifts `JAX_CHATTY_LOGGERS` to
    WARNING, so a worker's log at INFO is about jobs, not about the TPU library it has no use for."""
    for name, value in TENSORFLOW_QUIET.items():
        environ.setdefault(name, value)
    for name in JAX_CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mmap, returned to the kernel when
    freed. By default glibc raises that threshold to the size of the largest block freed so far (up to
    32 MiB), so after the first update a role keeps every later model-sized buffer in its heap arenas,
    one set per fetch thread: measured on a 4.9 MB model, 64 updates parsed and averaged in 4 threads
    raised peak RSS by 99 MB with the default and 60 MB with this. For the owner's roles only: a process
    that trains pays a page fault per fresh page of every large per-step tensor instead (Keras `fit` of
    the same model measured 2x slower), so workers keep glibc's default. Only an entry point should call
    it (it changes the process's allocator); does nothing where glibc is absent or when the operator set
    `MALLOC_MMAP_THRESHOLD_` themselves. Returns whether the setting was made."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def prepare_owner_process() -> None:
    """What the owner's CLIs (client, miner) set first thing: `quiet_tensorflow()` and `return_large_frees()`."""
    quiet_tensorflow()
    return_large_frees()
