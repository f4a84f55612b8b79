"""Strangers' jobs on an open topic, on real daemons: a worker and a miner that trust nobody in particular
are sent hostile jobs (models that attack Keras, memory bombs, nested JSON, absurd numbers) from brand-new
keys. Both stay up, refuse each job with one log line naming the reason, stay within a memory bound, and
then take part in an honest job that trains and verifies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grid_ipfs import messages
from grid_ipfs.chain import verify_chain
from grid_ipfs.client import Client, JobSpec
from grid_ipfs.identity import Identity, b64url_encode
from grid_ipfs.ipfs import cid_str

from .test_faults import make_grid
from .test_vetting import edited, h5_bytes, layers, members, named_function_lambda, rezip
from .waiting import wait_for

pytestmark = pytest.mark.integration

PEAK_RSS_BOUND = 2 * 1024 ** 3
"""A worker or miner process (TensorFlow, a digits model) peaks near 0.7 GB; the wide-Dense bomb alone
would take 3.6 GB if Keras built it."""


def hostile_models(honest: bytes) -> dict[str, tuple[bytes, str]]:
    """job id -> (a .keras archive an attacker would announce, what the refusal must say)."""
    def wide(config):
        model = layers(config)
        model[0]["config"]["batch_shape"] = [None, 64]
        for layer in model[1:]:
            layer["config"]["units"] = 16384
            layer["build_config"]["input_shape"] = [None, 64 if layer is model[1] else 16384]
        config["config"]["build_input_shape"] = config["build_config"]["input_shape"] = [None, 64]

    def h5_bomb(handle):  # all fill value and gzip: a few KB on the wire, 4 GiB when read
        handle.create_dataset("layers/dense/vars/0", shape=(2 ** 30,), dtype="float32", chunks=(2 ** 20,),
                              compression="gzip")

    bomb = members(honest)
    bomb["model.weights.h5"] = h5_bytes(h5_bomb)
    return {
        "floatx": (edited(honest, lambda c: layers(c).append(
            named_function_lambda("keras.config", "set_floatx", {"inputs": "float16"}))),
            "(Lambda): "),
        "os-system": (edited(honest, lambda c: layers(c).append(
            named_function_lambda("os", "system", {"inputs": "touch /tmp/grid-ipfs-pwned"}))),
            "(Lambda): "),
        "wide-dense": (edited(honest, wide), "parameters"),
        "h5-bomb": (rezip(bomb), "layer values"),
    }


def publish_until(ipfs, data: bytes, seen, what: str) -> None:
    """Publish on the jobs topic until `seen()` holds: pubsub is lossy while the mesh forms."""
    def sent_and_seen():
        ipfs.pubsub_publish(messages.JOBS_TOPIC, data)
        return seen()
    wait_for(sent_and_seen, timeout=120, interval=1.0, what=what)


def signed_raw(obj: dict, identity: Identity) -> bytes:
    """Sign any object the way `messages.encode` does (without its checks), as an attacker can."""
    obj = {"v": 1, "from": identity.id, **obj}
    obj["sig"] = b64url_encode(identity.sign(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()))
    return json.dumps(obj).encode()


def a_line_says(log: str, *parts: str) -> bool:
    return any(all(part in line for part in parts) for line in log.splitlines())


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_worker_and_a_miner_survive_strangers_jobs_then_train_an_honest_one(tmp_path):
    grid = make_grid(tmp_path, workers=1, nodes=2)
    grid.local.start()
    try:
        miner = grid.local.add_miner(tmp_path / "test.npz", ["--aggregation", "median"])
        logs = {"worker": lambda: grid.local.worker_log(0), "miner": lambda: grid.local.miner_log(miner)}
        wait_for(lambda: "listening on" in logs["worker"](), timeout=120, what="the worker to listen")
        wait_for(lambda: "mining on" in logs["miner"](), timeout=120, what="the miner to start")
        procs = {"worker": grid.local.workers[0], "miner": grid.local.miners[miner]}
        with grid.local.client(1) as ipfs:
            honest = grid.model.read_bytes()
            for job_id, (archive, reason) in hostile_models(honest).items():
                stranger = Identity.generate()  # a brand-new key: nobody vouched for it
                job = messages.Job(job=job_id, model=cid_str(ipfs.add(archive)), owner=stranger.id,
                                   config={"epochs": 1, "batch_size": 32, "rounds": 1})
                refused = [(log, f"job {job_id}: ", reason) for log in logs.values()]
                publish_until(ipfs, messages.encode(job, stranger),
                              lambda refused=refused: all(a_line_says(log(), *parts) for log, *parts in refused),
                              f"the worker and the miner to refuse job {job_id} ({reason})")
            stranger = Identity.generate()
            hostile_raw = {
                "nested JSON": b"[" * 60_000 + b"]" * 60_000,
                "nested signed config": signed_raw({"type": "job", "job": "deep", "model": job.model,
                                                    "owner": stranger.id, "config": {
                                                        "epochs": 1, "batch_size": 32, "rounds": 1,
                                                        "x": json.loads("[" * 900 + "]" * 900)}}, stranger),
                "absurd epochs": signed_raw({"type": "job", "job": "epochs", "model": job.model,
                                             "owner": stranger.id,
                                             "config": {"epochs": 10 ** 400, "batch_size": 32, "rounds": 1}},
                                            stranger),
            }
            for kind, data in hostile_raw.items():
                counts = [(log, log().count("dropped a message")) for log in logs.values()]
                publish_until(ipfs, data,
                              lambda counts=counts: all(log().count("dropped a message") > n for log, n in counts),
                              f"the worker and the miner to drop the {kind} message")
        for name, proc in procs.items():
            assert proc.poll() is None, f"the {name} died: {logs[name]()[-2000:]}"
            peak = peak_rss(proc.pid)
            print(f"\n{name}: peak RSS {peak / 2 ** 20:.0f} MiB after the hostile jobs")
            assert peak < PEAK_RSS_BOUND, f"the {name} peaked at {peak} bytes"
            assert "Traceback" not in logs[name](), logs[name]()
        assert not Path("/tmp/grid-ipfs-pwned").exists()

        # ...and the same worker and miner then take part in an honest job
        spec = JobSpec(model_path=grid.model, rounds=2, min_workers=1, round_timeout=120, job_id="honest",
                       eval_data=tmp_path / "test.npz", accept="val_accuracy>=0.5", miners=1,
                       proposal_timeout=90)
        with grid.local.client(0) as ipfs:
            result = Client(ipfs, Identity.generate(), head_dir=tmp_path / "heads").submit(spec)
            report = verify_chain(ipfs, result.head)
        assert [r.updates for r in result.rounds] == [1, 1]
        assert report.ok, report.reason
        assert all(len(r.proposals) == 2 for r in result.rounds), [r.proposals for r in result.rounds]
        assert result.rounds[-1].metrics["val_accuracy"] >= 0.5
    finally:
        grid.local.stop()
