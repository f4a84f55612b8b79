"""Proof of federated learning with competing aggregators: rival blocks, their checks, the ranking.

Pure logic over an in-memory block store; the miners on real daemons are tested in tests/test_beyond.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from multiformats import CID, multihash

from grid_ipfs.aggregate import parse_accept
from grid_ipfs.chain import ChainLog, decode_block, store_block
from grid_ipfs.contest import ContestError, best, check_rival, pofl_record, rival_block, score_key
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str
from grid_ipfs.payloads import weights_from_bytes, weights_to_bytes
from grid_ipfs.strategies import aggregate

from .test_chain_format import MemoryStore, signed_update

OWNER, MINER = Identity.generate(), Identity.generate()
WORKERS = sorted((Identity.generate() for _ in range(4)), key=lambda i: i.id)
BY_ID = {w.id: w for w in WORKERS}


def _entries(store, updates, *, round, head, base) -> list[dict]:
    """Update entries for `updates` ((worker id, weights CID, num_examples), by worker), each linking its
    worker's message signed for `round` of job "pofl" against `head` and base weights `base`."""
    return [{"worker": wid, "weights": weights, "num_examples": n, "metrics": {},
             "message": signed_update(store, BY_ID[wid], job="pofl", round_=round, head=head, base=base,
                                      weights=weights, num_examples=n, metrics={})}
            for wid, weights, n in updates]


@pytest.fixture
def round_():
    """A chain with genesis, the owner's staged candidate for round 1 (fedavg of 4 updates, one of them
    scaled x20), and what the owner holds: the updates as (weights, n) and the reference weights."""
    store = MemoryStore()
    rng = np.random.default_rng(3)
    reference = [rng.normal(size=(3, 2)).astype(np.float32), np.zeros(2, np.float32)]
    chain = ChainLog(store, None)
    model = store.add(b"a .keras file")
    base = store.add(weights_to_bytes(reference))
    genesis = chain.append({"job": "pofl", "round": 0, "model": model, "weights": base,
                            "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": {}}, OWNER)
    results = [([w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in reference], 10 + i)
               for i in range(4)]
    results[3] = ([w * 20 for w in results[3][0]], results[3][1])
    own = aggregate("fedavg", results)
    fields = {"job": "pofl", "round": 1, "model": model, "weights": store.add(weights_to_bytes(own)),
              "aggregation": {"name": "fedavg", "params": {"accept": "val_accuracy>=0.5"}},
              "updates": _entries(store, [(w.id, store.add(weights_to_bytes(u)), n)
                                          for w, (u, n) in zip(WORKERS, results)], round=1, head=genesis, base=base),
              "metrics": {"val_accuracy": 0.2, "accepted": 0.0}}
    candidate_cid = chain.stage(fields, OWNER)
    assert chain.head != candidate_cid  # staged, not appended
    candidate = decode_block(store.block_get(candidate_cid), candidate_cid)

    def fetch(cid):
        return weights_from_bytes(store.cat(cid), like=reference)

    return store, candidate, results, reference, fetch


def _rival(store, candidate, weights, *, name="median", params=None, signer=MINER, **changes):
    fields = rival_block(candidate, weights=store.add(weights_to_bytes(weights)), aggregation=name,
                         params=params or {"accept": "val_accuracy>=0.5"},
                         metrics={"val_accuracy": 0.9, "accepted": 1.0}, time=1.0)
    cid = store_block(store, {**fields, **changes}, signer)
    return store.block_get(cid), cid_str(cid)


def test_an_honest_rival_checks_out_and_keeps_the_candidates_round(round_):
    store, candidate, results, reference, fetch = round_
    median = aggregate("median", results)
    data, cid = _rival(store, candidate, median)
    block, weights = check_rival(data, cid, candidate, results, reference, fetch)
    assert block["signer"] == MINER.id and block["seq"] == candidate["seq"] == 1
    assert cid_str(block["prev"]) == cid_str(candidate["prev"])
    assert all(np.array_equal(a, b) for a, b in zip(weights, median))
    # median resists the scaled update where the candidate's fedavg does not
    assert np.abs(weights[0]).max() < 0.5 * np.abs(aggregate("fedavg", results)[0]).max()


def test_a_rival_whose_weights_are_not_its_rule_of_the_updates_is_refused(round_):
    store, candidate, results, reference, fetch = round_
    forged = [w + 0.01 for w in aggregate("median", results)]
    data, cid = _rival(store, candidate, forged)
    with pytest.raises(ContestError, match="are not median of the recorded updates"):
        check_rival(data, cid, candidate, results, reference, fetch)


