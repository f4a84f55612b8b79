"""A history that outlives its participants, on real daemons.

A job runs on three nodes: the owner on node 0, a worker on each node. Then the workers on nodes 1 and 2
leave for good (processes and daemons stopped) and the owner's daemon collects garbage. The owner's
node alone still verifies the whole chain (its recursive pin on the head holds every update it
fetched), a CAR export of it imported into a fresh node that never met the job verifies there, and
`chain verify --car` verifies it with no daemon at all. Each worker's witness file checks out against
the chain.
"""

from __future__ import annotations

import json
import time

import pytest

from grid_ipfs.chain import verify_chain, walk
from grid_ipfs.ipfs import IPFSError, cid_str, same_cid

from .cli import run_cli
from .test_faults import make_grid

pytestmark = pytest.mark.integration

ROUNDS = 2


def test_the_owner_alone_keeps_a_history_that_verifies_anywhere(tmp_path, make_devnet):
    grid = make_grid(tmp_path, workers=3, nodes=3)  # worker i on node i; the owner on node 0
    local = grid.local
    local.start()
    try:
        api = local.apis[0]
        proc = run_cli("grid_ipfs.client", "submit", "--api", api, "--model", str(grid.model), "--rounds",
                       str(ROUNDS), "--min-workers", "3", "--epochs", "1", "--eval-data", str(grid.root / "test.npz"),
                       "--key", str(tmp_path / "owner.key"), "--head-dir", str(tmp_path / "heads"),
                       "--job", "durable", "--json", timeout=500)
        assert proc.returncode == 0, proc.stderr + "\n".join(local.worker_log(i) for i in range(3))
        head = json.loads(proc.stdout)["head"]
        with local.client(0) as owner:
            recursive = owner.pin_ls(type="recursive")
            assert any(same_cid(cid, head) for cid in recursive), "the owner does not pin the head"
            older = [cid_str(cid) for cid, _ in walk(owner, head)][1:]
            assert not any(same_cid(cid, old) for cid in recursive for old in older), "older heads still pinned"

            for i in (1, 2):  # two organisations leave: their workers and their daemons, for good
                local.stop_worker(i)
                local.devnet.stop_node(i)
            litter = owner.add(b"nobody pins this", pin=False)
            owner.repo_gc()
            with pytest.raises(IPFSError):  # the collection did run: what nobody pins is gone
                owner.cat(litter, timeout=3)
            report = verify_chain(owner, head)
            assert report.ok and report.blocks == ROUNDS + 1 and report.unproven == 0, report.reason

            car = tmp_path / "durable.car"
            exported = run_cli("grid_ipfs.chain", "export", "--api", api, "--car", str(car), head)
            assert exported.returncode == 0, exported.stdout + exported.stderr
        for i in range(3):
            witness = next((local.directory / "keys" / f"worker{i}.witness").glob("*.jsonl"))
            checked = run_cli("grid_ipfs.chain", "verify", "--car", str(car), "--witness", str(witness), head)
            assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        local.stop()

    fresh = make_devnet(1)  # a node that never met the job: everything it knows comes from the CAR
    fresh_api = fresh.nodes[0].api
    imported = run_cli("grid_ipfs.chain", "import", "--api", fresh_api, str(car))
    assert imported.returncode == 0 and head in imported.stdout, imported.stdout + imported.stderr
    verified = run_cli("grid_ipfs.chain", "verify", "--api", fresh_api, head)
    assert verified.returncode == 0 and f"OK: {ROUNDS + 1} blocks verified" in verified.stdout, verified.stdout
    fresh.stop()

    offline = run_cli("grid_ipfs.chain", "verify", "--car", str(car))  # no daemon runs anywhere now
    assert offline.returncode == 0 and f"OK: {ROUNDS + 1} blocks verified" in offline.stdout, \
        offline.stdout + offline.stderr


def test_the_owners_pin_moves_to_each_head_and_recovers_when_the_old_one_is_gone(clients):
    from types import SimpleNamespace

    from grid_ipfs.client import Client
    from grid_ipfs.identity import Identity

    ipfs = clients[0]
    first, second, third = (ipfs.add(f"head {i} {time.time()}".encode(), pin=False) for i in range(3))

    def recursive() -> list:
        return list(ipfs.pin_ls(type="recursive"))

    ipfs.pin_update(None, first)
    assert any(same_cid(c, first) for c in recursive())
    ipfs.pin_update(first, second)
    assert any(same_cid(c, second) for c in recursive()) and not any(same_cid(c, first) for c in recursive())

    # the client's pin was removed behind its back: the next head is pinned afresh, not lost for good
    ipfs.pin_rm(second)
    job = SimpleNamespace(pinned=cid_str(second), message=SimpleNamespace(job="pinned"))
    Client(ipfs, Identity.generate())._pin(job, cid_str(third))
    assert job.pinned == cid_str(third) and any(same_cid(c, third) for c in recursive())
    ipfs.pin_rm(third)


def test_the_pin_thread_rests_nine_times_a_move_s_length_until_the_job_ends(monkeypatch):
    """On js-ipfs a move walks the whole chain, so a long job's moves get spaced to take `PIN_SHARE` (a
    tenth) of the time; once the job ends the newest head is pinned at once. Pure logic: a fake clock,
    a node whose every move takes 2 s of it, and a `pin_now` that records each rest."""
    from types import SimpleNamespace

    from grid_ipfs.client import core
    from grid_ipfs.identity import Identity

    assert core.PIN_SHARE == 0.1
    clock = [100.0]
    monkeypatch.setattr(core, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    class Node:
        def __init__(self):
            self.moves = []

        def pin_update(self, old, new, timeout):
            clock[0] += 2.0
            self.moves.append((old, new))

    class PinNow:
        def __init__(self):
            self.rests, self.ended = [], False

        def wait(self, timeout):
            self.rests.append(timeout)
            if not self.ended:
                clock[0] += timeout

        def set(self):
            self.ended = True

    node, job = Node(), SimpleNamespace(pinned=None, to_pin="h1", pin_rest_until=0.0, pin_now=PinNow(),
                                        message=SimpleNamespace(job="paced"))
    client = core.Client(node, Identity.generate())
    client._pin_newest(job)  # the first move: nothing to rest from
    clock[0] += 1.0  # a round later
    job.to_pin = "h2"
    client._pin_newest(job)  # rests until 20 s after the first move began
    client._pin_newest(job)  # queued behind it: finds the newest head pinned, moves nothing
    job.to_pin = "h3"
    job.pin_now.set()  # the job ends
    client._pin_newest(job)
    assert node.moves == [(None, "h1"), ("h1", "h2"), ("h2", "h3")]
    assert job.pin_now.rests == [0.0, 17.0, 18.0]
    assert clock[0] == 124.0 and job.pinned == "h3"  # no rest once the job ended
