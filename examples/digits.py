"""Federated digits: an MLP trained by FedAvg over workers that each hold a shard of sklearn's digits.

    python examples/digits.py [--rounds 5] [--workers 3] [--non-iid ALPHA] [--dir D]

A loopback devnet (one daemon per worker, at most 3), one worker process per shard, and a client on
node 0 that runs the job and evaluates each new global model on held-out digits. Shards are IID by
default; `--non-iid 0.3` gives each worker a Dirichlet(0.3) label mix instead (mostly a few classes).
The chain is then verified from the last node, recomputing every aggregate, and everything stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

from grid_ipfs import data  # noqa: E402
from grid_ipfs.chain import verify_chain  # noqa: E402
from grid_ipfs.client import Client, ClientCallback, JobSpec, RoundResult  # noqa: E402
from grid_ipfs.identity import Identity  # noqa: E402
from grid_ipfs.localgrid import LocalGrid  # noqa: E402


class PrintRounds(ClientCallback):
    def on_worker_joined(self, worker, name, joined, needed):
        print(f"  {name} joined ({joined}/{needed})", flush=True)

    def on_round_end(self, r: RoundResult):
        m = r.metrics
        print(f"round {r.round}: {r.updates} updates, train loss {m['loss']:.4f} accuracy {m['accuracy']:.4f}, "
              f"held-out loss {m['val_loss']:.4f} accuracy {m['val_accuracy']:.4f}, {r.seconds:.1f}s; "
              f"head {r.head}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--non-iid", type=float, metavar="ALPHA", help="Dirichlet label skew (smaller: more skewed)")
    parser.add_argument("--dir", type=Path, help="keep shards, repos, logs and heads here instead of a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="grid-ipfs-digits-") as tmp:
        root = (args.dir or Path(tmp)).resolve()
        x_train, y_train, x_test, y_test = data.digits()
        if args.non_iid is None:
            parts = data.split_iid(x_train, y_train, args.workers, seed=0)
        else:
            parts = data.split_dirichlet(x_train, y_train, args.workers, alpha=args.non_iid, seed=0, min_size=20)
        for i, (_, y) in enumerate(parts):
            print(f"shard {i}: {len(y)} examples, per class {np.bincount(y, minlength=10).tolist()}")
        shards = data.write_shards(root / "shards", parts)
        data.save_shard(root / "test.npz", x_test, y_test)

        from grid_ipfs import zoo  # Keras: imported after the data is ready, used only to write the model

        zoo.digits_mlp(seed=0).save(root / "digits.keras")

        with LocalGrid(root / "grid", shards, nodes=min(args.workers, 3)) as grid:
            print(f"devnet up ({len(grid.apis)} nodes); {args.workers} workers starting")
            with grid.client(0) as ipfs:
                client = Client(ipfs, Identity.generate(), head_dir=root / "heads", callbacks=[PrintRounds()])
                result = client.submit(JobSpec(model_path=root / "digits.keras", rounds=args.rounds,
                                               min_workers=args.workers, epochs=2, batch_size=32,
                                               eval_data=root / "test.npz"))
            print(f"chain head: {result.head}")
            with grid.client(len(grid.apis) - 1) as reader:
                report = verify_chain(reader, result.head)
            print(f"chain verified from node {len(grid.apis) - 1}: {report.ok} ({report.blocks} blocks) "
                  f"{report.reason}".rstrip())
    print(f"everything stopped; {time.monotonic() - started:.1f}s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
