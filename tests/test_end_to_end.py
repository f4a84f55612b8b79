"""The whole grid on real loopback daemons: 3 worker processes (one per node), a 5-round digits job.

One module-scoped grid runs the job once through the real CLI (`python -m grid_ipfs.client submit
--json`); the tests then read the chain it wrote from a node the client never talked to, audit it,
forge a copy of it, and push the client and the workers into their error paths.
"""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest

from grid_ipfs import data, zoo
from grid_ipfs.chain import ChainLog, verify_chain, walk
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str, same_cid
from grid_ipfs.localgrid import LocalGrid
from grid_ipfs.payloads import weights_from_bytes, weights_to_bytes

from .cli import run_cli
from .waiting import wait_for

pytestmark = pytest.mark.integration
ROUNDS = 5



@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, 3, seed=0))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    # A fourth worker whose data cannot feed the model: it must refuse the job, and say why.
    data.save_shard(root / "wrong.npz", np.zeros((20, 10), np.float32), np.zeros(20, np.int64))
    local = LocalGrid(root / "grid", shards, nodes=3)
    local.start()
    try:
        local.add_worker(root / "wrong.npz")
        yield SimpleNamespace(local=local, root=root, apis=local.apis)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def job(grid):
    """The job, run once by the client CLI on node 0; its `--json` result."""
    proc = run_cli("grid_ipfs.client", "submit", "--api", grid.apis[0], "--model", str(grid.root / "digits.keras"),
                   "--rounds", str(ROUNDS), "--min-workers", "3", "--epochs", "2", "--batch-size", "32",
                   "--eval-data", str(grid.root / "test.npz"), "--key", str(grid.root / "client.key"),
                   "--head-dir", str(grid.root / "heads"), "--job", "digits-e2e", "--json", timeout=500)
    logs = "\n".join(f"--- worker{i}\n{grid.local.worker_log(i)}" for i in range(4))
    assert proc.returncode == 0, f"client failed:\n{proc.stderr}\n{logs}"
    return json.loads(proc.stdout)


@pytest.fixture
def reader(grid):
    """An RPC client on node 2: neither the client (node 0) nor most workers wrote there."""
    with grid.local.client(2) as client:
        yield client


