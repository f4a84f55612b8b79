"""Benchmarks of grid_ipfs: `make bench` (= `python -m benchmarks.run`) writes results.json and RESULTS.md here.

One module per benchmark, each runnable alone (`python -m benchmarks.transfer` prints its table):

* `transfer`     add + cat through `IPFSClient` against raw httpx POSTs to the same daemon (1, 10, 100 MB)
* `pubsub`       publish -> receipt latency of signed update-sized messages between two devnet nodes
* `overhead`     the digits MLP on a 3-worker grid against the same FedAvg rounds in one process
* `overhead_cnn` the same with the Fashion-MNIST CNN (needs Debian's `dataset-fashion-mnist`)
* `flower`       the digits task on Flower (gRPC server and clients on localhost) against the grid
* `scale`        1, 4, 16, 64 workers hosted in one pool process on 4 nodes: s/round, critical path, owner peak RSS
* `compression`  float16 / int8 updates against float32: bytes per update, accuracy, chains verified
* `asynchrony`   sync against async rounds (FedBuff), one worker slowed 5x or all equal: time to a target accuracy
* `profile`      pyinstrument on the client and on one worker during a digits grid job
* `strategies`   FedAvgM, FedAdam, FedYogi, FedAdagrad, Bulyan against FedAvg on a 7-worker grid, chains verified

Every benchmark runs in its own process (started by `run.py`), starts its own daemons and workers under
a private temporary directory and stops them by PID in `finally` blocks; `run.py` then stops, by PID,
anything still running that names that directory. Nothing here is imported by grid_ipfs.
"""

ORDER = ["transfer", "pubsub", "overhead", "overhead_cnn", "flower", "scale", "compression", "asynchrony", "profile",
         "strategies"]
"""Every benchmark, in the order `run.py` runs them (flower reuses the grid figure of overhead)."""
