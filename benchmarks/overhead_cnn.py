"""overhead_cnn: `overhead` with the Fashion-MNIST CNN, where training dominates a round.

Same protocol as `benchmarks.overhead` (3 workers on 3 nodes, IID shards, a fresh grid job then the same
rounds in one process, per repeat) with `zoo.fashion_cnn` on a seeded subsample of Fashion-MNIST read by
`data.fashion_mnist` from `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`; another
directory with the idx files can be given in `GRID_BENCH_FASHION_ROOT`). The subsample keeps one run at a
few minutes. Adds `overhead_ratio` = overhead / in-process seconds per round (target <= 0.05). Without the
data set the result records why instead of numbers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from benchmarks import common, overhead
from benchmarks.overhead import Task

NAME = "overhead_cnn"
DEFAULT_REPEATS = (3, 1)
TARGET_RATIO = 0.05
TARGET_COORDINATION = 0.10
"""Issue 14: coordination (round - critical path) <= 10% of the CNN round."""
# (training examples over all workers, held-out examples, rounds) — full run, then --quick.
SIZES = {False: (30_000, 2_000, 5), True: (12_000, 1_000, 3)}


def fashion_root() -> Path:
    from grid_ipfs.data import FASHION_MNIST_ROOT

    return Path(os.environ.get("GRID_BENCH_FASHION_ROOT") or FASHION_MNIST_ROOT)


def fashion_task(directory: Path, root: Path, n_train: int, n_test: int, rounds: int,
                 workers: int = overhead.WORKERS) -> Task:
    from grid_ipfs import data, zoo

    x_train, y_train, x_test, y_test = data.fashion_mnist(root)
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(len(x_train), size=min(n_train, len(x_train)), replace=False))
    test = np.sort(rng.choice(len(x_test), size=min(n_test, len(x_test)), replace=False))
    x_train, y_train, x_test, y_test = x_train[train], y_train[train], x_test[test], y_test[test]
    shards = data.write_shards(directory / "shards", data.split_iid(x_train, y_train, workers, seed=0))
    test_path = data.save_shard(directory / "test.npz", x_test, y_test)
    model_path = directory / "fashion_cnn.keras"
    zoo.fashion_cnn(seed=0).save(model_path)
    return Task("fashion_cnn", model_path, shards, test_path, rounds, epochs=1, batch_size=32,
                train_examples=len(x_train), test_examples=len(x_test))


def run(ctx: common.Context) -> dict:
    from grid_ipfs.data import DataError

    root = fashion_root()
    n_train, n_test, rounds = SIZES[ctx.quick]
    ctx.info["data_root"] = str(root)
    try:
        task = fashion_task(ctx.workdir / "task", root, n_train, n_test, rounds)
    except DataError as exc:
        return {"skipped": f"{exc}. Or point GRID_BENCH_FASHION_ROOT at a directory holding the four idx "
                           f"files; then run `python -m benchmarks.run --only overhead_cnn`."}
    ctx.info.update(task.describe())
    return overhead.compare(ctx, task, ctx.workdir / "grid")


def render(r: dict) -> str:
    text = overhead.render(r, ratio=True)
    ok = r["overhead_ratio"] <= TARGET_RATIO
    coordination = r.get("coordination")
    share = ("" if coordination is None else f" Target coordination share <= {TARGET_COORDINATION:.0%}: "
             f"{common.verdict(coordination <= TARGET_COORDINATION)}.")
    return f"{text}\n\nTarget overhead ratio <= {TARGET_RATIO}: {common.verdict(ok)}.{share}"


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
