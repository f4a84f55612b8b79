"""The Flower side of `benchmarks.flower`: `python -m benchmarks.flower_app server|client ...`.

Run by the interpreter that has `flwr` (see `benchmarks.flower`). The server is Flower's `start_server`
(gRPC on 127.0.0.1) with `FedAvg` and a server-side evaluation of the global model on the held-out set
every round; each client is Flower's `start_client` with a `NumPyClient` doing exactly what a grid worker
does per round: evaluate the incoming weights on its validation split, then `training.fit` with the
worker's seed. The server writes `{"flwr_version", "rounds": [{"round", "start", "end", "accuracy"}]}`
where a round starts once its clients are sampled (so waiting for clients to connect is not counted,
as joining is not counted on the grid) and ends after the evaluation of the new global model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import common  # noqa: F401  (environment: TF quiet, PYTHONPATH)


def serve(args: argparse.Namespace) -> int:
    import flwr
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    from grid_ipfs import data
    from grid_ipfs.payloads import model_from_bytes
    from grid_ipfs.training import evaluate

    model = model_from_bytes(Path(args.model).read_bytes())
    x_test, y_test = data.load_shard(args.test)
    rounds: dict[int, dict] = {}

    def evaluate_fn(server_round, parameters, config):
        metrics = evaluate(model, parameters, x_test, y_test)
        entry = rounds.setdefault(server_round, {"round": server_round})
        entry.update(end=time.perf_counter(), accuracy=metrics.get("accuracy"), loss=metrics.get("loss"))
        return metrics["loss"], {"accuracy": metrics.get("accuracy", 0.0)}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            instructions = super().configure_fit(server_round, parameters, client_manager)  # waits for clients
            rounds.setdefault(server_round, {"round": server_round})["start"] = time.perf_counter()
            return instructions

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.workers,
                           min_evaluate_clients=0, min_available_clients=args.workers, evaluate_fn=evaluate_fn,
                           initial_parameters=ndarrays_to_parameters(model.get_weights()),
                           on_fit_config_fn=lambda r: {"round": r, "epochs": args.epochs,
                                                       "batch_size": args.batch_size})
    start_server(server_address=f"127.0.0.1:{args.port}", config=ServerConfig(num_rounds=args.rounds,
                                                                                round_timeout=600.0),
                 strategy=strategy)
    Path(args.out).write_text(json.dumps({"flwr_version": flwr.__version__,
                                          "rounds": [rounds[r] for r in sorted(rounds)]}))
    return 0


def work(args: argparse.Namespace) -> int:
    from flwr.client import NumPyClient, start_client

    from grid_ipfs import data
    from grid_ipfs.payloads import model_from_bytes
    from grid_ipfs.training import evaluate, fit

    model = model_from_bytes(Path(args.model).read_bytes())
    x_tr, y_tr, x_val, y_val = data.train_val_split(*data.load_shard(args.shard), args.val_split, seed=args.seed)

    class BenchClient(NumPyClient):
        def get_parameters(self, config):
            return model.get_weights()

        def fit(self, parameters, config):
            r = int(config["round"])
            if len(x_val):
                evaluate(model, parameters, x_val, y_val)
            weights, metrics = fit(model, parameters, x_tr, y_tr, epochs=int(config["epochs"]),
                                   batch_size=int(config["batch_size"]), seed=args.seed + r)
            return weights, len(x_tr), {k: float(v) for k, v in metrics.items()}

        def evaluate(self, parameters, config):
            return 0.0, len(x_val), {}

    start_client(server_address=f"127.0.0.1:{args.port}", client=BenchClient().to_client(), insecure=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flower_app")
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--test", required=True)
    s.add_argument("--workers", type=int, required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("--batch-size", type=int, required=True)
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--shard", required=True)
    c.add_argument("--val-split", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return serve(args) if args.role == "server" else work(args)


if __name__ == "__main__":
    sys.exit(main())
