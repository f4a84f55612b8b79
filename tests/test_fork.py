"""`chain.fork.compare` and `python -m grid_ipfs.chain compare`: two heads of a job are one history, one
extending the other, or a fork; a fork of two blocks validly signed by the owner is the proof that it
equivocated. Also `chain verify --witness` (a worker's record) on a real daemon.

Unit tests use the in-memory store of tests/test_chain_format.py; the integration tests put an
honest chain and the owner's second history on a real devnet node and drive the CLI as a subprocess.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from grid_ipfs.chain import ChainError, ChainLog, store_block
from grid_ipfs.chain.fork import compare
from grid_ipfs.chain.witness import Witness
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str

from .cli import run_cli
from .test_chain_format import OWNER, MemoryStore, build_chain, genesis_fields, get_block, put_raw
from .test_witness import fork_block, honest_records


@pytest.fixture
def chain():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=3)
    return store, cids


class Counting:
    """A store that counts block reads (to show compare reads nothing below the fork point)."""

    def __init__(self, store):
        self.store, self.gets = store, []

    def block_get(self, cid):
        self.gets.append(cid_str(cid))
        return self.store.block_get(cid)


def test_the_same_head(chain):
    store, cids = chain
    report = compare(store, cids[2], cid_str(cids[2]))
    assert report.kind == "same" and report.ahead == 0 and not report.equivocation


def test_one_head_extends_the_other_both_ways(chain):
    store, cids = chain
    forward, backward = compare(store, cids[3], cids[1]), compare(store, cids[1], cids[3])
    assert (forward.kind, forward.ahead) == ("a_extends_b", 2)
    assert (backward.kind, backward.ahead) == ("b_extends_a", 2)
    assert not forward.equivocation and forward.a is None


def test_a_fork_names_the_fork_point_and_both_owner_signed_blocks(chain):
    store, cids = chain
    other = fork_block(store, cids[1], time=7.0)  # the owner's second block at seq 2
    other_head = fork_block(store, other, seed=2)  # and a block on it: the heads are at seq 3 both
    counting = Counting(store)
    report = compare(counting, cids[3], other_head)
    assert report.kind == "fork" and report.common_seq == 1 and report.common == cid_str(cids[1])
    assert (report.a.cid, report.b.cid) == (cid_str(cids[2]), cid_str(other))
    assert report.a.seq == report.b.seq == 2 and report.a.round == report.b.round == 2
    assert report.a.signer == report.b.signer == OWNER.id and report.same_signer
    assert report.a.signature_valid and report.b.signature_valid and report.b.time == 7.0
    assert report.equivocation and report.as_dict()["equivocation"] is True
    assert cid_str(cids[0]) not in counting.gets  # nothing below the common block was read
    assert len(counting.gets) == 6


def test_a_fork_between_heads_of_different_lengths(chain):
    store, cids = chain
    other = fork_block(store, cids[0])  # the owner's other seq 1
    report = compare(store, other, cids[3])
    assert report.kind == "fork" and report.common_seq == 0 and report.seq_a == 1 and report.seq_b == 3
    assert (report.a.cid, report.b.cid) == (cid_str(other), cid_str(cids[1])) and report.equivocation


def test_a_fork_by_two_signers_or_with_a_bad_signature_is_not_proof(chain):
    store, cids = chain
    stranger = Identity.generate()
    theirs = fork_block(store, cids[1], identity=stranger)
    report = compare(store, cids[2], theirs)
    assert report.kind == "fork" and not report.same_signer and not report.equivocation
    forged = put_raw(store, {**get_block(store, cids[2]), "time": 99.0})  # the owner's block, altered
    report = compare(store, cids[2], forged)
    assert report.kind == "fork" and report.same_signer and not report.b.signature_valid
    assert not report.equivocation


def test_two_chains_with_no_common_genesis(chain):
    store, cids = chain
    _, others = build_chain(store, rounds=1)  # same job, other genesis (times differ)
    assert others[0] != cids[0]
    report = compare(store, cids[3], others[1])
    assert report.kind == "fork" and report.common_seq is None and report.common is None
    assert report.a.seq == report.b.seq == 0 and report.equivocation


def test_heads_of_different_jobs_are_not_a_fork(chain):
    store, cids = chain
    log = ChainLog(store, None)
    other = log.append(genesis_fields(store, np.random.default_rng(3), job="job-2"), OWNER)
    report = compare(store, cids[1], other)
    assert report.kind == "different_jobs" and (report.job_a, report.job_b) == ("job-1", "job-2")


def test_a_contest_candidate_is_not_equivocation(chain):
    store, cids = chain
    candidate = fork_block(store, cids[1])
    block = get_block(store, cids[2])
    fields = {k: v for k, v in block.items() if k not in ("v", "signer", "sig")}
    appended = store_block(store, {**fields, "ext": {"pofl": {"candidates": [candidate]}}}, OWNER)
    report = compare(store, appended, candidate)
    assert report.kind == "fork" and report.candidate and report.same_signer and not report.equivocation


def test_a_candidate_that_was_built_on_is_a_history_not_a_staged_candidate(chain):
    """Listing a block among a contest's candidates does not excuse a history built on top of it."""
    store, cids = chain
    candidate = fork_block(store, cids[1])
    block = get_block(store, cids[2])
    fields = {k: v for k, v in block.items() if k not in ("v", "signer", "sig")}
    appended = store_block(store, {**fields, "ext": {"pofl": {"candidates": [candidate]}}}, OWNER)
    built_on = fork_block(store, candidate, seed=5)  # the "candidate" became the parent of more history
    report = compare(store, appended, built_on)
    assert report.kind == "fork" and not report.candidate and report.equivocation


