"""Strategies as objects (`grid_ipfs.strategies`): the registry, what each declares, the server
optimizers' math by hand, and server state that `chain verify` replays from the chain (accepted blocks
only), so an owner who fakes the state is caught."""

from __future__ import annotations

import numpy as np
import pytest

from grid_ipfs.chain import ChainLog, verify_chain, walk
from grid_ipfs.payloads import weights_from_bytes, weights_to_bytes
from grid_ipfs.strategies import (
    STRATEGIES,
    Aggregate,
    Param,
    RoundContext,
    Strategy,
    StrategyError,
    make,
    names,
    number,
    register,
    run,
    strategy_class,
)
from grid_ipfs.strategies import base as strategies_base

from .cli import run_cli
from .test_chain_format import OWNER, WORKERS, MemoryStore, genesis_fields, signed_update


def _results(rng, n=3, shapes=((3, 2), (2,))):
    return [([rng.standard_normal(s).astype(np.float32) for s in shapes], int(rng.integers(5, 50)))
            for _ in range(n)]


def test_flower_names_select_the_same_strategy_and_blocks_record_ours():
    pairs = {"FedAvg": "fedavg", "FedMedian": "median", "FedTrimmedAvg": "trimmed-mean", "Krum": "krum",
             "MultiKrum": "multi-krum", "FedProx": "fedprox", "Bulyan": "bulyan", "FedAvgM": "fedavgm",
             "FedAdam": "fedadam", "fedyogi": "fedyogi", "FEDADAGRAD": "fedadagrad"}
    for alias, name in pairs.items():
        assert strategy_class(alias).name == name
    assert "FedAdam" in names(with_aliases=True) and "FedAdam" not in names()
    with pytest.raises(StrategyError, match="unknown aggregation 'FedSGD'; known: bulyan"):
        strategy_class("FedSGD")


BUILT_IN = {n: cls for n, cls in STRATEGIES.items() if cls.__module__.startswith("grid_ipfs.strategies.")}
"""The registered strategies of grid_ipfs itself (docs/strategies.md's example registers one more)."""


def test_what_each_rule_declares_is_what_the_roles_ask():
    private = {n for n, cls in BUILT_IN.items() if cls.adds_noise}
    masked = {n for n, cls in BUILT_IN.items() if not cls.readable_updates}
    stateful = {n for n, cls in BUILT_IN.items() if cls.stateful}
    assert private == {"dp-fedavg", "secure-dp-fedavg"}
    assert masked == {"secure-fedavg", "secure-dp-fedavg"}
    assert stateful == {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    # a miner may choose only rules that read single updates, promise no noise and keep no state: the
    # old table let secure-dp-fedavg through
    assert {n for n, cls in BUILT_IN.items() if cls.minable()} == {
        "fedavg", "fedprox", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"}
    assert make("fedprox", {"proximal_mu": 0.1}).fit_config() == {"proximal_mu": 0.1}
    assert make("secure-dp-fedavg", {"clip": 1.0, "noise_multiplier": 0.5}).fit_config() == {
        "secure_aggregation": True, "dp_clip": 1.0, "dp_noise": 0.5}


@pytest.mark.parametrize("name, params, message", [
    ("fedadam", {"eta": 0}, "fedadam: eta must be a finite number in (0, 1e+06]"),
    ("fedadam", {"tau": -1e-9}, "fedadam: tau must be a finite number in (0, 1e+06]"),
    ("fedyogi", {"beta_2": 1.0}, "fedyogi: beta_2 must be a finite number in [0, 1)"),
    ("fedavgm", {"server_momentum": True}, "fedavgm: server_momentum must be a number"),
    ("fedadagrad", {"beta_1": 0.9}, "fedadagrad: unexpected param 'beta_1' (takes eta, tau)"),
    ("bulyan", {"byzantine": -1}, "bulyan: byzantine must be an integer in 0..1000000"),
    ("dp-fedavg", {"clip": 1.0}, "dp-fedavg needs the param(s) noise_multiplier"),
])
def test_params_are_declared_and_range_checked(name, params, message):
    with pytest.raises(StrategyError) as raised:
        make(name, params)
    assert str(raised.value).startswith(message), str(raised.value)


def test_fedadam_two_steps_by_hand():
    ref = [np.array([1.0, -2.0], np.float32)]
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = make("fedadam", {"eta": eta, "beta_1": b1, "beta_2": b2, "tau": tau})
    updates = [[([np.array([1.5, -2.5], np.float32)], 10)], [([np.array([1.0, -1.0], np.float32)], 10)]]
    m = v = np.zeros(2)
    w, state = ref[0].astype(np.float64), None
    for t, results in enumerate(updates, start=1):
        out = run(strategy, results, RoundContext([w.astype(np.float32)], t, t, state))
        delta = results[0][0][0].astype(np.float64) - w
        m, v = b1 * m + (1 - b1) * delta, b2 * v + (1 - b2) * delta ** 2
        eta_t = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))  # Flower's server_round + 1
        w = w + eta_t * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(out.weights[0], w.astype(np.float32), rtol=1e-6)
        assert out.weights[0].dtype == np.float32 and out.state.step == t
        w, state = out.weights[0].astype(np.float64), out.state


