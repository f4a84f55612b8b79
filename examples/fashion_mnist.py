"""Federated Fashion-MNIST: a small CNN trained by FedAvg over 5 workers, from Debian's dataset package.

    python examples/fashion_mnist.py [--rounds 3] [--workers 5] [--limit 2000] [--dir D]

The images come from `sudo apt-get install dataset-fashion-mnist` (idx files under
/usr/share/datasets/fashion-mnist; nothing is downloaded). Each worker gets `--limit` random training
images (IID) and trains one epoch per round; the client evaluates each global model on 2,000 held-out
images. The defaults take a few minutes on 2 CPU cores; `--limit 200 --rounds 1` is a quick smoke run.
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

HELD_OUT = 2000


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--limit", type=int, default=2000, help="training images per worker (default 2000)")
    parser.add_argument("--data-root", default=data.FASHION_MNIST_ROOT, help="where the idx(.gz) files are")
    parser.add_argument("--dir", type=Path, help="keep shards, repos, logs and heads here instead of a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()

    try:
        x_train, y_train, x_test, y_test = data.fashion_mnist(args.data_root)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not 1 <= args.limit * args.workers <= len(x_train):
        parser.error(f"--limit x --workers must be between 1 and {len(x_train)}")
    rng = np.random.default_rng(0)
    take = rng.permutation(len(x_train))[:args.limit * args.workers]
    held_out = rng.permutation(len(x_test))[:HELD_OUT]

    with tempfile.TemporaryDirectory(prefix="grid-ipfs-fashion-") as tmp:
        root = (args.dir or Path(tmp)).resolve()
        shards = data.write_shards(root / "shards", data.split_iid(x_train[take], y_train[take], args.workers))
        data.save_shard(root / "test.npz", x_test[held_out], y_test[held_out])
        del x_train, y_train, x_test, y_test
        print(f"fashion-mnist: {args.workers} shards of {args.limit} images, {len(held_out)} held out")

        from grid_ipfs import zoo  # Keras: used only to write the compiled model

        zoo.fashion_cnn(seed=0).save(root / "fashion.keras")

        with LocalGrid(root / "grid", shards, nodes=min(args.workers, 3)) as grid:
            print(f"devnet up ({len(grid.apis)} nodes); {args.workers} workers starting", flush=True)
            with grid.client(0) as ipfs:
                client = Client(ipfs, Identity.generate(), head_dir=root / "heads", callbacks=[PrintRounds()])
                result = client.submit(JobSpec(model_path=root / "fashion.keras", rounds=args.rounds,
                                               min_workers=args.workers, epochs=1, batch_size=64,
                                               eval_data=root / "test.npz", round_timeout=600))
            print(f"chain head: {result.head}")
            with grid.client(len(grid.apis) - 1) as reader:
                report = verify_chain(reader, result.head)
            print(f"chain verified from node {len(grid.apis) - 1}: {report.ok} ({report.blocks} blocks) "
                  f"{report.reason}".rstrip())
    print(f"everything stopped; {time.monotonic() - started:.1f}s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
