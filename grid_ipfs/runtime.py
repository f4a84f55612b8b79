"""Process-wide settings that only an entry point may make: importing grid_ipfs changes no global.

The CLIs (`python -m grid_ipfs.worker`, `.client`, `.miner`, `.chain`, `.demo`) call `quiet_tensorflow()`
first thing; a program that uses grid_ipfs as a library decides for itself (e.g. by exporting the two
variables before it starts).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TENSORFLOW_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
"""TensorFlow's C++ start-up logs off, and oneDNN's reordering (whose float sums differ run to run) off."""


def quiet_tensorflow(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set `TENSORFLOW_QUIET` where the user has not set them already; call before TensorFlow loads."""
    for name, value in TENSORFLOW_QUIET.items():
        environ.setdefault(name, value)