def test_fedavgm_with_momentum_by_hand_and_without_it_is_fedavg():
    rng = np.random.default_rng(1)
    ref = [np.zeros(3, np.float32)]
    r1, r2 = _results(rng, shapes=((3,),)), _results(rng, shapes=((3,),))
    plain = make("fedavgm")
    assert run(plain, r1, RoundContext(ref)).weights[0].tobytes() == make("fedavg").aggregate(
        r1, RoundContext()).weights[0].tobytes()
    strategy = make("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9})
    first = run(strategy, r1, RoundContext(ref))
    mean1 = sum(w[0].astype(np.float64) * n for w, n in r1) / sum(n for _, n in r1)
    g1 = 0.0 - mean1
    np.testing.assert_allclose(first.weights[0], -0.5 * g1, rtol=1e-6)
    second = run(strategy, r2, RoundContext(first.weights, state=first.state))
    mean2 = sum(w[0].astype(np.float64) * n for w, n in r2) / sum(n for _, n in r2)
    g2 = 0.9 * g1 + (first.weights[0].astype(np.float64) - mean2)
    np.testing.assert_allclose(second.weights[0], first.weights[0] - 0.5 * g2, rtol=1e-5)


def test_another_rule_s_state_is_not_continued_but_restarted():
    rng = np.random.default_rng(2)
    ref, results = [np.zeros(2, np.float32)], _results(rng, shapes=((2,),))
    yogi = run(make("fedyogi"), results, RoundContext(ref)).state
    fresh = run(make("fedadam"), results, RoundContext(ref))
    resumed = run(make("fedadam"), results, RoundContext(ref, state=yogi))
    assert resumed.weights[0].tobytes() == fresh.weights[0].tobytes()
    other_params = run(make("fedadam", {"eta": 0.5}), results, RoundContext(ref)).state
    assert run(make("fedadam"), results, RoundContext(ref, state=other_params)).state.step == 1


def test_bulyan_by_hand_and_its_bound():
    # 7 updates, f = 1: Krum picks 5 one by one (the outlier never), then per coordinate the 3 values of
    # the 5 closest to their median are averaged
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1000.0]
    results = [([np.array([v], np.float32)], 1) for v in values]
    out = run(make("bulyan", {"byzantine": 1}), results, RoundContext())
    assert out.weights[0].tolist() == [2.0]  # picked 0..4 (or 1..5): median 2, closest {1, 2, 3}
    with pytest.raises(StrategyError, match=r"6 updates cannot tolerate 1 Byzantine ones \(needs n >= 4f \+ 3 = 7\)"):
        run(make("bulyan", {"byzantine": 1}), results[:6], RoundContext())


