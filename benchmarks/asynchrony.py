"""asynchrony: time to a target accuracy, synchronous rounds against async ones (`--mode async`, FedBuff).

For each task, two grids of 4 worker processes on 3 daemons: one where worker 3 runs `--slowdown 5`
(each of its updates takes five times as long as its training did, as on a machine five times
slower), one where every worker has the same speed. On each, the same seeded job runs twice through
the client CLI: synchronous rounds (every round waits for all 4 workers) and async ones (a block per 3
accepted updates, `1/sqrt(1 + staleness)`, server_lr 1). Every chain is verified from a node the client
never used, each aggregate recomputed bit for bit.

Measured from the chains themselves: the seconds from genesis to the first block whose held-out
accuracy reaches the task's target (the blocks' own `time` fields), and the final held-out accuracy.
Targets (issue 15): with the slow worker, async reaches the target clearly sooner (sync/async time
ratio > 1.5); with equal speeds, async's final accuracy is within 1 point of sync's, for about the
same number of updates (blocks x 3 ~ rounds x 4). Tasks: the digits MLP (target 0.90) and, unless
`--quick`, the Fashion-MNIST CNN (8,000 training and 2,000 held-out images, target 0.75; needs
Debian's `dataset-fashion-mnist`).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

from benchmarks import common
from benchmarks.common import log, table, verdict

NAME = "asynchrony"
DEFAULT_REPEATS = (1, 1)
WORKERS = 4
SLOWDOWN = 5.0
BUFFER = 3
TARGET_RATIO = 1.5
TARGET_POINTS = 1.0
VERIFY_NODE = 2
JOB_TIMEOUT = 1800.0


def run(ctx: common.Context) -> dict:
    from benchmarks.overhead import digits_task
    from benchmarks.overhead_cnn import fashion_root, fashion_task
    from grid_ipfs.data import DataError

    tasks = [(digits_task(ctx.workdir / "digits", workers=WORKERS, rounds=8, epochs=1), 0.90)]
    not_run = None
    if not ctx.quick:
        try:
            fashion = fashion_task(ctx.workdir / "fashion", fashion_root(), 8_000, 2_000, 6, workers=WORKERS)
            tasks.append((fashion, 0.75))
        except DataError as exc:
            not_run = f"fashion_cnn: {exc}"
    rows = []
    for task, target in tasks:
        for slow in (True, False):
            rows += measure(ctx, task, target, slow)
    out = {"rows": judge(rows)}
    if not_run:
        out["not_run"] = not_run
    return out


def measure(ctx: common.Context, task, target: float, slow: bool) -> list[dict]:
    from grid_ipfs.localgrid import LocalGrid

    speeds = "one slowed" if slow else "equal"
    grid = LocalGrid(ctx.workdir / f"grid-{task.name}-{'slow' if slow else 'equal'}", task.shards[:-1], nodes=3)
    rows = []
    try:
        grid.start()
        grid.add_worker(task.shards[-1], ["--slowdown", str(SLOWDOWN)] if slow else [])
        for mode in ("sync", "async"):
            # the same number of updates either way: rounds x 4 workers = blocks x the buffer
            blocks = task.rounds if mode == "sync" else task.rounds * WORKERS // BUFFER
            job = run_job(grid, task, mode, blocks, ctx)
            rows.append({"task": task.name, "speeds": speeds, "mode": mode, "target": target, "blocks": blocks,
                         **from_chain(grid, job["head"], target)})
            r = rows[-1]
            log(f"asynchrony {task.name} {speeds} {mode}: target {target} at {r['to_target_s']} s, final "
                f"{r['val_accuracy']:.4f}, {r['seconds']:.0f} s, verify {r['verify_ok']}")
    finally:
        grid.stop()
    return rows


def run_job(grid, task, mode: str, blocks: int, ctx: common.Context) -> dict:
    job_id = f"bench-async-{task.name}-{mode}-{secrets.token_hex(3)}"
    command = [sys.executable, "-m", "grid_ipfs.client", "submit", "--api", grid.apis[0],
               "--model", str(task.model_path), "--rounds", str(blocks), "--min-workers", str(WORKERS),
               "--epochs", str(task.epochs), "--batch-size", str(task.batch_size), "--eval-data", str(task.test_path),
               "--key", str(ctx.workdir / "client.key"), "--head-dir", str(ctx.workdir / "heads"), "--job", job_id,
               "--join-timeout", "600", "--round-timeout", "600", "--json",
               *(["--mode", "async", "--buffer-size", str(BUFFER)] if mode == "async" else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=common.REPO,
                          env=common.child_env())
    if done.returncode != 0:
        raise RuntimeError(f"{job_id} exited with {done.returncode}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout)


def from_chain(grid, head: str, target: float) -> dict:
    """Seconds from genesis to the first block at `target` held-out accuracy (None: never), the final
    accuracy and the job's length, read from the chain on another node, which verifies it too."""
    from grid_ipfs.chain import verify_chain, walk

    with grid.client(VERIFY_NODE) as reader:
        report = verify_chain(reader, head)
        blocks = [block for _, block in walk(reader, head)][::-1]
    start = blocks[0]["time"]
    reached = next((b["time"] - start for b in blocks[1:] if b["metrics"].get("val_accuracy", 0.0) >= target), None)
    stale = [u["staleness"] for b in blocks[1:] for u in b["updates"] if "staleness" in u]
    return {"to_target_s": reached, "val_accuracy": blocks[-1]["metrics"]["val_accuracy"],
            "seconds": blocks[-1]["time"] - start, "updates": sum(len(b["updates"]) for b in blocks[1:]),
            "staleness_mean": sum(stale) / len(stale) if stale else None, "verify_ok": report.ok,
            "verify_reason": report.reason}