def test_five_rounds_reach_90_percent_on_held_out_digits(job):
    assert set(job) >= {"job", "head", "model", "weights", "rounds"}
    assert [r["round"] for r in job["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["updates"] == 3 for r in job["rounds"]), job["rounds"]
    final = job["rounds"][-1]
    assert final["weights"] == job["weights"]
    assert final["metrics"]["val_accuracy"] >= 0.90, final["metrics"]
    # training went somewhere: the loss the workers report falls from the first round to the last
    assert final["metrics"]["loss"] < job["rounds"][0]["metrics"]["loss"]


def test_each_round_splits_its_time_into_the_slowest_worker_s_compute_and_coordination(job):
    for r in job["rounds"]:
        m = r["metrics"]
        assert 0 < m["critical_path_s"] <= r["seconds"], m  # the slowest worker's own part
        assert m["critical_path_s"] >= m["compute_s"]  # the maximum of what the mean is taken over
        # wall time when the block was made = critical path + coordination; the round ends a little later
        assert 0 <= m["critical_path_s"] + m["coordination_s"] <= r["seconds"], (m, r["seconds"])


def test_workers_log_one_line_per_round(grid, job):
    for i in range(3):
        log = grid.local.worker_log(i)
        for r in range(1, ROUNDS + 1):
            assert f"job digits-e2e round {r}: " in log, log


def test_worker_whose_data_does_not_fit_refuses_with_the_expected_shape(grid, job):
    log = wait_for(lambda: "cannot join job digits-e2e" in grid.local.worker_log(3) and grid.local.worker_log(3),
                   timeout=30, what="the wrong-shape worker to refuse the job")
    assert "feature shape (10,) but the model expects (64,)" in log, log
    assert "round 1" not in log


def test_chain_walks_with_plain_dag_get_paths_from_another_node(job, reader):
    head = job["head"]
    assert reader.dag_get(f"{head}/round") == ROUNDS
    assert reader.dag_get(f"{head}/prev/prev/round") == ROUNDS - 2
    genesis = "/".join([head] + ["prev"] * ROUNDS)
    assert reader.dag_get(f"{genesis}/seq") == 0
    assert reader.dag_get(f"{genesis}/aggregation/name") == "init"
    assert reader.dag_get(f"{head}/aggregation/name") == "fedavg"
    assert reader.dag_get(f"{head}/updates/0/num_examples") > 0


def test_one_recursive_pin_of_the_head_keeps_the_model_and_every_update(job, reader):
    reader.pin_add(job["head"], recursive=True, timeout=120)
    blocks = list(walk(reader, job["head"]))
    linked = {cid_str(blocks[0][1]["model"])}
    for _, block in blocks:
        linked.add(cid_str(block["weights"]))
        linked.update(cid_str(u["weights"]) for u in block["updates"])
    assert len(linked) == 1 + (ROUNDS + 1) + 3 * ROUNDS
    pins = reader.pin_ls(type="all")
    pinned = {cid_str(c) for c in pins}
    missing = [c for c in linked if not any(same_cid(c, p) for p in pinned)]
    assert not missing, f"not pinned under the head: {missing[:3]}"


def test_chain_verify_and_show_pass_from_another_node(grid, job):
    verified = run_cli("grid_ipfs.chain", "verify", "--api", grid.apis[2], job["head"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"OK: {ROUNDS + 1} blocks verified" in verified.stdout
    shown = run_cli("grid_ipfs.chain", "show", "--api", grid.apis[2], job["head"], "--json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    assert [len(row["workers"]) for row in rows] == [0] + [3] * ROUNDS
    assert rows[-1]["weights"] == job["weights"]


def test_a_forged_copy_with_one_flipped_update_is_named_by_verify(grid, job, reader):
    """A forger (their own key) re-signs the owner's blocks from round 3 on, on top of the genuine round 2,
    flipping one weight of one update in round 3: every block is validly signed, but round 3's aggregate
    no longer matches its updates. A copy re-signed from genesis on fails already at round 1: the
    workers' signed updates name the genuine history."""
    forger = Identity.generate()
    bad_round, forged = 3, None
    history = list(reversed(list(walk(reader, job["head"]))))
    copy = ChainLog(reader, None)
    copy._head = history[bad_round - 1][0]
    for _, block in history[bad_round:]:
        fields = {k: v for k, v in block.items() if k not in ("seq", "prev", "signer", "sig", "v")}
        if block["round"] == bad_round:
            updates = [dict(u) for u in block["updates"]]
            weights = weights_from_bytes(reader.cat(updates[1]["weights"]))
            weights[0] = weights[0].copy()
            weights[0].flat[0] = -weights[0].flat[0] + 1.0
            updates[1]["weights"] = reader.add(weights_to_bytes(weights))
            fields["updates"] = updates
        cid = copy.append(fields, forger)
        if block["round"] == bad_round:
            forged = cid

    for recompute in (True, False):  # the worker's own signed message names the forgery, before any recompute
        report = verify_chain(reader, copy.head, recompute=recompute)
        assert not report.ok and same_cid(report.first_bad, forged), report.reason
        assert f"seq {bad_round}" in report.reason and \
            f"update of {updates[1]['worker']}: its message sent weights" in report.reason, report.reason

    cli = run_cli("grid_ipfs.chain", "verify", "--api", grid.apis[1], cid_str(copy.head))
    assert cli.returncode == 1
    assert cid_str(forged) in cli.stdout, cli.stdout

    whole = ChainLog(reader, None)
    for _, block in history:
        whole.append({k: v for k, v in block.items() if k not in ("seq", "prev", "signer", "sig", "v")}, forger)
    blocks = [c for c, _ in walk(reader, whole.head)][::-1]
    report = verify_chain(reader, whole.head)
    assert not report.ok and same_cid(report.first_bad, blocks[1]), report.reason
    assert (f"its message extends head {cid_str(history[0][0])}, not this block's prev {cid_str(blocks[0])}"
            in report.reason), report.reason
    # The original still verifies, and pinning the owner's key exposes either copy at its first forged block.
    client_id = Identity.load_or_create(grid.root / "client.key").id
    assert verify_chain(reader, job["head"], signer=client_id, check_objects=False).ok
    owner_only = run_cli("grid_ipfs.chain", "verify", "--api", grid.apis[1], cid_str(whole.head), "--signer", client_id)
    assert owner_only.returncode == 1 and "signed by" in owner_only.stdout, owner_only.stdout
    pinned = verify_chain(reader, whole.head, signer=client_id, check_objects=False, recompute=False)
    assert not pinned.ok and "signed by" in pinned.reason and pinned.checks[0].ok is False
    pinned = verify_chain(reader, copy.head, signer=client_id, check_objects=False, recompute=False)
    assert not pinned.ok and same_cid(pinned.first_bad, forged) and "signed by" in pinned.reason


def test_client_exits_non_zero_when_too_few_workers_join(grid):
    proc = run_cli("grid_ipfs.client", "submit", "--api", grid.apis[0], "--model", str(grid.root / "digits.keras"),
                   "--rounds", "1", "--topic", "grid-ipfs/v1/jobs-nobody-listens", "--join-timeout", "3",
                   "--key", str(grid.root / "client.key"), "--head-dir", str(grid.root / "heads"))
    assert proc.returncode == 1, proc.stderr
    assert "only 0 of 1 workers joined" in proc.stderr


def test_round_fails_plainly_when_the_workers_fall_silent(grid):
    """A worker joins, then stops answering (SIGSTOP): the round's deadline passes without enough updates."""
    from grid_ipfs.client import Client, ClientCallback, JobFailed, JobSpec

    topic = "grid-ipfs/v1/jobs-stall"
    index = grid.local.add_worker(grid.local.shards[0], ["--topic", topic])
    stalled = grid.local.workers[index]

    class FreezeOnJoin(ClientCallback):
        retries: list = []

        def on_worker_joined(self, worker, name, joined, needed):
            stalled.send_signal(signal.SIGSTOP)

        def on_round_retry(self, round, attempt, received, needed):
            self.retries.append((round, attempt, received, needed))

    try:
        with grid.local.client(0) as ipfs:
            client = Client(ipfs, Identity.generate(), head_dir=grid.root / "heads", callbacks=[FreezeOnJoin()],
                            jobs_topic=topic)
            spec = JobSpec(model_path=grid.root / "digits.keras", rounds=2, min_workers=1, round_timeout=3,
                           join_timeout=120, max_retries=1)
            with pytest.raises(JobFailed, match=r"round 1 of job .*: 0 of 1 required updates .* 2 attempt"):
                client.submit(spec)
        assert FreezeOnJoin.retries == [(1, 1, 0, 1), (1, 2, 0, 1)]
    finally:
        stalled.send_signal(signal.SIGCONT)
        grid.local.stop_worker(index)


def test_worker_cli_names_what_a_bad_data_file_lacks(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((4, 2)), labels=np.zeros(4))
    proc = run_cli("grid_ipfs.worker", "--api", "/ip4/127.0.0.1/tcp/9", "--data", str(bad), timeout=60)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "'x'" in proc.stderr, proc.stderr
