"""grid_ipfs: federated learning over IPFS.

Importing the package is cheap on purpose: TensorFlow/Keras load only in the modules that
train or (de)serialise models, so the transport, the chain and the CLIs that only read start fast.
"""

__version__ = "0.1.0"
