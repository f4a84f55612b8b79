"""Process-wide settings that only an entry point may make: importing grid_ipfs changes no global.

The CLIs (`python -m grid_ipfs.worker`, `.pool`, `.chain`, `.demo`) call `quiet_tensorflow()` first
thing; the owner's (`.client`, `.miner`) call `prepare_owner_process()`, which also tunes the
allocator, and the client's has the garbage collector run between rounds. A program that uses
grid_ipfs as a library decides for itself (e.g. by exporting the variables before it starts).
"""

from __future__ import annotations

import gc
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


_cycles = {"collect": False, "frozen": False}


def collect_cycles_between_rounds() -> None:
    """Have `between_rounds()` collect reference cycles: an entry point's choice (it freezes the heap).

    Why: multiformats and dag_cbor type-check with typing_validation, whose union check keeps each
    failed member's TypeError, with its traceback and so its frame, in a list that frame holds: a cycle
    on nearly every CID parsed. Through `f_back` that frame keeps its callers' frames alive too, with
    their locals, until Python's rare full collection: on the owner, a round's float64 running sum and
    update buffer (3 model copies) were still alive in the next round. A full collection costs ~0.2 s
    with TensorFlow loaded, so the first is followed by `gc.freeze()` (everything alive then is kept for
    good, as a job's model and libraries are), and each later one only looks at what is newer: well under
    a millisecond."""
    _cycles["collect"] = True


def between_rounds() -> None:
    """Collect the reference cycles a round left (see `collect_cycles_between_rounds`); without that
    entry point's choice, nothing: a library user's process keeps Python's own schedule."""
    if not _cycles["collect"]:
        return
    gc.collect()
    if not _cycles["frozen"]:
        gc.freeze()
        _cycles["frozen"] = True


def prepare_owner_process() -> None:
    """What the owner's CLIs (client, miner) set first thing: `quiet_tensorflow()` and `return_large_frees()`.
    The client's also calls `collect_cycles_between_rounds()`: it runs one job and exits, so what the
    freeze keeps is that job's (a miner serves job after job, and does not freeze)."""
    quiet_tensorflow()
    return_large_frees()
