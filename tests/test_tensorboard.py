"""TensorBoard output: `block_scalars` (one block -> scalars), the event files `ScalarWriter` and
`write_chain` leave (read back with TensorBoard's own EventAccumulator: exact float32 values and steps),
the attacker's blocks (names that want to be paths, control characters, huge strings, non-numbers,
thousands of keys), and the whole path on real daemons: `client submit --tensorboard DIR` on a 2-worker
digits job, then `chain tensorboard` on its head, which must write the same scalars.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from grid_ipfs.chain import tensorboard as tb
from grid_ipfs.chain import walk
from grid_ipfs.chain.tensorboard import (
    GLOBAL_RUN,
    MAX_METRICS,
    MAX_TAG,
    MAX_WORKERS,
    Scalar,
    ScalarWriter,
    TensorBoardError,
    block_scalars,
    safe_tag,
    worker_run,
    write_chain,
)
from grid_ipfs.identity import Identity

from .cli import run_cli

UNREACHABLE = "/ip4/127.0.0.1/tcp/9"
TAG = re.compile(r"^(rejected/)?(round/)?[A-Za-z0-9_.-]{1,64}$")
WORKERS = sorted(Identity.generate().id for _ in range(2))


def read_scalars(logdir: Path) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """{run: {tag: [(step, value, wall time), ...]}} of every run under `logdir`, as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for folder in sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        out[folder.relative_to(logdir).as_posix()] = {
            tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return out


def f32(value: float) -> float:
    """What TensorBoard stores for `value` (a float32 scalar)."""
    return float(np.float32(value))


def chain(*blocks: dict) -> list[tuple[str, dict]]:
    """(cid, block) pairs genesis first, as `reversed(list(walk(...)))` gives them; each links its prev."""
    from multiformats import CID, multihash

    pairs = []
    for seq, block in enumerate(blocks):
        cid = str(CID("base32", 1, "dag-cbor", multihash.digest(f"block {seq}".encode(), "sha2-256")))
        block = {"seq": seq, "time": 1_800_000_000.0 + 10 * seq, "updates": [], **block}
        if seq:
            block["prev"] = pairs[-1][0]
        pairs.append((cid, block))
    return pairs


def entry(worker: str, n: int, **metrics) -> dict:
    return {"worker": worker, "num_examples": n, "metrics": metrics}


GENESIS = {"round": 0, "metrics": {"val_loss": 2.3, "val_accuracy": 0.1}}
ROUND_1 = {"round": 1, "metrics": {"loss": 0.9, "accuracy": 0.6, "val_loss": 0.8, "val_accuracy": 0.7},
           "updates": [entry(WORKERS[0], 30, loss=1.0, accuracy=0.5), entry(WORKERS[1], 10, loss=0.6, accuracy=0.9)]}


# -- block_scalars ----------------------------------------------------------------------------------------


def test_a_round_block_gives_its_metrics_its_extras_and_each_worker_s_metrics_at_its_round():
    scalars = block_scalars({**ROUND_1, "time": 1000.0}, previous_time=988.5)
    got = {(s.run, s.tag): s.value for s in scalars}
    assert got == {
        (GLOBAL_RUN, "loss"): 0.9, (GLOBAL_RUN, "accuracy"): 0.6, (GLOBAL_RUN, "val_loss"): 0.8,
        (GLOBAL_RUN, "val_accuracy"): 0.7, (GLOBAL_RUN, "round/updates"): 2.0,
        (GLOBAL_RUN, "round/examples"): 40.0, (GLOBAL_RUN, "round/seconds"): 11.5,
        (f"workers/{WORKERS[0]}", "loss"): 1.0, (f"workers/{WORKERS[0]}", "accuracy"): 0.5,
        (f"workers/{WORKERS[0]}", "round/examples"): 30.0,
        (f"workers/{WORKERS[1]}", "loss"): 0.6, (f"workers/{WORKERS[1]}", "accuracy"): 0.9,
        (f"workers/{WORKERS[1]}", "round/examples"): 10.0}
    assert {s.step for s in scalars} == {1} and {s.walltime for s in scalars} == {1000.0}


def test_genesis_is_step_0_without_seconds_and_an_async_entry_adds_its_staleness():
    assert {s.tag for s in block_scalars({**GENESIS, "time": 5.0})} == {"val_loss", "val_accuracy", "round/updates"}
    async_block = {"round": 7, "time": 9.0, "metrics": {"loss": 0.5, "staleness_mean": 1.5, "staleness_max": 3.0},
                   "updates": [{**entry(WORKERS[0], 8, loss=0.5), "staleness": 3}]}
    got = {(s.run, s.tag): (s.step, s.value) for s in block_scalars(async_block)}
    assert got[(f"workers/{WORKERS[0]}", "round/staleness")] == (7, 3.0)
    assert got[(GLOBAL_RUN, "staleness_max")] == (7, 3.0)


def test_a_rejected_try_writes_under_rejected_and_never_over_the_accepted_round():
    rejected = {**ROUND_1, "metrics": {**ROUND_1["metrics"], "val_accuracy": 0.2, "accepted": 0.0}}
    tags = {(s.run, s.tag) for s in block_scalars(rejected)}
    assert all(tag.startswith("rejected/") for _, tag in tags)
    assert (GLOBAL_RUN, "rejected/val_accuracy") in tags and (f"workers/{WORKERS[0]}", "rejected/loss") in tags


@pytest.mark.parametrize("block", [None, [], "block", {}, {"round": -1}, {"round": True}, {"round": 1.0},
                                   {"round": 1 << 63}, {"round": "1", "metrics": {"loss": 1.0}}])
def test_a_block_without_a_usable_round_gives_no_scalars(block):
    assert block_scalars(block) == []


def test_safe_tag_and_worker_run_never_give_a_path():
    assert safe_tag("val_accuracy") == "val_accuracy"
    assert safe_tag("../../etc/passwd") == ".._.._etc_passwd"
    assert safe_tag("a\nb\x1b[31m\u202e") == "a_b__31m_"
    assert safe_tag("x" * 10**6) == "x" * MAX_TAG
    assert safe_tag("") is None and safe_tag(3) is None and safe_tag(None) is None
    assert worker_run(WORKERS[0]) == f"workers/{WORKERS[0]}"
    for bad in ("../../etc", "a/b", "", ".", "..", "x" * 43, "x" * 10**6, None, 7, b"\x00" * 32, WORKERS[0] + "/"):
        assert worker_run(bad) is None


# -- the attacker's blocks --------------------------------------------------------------------------------


def hostile_metrics(many: bool = False) -> dict:
    metrics = {f"m{i:05d}": float(i) for i in range(5000)} if many else {}  # thousands of keys
    metrics.update({"../../../escape": 1.0, "/abs": 2.0, "a\x00b": 3.0, "\u202eevil\n[red]": 4.0, "y" * 10**6: 5.0,
                    "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "bool": True, "str": "0.5",
                    "none": None, "list": [1.0], "map": {"a": 1.0}, "bytes": b"\x01", "huge": 10**400,
                    "": 6.0, "round/updates": 7.0, "rejected/loss": 8.0})
    return metrics


def hostile_block(workers: int = MAX_WORKERS) -> dict:
    names = ["../../../etc/passwd", "/tmp/x", "C:\\win", "w\x1b]0;title\x07", "x" * 10**6, "", None, 12, ".."]
    updates = [{"worker": name, "num_examples": 5, "metrics": {"loss": 1.0}} for name in names]
    updates += [{"worker": WORKERS[0], "num_examples": True, "staleness": -1, "metrics": hostile_metrics(many=True)},
                {"worker": WORKERS[0], "num_examples": 9, "metrics": {"loss": 99.0}},  # the same worker again
                "not an entry", None, {"worker": WORKERS[1], "num_examples": 10**30, "metrics": "nope"}]
    updates += [entry(Identity.generate().id, 1, loss=0.1) for _ in range(workers + 20)]
    return {"round": 3, "time": 1.0, "metrics": hostile_metrics(), "updates": updates}


def test_thousands_of_metrics_write_the_first_max_metrics_by_name():
    scalars = block_scalars({"round": 1, "metrics": hostile_metrics(many=True)})
    assert [s.tag for s in scalars if not s.tag.startswith("round/")] == \
        [".._.._.._escape", "_abs", "a_b"] + [f"m{i:05d}" for i in range(MAX_METRICS - 3)]


def test_hostile_names_values_and_sizes_are_bounded_and_never_become_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "MAX_WORKERS", 16)  # the bound, not its size, is what is tested; fewer runs to read
    block = hostile_block(workers=16)
    scalars = block_scalars(block, previous_time=float("nan"))
    assert all(TAG.match(s.tag) for s in scalars), [s.tag for s in scalars if not TAG.match(s.tag)][:5]
    assert all(isinstance(s.value, float) and np.isfinite(s.value) for s in scalars)
    runs = {s.run for s in scalars}
    assert all(run == GLOBAL_RUN or re.fullmatch(r"workers/[A-Za-z0-9_-]{43}", run) for run in runs)
    # of the first 16 entries: 9 bad names, WORKERS[0] twice, 2 non-entries, WORKERS[1] with nothing usable,
    # 2 honest workers; the 20 entries after them are past the bound
    assert len(runs) == 1 + 1 + 2
    per_run_metrics = {}
    for s in scalars:
        if not s.tag.startswith("round/"):
            per_run_metrics[s.run] = per_run_metrics.get(s.run, 0) + 1
    assert per_run_metrics[f"workers/{WORKERS[0]}"] == MAX_METRICS
    global_tags = {s.tag for s in scalars if s.run == GLOBAL_RUN}
    assert "round/seconds" not in global_tags  # a non-finite previous time gives no duration
    assert {"round/updates", "round/examples"} <= global_tags  # a peer's "round/updates" key became round_updates
    assert {s.tag for s in scalars if s.run == GLOBAL_RUN} == {
        ".._.._.._escape", "_abs", "a_b", "_evil__red_", "y" * MAX_TAG, "round_updates", "rejected_loss",
        "round/updates", "round/examples"}
    first = [s for s in scalars if s.run == f"workers/{WORKERS[0]}"]
    assert all(s.value != 99.0 for s in first)  # the first entry of a worker counts, a second is ignored
    assert f"workers/{WORKERS[1]}" not in runs  # metrics "nope", examples 10**30: nothing usable

    written = write_chain(chain(GENESIS, block), tmp_path / "logs")
    assert written.runs == sorted(runs)
    assert sorted(p.relative_to(tmp_path / "logs").as_posix() for p in (tmp_path / "logs").rglob("*") if p.is_dir()) \
        == sorted({GLOBAL_RUN, "workers", *runs})
    assert list(tmp_path.iterdir()) == [tmp_path / "logs"]  # nothing outside the log directory
    back = read_scalars(tmp_path / "logs")
    assert back[GLOBAL_RUN]["round_updates"] == [(3, 7.0, 1.0)]
    assert back[GLOBAL_RUN][".._.._.._escape"] == [(3, 1.0, 1.0)]
    assert back[GLOBAL_RUN]["y" * MAX_TAG] == [(3, 5.0, 1.0)]


