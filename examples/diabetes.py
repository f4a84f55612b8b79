"""Federated linear regression on sklearn's diabetes data (the FlexBlock tutorial's task), 5 workers.

    python examples/diabetes.py [--rounds 5] [--workers 5] [--dir D]

The 354 training patients are dealt to the workers IID; each round every worker runs a few epochs of
SGD on its ~70 patients, and the client averages the updates (FedAvg) and measures the new global model
on the 88 held-out patients. Inputs and target are standardised (see `grid_ipfs.data.diabetes`), so an
MSE of 1.0 is "no better than predicting the mean"; a good linear fit gets about 0.5.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from grid_ipfs import data  # noqa: E402
from grid_ipfs.chain import verify_chain  # noqa: E402
from grid_ipfs.client import Client, ClientCallback, JobSpec, RoundResult  # noqa: E402
from grid_ipfs.identity import Identity  # noqa: E402
from grid_ipfs.localgrid import LocalGrid  # noqa: E402


class PrintRounds(ClientCallback):
    def on_job_start(self, job, genesis):
        print(f"job {job.job}: model {job.model}, genesis {genesis}", flush=True)

    def on_round_end(self, r: RoundResult):
        m = r.metrics  # loss/mae: the workers' training; val_*: the client's held-out evaluation
        print(f"round {r.round}: {r.updates} updates, train MSE {m['loss']:.4f} MAE {m['mae']:.4f}, "
              f"held-out MSE {m['val_loss']:.4f} MAE {m['val_mae']:.4f}, {r.seconds:.1f}s; head {r.head}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round (default 5)")
    parser.add_argument("--dir", type=Path, help="keep shards, repos, logs and heads here instead of a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="grid-ipfs-diabetes-") as tmp:
        root = (args.dir or Path(tmp)).resolve()
        x_train, y_train, x_test, y_test = data.diabetes()
        shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, args.workers, seed=0))
        data.save_shard(root / "test.npz", x_test, y_test)
        print(f"diabetes: {len(x_train)} patients in {args.workers} shards, {len(x_test)} held out")

        from grid_ipfs import zoo  # Keras: used only to write the compiled model

        model = zoo.diabetes_linear(seed=0)
        model.save(root / "diabetes.keras")
        initial = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
        print(f"initial model: held-out MSE {initial['loss']:.4f} MAE {initial['mae']:.4f}")

        with LocalGrid(root / "grid", shards, nodes=min(args.workers, 3)) as grid:
            print(f"devnet up ({len(grid.apis)} nodes); {args.workers} workers starting", flush=True)
            with grid.client(0) as ipfs:
                client = Client(ipfs, Identity.generate(), head_dir=root / "heads", callbacks=[PrintRounds()])
                result = client.submit(JobSpec(model_path=root / "diabetes.keras", rounds=args.rounds,
                                               min_workers=args.workers, epochs=args.epochs, batch_size=16,
                                               eval_data=root / "test.npz"))
            print(f"chain head: {result.head}")
            with grid.client(len(grid.apis) - 1) as reader:
                report = verify_chain(reader, result.head)
            print(f"chain verified from node {len(grid.apis) - 1}: {report.ok} ({report.blocks} blocks) "
                  f"{report.reason}".rstrip())
    final = result.rounds[-1].metrics["val_loss"]
    print(f"final held-out MSE {final:.4f} (from {initial['loss']:.4f}); everything stopped; "
          f"{time.monotonic() - started:.1f}s")
    return 0 if report.ok and math.isfinite(final) else 1


if __name__ == "__main__":
    sys.exit(main())
