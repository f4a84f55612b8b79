"""`make demo` / `python -m grid_ipfs.demo`: the whole grid, end to end, on this machine.

A 3-node loopback devnet, 3 worker processes (one per node) each holding an IID shard of sklearn's
digits, and a client that runs a 5-round FedAvg job from node 0 while you watch the accuracy per
round. The chain is then read and verified from node 2, which never saw the client's process, and
everything started is stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from .runtime import quiet_tensorflow


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()  # before anything loads TensorFlow; an entry point's choice
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="keep everything (repos, shards, logs) here instead of a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from . import data, zoo
    from .chain.__main__ import show, verify
    from .client import Client, JobSpec
    from .identity import Identity
    from .localgrid import LocalGrid
    from .progress import LogProgress, RichProgress

    with tempfile.TemporaryDirectory(prefix="grid-ipfs-demo-") as tmp:
        root = (args.dir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        x_train, y_train, x_test, y_test = data.digits()
        shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, args.workers, seed=0))
        data.save_shard(root / "test.npz", x_test, y_test)
        zoo.digits_mlp(seed=0).save(root / "digits.keras")
        print(f"digits: {len(x_train)} training examples in {args.workers} shards, {len(x_test)} held out")

        with LocalGrid(root / "grid", shards, nodes=args.workers) as grid:
            print(f"devnet up: {', '.join(grid.apis)}; {args.workers} workers starting")
            progress = RichProgress() if sys.stderr.isatty() else LogProgress()
            if isinstance(progress, LogProgress):
                logging.getLogger("grid_ipfs.client").setLevel(logging.INFO)
            with grid.client(0) as ipfs:
                client = Client(ipfs, Identity.generate(), head_dir=root / "heads", callbacks=[progress])
                result = client.submit(JobSpec(model_path=root / "digits.keras", rounds=args.rounds,
                                               min_workers=args.workers, epochs=2, batch_size=32,
                                               eval_data=root / "test.npz", round_timeout=120))
            final = result.rounds[-1].metrics
            print(f"\nfinal held-out accuracy {final.get('val_accuracy', float('nan')):.4f} after {args.rounds} rounds")
            print("\nthe chain, read from node 2 (not the client's node):")
            with grid.client(len(grid.apis) - 1) as reader:
                show(reader, result.head, as_json=False)
                code = verify(reader, result.head, recompute=True, as_json=False)
        print("everything stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
