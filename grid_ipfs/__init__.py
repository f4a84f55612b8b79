"""grid_ipfs: federated learning over IPFS.

Importing the package is cheap on purpose: TensorFlow/Keras load only in the modules that
train or (de)serialise models, so the transport, the chain and the CLIs that only read start fast.
"""

__version__ = "0.1.0"

from .errors import GridError  # noqa: E402  (the one root of grid_ipfs's exceptions; imports nothing)

__all__ = ["GridError", "__version__"]
