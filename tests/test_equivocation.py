"""An owner that equivocates, against a real worker on real daemons.

The test plays a dishonest job owner by hand (its own pubsub messages and blocks): it runs two rounds on
one history, then signs a second block at the same seq (a fork) and announces rounds on it, then a round
on an older head (a rollback). The worker signs the first two rounds against the heads they name, records
them in its witness file, and refuses every round of the other history with one log line. `chain compare`
prints the two owner-signed blocks as the proof, and `chain verify --witness` holds each history to what
the worker recorded. The worker's genuine signed updates, replayed by the owner into the other history or
into another job, fail verify naming the update.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest

from grid_ipfs import data, messages, zoo
from grid_ipfs.chain import ChainLog, verify_chain
from grid_ipfs.chain.contributions import update_entry
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs import cid_str, parse_cid
from grid_ipfs.localgrid import LocalGrid

from .cli import run_cli
from .test_hostile_peers import a_line_says, publish_until
from .waiting import wait_for

pytestmark = pytest.mark.integration

JOB = "fork-job"


class Owner:
    """A job owner driven step by step by the test, on node 1 (the worker runs on node 0)."""

    def __init__(self, ipfs, root: Path):
        self.ipfs, self.identity = ipfs, Identity.generate()
        model = root / "digits.keras"
        zoo.digits_mlp(seed=0).save(model)
        self.model = cid_str(ipfs.add(model.read_bytes()))
        from grid_ipfs.payloads import weights_to_bytes

        self.weights = cid_str(ipfs.add(weights_to_bytes(zoo.digits_mlp(seed=0).get_weights())))
        self.inbox: queue.Queue = queue.Queue()
        self.subscription = ipfs.pubsub_subscribe(messages.job_topic(JOB), on_message=self.inbox.put)
        self.subscription.wait_ready()
        self.job = messages.Job(job=JOB, model=self.model, owner=self.identity.id,
                                config={"epochs": 1, "batch_size": 32, "rounds": 5})

    def block(self, log: ChainLog, round_: int, updates: list, weights: str, **fields) -> str:
        return cid_str(log.append({"job": JOB, "round": round_, "model": self.model, "weights": weights,
                                   "aggregation": {"name": "fedavg" if updates else "init", "params": {}},
                                   "updates": updates, "metrics": {}, **fields}, self.identity))

    def announce(self, round_: int, attempt: int, head: str, weights: str) -> None:
        self.ipfs.pubsub_publish(messages.job_topic(JOB), messages.encode(messages.Round(
            job=JOB, round=round_, weights=weights, deadline=time.time() + 300, selected=None, attempt=attempt,
            head=head), self.identity))

    def update(self, round_: int, attempt: int, timeout: float = 240) -> tuple[messages.Envelope, bytes]:
        """The worker's update for (round, attempt), skipping everything else on the topic."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw = self.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                envelope = messages.decode(raw.data)
            except messages.MessageError:
                continue
            msg = envelope.message
            if isinstance(msg, messages.Update) and (msg.round, msg.attempt) == (round_, attempt):
                return envelope, bytes(raw.data)
        raise AssertionError(f"no update for round {round_} attempt {attempt} within {timeout}s")


@pytest.fixture
def grid(tmp_path):
    x, y, _, _ = data.digits()
    shards = data.write_shards(tmp_path / "shards", data.split_iid(x, y, 1, seed=1))
    local = LocalGrid(tmp_path / "grid", shards, nodes=2)
    local.start()
    try:
        yield local
    finally:
        local.stop()


def test_a_worker_refuses_a_forked_or_rolled_back_history_and_compare_proves_the_fork(grid, tmp_path):
    with grid.client(1) as ipfs:
        owner = Owner(ipfs, tmp_path)
        try:
            play_the_owner(grid, ipfs, owner)
        finally:
            owner.subscription.close()