def test_every_aggregate_is_the_same_bits_twice_and_checks_peer_numbers():
    rng = np.random.default_rng(3)
    results, ref = _results(rng, n=7), _results(rng, n=1)[0][0]
    for name in BUILT_IN:
        if not BUILT_IN[name].readable_updates:
            continue
        params = {"clip": 1.0, "noise_multiplier": 0.5} if name == "dp-fedavg" else {}
        first = run(make(name, params), results, RoundContext(ref, 1, 1))
        again = run(make(name, params), results, RoundContext(ref, 1, 1))
        assert [a.tobytes() for a in first.weights] == [a.tobytes() for a in again.weights], name
        with pytest.raises(ValueError, match="num_examples must be > 0"):
            run(make(name, params), [(results[0][0], 0)] + results[1:], RoundContext(ref, 1, 1))


def test_a_new_strategy_is_one_class(monkeypatch):
    monkeypatch.setattr(strategies_base, "STRATEGIES", dict(STRATEGIES))  # registering leaves no trace
    monkeypatch.setattr(strategies_base, "_BY_ALIAS", dict(strategies_base._BY_ALIAS))

    @register
    class Scaled(Strategy):
        name, aliases = "scaled-mean", ("ScaledMean",)
        params = {"factor": Param(1.0, number(0, 10))}

        def aggregate(self, results, context):
            return Aggregate([sum(w[i] for w, _ in results) / len(results) * self.values["factor"]
                              for i in range(len(results[0][0]))])

    out = run(strategies_base.make("ScaledMean", {"factor": 2.0}), [([np.ones(2)], 1), ([np.zeros(2)], 5)],
              RoundContext())
    assert out.weights[0].tolist() == [1.0, 1.0]
    with pytest.raises(StrategyError, match="scaled-mean: factor must be a finite number in"):
        strategies_base.make("scaled-mean", {"factor": 11})
    with pytest.raises(StrategyError, match="already names"):
        register(type("Clash", (Strategy,), {"name": "other", "aliases": ("scaledmean",)}))
    assert "scaled-mean" not in STRATEGIES  # the real registry was never touched


# -- server state replayed by chain verify ------------------------------------------------------------

RULE = "loss<=0.5"


def _stateful_chain(store, name, params, *, rounds=3, reject=(2,), cheat=None, declare=True, rule_at=None):
    """A chain of `name` where the first try of each round in `reject` fails the acceptance rule and is
    tried again, its genesis config declaring the rule (`declare`). `cheat(round, try, state,
    rejected_state)` may return the state the owner uses instead of the honest one, `rule_at(round)`
    another (name, params) for a round (forgers). Returns (head, the honest final state)."""
    rng = np.random.default_rng(4)
    log = ChainLog(store, None)
    genesis = genesis_fields(store, rng)
    if declare:
        genesis["config"] = {"rounds": rounds, "aggregation": name, "aggregation_params": dict(params)}
    log.append(genesis, OWNER)
    accepted_cid = genesis["weights"]
    accepted = weights_from_bytes(store.cat(accepted_cid))
    state, rejected_state = None, None
    for r in range(1, rounds + 1):
        used_name, used_params = rule_at(r) if rule_at else (name, params)
        strategy = make(used_name, used_params)
        tries = (False, True) if r in reject else (True,)
        for try_, accept in enumerate(tries, start=1):
            results = sorted(((w.id, _results(rng, n=1)[0], w) for w in WORKERS), key=lambda t: t[0])
            used = cheat(r, try_, state, rejected_state) if cheat else state
            seq = len(list(walk(store, log.head)))
            out = run(strategy, [res for _, res, _ in results], RoundContext(accepted, r, seq, used))
            entries = []
            for wid, (weights, n), worker in results:
                cid = store.add(weights_to_bytes(weights))
                entries.append({"worker": wid, "weights": cid, "num_examples": n, "metrics": {},
                                "message": signed_update(store, worker, job=genesis["job"], round_=r, head=log.head,
                                                         base=accepted_cid, weights=cid, num_examples=n,
                                                         metrics={}, attempt=try_)})
            weights_cid = store.add(weights_to_bytes(out.weights))
            log.append({"job": genesis["job"], "round": r, "model": genesis["model"], "weights": weights_cid,
                        "aggregation": {"name": used_name, "params": {**used_params, "accept": RULE}},
                        "updates": entries,
                        "metrics": {"loss": 0.25 if accept else 0.75, "accepted": 1.0 if accept else 0.0}}, OWNER)
            if accept:
                accepted, accepted_cid, state = out.weights, weights_cid, out.state
            else:
                rejected_state = out.state
    return log.head, state


