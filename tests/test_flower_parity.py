"""Issue #13: every aggregation strategy against Flower's own implementation (flwr 1.41) on the same inputs.

`tests/flower_reference.py` drives Flower's real Strategy objects (`aggregate_fit`, round after round on
one instance) in the flwr interpreter of the `flwr_python` fixture (benchmarks/.venv-flwr; flwr is never
installed into .venv). Here the same rounds go through `grid_ipfs.strategies.run`, the previous global
weights and the server state carried from round to round as the client does when every round is accepted.
One subprocess computes Flower's side of all cases.

Flower computes in float32, we in float64 with one cast per round, so the two agree to float32 rounding,
not bit for bit. Deliberate difference: our Multi-Krum averages the kept updates with equal weight (as in
the paper), Flower's weights them by their examples; so Flower gets equal example counts for those cases,
and `test_multi_krum_differs_from_flower_only_in_weighting` shows that with the real counts it differs.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks.flower import FLWR_VERSION
from grid_ipfs.strategies import STRATEGIES, RoundContext, make, run

# The first test may create the flwr overlay with pip (conftest's `flwr_python`): more than the usual 600 s.
pytestmark = pytest.mark.timeout(1500)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).with_name("flower_reference.py")
SEED = 13
CLIENTS = 7  # Bulyan with one Byzantine update needs 4f + 3 = 7
ROUNDS = 4
SHAPES = [(3, 4), (5,), (2, 2, 3)]
RTOL, ATOL = 1e-5, 1e-6
EQUAL_EXAMPLES = 100


@dataclass(frozen=True)
class Case:
    """Our strategy and params, and the Flower strategy and constructor kwargs that should agree."""

    id: str
    ours: str
    params: dict
    flower: str
    kwargs: dict
    equal_examples: bool = False
    """Flower is given equal example counts (our Multi-Krum ignores them; Flower's weights by them)."""


CASES = [
    Case("fedavg", "fedavg", {}, "FedAvg", {}),
    Case("fedprox", "fedprox", {"proximal_mu": 0.5}, "FedProx", {"proximal_mu": 0.5}),
    Case("median", "median", {}, "FedMedian", {}),
    Case("trimmed-mean-0.2", "trimmed-mean", {"trim": 0.2}, "FedTrimmedAvg", {"beta": 0.2}),
    Case("trimmed-mean-0.3", "trimmed-mean", {"trim": 0.3}, "FedTrimmedAvg", {"beta": 0.3}),
    Case("krum-f1", "krum", {"byzantine": 1}, "Krum", {"num_malicious_clients": 1, "num_clients_to_keep": 0}),
    Case("krum-f2", "krum", {"byzantine": 2}, "Krum", {"num_malicious_clients": 2, "num_clients_to_keep": 0}),
    Case("krum-multi3", "krum", {"byzantine": 1, "multi": 3}, "Krum",
         {"num_malicious_clients": 1, "num_clients_to_keep": 3}, equal_examples=True),
    Case("multi-krum-default", "multi-krum", {"byzantine": 1}, "Krum",
         {"num_malicious_clients": 1, "num_clients_to_keep": CLIENTS - 1}, equal_examples=True),
    Case("multi-krum-f2-keep3", "multi-krum", {"byzantine": 2, "multi": 3}, "Krum",
         {"num_malicious_clients": 2, "num_clients_to_keep": 3}, equal_examples=True),
    Case("bulyan", "bulyan", {"byzantine": 1}, "Bulyan", {"num_malicious_clients": 1, "to_keep": 0}),
    Case("fedavgm-defaults", "fedavgm", {}, "FedAvgM", {}),
    Case("fedavgm", "fedavgm", {"server_learning_rate": 0.7, "server_momentum": 0.9}, "FedAvgM",
         {"server_learning_rate": 0.7, "server_momentum": 0.9}),
    Case("fedavgm-no-momentum", "fedavgm", {"server_learning_rate": 0.5}, "FedAvgM", {"server_learning_rate": 0.5}),
    Case("fedadam-defaults", "fedadam", {}, "FedAdam", {}),
    Case("fedadam", "fedadam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}, "FedAdam",
         {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
    Case("fedyogi-defaults", "fedyogi", {}, "FedYogi", {}),
    Case("fedyogi", "fedyogi", {"eta": 0.05, "beta_1": 0.7, "beta_2": 0.9, "tau": 1e-2}, "FedYogi",
         {"eta": 0.05, "beta_1": 0.7, "beta_2": 0.9, "tau": 1e-2}),
    Case("fedadagrad-defaults", "fedadagrad", {}, "FedAdagrad", {}),
    Case("fedadagrad", "fedadagrad", {"eta": 0.2, "tau": 1e-2}, "FedAdagrad", {"eta": 0.2, "tau": 1e-2}),
]
"""Non-default params for every rule that has any; the server optimizers' defaults too (ours are Flower's)."""

WEIGHTED = {c.id: Case(f"{c.id}-weighted", c.ours, c.params, c.flower, c.kwargs) for c in CASES if c.equal_examples}
"""The equal-example cases again, Flower given the real counts."""

NOT_IN_FLOWER = {
    "dp-fedavg": "its Gaussian noise is drawn from a chain-seeded numpy stream; Flower's DP wrappers draw their own",
    "secure-fedavg": "aggregates masked fixed-point integer updates; Flower has no counterpart",
    "secure-dp-fedavg": "aggregates masked fixed-point integer updates; Flower has no counterpart",
}


def make_inputs() -> tuple[list[np.ndarray], list[tuple[list[list[np.ndarray]], list[int]]]]:
    """Initial float32 weights and ROUNDS rounds of (client weights, example counts): clients spread
    around a centre that drifts from round to round, one far-off update per round (at a different client
    each round, so the robust rules have something to reject) and distinct example counts."""
    rng = np.random.default_rng(SEED)
    initial = [rng.normal(0.0, 1.0, shape).astype(np.float32) for shape in SHAPES]
    rounds = []
    for r in range(ROUNDS):
        centre = [w + rng.normal(0.0, 0.3, w.shape) for w in initial]
        clients = [[(m + rng.normal(0.0, 3.0 if c == r % CLIENTS else 0.1, m.shape)).astype(np.float32)
                    for m in centre] for c in range(CLIENTS)]
        examples = [int(n) for n in rng.choice(np.arange(10, 1000), CLIENTS, replace=False)]
        rounds.append((clients, examples))
    return initial, rounds


def ours(case: Case, initial, rounds) -> list[list[np.ndarray]]:
    """Our aggregates, round after round: each accepted, so the next round's reference and state are its."""
    strategy = make(case.ours, case.params)
    reference, state, out = initial, None, []
    for r, (clients, examples) in enumerate(rounds, start=1):
        result = run(strategy, list(zip(clients, examples)), RoundContext(reference=reference, round=r, seq=r,
                                                                          state=state))
        reference, state = result.weights, result.state
        out.append(result.weights)
    return out


def flower_spec(cases: list[Case], initial, rounds) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON spec and arrays of flower_reference.py's input file."""
    arrays = {f"initial_{t}": w for t, w in enumerate(initial)}
    for r, (clients, _) in enumerate(rounds, start=1):
        for c, weights in enumerate(clients):
            arrays.update({f"r{r}_c{c}_t{t}": w for t, w in enumerate(weights)})
    spec = {"rounds": len(rounds), "clients": CLIENTS, "tensors": len(initial), "cases": [
        {"id": case.id, "strategy": case.flower, "kwargs": case.kwargs,
         "examples": [[EQUAL_EXAMPLES] * CLIENTS if case.equal_examples else examples for _, examples in rounds]}
        for case in cases]}
    return spec, arrays


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.fixture(scope="module")
def flower(flwr_python, inputs, tmp_path_factory) -> dict[str, np.ndarray]:
    """Flower's aggregates of every case (and of WEIGHTED), from one run of flower_reference.py."""
    directory = tmp_path_factory.mktemp("flower-parity")
    spec, arrays = flower_spec(CASES + list(WEIGHTED.values()), *inputs)
    np.savez(directory / "in.npz", spec=np.array(json.dumps(spec)), **arrays)
    try:
        done = subprocess.run([flwr_python, str(REFERENCE), str(directory / "in.npz"), str(directory / "out.npz")],
                              capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("flower_reference.py did not finish within 300 s")
    if done.returncode != 0:
        pytest.fail(f"flower_reference.py failed (exit {done.returncode}): {done.stderr[-2000:]}")
    with np.load(directory / "out.npz") as out:
        return {key: out[key] for key in out.files}


def flower_rounds(flower: dict, case_id: str) -> list[list[np.ndarray]]:
    return [[flower[f"{case_id}_r{r}_t{t}"] for t in range(len(SHAPES))] for r in range(1, ROUNDS + 1)]


def test_reference_is_the_pinned_flower(flower):
    assert str(flower["flwr_version"]) == FLWR_VERSION


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_flower(case, inputs, flower):
    theirs = flower_rounds(flower, case.id)
    for r, (mine, reference) in enumerate(zip(ours(case, *inputs), theirs), start=1):
        for t, (a, b) in enumerate(zip(mine, reference)):
            assert a.dtype == np.float32 and a.shape == SHAPES[t], (case.id, r, t, a.dtype, a.shape)
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{case.id} ({case.ours} {case.params}) vs Flower's {case.flower} "
                                               f"{case.kwargs}: round {r}, tensor {t}")


@pytest.mark.parametrize("case", [c for c in CASES if c.equal_examples], ids=lambda c: c.id)
def test_multi_krum_differs_from_flower_only_in_weighting(case, inputs, flower):
    """With the real example counts Flower's Multi-Krum (same selection, example-weighted mean) differs
    from ours beyond float tolerance: the equal-count agreement above is not vacuous."""
    mine = ours(case, *inputs)
    theirs = flower_rounds(flower, WEIGHTED[case.id].id)
    differs = [r for r, (a, b) in enumerate(zip(mine, theirs), start=1)
               if not all(np.allclose(x, y, rtol=RTOL, atol=ATOL) for x, y in zip(a, b))]
    assert differs, f"{case.id}: Flower's example-weighted Multi-Krum equals our equal-weight one in every round"


def test_every_builtin_strategy_is_compared():
    """A strategy added to grid_ipfs.strategies gets a parity case here or a reason it has none."""
    builtin = {name for name, cls in STRATEGIES.items() if cls.__module__.startswith("grid_ipfs.strategies.")}
    assert builtin - {c.ours for c in CASES} - set(NOT_IN_FLOWER) == set()
    assert set(NOT_IN_FLOWER) <= builtin


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ours_is_deterministic(case, inputs):
    """Two runs give the same bytes (what `chain verify` relies on), stateful rules included."""
    first, second = ours(case, *inputs), ours(case, *inputs)
    assert [[w.tobytes() for w in r] for r in first] == [[w.tobytes() for w in r] for r in second]
