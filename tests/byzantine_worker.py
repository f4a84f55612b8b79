"""A Byzantine worker for tests: `python -m tests.byzantine_worker --attack scale:20|random [worker args]`.

It joins jobs, follows rounds and signs its updates exactly like `grid_ipfs.worker.Worker` (same command
line plus `--attack`), but the weights it sends are poisoned:

* `scale:F` trains honestly, then sends `global + F * (trained - global)`: its update scaled by F
  (`scale:-20` sends the update reversed and boosted);
* `random` sends Gaussian weights (standard deviation `--random-std`, default 1) unrelated to training,
  a fresh draw every round.

It reports its true `num_examples` and training metrics, so only the aggregation rule (or the client's
norm screen) stands between it and the global model.
"""

from __future__ import annotations

import sys

import numpy as np

from grid_ipfs.worker import JoinedJob, Worker, build_parser
from grid_ipfs.worker import main as worker_main


def parse_attack(text: str) -> tuple[str, float]:
    """`scale:F` -> ("scale", F); `random` -> ("random", 0.0)."""
    kind, _, value = text.partition(":")
    if kind == "random" and not value:
        return "random", 0.0
    if kind == "scale":
        try:
            return "scale", float(value)
        except ValueError:
            pass
    raise ValueError(f"--attack: expected scale:FACTOR or random, got {text!r}")


class ByzantineWorker(Worker):
    def __init__(self, *args, attack: tuple[str, float], random_std: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack, self.random_std = attack, random_std

    def local_update(self, joined: JoinedJob, global_weights: list, round_) -> tuple[list, dict]:
        weights, metrics = super().local_update(joined, global_weights, round_)
        kind, factor = self.attack
        if kind == "scale":
            poisoned = [(g.astype(np.float64) + factor * (w.astype(np.float64) - g)).astype(w.dtype)
                        for g, w in zip(global_weights, weights)]
        else:
            rng = np.random.default_rng([self.seed, round_.round, round_.attempt])
            poisoned = [(rng.standard_normal(w.shape) * self.random_std).astype(w.dtype) for w in weights]
        return poisoned, metrics


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m tests.byzantine_worker")
    parser.add_argument("--attack", required=True, type=parse_attack, help="scale:FACTOR or random")
    parser.add_argument("--random-std", type=float, default=1.0, help="standard deviation of random weights")
    return worker_main(argv, parser=parser, make_worker=lambda args, *a, **kw: ByzantineWorker(
        *a, attack=args.attack, random_std=args.random_std, **kw))


if __name__ == "__main__":
    sys.exit(main())