@pytest.mark.parametrize("change, reason", [({"round": 2}, "round differs"), ({"seq": 5}, "seq differs")])
def test_a_rival_for_another_round_is_refused(round_, change, reason):
    store, candidate, results, reference, fetch = round_
    data, cid = _rival(store, candidate, aggregate("median", results), **change)
    with pytest.raises(ContestError, match=reason):
        check_rival(data, cid, candidate, results, reference, fetch)


def test_bytes_that_are_not_a_block_are_refused(round_):
    store, candidate, results, reference, fetch = round_
    with pytest.raises(ContestError, match="not a valid block"):
        check_rival(b"\xa0", cid_str(store.block_put(b"\xa0")), candidate, results, reference, fetch)


def test_a_rival_dropping_an_update_is_refused(round_):
    store, candidate, results, reference, fetch = round_
    data, cid = _rival(store, candidate, aggregate("median", results[:3]), updates=candidate["updates"][:3])
    with pytest.raises(ContestError, match="updates differs"):
        check_rival(data, cid, candidate, results, reference, fetch)


def test_a_rival_with_a_broken_signature_or_unknown_rule_is_refused(round_):
    store, candidate, results, reference, fetch = round_
    import dag_cbor

    data, cid = _rival(store, candidate, aggregate("median", results))
    block = dag_cbor.decode(data)
    block["metrics"]["val_accuracy"] = 0.99  # re-encoded: a new CID, the old signature
    forged = dag_cbor.encode(block)
    with pytest.raises(ContestError, match="bad signature"):
        check_rival(forged, cid_str(store.block_put(forged)), candidate, results, reference, fetch)
    data, cid = _rival(store, candidate, aggregate("median", results), name="mystery")
    with pytest.raises(ContestError, match="cannot be recomputed"):
        check_rival(data, cid, candidate, results, reference, fetch)


def test_best_ranks_by_the_rules_metric_among_candidates_that_pass():
    rule = parse_accept("val_accuracy>=0.6")
    winner, verdicts = best([{"val_accuracy": 0.3}, {"val_accuracy": 0.8}, {"val_accuracy": 0.9}, {}], rule)
    assert winner == 2
    assert "fails" in verdicts[0] and verdicts[2] == "val_accuracy 0.9" and "no val_accuracy" in verdicts[3]
    assert best([{"val_accuracy": 0.3}], rule)[0] is None
    # lower is better for losses; ties go to the earlier candidate (the owner's own)
    assert best([{"val_loss": 0.5}, {"val_loss": 0.4}, {"val_loss": 0.4}], None)[0] == 1
    assert best([{"val_loss": 0.5}, {"val_loss": 0.5}], parse_accept("improves:val_loss"), {"val_loss": 0.7})[0] == 0
    assert score_key(parse_accept("improves:val_loss")) == ("val_loss", True)
    assert score_key(None) == ("val_loss", True)


def test_the_pofl_record_links_every_candidate(round_):
    store, candidate, results, reference, fetch = round_
    _, rival = _rival(store, candidate, aggregate("median", results))
    record = pofl_record(MINER.id, rival, [cid_str(store.block_put(b"x")), rival])
    assert record["winner"] == MINER.id and cid_str(record["block"]) == rival
    assert [cid_str(c) for c in record["candidates"]][1] == rival


def _final(store, candidate, rival_cid, rival, **changes):
    """The owner's round block as the client writes it when `rival` won, with optional forgeries."""
    log = ChainLog(store, None)
    log._head = candidate["prev"]
    fields = {key: candidate[key] for key in ("job", "round", "model", "updates")}
    fields.update(weights=rival["weights"], aggregation=rival["aggregation"],
                  metrics={"val_accuracy": 0.9, "accepted": 1.0},
                  ext={"pofl": pofl_record(rival["signer"], rival_cid, [rival_cid])})
    fields.update(changes)
    return log.append(fields, OWNER)


def test_verify_checks_a_recorded_contest_against_its_winner(round_):
    from grid_ipfs.chain import verify_chain

    store, candidate, results, reference, fetch = round_
    data, rival_cid = _rival(store, candidate, aggregate("median", results))
    rival = decode_block(data, rival_cid)
    head = _final(store, candidate, rival_cid, rival)
    assert verify_chain(store, head).ok
    # the owner claims the miner won but writes its own fedavg: caught (weights and rule differ)
    fedavg_cid = store.add(weights_to_bytes(aggregate("fedavg", results)))
    forged = _final(store, candidate, rival_cid, rival, weights=fedavg_cid,
                    aggregation={"name": "fedavg", "params": {"accept": "val_accuracy>=0.5"}})
    report = verify_chain(store, forged)
    assert not report.ok and "weights differs from the winning candidate" in report.reason, report.reason
    # credit stolen: the named winner did not sign the winning candidate
    stolen = _final(store, candidate, rival_cid, rival,
                    ext={"pofl": pofl_record(OWNER.id, rival_cid, [rival_cid])})
    report = verify_chain(store, stolen)
    assert not report.ok and "not validly signed by the named winner" in report.reason, report.reason
    # an accepted block must name a winner among the candidates
    nobody = _final(store, candidate, rival_cid, rival, ext={"pofl": pofl_record(None, None, [rival_cid])})
    report = verify_chain(store, nobody)
    assert not report.ok and "names no winner" in report.reason, report.reason