def play_the_owner(grid, ipfs, owner: Owner) -> None:
    """Two honest rounds, then a fork and a rollback; then what compare and verify --witness make of it."""
    honest = ChainLog(ipfs, None)
    genesis = owner.block(honest, 0, [], owner.weights)
    publish_until(ipfs, messages.encode(owner.job, owner.identity),
                  lambda: "joined job fork-job" in grid.worker_log(0), "the worker to join")

    # Two honest rounds: the worker signs against genesis, then against block 1.
    heads, entries = [genesis], {}
    for r in (1, 2):
        owner.announce(r, 1, heads[-1], owner.weights)
        envelope, raw = owner.update(r, 1)
        assert envelope.message.head == heads[-1] and envelope.message.base == owner.weights
        entries[r] = update_entry(envelope, ipfs.block_put(raw, codec="raw"))
        heads.append(owner.block(honest, r, [entries[r]], owner.weights))
    witness_files = list((grid.directory / "keys" / "worker0.witness").glob("*.jsonl"))
    assert len(witness_files) == 1, witness_files
    assert [line.count(heads[0]) + line.count(heads[1]) for line in witness_files[0].read_text().splitlines()] \
        == [1, 1]

    # The fork: a second block at seq 1 on the same genesis over the same signed update, by the same owner.
    forked = ChainLog(ipfs, None)
    forked._head = parse_cid(genesis)
    fork1 = owner.block(forked, 1, [entries[1]], owner.weights, ext={"note": "another history"})
    owner.announce(2, 2, fork1, owner.weights)
    wait_for(lambda: a_line_says(grid.worker_log(0), "refused round 2 of fork-job", "fork at seq 1", fork1),
             timeout=120, what="the worker to refuse the forked head")
    # A rollback: a round on genesis again, below the head the worker signed last.
    owner.announce(3, 1, genesis, owner.weights)
    wait_for(lambda: a_line_says(grid.worker_log(0), "refused round 3 of fork-job", "rollback"), timeout=120,
             what="the worker to refuse the rolled-back head")
    assert grid.worker_log(0).count("job fork-job round ") == 2, grid.worker_log(0)  # trained twice only

    api = grid.apis[1]
    compared = run_cli("grid_ipfs.chain", "compare", "--api", api, heads[-1], fork1)
    assert compared.returncode == 1, compared.stdout + compared.stderr
    assert "equivocation" in compared.stdout and heads[1] in compared.stdout and fork1 in compared.stdout
    same = run_cli("grid_ipfs.chain", "compare", "--api", api, heads[-1], heads[1])
    assert same.returncode == 0, same.stdout + same.stderr

    # The worker's signed updates cannot be replayed into another history or another job.
    replayed = owner.block(forked, 2, [entries[2]], owner.weights)  # signed against heads[1], not fork1
    report = verify_chain(ipfs, replayed, recompute=False)
    assert not report.ok and f"its message extends head {heads[1]}, not this block's prev {fork1}" in report.reason
    other = ChainLog(ipfs, None)
    other_genesis = cid_str(other.append({"job": "other-job", "round": 0, "model": owner.model,
                                          "weights": owner.weights, "aggregation": {"name": "init", "params": {}},
                                          "updates": [], "metrics": {}}, owner.identity))
    elsewhere = cid_str(other.append({"job": "other-job", "round": 1, "model": owner.model, "weights": owner.weights,
                                      "aggregation": {"name": "fedavg", "params": {}}, "updates": [entries[1]],
                                      "metrics": {}}, owner.identity))
    report = verify_chain(ipfs, elsewhere, recompute=False)
    assert not report.ok and "its message is for round 1 of job 'fork-job', not round 1 of 'other-job'" in \
        report.reason, (other_genesis, report.reason)

    witness = str(witness_files[0])
    ok = run_cli("grid_ipfs.chain", "verify", "--api", api, "--no-recompute", "--witness", witness, heads[-1])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = run_cli("grid_ipfs.chain", "verify", "--api", api, "--no-recompute", "--witness", witness, fork1)
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout + bad.stderr
