"""What `--isolate` costs: in-process vs isolated seconds per round on digits, and the child's start-up.

    python -m benchmarks.isolation [--rounds 10] [--epochs 1]

A "round" is what a worker does per round with its model: evaluate the global weights on its
validation split, then train from them (`training.evaluate` + `training.fit`, or the same two requests
to a `sandbox.IsolatedModel`, weights crossing the pipe as safetensors both ways). No IPFS: this
measures isolation only. Prints a table of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--starts", type=int, default=3, help="child start-ups to time")
    args = parser.parse_args(argv)

    from grid_ipfs import data, training, zoo
    from grid_ipfs.data import train_val_split
    from grid_ipfs.payloads import model_from_bytes, model_to_bytes
    from grid_ipfs.sandbox import IsolatedModel

    x, y, _, _ = data.digits()
    shard = data.split_iid(x, y, 3, seed=0)[0]  # one worker's share, as in the end-to-end test
    x_train, y_train, x_val, y_val = train_val_split(shard[0], shard[1], 0.1, seed=0)
    model_bytes = model_to_bytes(zoo.digits_mlp(seed=0))
    settings = dict(epochs=args.epochs, batch_size=32)

    started = time.perf_counter()
    local = model_from_bytes(model_bytes, source="bench")
    local_load = time.perf_counter() - started
    weights = local.get_weights()

    def local_round(r: int):
        training.evaluate(local, weights, x_val, y_val)
        return training.fit(local, weights, x_train, y_train, seed=r, **settings)[0]

    starts, rows = [], {}
    for _ in range(args.starts):
        started = time.perf_counter()
        with IsolatedModel(model_bytes, source="bench", x_train=x_train, y_train=y_train, x_val=x_val,
                           y_val=y_val):
            starts.append(time.perf_counter() - started)
    with IsolatedModel(model_bytes, source="bench", x_train=x_train, y_train=y_train, x_val=x_val,
                       y_val=y_val) as isolated:

        def isolated_round(r: int):
            isolated.evaluate(weights)
            return isolated.fit(weights, seed=r, **settings)[0]

        for name, step in (("in-process", local_round), ("isolated", isolated_round)):
            times = []
            for r in range(args.rounds + 1):  # round 0 traces the train/test functions: not counted
                started = time.perf_counter()
                step(r)
                if r:
                    times.append(time.perf_counter() - started)
            rows[name] = statistics.median(times)

    print(f"digits MLP, {len(x_train)} training / {len(x_val)} validation examples, {args.epochs} epoch(s), "
          f"medians of {args.rounds} rounds")
    print(f"{'':<28}{'seconds':>10}")
    print(f"{'in-process s/round':<28}{rows['in-process']:>10.3f}")
    print(f"{'isolated s/round':<28}{rows['isolated']:>10.3f}")
    print(f"{'isolation overhead s/round':<28}{rows['isolated'] - rows['in-process']:>10.3f}")
    print(f"{'in-process model load':<28}{local_load:>10.3f}")
    print(f"{'child start-up + load':<28}{statistics.median(starts):>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
