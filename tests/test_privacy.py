"""Privacy budget of DP-FedAvg (`grid_ipfs.privacy`, `python -m grid_ipfs.chain privacy`).

Unit tests check the accountant against independent computations: the closed-form privacy profile of
the Gaussian mechanism written out here with scipy (T rounds of noise multiplier z are one Gaussian
mechanism of mu = sqrt(T) / z), dp-accounting's PLD accountant composing the rounds one by one (same
value) and its RDP accountant and the zCDP bound rho + 2 sqrt(rho log(1/delta)), rho = T / (2 z^2)
(both valid but looser: never below). Integration: a real 2-round dp-fedavg job on a devnet with 2
workers, its chain read by the CLI from another node.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.optimize import brentq  # noqa: E402
from scipy.stats import norm  # noqa: E402

from grid_ipfs.privacy import DEFAULT_DELTA, chain_epsilon, compose_epsilon, epsilon  # noqa: E402

from .cli import run_cli  # noqa: E402
from .waiting import wait_for  # noqa: E402


def exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """The tight epsilon of `rounds` Gaussian mechanisms of noise multiplier z (Balle and Wang 2018):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), mu = sqrt(rounds) / z."""
    mu = math.sqrt(rounds) / z
    delta_of = lambda eps: (norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))
                            - delta)
    return brentq(delta_of, 0.0, 1000.0, xtol=1e-9)


def zcdp_epsilon(z: float, rounds: int, delta: float) -> float:
    rho = rounds / (2 * z * z)
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


# -- the accountant ----------------------------------------------------------------------------------------


def test_epsilon_grows_with_rounds():
    values = [epsilon(1.0, t) for t in range(1, 11)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert epsilon(1.0, 0) == 0.0


def test_epsilon_falls_as_noise_grows():
    values = [epsilon(z, 3) for z in (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 20.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.5 < 100 < values[0]


def test_zero_noise_is_no_privacy():
    assert epsilon(0.0, 1) == math.inf and epsilon(0, 10) == math.inf
    assert compose_epsilon([1.0, 0.0, 1.0]) == math.inf


def test_a_smaller_delta_costs_more_epsilon():
    assert epsilon(1.0, 3, 1e-3) < epsilon(1.0, 3, 1e-5) < epsilon(1.0, 3, 1e-7)


@pytest.mark.parametrize("z, rounds", [(0.1, 10), (0.3, 3), (1.0, 3), (1.0, 10), (2.0, 50), (5.0, 1)])
def test_epsilon_is_the_exact_gaussian_value_below_rdp_and_zcdp(z, rounds):
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    got = epsilon(z, rounds, 1e-5)
    assert got == pytest.approx(exact_gaussian_epsilon(z, rounds, 1e-5), rel=1e-9)
    rdp = RdpAccountant()
    rdp.compose(SelfComposedDpEvent(GaussianDpEvent(z), rounds))
    assert got < rdp.get_epsilon(1e-5) and got < zcdp_epsilon(z, rounds, 1e-5)


@pytest.mark.parametrize("z, rounds", [(1.0, 3), (0.5, 5)])
def test_epsilon_agrees_with_the_pld_accountant_composing_round_by_round(z, rounds):
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    pld = PLDAccountant()
    pld.compose(SelfComposedDpEvent(GaussianDpEvent(z), rounds))
    assert epsilon(z, rounds, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=2e-3)


def test_known_values():
    # the exact (epsilon, 1e-5) of 3 and 10 rounds at noise multiplier 1; the RDP accountant says 9.01, 19.05
    assert epsilon(1.0, 3, 1e-5) == pytest.approx(8.3854, abs=1e-3)
    assert epsilon(1.0, 10, 1e-5) == pytest.approx(17.8566, abs=1e-3)
    assert epsilon(0.3, 10, 1e-5) == pytest.approx(99.673, abs=1e-2)


def test_heterogeneous_noise_composes_in_any_order():
    mixed = compose_epsilon([1.0, 2.0, 1.0])
    assert mixed == pytest.approx(compose_epsilon([2.0, 1.0, 1.0]))
    assert epsilon(2.0, 3) < mixed < epsilon(1.0, 3)


@pytest.mark.parametrize("call", [
    lambda: epsilon(1.0, 3, 0.0), lambda: epsilon(1.0, 3, 1.0), lambda: epsilon(-0.1, 3),
    lambda: epsilon(float("nan"), 3), lambda: epsilon(1.0, -1), lambda: epsilon(1.0, 2.5),
    lambda: epsilon(True, 3), lambda: chain_epsilon([], delta=2.0),
])
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


# -- a chain's budget (block dicts; no daemon) -------------------------------------------------------------


def block(seq, round, name="dp-fedavg", z=1.0, clip=3.0, accepted=None):
    params = {"clip": clip, "noise_multiplier": z, "seed": 5} if name == "dp-fedavg" else {}
    metrics = {"val_accuracy": 0.5} if accepted is None else {"accepted": 1.0 if accepted else 0.0}
    return {"job": "dp", "seq": seq, "round": round, "aggregation": {"name": name, "params": params},
            "metrics": metrics}


GENESIS = block(0, 0, name="init")


def test_chain_budget_counts_every_noisy_aggregate_rejected_tries_too():
    chain = [GENESIS, block(1, 1, accepted=True), block(2, 2, accepted=False), block(3, 2, accepted=True)]
    budget = chain_epsilon([(f"cid{b['seq']}", b) for b in reversed(chain)], 1e-5)  # as chain.walk yields them
    assert budget.private and budget.job == "dp"
    assert [(r.seq, r.round, r.accepted) for r in budget.releases] == [(1, 1, True), (2, 2, False), (3, 2, True)]
    assert budget.epsilon == pytest.approx(epsilon(1.0, 3)) and budget.rounds == 2
    assert [r.epsilon for r in budget.releases] == pytest.approx([epsilon(1.0, t) for t in (1, 2, 3)])
    assert chain_epsilon(chain).epsilon == pytest.approx(budget.epsilon)  # plain dicts, default delta
    assert chain_epsilon([GENESIS]).epsilon == 0.0


def test_chain_budget_is_infinite_from_the_first_aggregate_without_noise():
    chain = [GENESIS, block(1, 1), block(2, 2, name="fedavg"), block(3, 3)]
    budget = chain_epsilon(chain)
    assert not budget.private and budget.epsilon == math.inf
    assert "block seq 2 (round 2)" in budget.reason and "rule fedavg, without noise" in budget.reason
    assert math.isfinite(budget.releases[0].epsilon) and budget.releases[1].epsilon == math.inf
    out = budget.as_dict()
    assert out["epsilon"] is None and out["private"] is False and out["releases"][2]["epsilon"] is None
    json.dumps(out, allow_nan=False)  # valid JSON: no Infinity
    zero = chain_epsilon([GENESIS, block(1, 1, z=0.0)])
    assert zero.epsilon == math.inf and "noise multiplier 0" in zero.reason


def test_chain_budget_with_changing_noise_and_bad_params():
    budget = chain_epsilon([GENESIS, block(1, 1, z=2.0), block(2, 2, z=1.0)], DEFAULT_DELTA)
    assert budget.epsilon == pytest.approx(compose_epsilon([2.0, 1.0]))
    with pytest.raises(ValueError, match=r"block seq 1 \(round 1\): bad dp-fedavg params"):
        chain_epsilon([GENESIS, block(1, 1, z="1")])


# -- on real daemons: a tiny dp-fedavg job, its chain read by the CLI --------------------------------------

CLIP, NOISE, ROUNDS, WORKERS = 3.0, 1.0, 2, 2



@pytest.fixture(scope="module")
def dp_job(tmp_path_factory):
    """2 workers, 2 rounds of dp-fedavg (clip 3, noise 1) on digits; the grid is stopped at the end."""
    from grid_ipfs import data, zoo
    from grid_ipfs.client import Client, JobSpec
    from grid_ipfs.identity import Identity
    from grid_ipfs.localgrid import LocalGrid

    root = tmp_path_factory.mktemp("privacy")
    x, y, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x[:600], y[:600], WORKERS, seed=1))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    grid = LocalGrid(root / "grid", shards, nodes=2)
    grid.start()
    try:
        for i in range(WORKERS):
            wait_for(lambda i=i: "listening on" in grid.worker_log(i), timeout=120, what=f"worker{i} to listen")
        spec = JobSpec(model_path=root / "digits.keras", eval_data=root / "test.npz", rounds=ROUNDS,
                       min_workers=WORKERS, round_timeout=60, join_timeout=120, max_retries=1, epochs=1,
                       aggregation="dp-fedavg", aggregation_params={"clip": CLIP, "noise_multiplier": NOISE, "seed": 5},
                       job_id="privacy-dp")
        with grid.client(0) as ipfs:
            result = Client(ipfs, Identity.load_or_create(root / "owner.key"), head_dir=root / "heads").submit(spec)
        yield SimpleNamespace(grid=grid, root=root, result=result, head=result.head)
    finally:
        grid.stop()


@pytest.mark.integration
def test_privacy_cli_reports_the_budget_of_a_real_dp_job(dp_job):
    assert [r.updates for r in dp_job.result.rounds] == [WORKERS] * ROUNDS
    api = dp_job.grid.apis[1]  # another node than the client's
    proc = run_cli("grid_ipfs.chain", "privacy", "--api", api, dp_job.head, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["job"] == "privacy-dp" and out["private"] is True and out["rounds"] == ROUNDS
    assert out["delta"] == 1e-5 and out["accountant"] == "exact-gaussian"
    assert out["epsilon"] == pytest.approx(epsilon(NOISE, ROUNDS, 1e-5), rel=1e-9)
    assert [(r["round"], r["clip"], r["noise_multiplier"], r["accepted"]) for r in out["releases"]] == [
        (1, CLIP, NOISE, True), (2, CLIP, NOISE, True)]
    assert [r["epsilon"] for r in out["releases"]] == pytest.approx([epsilon(NOISE, t) for t in (1, 2)])

    text = run_cli("grid_ipfs.chain", "privacy", "--api", api, dp_job.head, "--delta", "1e-3")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("job privacy-dp: 2 aggregate(s) after genesis, 2 accepted round(s)"), lines
    assert lines[2] == f"  round 2 (seq 2): clip 3, noise multiplier 1; epsilon so far {epsilon(1.0, 2, 1e-3):.4g}"
    assert lines[3] == f"epsilon {epsilon(NOISE, ROUNDS, 1e-3):.4g} at delta 0.001", lines
    assert epsilon(NOISE, ROUNDS, 1e-3) < out["epsilon"]


@pytest.mark.integration
def test_privacy_cli_on_a_chain_without_noise_and_bad_deltas(dp_job):
    from grid_ipfs.chain import ChainLog, walk
    from grid_ipfs.identity import Identity
    from grid_ipfs.ipfs.cids import cid_str
    from grid_ipfs.payloads import weights_to_bytes

    from .test_chain_format import signed_update

    owner = Identity.generate()
    with dp_job.grid.client(0) as ipfs:
        genesis = next(b for _, b in walk(ipfs, dp_job.head) if b["seq"] == 0)
        weights = ipfs.add(weights_to_bytes([np.zeros(3, np.float32)]))
        log = ChainLog(ipfs, None)
        log.append({"job": "plain", "round": 0, "model": genesis["model"], "weights": weights,
                    "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": {}}, owner)
        log.append({"job": "plain", "round": 1, "model": genesis["model"], "weights": weights,
                    "aggregation": {"name": "fedavg", "params": {}},
                    "updates": [{"worker": owner.id, "weights": weights, "num_examples": 1, "metrics": {},
                                 "message": signed_update(ipfs, owner, job="plain", round_=1, head=log.head,
                                                          base=weights, weights=weights, num_examples=1, metrics={})}],
                    "metrics": {}}, owner)
        head = cid_str(log.head)
    proc = run_cli("grid_ipfs.chain", "privacy", "--api", dp_job.grid.apis[1], head)
    assert proc.returncode == 0, proc.stderr
    assert "  round 1 (seq 1): fedavg, no noise; epsilon so far inf" in proc.stdout, proc.stdout
    assert ("epsilon inf at delta 1e-05: block seq 1 (round 1) releases its aggregate without noise "
            "(rule fedavg, without noise)") in proc.stdout, proc.stdout
    assert json.loads(run_cli("grid_ipfs.chain", "privacy", "--api", dp_job.grid.apis[1], head,
                              "--json").stdout)["epsilon"] is None
    for bad in ("0", "1", "-1e-5", "nan"):
        proc = run_cli("grid_ipfs.chain", "privacy", "--api", dp_job.grid.apis[1], head, f"--delta={bad}")
        assert proc.returncode == 2 and "--delta must be in (0, 1)" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_chain_verify_re_evaluates_the_real_dp_chain_on_the_clients_eval_data(dp_job):
    """The chain CLI's evaluator must give the client's own numbers (same model, same metric names)."""
    proc = run_cli("grid_ipfs.chain", "verify", "--api", dp_job.grid.apis[1], dp_job.head, "--eval-data",
                   str(dp_job.root / "test.npz"), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"ok": True, "blocks": ROUNDS + 1, "reason": "", "first_bad": None,
                                       "evaluated": True, "ext_checked": False, "contributions_unproven": 0,
                                       "witness_records": 0}
