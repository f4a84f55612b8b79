"""What keeping the whole history costs the owner: the recursive pin moved to each new head, a CAR export,
and verifying from the CAR with no daemon, as the chain grows.

    python -m benchmarks.durability [--rounds 100] [--workers 8] [--kib 100]

One local daemon (js-ipfs here, Kubo in production). Each round adds `--workers` updates of `--kib` KiB,
their signed update messages, the aggregate (FedAvg, recomputable) and a block, then moves the owner's
pin to the new head (`IPFSClient.pin_update`: Kubo's `pin/update` walks only what is new; js-ipfs pins
the new head with a full walk, then unpins the old one). Prints the pin's median seconds per round at
a few chain lengths, then export and verify times, each with its target and met/missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

PIN_TARGET = 1.0
"""Seconds per round for the pin at the longest chain measured: small beside a round (seconds)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kib", type=int, default=100, help="size of each update's weights")
    args = parser.parse_args(argv)

    import numpy as np

    from grid_ipfs import messages
    from grid_ipfs.aggregate import fedavg
    from grid_ipfs.chain import ChainLog, verify_chain
    from grid_ipfs.chain.contributions import update_entry
    from grid_ipfs.identity import Identity
    from grid_ipfs.ipfs import cid_str
    from grid_ipfs.ipfs.car import CarStore
    from grid_ipfs.ipfs.devnet import Devnet
    from grid_ipfs.payloads import weights_to_bytes

    owner, workers = Identity.generate(), [Identity.generate() for _ in range(args.workers)]
    rng = np.random.default_rng(0)
    shape = (args.kib * 1024 // 4,)
    marks = sorted({m for m in (10, args.rounds // 2, args.rounds) if 1 <= m <= args.rounds})
    pins: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="grid-bench-durability-") as tmp, Devnet.up(1, Path(tmp) / "net") as net:
        with net.nodes[0].client() as ipfs:
            log = ChainLog(ipfs, None)
            weights = [rng.standard_normal(shape).astype(np.float32)]
            base = cid_str(ipfs.add(weights_to_bytes(weights)))
            model = cid_str(ipfs.add(b"a model"))
            log.append({"job": "bench", "round": 0, "model": model, "weights": base,
                        "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": {}}, owner)
            ipfs.pin_update(None, log.head)
            pinned, times = log.head, []
            for r in range(1, args.rounds + 1):
                head, updates, results = cid_str(log.head), [], []
                for worker in sorted(workers, key=lambda w: w.id):
                    mine = [rng.standard_normal(shape).astype(np.float32)]
                    cid = cid_str(ipfs.add(weights_to_bytes(mine)))
                    data = messages.encode(messages.Update(job="bench", round=r, weights=cid, num_examples=10,
                                                           metrics={}, eval_metrics={}, head=head, base=base), worker)
                    updates.append(update_entry(messages.decode(data), ipfs.block_put(data, codec="raw")))
                    results.append((mine, 10))
                base = cid_str(ipfs.add(weights_to_bytes(fedavg(results))))
                log.append({"job": "bench", "round": r, "model": model, "weights": base,
                            "aggregation": {"name": "fedavg", "params": {}}, "updates": updates, "metrics": {}},
                           owner, extends=head)
                started = time.perf_counter()
                ipfs.pin_update(pinned, log.head, timeout=600)
                times.append(time.perf_counter() - started)
                pinned = log.head
                if r in marks:
                    pins[r] = statistics.median(times[-5:])
            car = Path(tmp) / "chain.car"
            started = time.perf_counter()
            size = ipfs.dag_export(log.head, car, timeout=600)
            exported = time.perf_counter() - started
            started = time.perf_counter()
            daemon_report = verify_chain(ipfs, log.head)
            daemon_verify = time.perf_counter() - started
        started = time.perf_counter()
        car_report = verify_chain(CarStore(car), log.head)
        car_verify = time.perf_counter() - started
    assert daemon_report.ok and car_report.ok, (daemon_report.reason, car_report.reason)

    objects = 1 + (args.rounds + 1) * 2 + args.rounds * args.workers * 2
    print(f"## Durability: {args.rounds} rounds x {args.workers} workers, {args.kib} KiB updates "
          f"({objects} chain objects), one js-ipfs daemon\n")
    print("| what | seconds | target | |")
    print("|---|---|---|---|")
    for r, seconds in pins.items():
        target = f"<= {PIN_TARGET:g}" if r == marks[-1] else ""
        verdict = ("met" if seconds <= PIN_TARGET else "missed") if target else ""
        print(f"| move the head pin, chain of {r} rounds (median of 5) | {seconds:.3f} | {target} | {verdict} |")
    print(f"| CAR export ({size / 1e6:.1f} MB) | {exported:.2f} | | |")
    print(f"| verify through the daemon | {daemon_verify:.2f} | | |")
    verdict = "met" if car_verify <= daemon_verify else "missed"
    print(f"| verify --car, no daemon | {car_verify:.2f} | <= through the daemon | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
