"""A whole grid on one machine: a loopback devnet plus one worker process per data shard.

Used by `make demo`, the examples, the end-to-end tests and the benchmarks. Workers are separate
processes started with `python -m grid_ipfs.worker` (never forked from a process that ran
TensorFlow: such children hang), spread round-robin over the daemons, each logging to its own file.
Everything started is stopped by PID on `stop()` / leaving the `with` block, even after a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .ipfs.devnet import Devnet
from .ipfs.rpc import IPFSClient


class LocalGrid:
    def __init__(self, directory: str | Path, shards: list[str | Path], *, nodes: int = 3,
                 worker_args: list[str] | None = None):
        self.directory = Path(directory).resolve()
        self.shards = [Path(s).resolve() for s in shards]
        self.n_nodes = nodes
        self.worker_args = worker_args or []
        self.devnet: Devnet | None = None
        self.workers: list[subprocess.Popen] = []

    def start(self) -> LocalGrid:
        try:
            self.devnet = Devnet.up(self.n_nodes, self.directory / "devnet")
            for i in range(len(self.shards)):
                self.start_worker(i)
        except BaseException:
            self.stop()
            raise
        return self

    def worker_command(self, i: int, extra_args: list[str] | None = None) -> list[str]:
        api = self.devnet.nodes[i % len(self.devnet.nodes)].api
        return [sys.executable, "-m", "grid_ipfs.worker", "--api", api, "--data", str(self.shards[i]),
                "--name", f"worker{i}", "--key", str(self.directory / "keys" / f"worker{i}.key"),
                *self.worker_args, *(extra_args or [])]

    def add_worker(self, shard: str | Path, extra_args: list[str] | None = None) -> int:
        """Start one more worker on `shard` (round-robin node); returns its index."""
        self.shards.append(Path(shard).resolve())
        self.start_worker(len(self.shards) - 1, extra_args)
        return len(self.shards) - 1

    def start_worker(self, i: int, extra_args: list[str] | None = None) -> subprocess.Popen:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONUNBUFFERED": "1"}
        with open(logs / f"worker{i}.log", "ab") as log_file:
            proc = subprocess.Popen(self.worker_command(i, extra_args), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        if i < len(self.workers):
            self.workers[i] = proc
        else:
            self.workers.append(proc)
        return proc

    def stop_worker(self, i: int, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.workers[i]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def worker_log(self, i: int) -> str:
        path = self.directory / "logs" / f"worker{i}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def apis(self) -> list[str]:
        return self.devnet.apis if self.devnet else []

    def client(self, node: int = 0) -> IPFSClient:
        return IPFSClient(self.apis[node])

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.devnet is not None:
            self.devnet.stop()
        elif (self.directory / "devnet").exists():
            Devnet.down(self.directory / "devnet")

    def __enter__(self) -> LocalGrid:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
