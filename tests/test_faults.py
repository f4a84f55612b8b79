"""Faults on real daemons: workers killed and restarted, a daemon restarted, the client killed and
resumed, unreachable daemons, racing appenders, and a flood of hostile messages during a job.

Each test builds its own small grid (it breaks things) and stops every process it started by PID.
Rounds use short deadlines so the fault paths run in seconds; nothing here asserts a timing.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from grid_ipfs import data, messages, zoo
from grid_ipfs.chain import ChainLog, read_head, verify_chain, walk
from grid_ipfs.client import Client, ClientCallback, JobSpec
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.rpc import IPFSClient
from grid_ipfs.localgrid import LocalGrid

from .waiting import wait_for

pytestmark = pytest.mark.integration


def make_grid(root, workers: int, nodes: int, worker_args: list[str] | None = None) -> SimpleNamespace:
    x, y, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x, y, workers, seed=1))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    local = LocalGrid(root / "grid", shards, nodes=nodes, worker_args=worker_args)
    return SimpleNamespace(local=local, root=root, model=root / "digits.keras")


@pytest.fixture
def grid_factory(tmp_path):
    made: list[LocalGrid] = []

    def make(workers: int = 2, nodes: int = 2, worker_args: list[str] | None = None) -> SimpleNamespace:
        grid = make_grid(tmp_path, workers, nodes, worker_args)
        made.append(grid.local)
        grid.local.start()
        return grid

    yield make
    for local in made:
        local.stop()


def worker_ids(grid) -> list[str]:
    return [Identity.load_or_create(grid.local.directory / "keys" / f"worker{i}.key").id
            for i in range(len(grid.local.shards))]


def wait_listening(grid, i: int, after: int = 0) -> None:
    wait_for(lambda: grid.local.worker_log(i).count("listening on") > after, timeout=60,
             what=f"worker{i} to listen")


class Hooks(ClientCallback):
    """Run test code at round boundaries; record retries."""

    def __init__(self, on_end=None, on_start=None):
        self.on_end, self.on_start, self.retries = on_end or {}, on_start or {}, []

    def on_round_start(self, round, expected, deadline):
        if round in self.on_start:
            self.on_start.pop(round)()

    def on_round_retry(self, round, attempt, received, needed):
        self.retries.append((round, attempt, received))

    def on_round_end(self, result):
        if result.round in self.on_end:
            self.on_end[result.round]()


def run_job(grid, spec: JobSpec, hooks: ClientCallback | None = None, node: int = 0, **kwargs):
    with grid.local.client(node) as ipfs:
        client = Client(ipfs, Identity.generate(), head_dir=grid.root / "heads",
                        callbacks=[hooks] if hooks else [], **kwargs)
        return client.submit(spec), client


def test_killed_worker_closes_the_round_at_its_deadline_and_a_restarted_worker_rejoins(grid_factory):
    grid = grid_factory(workers=3, nodes=2)
    for i in range(3):
        wait_listening(grid, i)
    hooks = Hooks(on_end={
        1: lambda: grid.local.stop_worker(2, signal.SIGKILL),
        2: lambda: (grid.local.start_worker(2), wait_listening(grid, 2, after=1)),
    })
    spec = JobSpec(model_path=grid.model, rounds=4, min_workers=2, round_timeout=8, max_retries=0, epochs=1)
    result, _ = run_job(grid, spec, hooks)
    counts = [r.updates for r in result.rounds]
    assert counts[0] == 3 and counts[1] == 2, counts  # round 2 closed at its deadline with the two alive
    assert counts[-1] == 3, counts  # the restarted worker (same key) is back by the last round
    with grid.local.client(1) as reader:
        assert verify_chain(reader, result.head).ok


def test_a_round_short_of_updates_is_announced_again_and_then_closes(grid_factory):
    grid = grid_factory(workers=2, nodes=2)
    stalled = grid.local.workers[1]
    hooks = Hooks(on_start={2: lambda: stalled.send_signal(signal.SIGSTOP)})
    hooks.on_round_retry = lambda round, attempt, received, needed: (
        hooks.retries.append((round, attempt, received)), stalled.send_signal(signal.SIGCONT))
    spec = JobSpec(model_path=grid.model, rounds=3, min_workers=2, round_timeout=6, max_retries=2)
    try:
        result, _ = run_job(grid, spec, hooks)
    finally:
        stalled.send_signal(signal.SIGCONT)
    assert hooks.retries == [(2, 1, 1)]
    assert [(r.updates, r.attempts) for r in result.rounds] == [(2, 1), (2, 2), (2, 1)]
    assert result.rounds[1].metrics["attempts"] == 2.0  # recorded in the chain too


def test_worker_keeps_serving_after_its_daemon_restarts(grid_factory):
    grid = grid_factory(workers=2, nodes=2)
    devnet = grid.local.devnet
    job_topic = messages.job_topic("restart-job")

    def restart_node_1():
        devnet.stop_node(1)
        devnet.start_node(1)
        # the worker's subscription reconnects by itself; wait until node 0 sees it on the topic again
        with grid.local.client(0) as ipfs:
            wait_for(lambda: devnet.nodes[1].peer_id in ipfs.pubsub_peers(job_topic), timeout=60,
                     what="worker1's subscription to come back")

    spec = JobSpec(model_path=grid.model, rounds=3, min_workers=2, round_timeout=20, max_retries=2,
                   job_id="restart-job")
    result, _ = run_job(grid, spec, Hooks(on_end={1: restart_node_1}))
    assert [r.updates for r in result.rounds] == [2, 2, 2]
    assert "resubscrib" in grid.local.worker_log(1).lower() or "reconnect" in grid.local.worker_log(1).lower()


def test_client_killed_mid_job_resumes_from_its_chain_without_losing_or_repeating_a_round(grid_factory):
    """With FedAdam, whose server moments no block stores: the resumed client must replay them from the
    chain exactly as `chain verify` does, or the rounds after the restart do not verify."""
    grid = grid_factory(workers=2, nodes=2)
    key, heads = grid.root / "client.key", grid.root / "heads"
    common = ["--api", grid.local.apis[0], "--key", str(key), "--head-dir", str(heads), "--round-timeout", "30"]
    client = subprocess.Popen([sys.executable, "-m", "grid_ipfs.client", "submit", *common, "--model", str(grid.model),
                               "--rounds", "5", "--min-workers", "2", "--job", "resumable", "--json",
                               "--aggregation", "FedAdam", "--param", "eta=0.01"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with grid.local.client(0) as ipfs:
            def rounds_done() -> int:
                head = read_head(heads / "resumable.head")
                return ipfs.dag_get(f"{head}/round") if head else 0
            wait_for(lambda: rounds_done() >= 2, timeout=120, what="two rounds in the chain")
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        client.stdout.close()
        client.stderr.close()

    resumed = subprocess.run([sys.executable, "-m", "grid_ipfs.client", "resume", *common, "--job", "resumable",
                              "--min-workers", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    output = json.loads(resumed.stdout)
    assert output["rounds"] and output["rounds"][-1]["round"] == 5
    with grid.local.client(1) as reader:
        blocks = [block for _, block in walk(reader, output["head"])][::-1]
        assert [b["round"] for b in blocks] == [0, 1, 2, 3, 4, 5]  # one line: each round exactly once
        assert blocks[0]["config"]["rounds"] == 5
        assert {b["aggregation"]["name"] for b in blocks[1:]} == {"fedadam"}
        report = verify_chain(reader, output["head"])
        assert report.ok, report.reason
        assert report.server_state.step == 5  # five accepted aggregates folded into the moments


def test_unreachable_daemon_is_a_one_line_error_for_every_command(tmp_path):
    api = "/ip4/127.0.0.1/tcp/9"  # discard port: nothing listens there
    shard = tmp_path / "s.npz"
    data.save_shard(shard, *data.split_iid(*data.digits()[:2], 1)[0])
    zoo.digits_mlp().save(tmp_path / "m.keras")
    commands = {
        "worker": ["grid_ipfs.worker", "--api", api, "--data", str(shard), "--key", str(tmp_path / "w.key")],
        "client": ["grid_ipfs.client", "submit", "--api", api, "--model", str(tmp_path / "m.keras"), "--rounds", "1",
                   "--key", str(tmp_path / "c.key")],
        "chain": ["grid_ipfs.chain", "verify", "--api", api,
                  "bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"],
    }
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1, (name, proc.stderr)
        assert lines and lines[-1].startswith("error:") and "127.0.0.1" in lines[-1] and "9" in lines[-1], (name, lines)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)


def _append_blocks(api: str, head_file: str, who: int, count: int) -> None:
    """Runs in a spawned process: append `count` blocks to the shared chain."""
    from grid_ipfs.ipfs.cids import cid_str

    identity = Identity.generate()
    with IPFSClient(api) as ipfs:
        log = ChainLog(ipfs, head_file)
        genesis = [b for _, b in walk(ipfs, log.head)][-1]
        for i in range(count):
            head = [b for _, b in walk(ipfs, log.head)][0]
            log.append({"job": genesis["job"], "round": head["round"] + 1, "model": cid_str(genesis["model"]),
                        "weights": cid_str(genesis["weights"]), "aggregation": {"name": "fedavg", "params": {}},
                        "updates": [{"worker": identity.id, "weights": cid_str(genesis["weights"]), "num_examples": 1,
                                     "metrics": {"who": float(who), "i": float(i)},
                                     "message": ipfs.block_put(f"update {who} {i}".encode(), codec="raw")}],
                        "metrics": {}}, identity)


def test_two_processes_appending_to_one_head_file_lose_no_block(tmp_path):
    from grid_ipfs.ipfs.devnet import Devnet
    from grid_ipfs.payloads import weights_to_bytes

    with Devnet.up(1, tmp_path / "net") as net, net.nodes[0].client() as ipfs:
        import numpy as np

        head_file = tmp_path / "race.head"
        weights = ipfs.add(weights_to_bytes([np.zeros(3, np.float32)]))
        ChainLog(ipfs, head_file).append({"job": "race", "round": 0, "model": ipfs.add(b"model"), "weights": weights,
                                          "aggregation": {"name": "init", "params": {}}, "updates": [],
                                          "metrics": {}}, Identity.generate())
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_append_blocks, args=(net.apis[0], str(head_file), who, 6)) for who in (1, 2)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(120)
            assert [p.exitcode for p in procs] == [0, 0]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(10)
        blocks = [b for _, b in walk(ipfs, read_head(head_file))][::-1]
        assert [b["seq"] for b in blocks] == list(range(13))
        writers = sorted((b["updates"][0]["metrics"]["who"], b["updates"][0]["metrics"]["i"]) for b in blocks[1:])
        assert writers == sorted((float(w), float(i)) for w in (1, 2) for i in range(6))


def test_job_completes_under_a_flood_of_hostile_messages(grid_factory, caplog):
    """1000 hostile messages during a 4-round job (tests/hostile.py: 20 kinds, deep JSON, huge numbers and
    control characters included): it completes, both workers stay up, every message is dropped and counted."""
    caplog.set_level(logging.INFO, logger="grid_ipfs.client")
    client_identity = Identity.generate()
    grid = grid_factory(workers=2, nodes=2)
    # workers follow only jobs signed by our client: restart them with --trust-clients
    trust = grid.root / "trusted-clients.txt"
    trust.write_text(client_identity.id + "\n")
    for i in range(2):
        grid.local.stop_worker(i)
        grid.local.start_worker(i, ["--trust-clients", str(trust)])
    allowed = set(worker_ids(grid))
    flood = {}

    def start_flood():
        flood["proc"] = subprocess.Popen([sys.executable, "-m", "tests.hostile", "--api", grid.local.apis[1],
                                          "--job", "flooded", "--count", "1000", f"--victim={sorted(allowed)[0]}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish_flood():  # the whole flood lands while the job is live: the last round waits for it
        wait_for(lambda: flood["proc"].poll() is not None, timeout=180, what="the flood to be sent")

    spec = JobSpec(model_path=grid.model, rounds=4, min_workers=2, round_timeout=30, max_retries=1, job_id="flooded")
    try:
        with grid.local.client(0) as ipfs:
            client = Client(ipfs, client_identity, head_dir=grid.root / "heads", allowed_workers=allowed,
                            callbacks=[Hooks(on_start={1: start_flood, 4: finish_flood})])
            result = client.submit(spec)
        out, err = flood["proc"].communicate(timeout=120)
    finally:
        if "proc" in flood and flood["proc"].poll() is None:
            flood["proc"].kill()
            flood["proc"].wait(10)
    assert out.strip(), f"the flood sender printed nothing (exit {flood['proc'].returncode}): {err[-2000:]}"
    sent = json.loads(out)
    assert sent["sent"] == 1000, (sent, err)
    assert [r.updates for r in result.rounds] == [2, 2, 2, 2]
    assert all(proc.poll() is None for proc in grid.local.workers), "a worker died under the flood"
    dropped = result.dropped
    # every hostile message reached the client and was counted as its kind (pubsub on loopback loses none)
    from tests.hostile import DROPPED_AS

    expected: dict[str, int] = {}
    for kind, count in sent["by_kind"].items():
        expected[DROPPED_AS[kind]] = expected.get(DROPPED_AS[kind], 0) + count
    assert len(sent["by_kind"]) == 20 and expected == {  # the counts README's reliability table states
        "malformed": 650, "not allowed": 100, "not from a worker": 150, "late or rejected update": 100}, expected
    assert {k: dropped.get(k, 0) for k in ("malformed", "not allowed", "not from a worker")} == \
        {k: expected[k] for k in ("malformed", "not allowed", "not from a worker")}, (dropped, expected)
    # strangers' updates are counted as late or rejected, and so would be a late honest one: tell them
    # apart by the sender each drop's log line names
    update_drops = [r.getMessage() for r in caplog.records if r.name == "grid_ipfs.client" and (
        r.getMessage().startswith("dropped a message (late): update ") or " rejected update from " in r.getMessage())]
    assert "rejected update" not in dropped  # refused updates are counted apart from dropped messages
    assert dropped.get("late", 0) + sum(result.rejected.values()) == len(update_drops), (dropped, result.rejected)
    from_strangers = [line for line in update_drops if not any(w[:12] in line for w in allowed)]
    assert len(from_strangers) == expected["late or rejected update"] == 100, (from_strangers, expected)
    assert "failed" not in dropped and "too many examples" not in dropped, dropped
    for i in range(2):
        log = grid.local.worker_log(i)
        assert "dropped a message" in log and "nested 60000 levels deep" in log and "nested 1002 levels" in log
        assert "Traceback" not in log and "\x1b" not in log and "handling it failed" not in log
    print(f"\nflood: sent {sent['by_kind']}\nclient dropped {dropped}")