def judge(rows: list[dict]) -> list[dict]:
    """Fill, on each async row, `ratio` (sync's seconds to target / async's, with the slowed worker) or
    `points` (sync's final accuracy minus async's, equal speeds), and `met`. Pure, for tests."""
    for row in rows:
        row["ratio"] = row["points"] = row["met"] = None
        if row["mode"] != "async":
            continue
        sync = next((r for r in rows if r["mode"] == "sync" and r["task"] == row["task"]
                     and r["speeds"] == row["speeds"]), None)
        if sync is None:
            continue
        verified = bool(row["verify_ok"] and sync["verify_ok"])
        if row["speeds"] == "one slowed":
            if row["to_target_s"] is not None and sync["to_target_s"] is not None:
                row["ratio"] = sync["to_target_s"] / row["to_target_s"]
            elif row["to_target_s"] is not None:
                row["ratio"] = float("inf")  # async got there, sync never did
            row["met"] = verified and row["ratio"] is not None and row["ratio"] > TARGET_RATIO
        else:
            row["points"] = 100 * (sync["val_accuracy"] - row["val_accuracy"])
            row["met"] = verified and row["points"] <= TARGET_POINTS
    return rows


def render(r: dict) -> str:
    def num(value, fmt):
        return "-" if value is None else fmt.format(value)

    body = table(["task", "workers", "mode", "blocks", "updates", "s to target", "final val_accuracy", "staleness",
                  "s/job", "verify", "async vs sync", "target"],
                 [[row["task"], row["speeds"], row["mode"], row["blocks"], row["updates"],
                   num(row["to_target_s"], "{:.1f}") + f" ({row['target']:g})", f"{row['val_accuracy']:.4f}",
                   num(row["staleness_mean"], "{:.2f}"), f"{row['seconds']:.0f}",
                   "ok" if row["verify_ok"] else f"FAILED: {row['verify_reason']}",
                   (num(row["ratio"], "{:.2f}x sooner") if row["speeds"] == "one slowed"
                    else num(row["points"], "{:+.2f} points")),
                   verdict(row["met"]) if row["met"] is not None else ""] for row in r["rows"]])
    skipped = f"\n\nNot run: {r['not_run']}." if r.get("not_run") else ""
    return (f"{body}{skipped}\n\n{WORKERS} worker processes on 3 daemons; 'one slowed': worker 3 runs "
            f"`--slowdown {SLOWDOWN:g}`. Sync: every round waits for all {WORKERS}; async: a block per {BUFFER} "
            f"updates, staleness weight 1/sqrt(1+tau), server_lr 1, about the same number of updates in all. Seconds "
            f"to target are read off the chain (block times from genesis); every chain verified on node "
            f"{VERIFY_NODE}. Targets: with the slowed worker async reaches the target > {TARGET_RATIO:g}x sooner; "
            f"with equal speeds its final accuracy is within {TARGET_POINTS:g} point of sync's.")


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
