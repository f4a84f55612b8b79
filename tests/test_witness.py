"""A worker's witness of the heads it signed against: the file format, `check_extends` (no rollback, no
fork under a worker's signature) and `check_chain_against` (a chain audited against a witness).

No daemon: chains live in the in-memory store of tests/test_chain_format.py. Forks are built the way
an equivocating owner would: a second validly signed block on the same parent.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from types import SimpleNamespace

import numpy as np
import pytest

from grid_ipfs.chain import store_block, walk
from grid_ipfs.chain import witness as witness_module
from grid_ipfs.chain.witness import (
    Witness,
    WitnessError,
    WitnessRecord,
    check_chain_against,
    check_extends,
)
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str, parse_cid

from .test_chain_format import OWNER, WORKERS, MemoryStore, build_chain, get_block, round_fields

WORKER = WORKERS[0]


def fork_block(store, parent_cid, *, seed=1, time=2.0, identity=OWNER):
    """A validly signed round block on `parent_cid`, other than the honest chain's: the owner equivocating."""
    parent = get_block(store, parent_cid)
    genesis = get_block(store, next(c for c, b in walk(store, parent_cid) if b["seq"] == 0))
    on_parent = SimpleNamespace(head=parent_cid)  # the workers' updates name the parent as their head
    fields = round_fields(store, np.random.default_rng(seed), genesis, parent["round"] + 1, on_parent)
    return store_block(store, {**fields, "seq": parent["seq"] + 1, "prev": parent_cid, "time": time}, identity)


def credit(store, block_cid, worker=WORKER) -> str:
    """The weights CID `block_cid` credits `worker` with."""
    return cid_str(next(u["weights"] for u in get_block(store, block_cid)["updates"] if u["worker"] == worker.id))


def rec(head, seq, *, round_=None, update=None, store=None, after=None, job="job-1", attempt=1, **changes):
    """The record a worker writes for the round extending `head` (at `seq`); `update` defaults to what the
    block `after` (the next block) credits it with."""
    if update is None:
        update = credit(store, after) if after is not None else head
    fields = {"job": job, "owner": OWNER.id, "worker": WORKER.id, "round": seq + 1 if round_ is None else round_,
              "attempt": attempt, "head": cid_str(head), "seq": seq, "base": cid_str(head), "update": update,
              "time": 1000.0 + seq}
    return WitnessRecord(**{**fields, **changes})


@pytest.fixture
def chain():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=3)
    return store, cids


def blocks_by_seq(store, head):
    return {b["seq"]: (c, b) for c, b in walk(store, head)}


# -- the file ----------------------------------------------------------------------------------------


def test_records_round_trip_and_last_is_the_highest_seq(tmp_path, chain):
    store, cids = chain
    w = Witness.for_job(tmp_path / "witness", OWNER.id, "job-1")
    assert w.records() == [] and w.last() is None
    written = [rec(cids[0], 0, store=store, after=cids[1]), rec(cids[1], 1, store=store, after=cids[2]),
               rec(cids[1], 1, attempt=2, store=store, after=cids[2])]
    for r in written:
        w.record(r)
    assert w.records() == written
    assert w.last() == written[2]  # the newest of the highest seq
    assert WitnessRecord.from_json(written[0].to_json()) == written[0]
    assert stat.S_IMODE(w.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(w.path.parent.stat().st_mode) == 0o700
    assert w.path.parent == tmp_path / "witness" and w.path.name == f"job-1.{OWNER.id}.jsonl"


def test_a_record_normalises_cids_and_refuses_bad_values(chain):
    store, cids = chain
    r = rec(cids[0], 0, base=cids[0], update=cids[1].encode("base58btc"))  # kept in canonical text
    assert r.base == cid_str(cids[0]) and r.update == cid_str(cids[1]) and isinstance(r.base, str)
    with pytest.raises(WitnessError, match="seq: expected an integer >= 0"):
        dataclasses.replace(r, seq=True)
    with pytest.raises(WitnessError, match="head: expected a CID string, got bytes"):
        dataclasses.replace(r, head=bytes(cids[0]))


def _good_line(cids) -> dict:
    return json.loads(rec(cids[0], 0).to_json())


@pytest.mark.parametrize("change, reason", [
    ({"round": "1"}, "round: expected an integer >= 1"),
    ({"seq": True}, "seq: expected an integer >= 0"),
    ({"attempt": 0}, "attempt: expected an integer >= 1"),
    ({"attempt": 1.0}, "attempt: expected an integer"),
    ({"head": "bafy-not-a-cid"}, "head: "),
    ({"update": 12}, "update: expected a CID string"),
    ({"job": "../etc"}, "job: not a job id"),
    ({"owner": "not-an-id"}, "owner: not a public id"),
    ({"worker": None}, "worker: not a public id"),
    ({"time": "now"}, "time: expected a finite number"),
    ({"time": False}, "time: expected a finite number"),
    ({"extra": 1}, "unexpected field extra"),
])
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path, chain, change, reason):
    _, cids = chain
    path = tmp_path / "w.jsonl"
    good = _good_line(cids)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(WitnessError) as caught:
        Witness(path).records()
    message = str(caught.value)
    assert message.startswith(f"witness {path} line 2: ") and reason in message and "\n" not in message


