"""Two writers on one head file, each about to append the round its workers signed against the same head.

A round's updates name the head the round was announced on, so its block must link exactly that head: of
two writers that aggregated against it, the second to take the lock must be refused (`extends`), not
appended on top of the first (a block whose updates were signed for another position). The chain stays
one line, and the refusal names the block, and the key, that moved it.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from grid_ipfs import messages
from grid_ipfs.chain import ChainError, ChainLog, read_head, verify_chain, walk
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str
from grid_ipfs.payloads import weights_from_bytes, weights_to_bytes

from .test_chain_format import OWNER, WORKERS, DirStore, genesis_fields, get_block, round_fields


def _append_round_1(root: str, head_file: str, barrier, seed: int, out) -> None:
    """A writer process: aggregate round 1 against the head it reads, wait for the other, then append."""
    store, me = DirStore(Path(root)), Identity.generate()
    log = ChainLog(store, head_file)
    extends = log.head
    fields = round_fields(store, np.random.default_rng(seed), get_block(store, extends), 1, log)
    barrier.wait()  # both have aggregated against the same head; now both append
    try:
        out.put((me.id, "appended", cid_str(log.append(fields, me, extends=extends))))
    except ChainError as exc:
        out.put((me.id, "refused", str(exc)))


def test_of_two_processes_that_aggregated_against_one_head_only_the_first_appends(tmp_path):
    root, head_file = tmp_path / "blocks", tmp_path / "head"
    root.mkdir()
    store = DirStore(root)
    genesis = ChainLog(store, head_file).append(genesis_fields(store, np.random.default_rng(0)), OWNER)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_append_round_1, args=(str(root), str(head_file), barrier, seed, out))
             for seed in (1, 2)]
    for p in procs:
        p.start()
    try:
        answers = sorted(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    outcomes = {outcome: (who, detail) for who, outcome, detail in answers}
    assert sorted(outcomes) == ["appended", "refused"], answers
    winner, block = outcomes["appended"]
    assert outcomes["refused"][1] == (
        f"the chain moved: the block was to extend {cid_str(genesis)}, but head file {head_file} names {block} "
        f"(seq 1), appended by {winner}")
    assert cid_str(read_head(head_file)) == block
    assert [b["seq"] for _, b in walk(store, block)] == [1, 0]  # one line: the refused block is nowhere
    assert verify_chain(store, block).ok


@pytest.mark.integration
def test_the_client_fails_the_job_naming_the_writer_that_moved_the_head(clients, tmp_path):
    """The client's side of the same race, on a real daemon: its round closes after another writer
    appended to the job's head file; the job fails in one line naming that writer, and the chain keeps
    the other writer's block alone."""
    from grid_ipfs.client import Client, JobFailed, JobResult, JobSpec
    from grid_ipfs.client.collect import Collected
    from grid_ipfs.client.inbox import Inbox
    from grid_ipfs.client.state import Accepted, JobRun

    ipfs, rng = clients[0], np.random.default_rng(4)
    head_file = tmp_path / "race.head"
    chain = ChainLog(ipfs, head_file)
    job_id = f"race-{time.time_ns()}"
    genesis_cid = chain.append(genesis_fields(ipfs, rng, job=job_id), OWNER)
    genesis = get_block(ipfs, genesis_cid)
    collected = {}
    for worker in WORKERS:  # the round's updates, signed against the genesis head
        weights = [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)]
        update = messages.Update(job=job_id, round=1, weights=cid_str(ipfs.add(weights_to_bytes(weights))),
                                 num_examples=10, metrics={"loss": 0.5}, eval_metrics={}, attempt=1,
                                 head=cid_str(genesis_cid), base=cid_str(genesis["weights"]))
        collected[worker.id] = Collected(worker.id, update, weights, messages.encode(update, worker))
    spec = JobSpec(model_path=None, rounds=1, job_id=job_id)
    accepted = Accepted(cid_str(genesis_cid), 0, weights_from_bytes(ipfs.cat(genesis["weights"])),
                        cid_str(genesis["weights"]), {})
    job = JobRun(messages.Job(job=job_id, model=cid_str(genesis["model"]), owner=OWNER.id,
                              config={"epochs": 1, "batch_size": 32, "rounds": 1}),
                 spec, chain, None, None, spec.strategy, accepted,
                 JobResult(job_id, cid_str(genesis["model"]), cid_str(genesis_cid), cid_str(genesis["weights"])),
                 extends=cid_str(genesis_cid))
    other, other_log = Identity.generate(), ChainLog(ipfs, head_file)  # e.g. a second `client resume`
    moved = other_log.append(round_fields(ipfs, rng, genesis, 1, other_log), other, extends=genesis_cid)

    client = Client(ipfs, OWNER, head_dir=tmp_path)
    with pytest.raises(JobFailed) as failed:
        client._close_round(Inbox(job, OWNER.id), 1, collected, {}, 1, time.monotonic(), 0)
    assert str(failed.value) == (
        f"round 1 of job {job_id}: the chain moved: the block was to extend {cid_str(genesis_cid)}, but head "
        f"file {head_file} names {cid_str(moved)} (seq 1), appended by {other.id}; its workers signed their "
        f"updates against {cid_str(genesis_cid)}: stop the other writer")
    assert cid_str(read_head(head_file)) == cid_str(moved)
    assert [b["seq"] for _, b in walk(ipfs, moved)] == [1, 0]
    assert verify_chain(ipfs, moved).ok
