"""Streaming aggregation: the owner adds each update as it arrives (`Strategy.fold`, `client.collect.Stream`),
the block records that order (`fold`), and `chain verify` adds them in the same order, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from grid_ipfs import messages
from grid_ipfs.aggregate import RunningFedAvg
from grid_ipfs.chain import ChainError, ChainLog, validate_block, verify_chain
from grid_ipfs.chain.blocks import summation_order
from grid_ipfs.chain.contributions import message_cid
from grid_ipfs.client.collect import Collected, Stream, prefetch
from grid_ipfs.payloads import weights_from_bytes, weights_to_bytes
from grid_ipfs.secagg import masked_like
from grid_ipfs.strategies import STRATEGIES, RoundContext, Running, Strategy, StrategyError, make, run, streams
from grid_ipfs.strategies.builtin import WeightsFold
from tests.test_chain_format import OWNER, WORKERS, MemoryStore, genesis_fields, get_block, put_raw, signed_update

BIG = 2 ** 53  # MAX_NUM_EXAMPLES: 2**53 + 1 rounds to 2**53 in float64, so the order of a sum shows


def _results(rng, n=5, masked=False):
    shapes = [(4, 3), (3,)]
    if masked:
        return [([rng.integers(0, 2 ** 63, s, dtype=np.uint64) for s in shapes], int(rng.integers(1, 50)))
                for _ in range(n)]
    return [([rng.standard_normal(s).astype(np.float32) for s in shapes], int(rng.integers(1, 50)))
            for _ in range(n)]


STREAMING = {"fedavg": {}, "fedprox": {"proximal_mu": 0.1}, "dp-fedavg": {"clip": 0.5, "noise_multiplier": 1.0},
             "secure-fedavg": {}, "secure-dp-fedavg": {"clip": 0.5, "noise_multiplier": 1.0},
             "fedavgm": {}, "fedadam": {}, "fedyogi": {}, "fedadagrad": {}}


def test_the_builtin_rules_that_fold_are_exactly_the_averaging_ones():
    builtin = {name for name, cls in STRATEGIES.items() if cls.__module__.startswith("grid_ipfs.")}
    assert {name for name in builtin if streams(make(name, STREAMING.get(name, {})))} == set(STREAMING)


@pytest.mark.parametrize("name", sorted(STREAMING))
def test_a_fold_in_any_order_is_run_over_the_results_in_that_order_bit_for_bit(name):
    rng = np.random.default_rng(1)
    strategy = make(name, STREAMING[name])
    secure = not strategy.readable_updates
    results = _results(rng, masked=secure)
    reference = [rng.standard_normal(a.shape).astype(np.float32) for a in results[0][0]]
    context = RoundContext(reference, 3, 4, None)
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1]):
        running = Running(strategy, context)
        for i in order:
            running.add(*results[i])
        folded, batch = running.result(), run(strategy, [results[i] for i in order], context)
        assert [a.tobytes() for a in folded.weights] == [b.tobytes() for b in batch.weights]
        assert repr(folded.state) == repr(batch.state)


def test_the_order_of_a_float_sum_can_change_the_aggregate():
    """Why the block records the order: FedAvg over the same three updates, added in two orders."""
    ones = [np.ones(2, np.float32)]
    up, down, small = (ones, BIG), ([-ones[0]], BIG), (ones, 1)
    fedavg = make("fedavg")
    first = run(fedavg, [up, small, down], RoundContext()).weights[0]
    second = run(fedavg, [up, down, small], RoundContext()).weights[0]
    assert first.tobytes() != second.tobytes()


def test_running_refuses_a_rule_that_needs_every_update_and_bad_adds_leave_it_unchanged():
    with pytest.raises(StrategyError, match="median cannot aggregate one update at a time"):
        Running(make("median"), RoundContext())
    with pytest.raises(StrategyError, match="fedadam needs the previous global weights"):
        Running(make("fedadam"), RoundContext())
    running = Running(make("fedavg"), RoundContext())
    with pytest.raises(StrategyError, match="nothing to aggregate"):
        running.result()
    running.add([np.ones(2, np.float32)], 3)
    for weights, n, reason in (([np.ones(3, np.float32)], 1, "shape"), ([np.ones(2, np.float32)], 0, "must be > 0"),
                               ([np.ones(2, np.float32)], True, "must be an integer"),
                               ([np.ones(2, np.float32), np.ones(1)], 1, "tensors")):
        with pytest.raises(StrategyError, match=reason):
            running.add(weights, n)
    assert running.count == 1 and running.result().weights[0].tolist() == [1.0, 1.0]


def test_a_fold_whose_result_is_not_finite_is_refused_not_published():
    class Doubling(Strategy):  # not registered: Running takes any instance
        name = "doubling"

        def fold(self, context):
            return WeightsFold(Doubled())

    class Doubled(RunningFedAvg):
        def result(self):
            return [w * np.float32(2) for w in super().result()]

    running = Running(Doubling(), RoundContext())
    running.add([np.full(2, 3e38, np.float32)], 1)
    with np.errstate(over="ignore"), pytest.raises(StrategyError, match="doubling: the aggregate's tensor 0 holds "
                                                                         "non-finite values"):
        running.result()


def _collected(worker: str, weights, n: int) -> Collected:
    update = messages.Update(job="j", round=1, weights="bafkqaaa", num_examples=n, metrics={}, eval_metrics={})
    return Collected(worker, update, None, b"", None)


def test_a_stream_re_adds_the_kept_updates_in_order_when_one_is_refused_after_it_was_added():
    rng = np.random.default_rng(2)
    results = _results(rng, n=4)
    workers = ["w3", "w1", "w0", "w2"]  # arrival order
    by_worker = dict(zip(workers, results))
    reloaded = []

    def reload(c: Collected):
        reloaded.append(c.worker)
        return by_worker[c.worker][0]

    stream = Stream(make("fedavg"), RoundContext(), reload)
    collected = {}
    for worker in workers:
        stream.add(worker, *by_worker[worker])
        collected[worker] = _collected(worker, *by_worker[worker])
    out, order = stream.result(dict(collected))
    assert order == workers and reloaded == []  # the common path reads nothing back
    assert out.weights[0].tobytes() == run(make("fedavg"), results, RoundContext()).weights[0].tobytes()

    del collected["w1"]  # e.g. the outlier screen refused it after it was added
    out, order = stream.result(collected)
    assert order == ["w3", "w0", "w2"] and reloaded == order
    kept = [by_worker[w] for w in order]
    expected = run(make("fedavg"), kept, RoundContext()).weights
    assert [a.tobytes() for a in out.weights] == [a.tobytes() for a in expected]


def test_secure_masks_cancel_in_a_stream_whatever_the_order():
    rng = np.random.default_rng(3)
    like = masked_like([np.zeros((4, 3), np.float32), np.zeros(3, np.float32)])
    assert [a.dtype for a in like] == [np.uint64, np.uint64]
    results = _results(rng, masked=True)
    strategy = make("secure-fedavg")
    forward, backward = Running(strategy, RoundContext()), Running(strategy, RoundContext())
    for r in results:
        forward.add(*r)
    for r in reversed(results):
        backward.add(*r)
    assert [a.tobytes() for a in forward.result().weights] == [a.tobytes() for a in backward.result().weights]


# -- the block's record of the order -------------------------------------------------------------------


def _ordered_round(store, genesis: dict, log: ChainLog, order: list[int] | None) -> dict:
    """A FedAvg round over three updates whose aggregate depends on the order they are added in (one of
    them weighs 1 example against 2**53), aggregated in `order` (indices into the sorted entries)."""
    head = log.head
    base = get_block(store, head)["weights"]
    workers = sorted(WORKERS, key=lambda w: w.id)
    values = [(np.ones((3, 2), np.float32), BIG), (-np.ones((3, 2), np.float32), BIG), (np.ones((3, 2), np.float32), 1)]
    entries, results = [], []
    for worker, (value, n) in zip(workers, values):
        weights = [value, np.zeros(2, np.float32)]
        cid = store.add(weights_to_bytes(weights))
        entries.append({"worker": worker.id, "weights": cid, "num_examples": n, "metrics": {},
                        "message": signed_update(store, worker, job=genesis["job"], round_=1, head=head, base=base,
                                                 weights=cid, num_examples=n, metrics={})})
        results.append((weights, n))
    summed = [results[i] for i in (order or range(3))]
    aggregate = run(make("fedavg"), summed, RoundContext()).weights
    fields = {"job": genesis["job"], "round": 1, "model": genesis["model"],
              "weights": store.add(weights_to_bytes(aggregate)), "aggregation": {"name": "fedavg", "params": {}},
              "updates": entries, "metrics": {}}
    if order is not None:
        fields["fold"] = order
    return fields


def _chain_with(order):
    store, rng = MemoryStore(), np.random.default_rng(0)
    log = ChainLog(store, None)
    genesis = genesis_fields(store, rng)
    log.append(genesis, OWNER)
    head = log.append(_ordered_round(store, genesis, log, order), OWNER)
    return store, head


def test_a_block_summed_in_arrival_order_verifies_and_records_that_order():
    store, head = _chain_with([2, 0, 1])
    block = get_block(store, head)
    assert block["fold"] == [2, 0, 1] and summation_order(block) == [2, 0, 1]
    assert verify_chain(store, head).ok


def test_the_recorded_order_is_what_verify_adds_in():
    """The same updates and weights with the order dropped (re-signed by the owner) no longer verify."""
    store, head = _chain_with([2, 0, 1])
    block = get_block(store, head)
    del block["fold"]
    from grid_ipfs.chain import sign_block
    forged = put_raw(store, sign_block({k: v for k, v in block.items() if k not in ("v", "signer", "sig")}, OWNER))
    report = verify_chain(store, forged)
    assert not report.ok and report.reason == "block 1 (seq 1): weights differ from fedavg of its 3 updates"


@pytest.mark.parametrize("fold, reason", [
    ([0, 1, 2], "the updates' own order; omit the field"),
    ([0, 1], "expected the update indices 0..2, each once"),
    ([0, 1, 1], "expected the update indices 0..2, each once"),
    ([0, 1, 3], "expected the update indices 0..2, each once"),
    ([0, 1, True], "expected the update indices 0..2, each once"),
    ([0.0, 2, 1], "expected the update indices 0..2, each once"),
    ("021", "expected the update indices 0..2, each once"),
])
def test_a_bad_fold_is_named(fold, reason):
    store, head = _chain_with([2, 0, 1])
    block = {**get_block(store, head), "fold": fold}
    with pytest.raises(ChainError, match=reason):
        validate_block(block)


def test_genesis_has_no_fold():
    store, rng = MemoryStore(), np.random.default_rng(0)
    log = ChainLog(store, None)
    genesis = get_block(store, log.append(genesis_fields(store, rng), OWNER))
    with pytest.raises(ChainError, match="fold"):
        validate_block({**genesis, "fold": []})


def test_prefetch_leaves_the_update_with_the_owners_daemon_and_stores_its_message(make_devnet):
    """The owner's fetch threads only make its daemon fetch (`prefetch`); the update is then read from
    that daemon one at a time. So once prefetched, it must be there with the worker's node gone, and the
    signed message must be stored under its own CID for the block to link."""
    net = make_devnet(2)
    owner, worker = net.nodes[0].client(), net.nodes[1].client()
    weights = [np.arange(12, dtype=np.float32).reshape(4, 3), np.ones(3, np.float32)]
    cid = str(worker.add(weights_to_bytes(weights)))
    message = b"a signed update message, as published"
    update = messages.Update(job="j", round=1, weights=cid, num_examples=5, metrics={}, eval_metrics={})
    assert prefetch(owner, update, message) is True
    net.stop_node(1)
    local = owner.cat(cid, timeout=5)
    assert all(np.array_equal(a, b) for a, b in zip(weights_from_bytes(local), weights))
    assert owner.block_get(message_cid(message), timeout=5) == message