@pytest.mark.parametrize("line, reason", [
    ("not json", "not JSON"), ("[1, 2]", "expected a JSON object"), ('{"job": "job-1"}', "missing field owner"),
    ('{"time": NaN}', "not JSON"), ("\xff", "not JSON"),
])
def test_lines_that_are_not_records(tmp_path, line, reason):
    path = tmp_path / "w.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(WitnessError, match=f"line 1: {reason}"):
        Witness(path).records()


def test_non_utf8_and_overlong_lines(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(WitnessError, match="line 1: not UTF-8"):
        Witness(path).records()
    path.write_text("x" * (witness_module.MAX_LINE_CHARS + 1) + "\n")
    with pytest.raises(WitnessError, match="line 1: a line of 4097 characters"):
        Witness(path).records()


def test_a_huge_file_or_too_many_records_is_refused_unread(tmp_path, monkeypatch, chain):
    _, cids = chain
    path = tmp_path / "w.jsonl"
    line = rec(cids[0], 0).to_json() + "\n"
    path.write_text(line * 10)
    monkeypatch.setattr(witness_module, "MAX_WITNESS_BYTES", len(line) * 10 - 1)
    with pytest.raises(WitnessError, match="larger than"):
        Witness(path).records()
    monkeypatch.setattr(witness_module, "MAX_WITNESS_BYTES", 1 << 20)
    monkeypatch.setattr(witness_module, "MAX_RECORDS", 9)
    with pytest.raises(WitnessError, match="10 lines, more than 9"):
        Witness(path).records()


def test_a_torn_last_write_is_ignored_and_the_next_record_starts_a_fresh_line(tmp_path, chain):
    _, cids = chain
    w = Witness(tmp_path / "w.jsonl")
    first, second = rec(cids[0], 0), rec(cids[1], 1)
    w.path.write_text(first.to_json() + "\n" + second.to_json()[:40])
    assert w.records() == [first]
    w.record(second)
    assert w.records() == [first, second]


@pytest.mark.parametrize("owner, job", [
    (OWNER.id, "../escape"), (OWNER.id, "a/b"), (OWNER.id, ""), ("../../" + OWNER.id[6:], "job-1"),
    (OWNER.id[:-1] + "/", "job-1"), (OWNER.id + "x", "job-1"),
])
def test_for_job_refuses_names_that_could_escape_the_directory(tmp_path, owner, job):
    with pytest.raises(WitnessError, match="not a"):
        Witness.for_job(tmp_path, owner, job)


def test_for_job_names_stay_in_the_directory_and_differ_per_owner(tmp_path):
    other = Identity.generate().id
    dots = Witness.for_job(tmp_path, OWNER.id, "..")
    assert dots.path.parent == tmp_path and dots.path.name == f"...{OWNER.id}.jsonl"
    assert Witness.for_job(tmp_path, OWNER.id, "j").path != Witness.for_job(tmp_path, other, "j").path


# -- check_extends: what a worker asks before it signs an update ---------------------------------------


def test_check_extends_accepts_no_history_a_retry_and_a_descendant(chain):
    store, cids = chain
    last = rec(cids[1], 1)
    assert check_extends(store, None, cids[1], get_block(store, cids[1])) is None
    assert check_extends(store, last, cids[1], get_block(store, cids[1])) is None  # another attempt
    assert check_extends(store, last, cids[2], get_block(store, cids[2])) is None
    assert check_extends(store, last, cids[3], get_block(store, cids[3])) is None


def test_check_extends_refuses_a_rollback(chain):
    store, cids = chain
    reason = check_extends(store, rec(cids[2], 2), cids[1], get_block(store, cids[1]))
    assert reason.startswith("rollback: ") and "seq 1, below" in reason and cid_str(cids[2]) in reason


def test_check_extends_refuses_another_block_at_the_witnessed_seq(chain):
    store, cids = chain
    forked = fork_block(store, cids[1])  # seq 2, validly signed by the owner, not cids[2]
    reason = check_extends(store, rec(cids[2], 2), forked, get_block(store, forked))
    assert reason.startswith("fork at seq 2: ") and cid_str(forked) in reason and cid_str(cids[2]) in reason


def test_check_extends_refuses_a_head_descending_from_a_fork(chain):
    store, cids = chain
    forked = fork_block(store, cids[1])
    above = fork_block(store, forked, seed=2)
    reason = check_extends(store, rec(cids[2], 2), above, get_block(store, above))
    assert reason.startswith("fork at seq 2: ")
    assert all(cid_str(c) in reason for c in (above, forked, cids[2]))


def test_check_extends_names_an_unreachable_block(chain):
    store, cids = chain
    del store.objects[bytes(cids[2].digest)]
    reason = check_extends(store, rec(cids[1], 1), cids[3], get_block(store, cids[3]))
    assert reason.startswith(f"cannot read block {cid_str(cids[2])}")


def test_check_extends_survives_a_dropped_daemon_connection_but_not_a_dead_daemon(chain):
    """The keep-alive race of js-ipfs (a reused connection closed under a request) cost 64-worker rounds."""
    from grid_ipfs.ipfs.errors import DaemonUnreachable

    store, cids = chain

    class Flaky(MemoryStore):
        def __init__(self, failures):
            super().__init__()
            self.failures, self.calls = failures, 0

        def block_get(self, cid):
            self.calls += 1
            if self.calls <= self.failures:
                raise DaemonUnreachable("/ip4/127.0.0.1/tcp/5001", "Server disconnected without sending a response")
            return store.block_get(cid)

    once = Flaky(failures=1)
    assert check_extends(once, rec(cids[1], 1), cids[3], get_block(store, cids[3])) is None and once.calls == 3
    dead = Flaky(failures=10**6)
    reason = check_extends(dead, rec(cids[1], 1), cids[3], get_block(store, cids[3]))
    assert reason.startswith(f"cannot read block {cid_str(cids[2])}") and "Server disconnected" in reason
    assert dead.calls == 3  # READ_ATTEMPTS, then the round is refused with the reason


def test_check_extends_walks_at_most_max_steps(chain):
    store, cids = chain

    class Counting(MemoryStore):
        gets = 0

        def block_get(self, cid):
            Counting.gets += 1
            return store.block_get(cid)

    counting = Counting()
    reason = check_extends(counting, rec(cids[0], 0), cids[3], get_block(store, cids[3]), max_steps=2)
    assert "3 blocks above" in reason and "more than 2 (max_steps)" in reason and Counting.gets == 0
    assert check_extends(counting, rec(cids[0], 0), cids[3], get_block(store, cids[3]), max_steps=3) is None
    assert Counting.gets == 3  # never below the witnessed seq


def test_check_extends_gives_up_at_its_deadline(chain):
    """An owner's slow node cannot hold a worker past the walk's deadline, however many steps are allowed."""
    import time

    store, cids = chain

    class Slow(MemoryStore):
        def block_get(self, cid, timeout=None):
            Slow.timeouts.append(timeout)
            return store.block_get(cid)

    Slow.timeouts = []
    reason = check_extends(Slow(), rec(cids[0], 0), cids[3], get_block(store, cids[3]),
                           deadline=time.monotonic() - 1)
    assert reason.startswith(f"walking from head {cid_str(cids[3])} down to seq 0 took too long")
    assert Slow.timeouts == []  # nothing fetched once the deadline passed
    assert check_extends(Slow(), rec(cids[0], 0), cids[3], get_block(store, cids[3]),
                         deadline=time.monotonic() + 60) is None
    assert len(Slow.timeouts) == 3 and all(0 < t <= 60 for t in Slow.timeouts)  # each fetch bounded by what is left


def test_check_extends_refuses_another_job(chain):
    store, cids = chain
    reason = check_extends(store, rec(cids[1], 1, job="job-2"), cids[2], get_block(store, cids[2]))
    assert "of job job-1, the witness of job job-2" in reason


# -- check_chain_against: a chain audited against a worker's witness ---------------------------------


def honest_records(store, cids):
    return [rec(cids[s], s, store=store, after=cids[s + 1]) for s in range(len(cids) - 1)]


def test_an_honest_chain_agrees_with_its_witness(chain):
    store, cids = chain
    assert check_chain_against(honest_records(store, cids), blocks_by_seq(store, cids[-1])) is None


def test_a_forked_chain_fails_naming_the_seq_and_both_blocks(chain):
    store, cids = chain
    forked = fork_block(store, fork_block(store, cids[1]), seed=2)  # the owner's other history from seq 2
    records = honest_records(store, cids)
    seq, reason = check_chain_against(records, blocks_by_seq(store, forked))
    # the fork's seq 2 block credits the worker with weights it never sent on the common block
    assert seq == 2 and reason.startswith("block ") and f"credits worker {WORKER.id} in round 2" in reason
    seq, reason = check_chain_against([records[0], records[2]], blocks_by_seq(store, forked))
    assert seq == 2 and reason.startswith("the chain's block at seq 2 is ") and "rewrote history" in reason
    assert cid_str(cids[2]) in reason and cid_str(get_block(store, forked)["prev"]) in reason


def test_a_record_above_the_head_means_the_chain_was_cut_back(chain):
    store, cids = chain
    seq, reason = check_chain_against(honest_records(store, cids), blocks_by_seq(store, cids[1]))
    assert seq == 1 and "at seq 2, above this chain's head at seq 1" in reason and "rollback" in reason


def test_a_block_crediting_the_worker_with_weights_it_never_announced_fails(chain):
    store, cids = chain
    records = honest_records(store, cids)
    records[1] = rec(cids[1], 1, update=credit(store, cids[1]))  # the worker announced other weights
    seq, reason = check_chain_against(records, blocks_by_seq(store, cids[-1]))
    assert seq == 2 and f"credits worker {WORKER.id} in round 2" in reason and credit(store, cids[1]) in reason
    # another attempt on the same head that announced the credited weights makes it right again
    assert check_chain_against([*records, rec(cids[1], 1, attempt=2, store=store, after=cids[2])],
                               blocks_by_seq(store, cids[-1])) is None


def test_records_of_another_job_or_owner_are_the_wrong_file(chain):
    store, cids = chain
    with pytest.raises(WitnessError, match="record of job job-2"):
        check_chain_against([rec(cids[0], 0, job="job-2")], blocks_by_seq(store, cids[-1]))
    with pytest.raises(WitnessError, match="genesis is signed by"):
        check_chain_against([rec(cids[0], 0, owner=WORKERS[1].id)], blocks_by_seq(store, cids[-1]))


def test_canonical_cid_text_fast_path_agrees_with_multiformats(chain):
    store, cids = chain
    raw, pb = store.add(b"weights"), parse_cid("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")
    for cid in (cids[0], raw, pb, cids[1].encode("base58btc"), cids[1].encode("base16")):
        assert witness_module._cid("head", cid if isinstance(cid, str) else cid_str(cid)) == cid_str(cid)
    text = cid_str(cids[0])
    bad_tail = text[:-1] + witness_module._B32_ALPHABET[witness_module._B32_ALPHABET.index(text[-1]) | 1]
    with pytest.raises(WitnessError, match="Pad bits"):  # non-zero pad bits: not a CID, as multiformats says
        witness_module._cid("head", bad_tail)


def test_records_are_read_incrementally_and_again_when_the_file_shrinks(tmp_path, chain):
    _, cids = chain
    reader, writer = Witness(tmp_path / "w.jsonl"), Witness(tmp_path / "w.jsonl")
    first, second = rec(cids[0], 0), rec(cids[1], 1)
    writer.record(first)
    assert reader.records() == [first]
    writer.record(second)
    assert reader.records() == [first, second] and reader.last() == second
    reader.path.write_text(second.to_json() + "\n")
    assert reader.records() == [second]


def test_concurrent_writers_never_interleave_lines(tmp_path, chain):
    from concurrent.futures import ThreadPoolExecutor

    _, cids = chain
    records = [rec(cids[i % 3], i % 3, attempt=i + 1) for i in range(40)]
    writers = [Witness(tmp_path / "w.jsonl") for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: writers[i % 4].record(records[i]), range(40)))
    assert sorted(Witness(tmp_path / "w.jsonl").records(), key=lambda r: r.attempt) == records