def test_a_rival_with_fields_of_its_own_is_refused_and_cannot_win(round_):
    """A rival's own `ext` would ride into the owner's recursive pin with whatever it links (a CID
    nobody has stalls every later pin): the owner refuses it, and verify refuses it as a winner."""
    from grid_ipfs.chain import verify_chain
    from grid_ipfs.contest import check_rival_fields

    store, candidate, results, reference, fetch = round_
    nowhere = CID("base32", 1, "dag-pb", multihash.digest(b"a DAG nobody serves", "sha2-256"))
    data, rival_cid = _rival(store, candidate, aggregate("median", results), ext={"bait": nowhere})
    rival = decode_block(data, rival_cid)
    check_rival(data, rival_cid, candidate, results, reference, fetch)  # its round and weights are fine...
    with pytest.raises(ContestError, match="a rival block carries ext: it holds only the round"):
        check_rival_fields(rival)  # ...but not its own fields
    check_rival_fields(decode_block(*_rival(store, candidate, aggregate("median", results))))
    report = verify_chain(store, _final(store, candidate, rival_cid, rival))
    assert not report.ok and report.reason.endswith(f"winning candidate {rival_cid} carries fields of its own "
                                                    "(ext or config)"), report.reason


def _endorse(store, head, *, signer=MINER, round=1, verdict="accepted", job="pofl"):
    from grid_ipfs import messages

    data = messages.encode(messages.Endorse(job=job, round=round, head=cid_str(head), verdict=verdict), signer)
    return store.block_put(data, codec="raw"), data


def test_verify_checks_the_endorsements_a_block_links(round_):
    """Round 2's block links the miners' signed endorsements of round 1's block: each must be genuine,
    about exactly that block, and one per miner; a dispute is recorded evidence, not a failure."""
    from grid_ipfs.chain import verify_chain

    store, candidate, results, reference, fetch = round_
    data, rival_cid = _rival(store, candidate, aggregate("median", results))
    rival = decode_block(data, rival_cid)
    first = _final(store, candidate, rival_cid, rival)
    other_miner = Identity.generate()
    round_2 = _entries(store, [(u["worker"], u["weights"], u["num_examples"]) for u in candidate["updates"]],
                       round=2, head=first, base=rival["weights"])  # the same updates, signed for round 2

    def second(endorsements, *, as_written=False):
        pofl = pofl_record(None, None, [rival_cid], endorsements) if not as_written else \
            {**pofl_record(None, None, [rival_cid]), "endorsements": endorsements}
        log = ChainLog(store, None)
        log._head = first
        fields = {key: candidate[key] for key in ("job", "model")}
        fields.update(round=2, weights=rival["weights"], aggregation=rival["aggregation"], updates=round_2,
                      metrics={"val_accuracy": 0.2, "accepted": 0.0},  # a rejected try: no winner to name
                      ext={"pofl": pofl})
        return verify_chain(store, log.append(fields, OWNER))

    genuine = [_endorse(store, first)[0], _endorse(store, first, signer=other_miner, verdict="disputed: low")[0]]
    assert second(genuine).ok, second(genuine).reason
    assert "endorsements" not in pofl_record(None, None, [rival_cid])  # none: no key at all
    wrong_block = _endorse(store, candidate["prev"])[0]  # the genesis CID, claimed as round 1's block
    assert "is not an endorsement of the previous block" in second([wrong_block]).reason
    wrong_round = _endorse(store, first, round=2)[0]
    assert "is not an endorsement of the previous block" in second([wrong_round]).reason
    _, signed = _endorse(store, first)
    forged = store.block_put(signed.replace(b'"accepted"', b'"disputed"'), codec="raw")
    assert "bad signature" in second([forged]).reason
    assert "two endorsements from" in second([genuine[0], _endorse(store, first, verdict="accepted!")[0]]).reason
    assert "expected a list of links" in second(["not a link"], as_written=True).reason
