"""Flower's own strategies on given rounds of client updates: the reference of tests/test_flower_parity.py.

Run with an interpreter that has flwr (`benchmarks/.venv-flwr/bin/python`, never the project's .venv):

    python tests/flower_reference.py INPUTS.npz OUTPUTS.npz

INPUTS.npz holds `spec` (JSON: `rounds`, `clients`, `tensors` and `cases`, each `{id, strategy, kwargs,
examples}` with `examples[r - 1][c]` client c's example count in round r), `initial_<t>` (the initial
global weights) and `r<round>_c<client>_t<tensor>` (client c's weights in that round). Each case builds
`flwr.server.strategy.<strategy>(initial_parameters=..., **kwargs)` and, as Flower's server does, calls its
`aggregate_fit(round, results, [])` for rounds 1..R on the one instance (so server state carries over).
OUTPUTS.npz gets `<id>_r<round>_t<tensor>`, each round's aggregate, and `flwr_version`.
"""

from __future__ import annotations

import json
import sys

import flwr
import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flower_strategies


def run_case(case: dict, inputs, spec: dict) -> dict[str, np.ndarray]:
    """One strategy instance over all rounds; returns its aggregates keyed `<id>_r<round>_t<tensor>`."""
    initial = [inputs[f"initial_{t}"] for t in range(spec["tensors"])]
    strategy = getattr(flower_strategies, case["strategy"])(
        initial_parameters=ndarrays_to_parameters(initial), **case["kwargs"])
    out = {}
    for r in range(1, spec["rounds"] + 1):
        results = []
        for c in range(spec["clients"]):
            weights = [inputs[f"r{r}_c{c}_t{t}"] for t in range(spec["tensors"])]
            fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), int(case["examples"][r - 1][c]), {})
            results.append((None, fit))  # the ClientProxy: aggregate_fit never reads it
        parameters, _ = strategy.aggregate_fit(r, results, [])
        if parameters is None:
            raise SystemExit(f"{case['id']}: Flower's {case['strategy']} returned no aggregate in round {r}")
        for t, array in enumerate(parameters_to_ndarrays(parameters)):
            out[f"{case['id']}_r{r}_t{t}"] = array
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: flower_reference.py INPUTS.npz OUTPUTS.npz")
    with np.load(argv[0]) as inputs:
        spec = json.loads(str(inputs["spec"]))
        out = {"flwr_version": np.array(flwr.__version__)}
        for case in spec["cases"]:
            out.update(run_case(case, inputs, spec))
    np.savez(argv[1], **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
