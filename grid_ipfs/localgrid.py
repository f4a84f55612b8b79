"""A whole grid on one machine: a loopback devnet plus one worker process per data shard (and miners).

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
from collections.abc import Mapping, Sequence
from pathlib import Path

from .ipfs.devnet import Devnet
from .ipfs.rpc import IPFSClient


class LocalGrid:
    """`pooled=True` hosts all the workers in one `python -m grid_ipfs.pool` process (one TensorFlow
    runtime for all: 64 workers fit on one machine), spread over the daemons as separate workers are;
    its log is `pool_log()`.

    `worker_env[i]` adds variables to worker i's environment (e.g. `{"KERAS_BACKEND": "jax"}`: one job
    whose workers train on different Keras backends); `start_worker` / `add_worker` take `env` too. A
    pool is one process: it gets none of them."""

    def __init__(self, directory: str | Path, shards: list[str | Path], *, nodes: int = 3,
                 worker_args: list[str] | None = None, pooled: bool = False,
                 worker_env: Sequence[Mapping[str, str] | None] | None = None):
        self.directory = Path(directory).resolve()
        self.shards = [Path(s).resolve() for s in shards]
        self.n_nodes = nodes
        self.worker_args = worker_args or []
        self.pooled = pooled
        self.worker_env: list[dict[str, str]] = [dict(env or {}) for env in (worker_env or [])]
        self.devnet: Devnet | None = None
        self.workers: list[subprocess.Popen] = []
        self.miners: list[subprocess.Popen] = []
        self.pool: subprocess.Popen | None = None

    def start(self) -> LocalGrid:
        try:
            self.devnet = Devnet.up(self.n_nodes, self.directory / "devnet")
            if self.pooled:
                self.start_pool(self.shards)
            else:
                for i in range(len(self.shards)):
                    self.start_worker(i)
        except BaseException:
            self.stop()
            raise
        return self

    def start_pool(self, shards: list[str | Path]) -> subprocess.Popen:
        """Host one worker per shard in one `python -m grid_ipfs.pool` process (stopping the pool running);
        workers are named after their shards' stems, with keys under DIRECTORY/keys."""
        self.stop_pool()
        apis = [arg for node in self.devnet.nodes for arg in ("--api", node.api)]
        self.pool = self._spawn("pool", [sys.executable, "-m", "grid_ipfs.pool", *apis, "--data",
                                         *(str(Path(s).resolve()) for s in shards),
                                         "--key-dir", str(self.directory / "keys"), *self.worker_args])
        return self.pool

    def stop_pool(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.pool is None:
            return None
        code, self.pool = _stop(self.pool, sig, timeout), None
        return code

    def pool_log(self) -> str:
        return self._log("pool")

    def worker_command(self, i: int, extra_args: list[str] | None = None) -> list[str]:
        api = self.devnet.nodes[i % len(self.devnet.nodes)].api
        data = ["--data", str(self.shards[i])] if self.shards[i] is not None else []
        return [sys.executable, "-m", "grid_ipfs.worker", "--api", api, *data, "--name", f"worker{i}",
                "--key", str(self.directory / "keys" / f"worker{i}.key"),
                *self.worker_args, *(extra_args or [])]

    def add_worker(self, shard: str | Path | None, extra_args: list[str] | None = None,
                   env: Mapping[str, str] | None = None) -> int:
        """Start one more worker on `shard` (round-robin node), any `--data` source, or None when
        `extra_args` name the data (`--data-loader`); `env` is added to its environment. Returns its index."""
        self.shards.append(Path(shard).resolve() if shard is not None else None)
        self.start_worker(len(self.shards) - 1, extra_args, env)
        return len(self.shards) - 1

    def start_worker(self, i: int, extra_args: list[str] | None = None,
                     env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start (or restart) worker i; `env` replaces its `worker_env` entry, which restarts keep."""
        if env is not None:
            self.worker_env += [{} for _ in range(i + 1 - len(self.worker_env))]
            self.worker_env[i] = dict(env)
        extra_env = self.worker_env[i] if i < len(self.worker_env) else {}
        proc = self._spawn(f"worker{i}", self.worker_command(i, extra_args), extra_env)
        if i < len(self.workers):
            self.workers[i] = proc
        else:
            self.workers.append(proc)
        return proc

    def add_miner(self, eval_data: str | Path, extra_args: list[str] | None = None) -> int:
        """Start a miner (`python -m grid_ipfs.miner`) judging on `eval_data`, on the next node round-robin
        after the workers'; returns its index. Its log is `miner_log(index)`."""
        i = len(self.miners)
        api = self.devnet.nodes[(len(self.shards) + i) % len(self.devnet.nodes)].api
        command = [sys.executable, "-m", "grid_ipfs.miner", "--api", api, "--eval-data", str(Path(eval_data).resolve()),
                   "--name", f"miner{i}", "--key", str(self.directory / "keys" / f"miner{i}.key"), *(extra_args or [])]
        self.miners.append(self._spawn(f"miner{i}", command))
        return i

    def miner_log(self, i: int) -> str:
        return self._log(f"miner{i}")

    def _spawn(self, name: str, command: list[str], extra_env: Mapping[str, str] | None = None) -> subprocess.Popen:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONUNBUFFERED": "1",
               **(extra_env or {})}
        with open(logs / f"{name}.log", "ab") as log_file:
            return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env)

    def stop_worker(self, i: int, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        return _stop(self.workers[i], sig, timeout)

    def stop_miner(self, i: int, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        return _stop(self.miners[i], sig, timeout)

    def worker_log(self, i: int) -> str:
        return self._log(f"worker{i}")

    def _log(self, name: str) -> str:
        path = self.directory / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def apis(self) -> list[str]:
        return self.devnet.apis if self.devnet else []

    def client(self, node: int = 0) -> IPFSClient:
        return IPFSClient(self.apis[node])

    def stop(self) -> None:
        processes = self.workers + self.miners + ([self.pool] if self.pool is not None else [])
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in processes:
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


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> int | None:
    """Signal `proc` and wait for it (SIGKILL after `timeout`); its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