def test_numbers_beyond_float32_are_left_out_not_written_as_infinities():
    block = {"round": 1, "time": 1e300, "metrics": {"loss": 1e300, "low": -3.5e38, "ok": 3.4e38},
             "updates": [entry(WORKERS[0], 5, loss=1e39, accuracy=0.5)]}
    scalars = block_scalars(block, previous_time=0.0)
    assert {(s.run, s.tag) for s in scalars if s.tag not in ("round/updates", "round/examples")} == {
        (GLOBAL_RUN, "ok"), (f"workers/{WORKERS[0]}", "accuracy")}  # no round/seconds of 1e300 either
    assert all(np.isfinite(np.float32(s.value)) for s in scalars)


def test_a_writer_opens_at_most_max_runs_and_appends_to_a_run_s_closed_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "MAX_RUNS", 3)
    monkeypatch.setattr(tb, "MAX_OPEN", 1)  # every other write closes a file and reopens another
    with ScalarWriter(tmp_path) as writer:
        for step in range(3):
            writer.write([Scalar("global", "loss", step, step / 4, 100.0 + step),
                          Scalar("workers/a", "loss", step, 1 + step / 4, 100.0 + step)])
        assert writer.write([Scalar("workers/b", "loss", 0, 1.0), Scalar("workers/c", "loss", 0, 2.0)]) == 1
        assert writer.left_out == 1 and writer.runs == ["global", "workers/a", "workers/b"]
    assert len(list((tmp_path / "global").iterdir())) == 1  # one file per run, however often reopened
    back = read_scalars(tmp_path)
    assert back["global"]["loss"] == [(0, 0.0, 100.0), (1, 0.25, 101.0), (2, 0.5, 102.0)]
    assert back["workers/a"]["loss"] == [(0, 1.0, 100.0), (1, 1.25, 101.0), (2, 1.5, 102.0)]
    assert set(back) == {"global", "workers/a", "workers/b"}


