"""Workers hosted in one process (`python -m grid_ipfs.pool`), through the real protocol on real daemons:
each signs with its own key, the owner streams their updates into FedAvg, and the chain verifies."""

from __future__ import annotations

import json
import signal

import pytest

from grid_ipfs import data, zoo
from grid_ipfs.chain import verify_chain, walk
from grid_ipfs.localgrid import LocalGrid

from .cli import run_cli
from .waiting import wait_for

pytestmark = pytest.mark.integration
WORKERS = 8


def test_eight_workers_in_one_process_each_sign_their_updates_and_the_chain_verifies(tmp_path):
    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(tmp_path / "shards", data.split_iid(x_train, y_train, WORKERS, seed=0))
    data.save_shard(tmp_path / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(tmp_path / "digits.keras")
    with LocalGrid(tmp_path / "grid", shards, nodes=2, pooled=True) as grid:
        assert grid.workers == [] and grid.pool is not None  # one process hosts them all
        wait_for(lambda: grid.pool_log().count("listening on") == WORKERS, timeout=120,
                 what=f"{WORKERS} hosted workers listening")
        proc = run_cli("grid_ipfs.client", "submit", "--api", grid.apis[0], "--model", str(tmp_path / "digits.keras"),
                       "--rounds", "2", "--epochs", "3", "--min-workers", str(WORKERS),
                       "--eval-data", str(tmp_path / "test.npz"),
                       "--key", str(tmp_path / "client.key"), "--head-dir", str(tmp_path / "heads"),
                       "--job", "pooled", "--json", timeout=400)
        assert proc.returncode == 0, f"client failed:\n{proc.stderr}\n{grid.pool_log()}"
        result = json.loads(proc.stdout)
        assert [r["updates"] for r in result["rounds"]] == [WORKERS, WORKERS]
        with grid.client(1) as reader:
            report = verify_chain(reader, result["head"])
            assert report.ok, report.reason
            blocks = [block for _, block in walk(reader, result["head"])]
        workers = {u["worker"] for block in blocks for u in block["updates"]}
        assert len(workers) == WORKERS  # eight identities, one per shard: each update is its own worker's
        assert all(block["metrics"]["critical_path_s"] > 0 for block in blocks[:-1])
        assert result["rounds"][-1]["metrics"]["val_accuracy"] > 0.75, result["rounds"][-1]["metrics"]
        pool = grid.pool
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(60) == 0, grid.pool_log()
        assert f"pool stopped: {WORKERS} workers" in grid.pool_log()
        assert "Traceback" not in grid.pool_log()
