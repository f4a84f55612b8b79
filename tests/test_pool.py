"""Workers hosted in one process (`python -m grid_ipfs.pool`), through the real protocol on real daemons:
each signs with its own key, the owner streams their updates into FedAvg, and the chain verifies."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest

from grid_ipfs import data, zoo
from grid_ipfs.chain import verify_chain, walk
from grid_ipfs.localgrid import LocalGrid
from grid_ipfs.payloads import DEFLATE_MAGIC

from .cli import run_cli
from .waiting import wait_for

pytestmark = pytest.mark.integration
WORKERS = 8


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, WORKERS, seed=0))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    with LocalGrid(root / "grid", shards, nodes=2, pooled=True) as grid:
        wait_for(lambda: grid.pool_log().count("listening on") == WORKERS, timeout=120,
                 what=f"{WORKERS} hosted workers listening")
        yield SimpleNamespace(grid=grid, root=root)


def _submit(pooled, job: str, *extra: str) -> dict:
    root, grid = pooled.root, pooled.grid
    proc = run_cli("grid_ipfs.client", "submit", "--api", grid.apis[0], "--model", str(root / "digits.keras"),
                   "--rounds", "2", "--epochs", "3", "--min-workers", str(WORKERS),
                   "--eval-data", str(root / "test.npz"), "--key", str(root / "client.key"),
                   "--head-dir", str(root / "heads"), "--job", job, "--json", *extra, timeout=400)
    assert proc.returncode == 0, f"client failed:\n{proc.stderr}\n{grid.pool_log()}"
    return json.loads(proc.stdout)


def test_eight_workers_in_one_process_each_sign_their_updates_and_the_chain_verifies(pooled):
    grid = pooled.grid
    assert grid.workers == [] and grid.pool is not None  # one process hosts them all
    result = _submit(pooled, "pooled")
    assert [r["updates"] for r in result["rounds"]] == [WORKERS, WORKERS]
    with grid.client(1) as reader:
        report = verify_chain(reader, result["head"])
        assert report.ok, report.reason
        blocks = [block for _, block in walk(reader, result["head"])]
    workers = {u["worker"] for block in blocks for u in block["updates"]}
    assert len(workers) == WORKERS  # eight identities, one per shard: each update is its own worker's
    assert all(block["metrics"]["critical_path_s"] > 0 for block in blocks[:-1])
    assert result["rounds"][-1]["metrics"]["val_accuracy"] > 0.75, result["rounds"][-1]["metrics"]


def test_an_int8_job_sends_compressed_deltas_that_the_chain_records_and_verifies(pooled):
    grid = pooled.grid
    result = _submit(pooled, "pooled-int8", "--compression", "int8")
    with grid.client(1) as reader:
        report = verify_chain(reader, result["head"])  # decodes every update against its round's base
        assert report.ok, report.reason
        blocks = [block for _, block in walk(reader, result["head"])]
        assert blocks[-1]["config"]["compression"] == "int8"
        full = len(reader.cat(blocks[0]["weights"]))
        sizes = []
        for update in blocks[0]["updates"]:
            sent = reader.cat(update["weights"])
            assert sent.startswith(DEFLATE_MAGIC)
            sizes.append(len(sent))
    assert max(sizes) * 3 < full, (sizes, full)  # the small digits MLP: its headers weigh in too
    assert result["rounds"][-1]["metrics"]["val_accuracy"] > 0.75, result["rounds"][-1]["metrics"]


def test_the_pool_stops_on_sigterm_with_one_summary_line(pooled):
    grid = pooled.grid
    pool = grid.pool
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(60) == 0, grid.pool_log()
    assert f"pool stopped: {WORKERS} workers" in grid.pool_log()
    assert "Traceback" not in grid.pool_log()


def test_hosted_workers_share_one_model_per_file_while_a_job_holds_it():
    """`SharedModels`: one load (and one Keras trace) per model file for all the workers of a pool; a
    different file is its own model; an entry goes when no joined job holds its model any more."""
    import gc

    from grid_ipfs.worker import SharedModels

    class Model:  # what a loader returns; only identity and lifetime matter here
        pass

    shared, loads = SharedModels(), []

    def load():
        loads.append(Model())
        return loads[-1]

    first = shared.get(b"model file A", load)
    assert shared.get(b"model file A", load) is first and len(loads) == 1
    other = shared.get(b"model file B", load)
    assert other is not first and len(loads) == 2
    del first, other
    loads.clear()
    gc.collect()
    assert shared.get(b"model file A", load) is loads[0] and len(loads) == 1  # loaded again: nobody held it
