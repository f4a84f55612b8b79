"""Asynchronous jobs (`--mode async`, FedBuff) on real daemons: a slow worker does not hold the job up,
a worker that leaves and comes back trains on, the owner killed mid-job resumes, and every chain
verifies bit for bit from a node the owner never talked to; forged base or staleness records do not.

Each test builds its own small grid and stops every process it started by PID. Nothing here asserts
a timing: "does not hold up" is read off the chain (blocks that closed without the slow worker).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from grid_ipfs import data, zoo
from grid_ipfs.chain import read_head, verify_chain, walk
from grid_ipfs.chain.log import store_block
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str
from grid_ipfs.localgrid import LocalGrid

from .waiting import wait_for

pytestmark = pytest.mark.integration

SLOWDOWN = "5"


@pytest.fixture
def grid(tmp_path):
    """Three workers on three nodes; worker 2 is five times slower than the others."""
    x, y, x_test, y_test = data.digits()
    shards = data.write_shards(tmp_path / "shards", data.split_iid(x, y, 3, seed=2))
    data.save_shard(tmp_path / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(tmp_path / "digits.keras")
    local = LocalGrid(tmp_path / "grid", shards[:2], nodes=3)
    try:
        local.start()
        local.add_worker(shards[2], ["--slowdown", SLOWDOWN])
        ids = [Identity.load_or_create(local.directory / "keys" / f"worker{i}.key").id for i in range(3)]
        yield SimpleNamespace(local=local, root=tmp_path, ids=ids, model=tmp_path / "digits.keras",
                              heads=tmp_path / "heads", key=tmp_path / "client.key")
    finally:
        local.stop()


def submit_args(grid, job: str, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grid_ipfs.client", "submit", "--api", grid.local.apis[0], "--model", str(grid.model),
            "--rounds", str(rounds), "--min-workers", "3", "--mode", "async", "--buffer-size", "2",
            "--round-timeout", "30", "--eval-data", str(grid.root / "test.npz"), "--key", str(grid.key),
            "--head-dir", str(grid.heads), "--job", job, "--json", *extra]


def chain_of(grid, head: str) -> list[dict]:
    with grid.local.client(1) as reader:
        return [block for _, block in walk(reader, head)][::-1]


def logs(grid) -> str:
    return "\n".join(f"--- worker{i}\n{grid.local.worker_log(i)[-3000:]}" for i in range(3))


def test_an_async_job_with_a_slow_worker_and_one_that_leaves_completes_and_verifies(grid):
    rounds = 20
    client = subprocess.Popen(submit_args(grid, "async-slow", rounds), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    rejoined = grid.ids[1]
    try:
        with grid.local.client(0) as ipfs:
            def newest() -> dict | None:
                head = read_head(grid.heads / "async-slow.head")
                return next(walk(ipfs, head))[1] if head else None

            wait_for(lambda: (newest() or {}).get("round", 0) >= 3, timeout=240, what="three async blocks")
            grid.local.stop_worker(1)  # a fast worker leaves mid-job ...
            left_at = newest()["round"]
            wait_for(lambda: newest()["round"] >= left_at + 2, timeout=240, what="two blocks without worker 1")
            grid.local.start_worker(1)  # ... and comes back
            back_at = newest()["round"]

            def returned() -> bool:
                block = newest()
                return block["round"] > back_at and rejoined in {u["worker"] for u in block["updates"]}
            wait_for(returned, timeout=240, what="a block with the returning worker's update")
        out, err = client.communicate(timeout=600)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate(timeout=10)
    assert client.returncode == 0, f"{err[-3000:]}\n{logs(grid)}"
    result = json.loads(out)
    blocks = chain_of(grid, result["head"])
    assert [b["round"] for b in blocks] == list(range(rounds + 1))
    assert blocks[0]["config"]["async"]["buffer_size"] == 2
    slow = grid.ids[2]
    entries = [(b["round"], u) for b in blocks[1:] for u in b["updates"]]
    assert all(set(u) >= {"base", "staleness"} for _, u in entries)
    assert all(1 <= len(b["updates"]) <= 2 for b in blocks[1:])
    # the slow worker does not hold the job up: blocks close without it, and what it sends is stale
    before_leaving = blocks[1:left_at + 1]
    assert any(slow not in {u["worker"] for u in b["updates"]} for b in before_leaving), entries
    assert any(u["worker"] == slow and u["staleness"] >= 1 for _, u in entries), entries
    with grid.local.client(2) as auditor:
        report = verify_chain(auditor, result["head"], signer=Identity.load_or_create(grid.key).id)
        assert report.ok, report.reason
    assert blocks[-1]["metrics"]["val_accuracy"] > 0.8
    assert "staleness_max" in blocks[-1]["metrics"]


def test_an_async_owner_killed_mid_job_resumes_and_each_round_lands_once(grid):
    client = subprocess.Popen(submit_args(grid, "async-resume", 6), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        with grid.local.client(0) as ipfs:
            def rounds_done() -> int:
                head = read_head(grid.heads / "async-resume.head")
                return ipfs.dag_get(f"{head}/round") if head else 0
            wait_for(lambda: rounds_done() >= 2, timeout=240, what="two async blocks")
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        client.stdout.close()
        client.stderr.close()
    resumed = subprocess.run([sys.executable, "-m", "grid_ipfs.client", "resume", "--api", grid.local.apis[0],
                              "--key", str(grid.key), "--head-dir", str(grid.heads), "--job", "async-resume",
                              "--min-workers", "1", "--round-timeout", "30", "--json"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"{resumed.stderr[-3000:]}\n{logs(grid)}"
    head = json.loads(resumed.stdout)["head"]
    blocks = chain_of(grid, head)
    assert [b["round"] for b in blocks] == list(range(7))  # each round exactly once
    with grid.local.client(2) as auditor:
        report = verify_chain(auditor, head)
        assert report.ok, report.reason


def test_forged_staleness_base_or_a_reused_update_fail_verify(grid):
    proc = subprocess.run(submit_args(grid, "async-forge", 4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{logs(grid)}"
    head = json.loads(proc.stdout)["head"]
    owner = Identity.load_or_create(grid.key)
    with grid.local.client(0) as ipfs:
        walked = list(walk(ipfs, head))
        newest, below = walked[0][1], walked[1][1]
        assert verify_chain(ipfs, head).ok

        def forged(change) -> str:  # the newest block, changed and signed again by the owner's own key
            fields = {k: v for k, v in newest.items() if k not in ("v", "signer", "sig")}
            fields["updates"] = [dict(u) for u in fields["updates"]]
            change(fields)
            return cid_str(store_block(ipfs, fields, owner))

        def staleness(fields):
            fields["updates"][0]["staleness"] += 1

        def base(fields):  # the same update, said to come from another block than the one it names
            update = fields["updates"][0]  # (with the staleness that other block would give it)
            other = walked[-1] if update["base"] != walked[-1][0] else walked[1]
            update["base"], update["staleness"] = other[0], newest["round"] - (other[1]["round"] + 1)

        def reused(fields):  # an update the block below took already, counted again
            fields["updates"] = [dict(below["updates"][0], staleness=below["updates"][0]["staleness"] + 1)]
            fields.pop("fold", None)

        for change, reason in ((staleness, "recorded, but its base is"), (base, ": its message "),
                               (reused, "is in an earlier block already")):
            report = verify_chain(ipfs, forged(change))
            assert not report.ok and report.first_bad_seq == newest["seq"], (change.__name__, report.reason)
            assert reason in report.reason, (change.__name__, report.reason)