@pytest.mark.parametrize("name, params", [("fedadam", {"eta": 0.05}), ("fedavgm", {"server_momentum": 0.9}),
                                          ("fedyogi", {}), ("fedadagrad", {})])
def test_verify_replays_the_server_state_from_genesis_through_a_rejected_try(name, params):
    store = MemoryStore()
    head, state = _stateful_chain(store, name, params)
    report = verify_chain(store, head, signer=OWNER.id)
    assert report.ok, report.reason
    replayed = report.server_state
    assert replayed.step == state.step == 3  # two accepted rounds and the retry of round 2: 3 steps, not 4
    assert all(a.tobytes() == b.tobytes() for a, b in zip(replayed.first + replayed.second,
                                                           state.first + state.second))


@pytest.mark.parametrize("cheat, why", [
    (lambda r, try_, state, rejected: None if r == 3 else state, "state reset at round 3"),
    (lambda r, try_, state, rejected: rejected if (r, try_) == (2, 2) else state, "rejected try's state kept"),
])
def test_an_owner_who_fakes_the_server_state_is_named_by_verify(cheat, why):
    store = MemoryStore()
    head, _ = _stateful_chain(store, "fedadam", {"eta": 0.05}, cheat=cheat, declare=False)
    report = verify_chain(store, head)
    assert not report.ok, why
    assert "weights differ from fedadam" in report.reason, report.reason


@pytest.mark.parametrize("rule", ["dp-fedavg", "secure-fedavg", "secure-dp-fedavg", "fedadam"])
def test_a_miner_cannot_choose_a_rule_that_is_the_owner_s_alone(rule, tmp_path):
    """The old table refused dp-fedavg and secure-fedavg but let secure-dp-fedavg through; now the
    strategy says (`minable`), before the daemon is touched."""
    proc = run_cli("grid_ipfs.miner", "--api", "/ip4/127.0.0.1/tcp/9", "--eval-data", str(tmp_path / "v.npz"),
                   "--aggregation", rule, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{rule} is the owner's choice" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("rule_at, recorded", [
    (lambda r: ("fedadam", {"eta": 0.05 + 1e-15}) if r == 3 else ("fedadam", {"eta": 0.05}), "fedadam {'eta': 0.05"),
    (lambda r: ("fedavg", {}) if r == 2 else ("fedadam", {"eta": 0.05}), "fedavg {}"),
])
def test_a_job_declaring_a_stateful_rule_keeps_it_so_its_state_cannot_be_restarted(rule_at, recorded):
    """Honest arithmetic, but a rule or params switched for one round: the state restarts from there, which
    the recomputation alone would accept. The genesis config declares the rule, and verify holds every
    block to it."""
    store = MemoryStore()
    head, _ = _stateful_chain(store, "fedadam", {"eta": 0.05}, rule_at=rule_at)
    report = verify_chain(store, head)
    assert not report.ok
    assert f"aggregation {recorded}" in report.reason and "is not the job's fedadam {'eta': 0.05}" in report.reason


def test_an_aggregate_that_overflows_is_refused_before_anyone_publishes_it():
    """FedAvg cannot leave its inputs' range; a server optimizer can (momentum adds up). Finite float32
    updates near the float32 maximum from a hostile worker: the second round's FedAvgM step adds the
    momentum of the first and overflows."""
    huge = [np.full(3, 3e38, np.float32)]
    strategy = make("fedavgm", {"server_momentum": 0.9})
    first = run(strategy, [(huge, 1)], RoundContext([np.zeros(3, np.float32)]))
    assert np.isfinite(first.weights[0]).all()
    with pytest.raises(StrategyError, match="fedavgm: the aggregate's tensor 0 holds non-finite values"):
        run(strategy, [(huge, 1)], RoundContext(first.weights, state=first.state))