def test_compare_is_bounded_and_names_broken_chains(chain):
    store, cids = chain
    with pytest.raises(ChainError, match="longer than the 2 blocks allowed"):
        compare(store, cids[3], cids[1], max_blocks=2)
    del store.objects[bytes(cids[1].digest)]
    with pytest.raises(Exception, match="not found"):
        compare(store, cids[3], fork_block(store, cids[0]))


# -- the CLI on a real daemon ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """An honest 3-round chain and the owner's second history forking at seq 2, on a 1-node devnet."""
    from types import SimpleNamespace

    from grid_ipfs.ipfs.devnet import Devnet

    root = tmp_path_factory.mktemp("fork")
    net = Devnet.up(1, root / "devnet")
    try:
        with net.nodes[0].client() as client:
            _, cids = build_chain(client, rounds=3)
            other = fork_block(client, cids[1], time=7.0)
            other_head = fork_block(client, other, seed=2)
            witness = Witness.for_job(root / "witness", OWNER.id, "job-1")
            for record in honest_records(client, cids)[:2]:  # rounds 1 and 2: heads at seq 0 and 1
                witness.record(record)
            witness.record(honest_records(client, cids)[2])  # round 3, against the head at seq 2
        yield SimpleNamespace(api=net.nodes[0].api, cids=[cid_str(c) for c in cids], other=cid_str(other),
                              other_head=cid_str(other_head), witness=witness.path, root=root)
    finally:
        net.stop()


@pytest.mark.integration
def test_compare_cli_prints_the_proof_of_equivocation_and_exits_1(forked):
    proc = run_cli("grid_ipfs.chain", "compare", "--api", forked.api, forked.cids[3], forked.other_head, timeout=120)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert f"fork after seq 1 ({forked.cids[1]})" in out
    assert forked.cids[2] in out and forked.other in out and out.count("signature valid") == 2
    last = out.strip().splitlines()[-1]
    assert last == f"owner {OWNER.id} signed two different blocks at seq 2 of job job-1: equivocation"
    proc = run_cli("grid_ipfs.chain", "compare", "--api", forked.api, forked.cids[3], forked.other_head, "--json",
                   timeout=120)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["kind"] == "fork" and report["equivocation"] is True
    assert report["a"]["cid"] == forked.cids[2] and report["b"]["cid"] == forked.other


@pytest.mark.integration
def test_compare_cli_exits_0_when_one_head_extends_the_other(forked):
    proc = run_cli("grid_ipfs.chain", "compare", "--api", forked.api, forked.cids[1], forked.cids[3], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{forked.cids[3]} extends {forked.cids[1]} by 2 blocks (job job-1)"


@pytest.mark.integration
def test_compare_cli_names_an_unreadable_head_in_one_error_line(forked):
    missing = "bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    proc = run_cli("grid_ipfs.chain", "compare", "--api", forked.api, forked.cids[1], "not-a-cid", timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: not a valid CID: 'not-a-cid'")
    proc = run_cli("grid_ipfs.chain", "compare", "--api", forked.api, forked.cids[1], missing, "--max-blocks", "5",
                   timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


@pytest.mark.integration
def test_verify_with_a_witness_passes_on_the_chain_it_witnessed_and_fails_on_the_fork(forked):
    ok = run_cli("grid_ipfs.chain", "verify", "--api", forked.api, forked.cids[3], "--witness", str(forked.witness),
                 timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: ") and "3 witness records of 1 file(s) agree" in ok.stdout
    bad = run_cli("grid_ipfs.chain", "verify", "--api", forked.api, forked.other_head, "--witness",
                  str(forked.witness), timeout=300)
    assert bad.returncode == 1
    line = bad.stdout.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"FAILED at block 2 ({forked.other}): witness ")
    assert str(forked.witness) in line


@pytest.mark.integration
def test_verify_with_a_witness_of_another_job_is_an_error(forked, tmp_path):
    wrong = tmp_path / "other.jsonl"
    record = json.loads(forked.witness.read_text().splitlines()[0])
    wrong.write_text(json.dumps({**record, "job": "job-2"}) + "\n")
    proc = run_cli("grid_ipfs.chain", "verify", "--api", forked.api, forked.cids[3], "--witness", str(wrong),
                   timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "job job-2" in proc.stderr