def test_a_chain_of_more_workers_than_open_files_leaves_one_file_per_run(tmp_path, monkeypatch):
    # Each block writes every worker's run, more runs than MAX_OPEN: a file per run and block would
    # make a long chain leave rounds x workers files (a crafted chain: millions).
    monkeypatch.setattr(tb, "MAX_OPEN", 2)
    workers = sorted(Identity.generate().id for _ in range(5))
    rounds = [{"round": r, "metrics": {"loss": 1 / r}, "updates": [entry(w, 10, loss=1 / r) for w in workers]}
              for r in range(1, 5)]
    write_chain(chain(GENESIS, *rounds), tmp_path)
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 6  # global and the five workers
    back = read_scalars(tmp_path)
    assert [step for step, *_ in back[f"workers/{workers[0]}"]["loss"]] == [1, 2, 3, 4]


def test_a_log_directory_that_cannot_be_made_or_no_tensorboard_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TensorBoardError, match="cannot write TensorBoard logs to"):
        ScalarWriter(tmp_path / "file" / "logs")
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.record_writer", None)  # as if not installed
    with pytest.raises(TensorBoardError, match=r"pip install 'grid-ipfs\[tensorboard\]'"):
        ScalarWriter(tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


# -- write_chain ------------------------------------------------------------------------------------------


def test_write_chain_keeps_each_round_s_accepted_scalars_and_its_rejected_tries_apart(tmp_path):
    rejected = {**ROUND_1, "metrics": {**ROUND_1["metrics"], "val_accuracy": 0.25, "accepted": 0.0}}
    accepted = {**ROUND_1, "metrics": {**ROUND_1["metrics"], "accepted": 1.0}}
    round_2 = {"round": 2, "metrics": {"loss": 0.4, "val_accuracy": 0.8, "accepted": 1.0},
               "updates": [entry(WORKERS[1], 10, loss=0.3)]}
    done = write_chain(chain(GENESIS, rejected, accepted, round_2), tmp_path)
    assert (done.blocks, done.rounds, done.left_out) == (4, (0, 2), 0)
    back = read_scalars(tmp_path)
    t0 = 1_800_000_000.0
    assert back[GLOBAL_RUN]["val_accuracy"] == [(0, f32(0.1), t0), (1, f32(0.7), t0 + 20), (2, f32(0.8), t0 + 30)]
    assert back[GLOBAL_RUN]["rejected/val_accuracy"] == [(1, f32(0.25), t0 + 10)]
    assert back[GLOBAL_RUN]["round/seconds"] == [(1, 10.0, t0 + 20), (2, 10.0, t0 + 30)]  # from each block's prev
    assert back[GLOBAL_RUN]["rejected/round/seconds"] == [(1, 10.0, t0 + 10)]
    assert back[f"workers/{WORKERS[0]}"]["loss"] == [(1, 1.0, t0 + 20)]
    assert back[f"workers/{WORKERS[0]}"]["rejected/loss"] == [(1, 1.0, t0 + 10)]
    assert back[f"workers/{WORKERS[1]}"]["loss"] == [(1, f32(0.6), t0 + 20), (2, f32(0.3), t0 + 30)]
    assert done.scalars == sum(len(points) for tags in back.values() for points in tags.values())


def test_chain_tensorboard_cli_errors_are_one_line(tmp_path):
    head = chain(GENESIS)[0][0]
    proc = run_cli("grid_ipfs.chain", "tensorboard", "--api", UNREACHABLE, head, str(tmp_path / "logs"), timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    proc = run_cli("grid_ipfs.chain", "tensorboard", "--api", UNREACHABLE, "not-a-cid", str(tmp_path), timeout=120)
    assert proc.returncode == 1 and "not-a-cid" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "logs").exists()


# -- on real daemons: the live callback and the command after the fact -----------------------------------


@pytest.mark.integration
def test_the_callback_writes_what_write_chain_writes_and_a_bad_block_costs_a_warning(devnet, tmp_path, caplog):
    """A hand-built chain on a real daemon (genesis, a rejected try of round 1, round 1, round 2) fed to the
    callback's hooks as the client calls them; then a resumed job's callback, and a head that is no block."""
    from grid_ipfs.chain import ChainLog
    from grid_ipfs.client import RoundResult, TensorBoard
    from grid_ipfs.ipfs.cids import cid_str

    with devnet.nodes[0].client() as ipfs:
        owner, log = Identity.generate(), ChainLog(ipfs, None)
        weights, message = ipfs.add(b"weights"), ipfs.block_put(b"an update message", codec="raw")

        def append(r: int, metrics: dict, trained: list[tuple[str, int, float]]) -> str:
            updates = [{"worker": w, "weights": weights, "num_examples": n, "metrics": {"loss": loss},
                        "message": message} for w, n, loss in trained]
            return cid_str(log.append({"job": "tb-hooks", "round": r, "model": weights, "weights": weights,
                                       "aggregation": {"name": "fedavg" if r else "init", "params": {}},
                                       "updates": updates, "metrics": metrics}, owner))

        genesis = append(0, {"val_accuracy": 0.1}, [])
        rejected = append(1, {"loss": 0.9, "val_accuracy": 0.05, "accepted": 0.0}, [(WORKERS[0], 30, 1.0)])
        round_1 = append(1, {"loss": 0.8, "val_accuracy": 0.6, "accepted": 1.0},
                         [(WORKERS[0], 30, 0.9), (WORKERS[1], 10, 0.5)])
        round_2 = append(2, {"loss": 0.4, "val_accuracy": 0.8, "accepted": 1.0}, [(WORKERS[1], 10, 0.3)])
        result = lambda r, head: RoundResult(r, "", head, 1, {}, 1.0)  # noqa: E731 - only the head is read

        live = TensorBoard(tmp_path / "live", ipfs)
        live.on_job_start(None, genesis)
        live.on_round_rejected(result(1, rejected), "val_accuracy 0.05 fails val_accuracy>=0.5")
        live.on_round_end(result(1, round_1))
        live.on_round_end(result(1, cid_str(message)))  # not a chain block: a warning, and the job goes on
        live.on_round_end(result(2, round_2))
        live.on_job_end(None)
        resumed = TensorBoard(tmp_path / "resumed", ipfs)  # `client resume` after round 1
        resumed.on_job_start(None, round_1)
        resumed.on_round_end(result(2, round_2))
        resumed.on_job_end(None)
        done = write_chain(reversed(list(walk(ipfs, round_2))), tmp_path / "after")

    assert any("TensorBoard: could not read block" in r.getMessage() for r in caplog.records)
    after = read_scalars(tmp_path / "after")
    assert read_scalars(tmp_path / "live") == after and done.blocks == 4
    assert [(step, value) for step, value, _ in after[GLOBAL_RUN]["val_accuracy"]] == \
        [(0, f32(0.1)), (1, f32(0.6)), (2, f32(0.8))]
    assert [(step, value) for step, value, _ in after[GLOBAL_RUN]["rejected/val_accuracy"]] == [(1, f32(0.05))]
    assert [(step, value) for step, value, _ in after[f"workers/{WORKERS[0]}"]["loss"]] == [(1, f32(0.9))]
    resumed_back = read_scalars(tmp_path / "resumed")
    only_round_2 = {run: {tag: [p for p in points if p[0] == 2] for tag, points in tags.items()}
                    for run, tags in after.items()}
    only_round_2 = {run: {tag: points for tag, points in tags.items() if points} for run, tags in only_round_2.items()}
    assert resumed_back == {run: tags for run, tags in only_round_2.items() if tags}
    assert "round/seconds" in resumed_back[GLOBAL_RUN]  # measured from the block it resumed after



@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 2-round digits job of 2 workers, submitted with --tensorboard; the grid is stopped by PID after."""
    from grid_ipfs import data, zoo
    from grid_ipfs.localgrid import LocalGrid

    root = tmp_path_factory.mktemp("tensorboard")
    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, 2, seed=0))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    with LocalGrid(root / "grid", shards, nodes=2) as grid:
        proc = run_cli("grid_ipfs.client", "submit", "--api", grid.apis[0], "--model", str(root / "digits.keras"),
                       "--rounds", "2", "--min-workers", "2", "--epochs", "1", "--eval-data", str(root / "test.npz"),
                       "--key", str(root / "client.key"), "--head-dir", str(root / "heads"), "--job", "digits-tb",
                       "--tensorboard", str(root / "live"), "--json", timeout=400)
        logs = "\n".join(f"--- worker{i}\n{grid.worker_log(i)}" for i in range(2))
        assert proc.returncode == 0, f"client failed:\n{proc.stderr}\n{logs}"
        result = json.loads(proc.stdout)
        with grid.client(1) as reader:
            workers = sorted({u["worker"] for _, block in walk(reader, result["head"]) for u in block["updates"]})
        yield SimpleNamespace(grid=grid, root=root, result=result, workers=workers)


@pytest.mark.integration
def test_submit_tensorboard_writes_every_round_globally_and_per_worker(job):
    back = read_scalars(job.root / "live")
    rounds = job.result["rounds"]
    assert len(job.workers) == 2 and set(back) == {GLOBAL_RUN, *(f"workers/{w}" for w in job.workers)}
    glob = back[GLOBAL_RUN]
    assert [(step, value) for step, value, _ in glob["val_accuracy"]][1:] == \
        [(r["round"], f32(r["metrics"]["val_accuracy"])) for r in rounds]
    assert glob["val_accuracy"][0][0] == 0  # genesis: the initial weights' held-out score
    assert [(step, value) for step, value, _ in glob["loss"]] == \
        [(r["round"], f32(r["metrics"]["loss"])) for r in rounds]
    assert [value for _, value, _ in glob["round/updates"]] == [0.0, 2.0, 2.0]
    for worker in job.workers:
        run = back[f"workers/{worker}"]
        assert [step for step, _, _ in run["loss"]] == [1, 2]
        assert {"loss", "accuracy", "round/examples"} <= set(run)
    # the global loss is the workers' example-weighted mean, as the block records it
    for i, r in enumerate(rounds):
        weights = [back[f"workers/{w}"]["round/examples"][i][1] for w in job.workers]
        losses = [back[f"workers/{w}"]["loss"][i][1] for w in job.workers]
        assert np.average(losses, weights=weights) == pytest.approx(r["metrics"]["loss"], rel=1e-5)


@pytest.mark.integration
def test_chain_tensorboard_on_the_head_writes_the_same_scalars(job):
    out = job.root / "after"
    proc = run_cli("grid_ipfs.chain", "tensorboard", "--api", job.grid.apis[1], job.result["head"], str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: 3 blocks, rounds 0..2,") and "in 3 runs" in proc.stdout
    assert read_scalars(out) == read_scalars(job.root / "live")


@pytest.mark.integration
def test_submit_with_a_tensorboard_dir_that_cannot_be_made_fails_before_the_job(job):
    (job.root / "a-file").write_text("x")
    proc = run_cli("grid_ipfs.client", "submit", "--api", job.grid.apis[0], "--model", str(job.root / "digits.keras"),
                   "--rounds", "1", "--key", str(job.root / "client.key"), "--head-dir", str(job.root / "heads"),
                   "--job", "digits-tb-bad", "--tensorboard", str(job.root / "a-file" / "logs"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot write TensorBoard logs to")
    assert not (job.root / "heads" / "digits-tb-bad.head").exists()
