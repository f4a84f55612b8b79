"""Many workers in one process: `python -m grid_ipfs.pool --api A [--api B ...] --data S0.npz S1.npz ...`.

A worker process holds a TensorFlow runtime (~500 MB), so a machine runs a dozen or two of them. A pool
hosts one `Worker` per shard as threads of one process, like Flower's simulation engine, but over the
real protocol: each hosted worker has its own identity (key file), data shard, daemon connection
(spread round-robin over the `--api`s) and subscriptions, signs its own messages and keeps its own
witness file, so a job owner cannot tell them from separate processes. They share the one Keras
runtime and take turns at it (`kerasstate.KERAS_LOCK`: one load, fit or evaluate at a time), while
their fetches, adds and publishes overlap; they share one Keras model per model file (`SharedModels`),
so Keras traces a job's model once, not once per hosted worker. A researcher can so run 64+ workers on one machine.

What a pool does not give: isolation between the hosted workers (they trust each other's code: it is
one operator's process) and `--isolate` (a child per job per worker would cost what the pool saves).
SIGINT/SIGTERM stop every worker between steps.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .data import DataError
from .identity import Identity, IdentityError, read_id_list
from .ipfs import IPFSError
from .ipfs.rpc import IPFSClient
from .runtime import quiet_tensorflow
from .sources import open_data
from .vetting import policy_from_args
from .worker import SharedModels, Worker, add_training_arguments, training_options

log = logging.getLogger("grid_ipfs.pool")


class WorkerPool:
    """`workers` run on threads of this process until `stop()`; `serve()` is the CLI's lifecycle."""

    def __init__(self, workers: list[Worker]):
        names = [w.name for w in workers]
        if len(set(names)) != len(names):
            raise ValueError(f"hosted workers need distinct names, got {names}")
        self.workers = workers
        self._threads: list[threading.Thread] = []

    def start(self) -> WorkerPool:
        for worker in self.workers:
            thread = threading.Thread(target=self._run, args=(worker,), name=worker.name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, worker: Worker) -> None:
        """One worker's loop; if it cannot start (its daemon, say), one line and the others go on."""
        try:
            worker.run()
        except Exception as exc:  # noqa: BLE001 - one hosted worker's failure is not the pool's
            log.error("%s stopped: %s: %s", worker.name, type(exc).__name__, " ".join(str(exc).split())[:300])

    def stop(self, *_: object) -> None:
        for worker in self.workers:
            worker.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker's thread to end; whether all did within `timeout`."""
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def running(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def serve(self) -> None:
        """Run until SIGINT or SIGTERM, or until every worker stopped."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.start()
        log.info("hosting %d workers in one process", len(self.workers))
        while not self.join(timeout=0.5):  # short joins: the main thread must stay free for signals
            pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.pool", description=__doc__.split("\n")[0])
    parser.add_argument("--api", action="append", required=True, metavar="MULTIADDR",
                        help="an IPFS daemon's API multiaddr; repeat it to spread the workers round-robin")
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="one data source per hosted worker (an .npz shard, a .csv file with --label-column, "
                             "or a folder of class sub-folders of images); a worker is named after its stem")
    parser.add_argument("--label-column", default=None, metavar="NAME", help="CSV sources: the column of labels")
    parser.add_argument("--key-dir", type=Path, default=Path.home() / ".grid_ipfs", metavar="DIR",
                        help="the workers' key files, worker-NAME.key (created on first run), and their "
                             "witness files beside them (default ~/.grid_ipfs)")
    add_training_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    options = training_options(args, parser)
    names = [Path(path).stem for path in args.data]
    if len(set(names)) != len(names):
        parser.error("--data: shards need distinct file names (a worker is named after its shard)")
    try:
        policy = policy_from_args(args)
        trusted = read_id_list(args.trust_clients) if args.trust_clients else None
        for api in args.api:
            IPFSClient(api).wait_ready(timeout=10)
        workers, models = [], SharedModels()
        for i, (path, name) in enumerate(zip(args.data, names)):
            data = open_data(path, label_column=args.label_column if Path(path).suffix.lower() == ".csv" else None)
            key = args.key_dir / f"worker-{name}.key"
            workers.append(Worker(IPFSClient(args.api[i % len(args.api)]), Identity.load_or_create(key), data,
                                  name=name, trusted_clients=trusted, witness_dir=key.with_suffix(".witness"),
                                  policy=policy, shared_models=models, **options))
        pool = WorkerPool(workers)
    except (DataError, IPFSError, IdentityError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pool.serve()
    log.info("pool stopped: %d workers (%d messages dropped, %d failed)", len(pool.workers),
             sum(w.dropped for w in pool.workers), sum(w.failed for w in pool.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
