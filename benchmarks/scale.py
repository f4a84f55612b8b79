"""scale: 1, 4, 16 and 64 workers hosted in one process on 4 nodes — s/round, fetch time, the owner's peak RSS.

One 4-node devnet; for each count, one `python -m grid_ipfs.pool` process hosts that many workers (each
its own key, shard, daemon connection and subscriptions, round-robin over the nodes: 64 workers are 16
per node), each with its own IID shard of digits (`split_iid(seed=0)` into 64, ~22 examples each), so
every point does the same work per worker (weak scaling). The model is a wide digits MLP
(`zoo.digits_mlp` with 16384 hidden units, ~4.9 MB of float32 weights) so that weights transfers and
the owner's memory are visible next to the ~0.5 GB a TensorFlow process starts with.

The client runs as its real CLI in a subprocess, `python -m grid_ipfs.client submit ... --json`, through
`benchmarks.probe client` (the same `main`, with `aggregate` and `IPFSClient.cat` timed); its peak RSS
is its own VmHWM, read by the probe as the client ends. (Until 2026-12-07 it was ru_maxrss from
`os.wait4`, which Linux starts at the parent's high-water mark: it measured this runner, not the owner.)
`s_per_round` is the mean of the rounds' own seconds (joining excluded), `fetch_s` the client's time in
`IPFSClient.cat` per round, summed over its threads (its daemon fetching each update from the network on a
fetch thread, then the client reading it back from its daemon to add it), `critical_s` the mean of the
blocks' `critical_path_s` (the slowest worker's own compute, not counting its wait for the pool's shared
Keras runtime) and `coordination` the rest of the round as a share of it. FedAvg streams: each update is
added to the running mean as it arrives, so the owner's memory should not grow with the workers; the target
is growth from 1 to 64 workers under 2 model copies. `--quick`: 1 and 4 workers, 2 rounds.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import cell, log, table, verdict

NAME = "scale"
DEFAULT_REPEATS = (2, 1)
NODES = 4
HIDDEN = 16384
COUNTS = {False: (1, 4, 16, 64), True: (1, 4)}
ROUNDS = {False: 3, True: 2}
SHARDS = 64
RSS_TARGET_COPIES = 2.0
"""Owner peak RSS growth from the fewest to the most workers, in model copies (issue 14's target)."""


def run(ctx: common.Context) -> list[dict]:
    from grid_ipfs import data, zoo
    from grid_ipfs.localgrid import LocalGrid

    counts, rounds = COUNTS[ctx.quick], ROUNDS[ctx.quick]
    x_train, y_train, _, _ = data.digits()
    shards = data.write_shards(ctx.workdir / "shards", data.split_iid(x_train, y_train, SHARDS, seed=0))
    # One initial model per repeat: seeded training from the same weights would give byte-identical updates,
    # which a later repeat would find already in the owner's node and never fetch (a cache hit, not a warm
    # network: the 0.77 s "warm" fetch of an earlier version of this benchmark).
    model_paths = [ctx.workdir / f"digits_wide-{rep}.keras" for rep in range(ctx.repeats)]
    for rep, path in enumerate(model_paths):
        zoo.digits_mlp(seed=rep, hidden=HIDDEN).save(path)
    weights_mb = sum(w.nbytes for w in zoo.digits_mlp(seed=0, hidden=HIDDEN).get_weights()) / 1e6
    ctx.info.update(counts=list(counts), rounds=rounds, nodes=NODES, hidden=HIDDEN, weights_mb=round(weights_mb, 2),
                    examples_per_worker=len(data.load_shard(shards[0])[0]), epochs=1, batch_size=32,
                    hosting="one grid_ipfs.pool process per count")

    rows = []
    grid = LocalGrid(ctx.workdir / "grid", [], nodes=NODES)
    grid.start()
    try:
        for n in counts:
            start_pool(grid, shards[:n])
            samples = []
            for rep in range(ctx.repeats):
                sample = run_client(grid, ctx.workdir / f"client-{n}-{rep}", model_paths[rep], n, rounds)
                samples.append(sample)
                log(f"scale {n} worker(s) repeat {rep + 1}/{ctx.repeats}: {sample['s_per_round']:.2f} s/round, "
                    f"first round {sample['first_round_s']:.2f} s, later rounds {sample['later_round_s']:.2f} s, "
                    f"fetch {sample['fetch_s']:.2f} s/round, critical path {sample['critical_s']:.2f} s, "
                    f"owner peak RSS {sample['client_peak_rss_mb']:.0f} MB, rounds {sample['round_s']}")
            grid.stop_pool()
            row = {"workers": n}
            row.update(common.fold(samples, ["s_per_round", "aggregate_s", "client_peak_rss_mb", "fetch_s",
                                             "critical_s", "coordination", "first_round_s", "later_round_s"]))
            fresh, warm = samples[0]["s_per_round"], samples[-1]["s_per_round"]
            row["fresh_over_warm"] = fresh / warm if len(samples) > 1 else None
            row.update(nodes=NODES, rounds=rounds, weights_mb=round(weights_mb, 2), repeats=ctx.repeats)
            rows.append(row)
    finally:
        grid.stop()
    return rows


def start_pool(grid, shards: list[Path], timeout: float = 600.0) -> None:
    """Host `shards`' workers in one pool process and wait until every one of them listens."""
    offset = len(grid.pool_log())
    grid.start_pool(shards)
    deadline = time.monotonic() + timeout
    while grid.pool_log()[offset:].count("listening on") < len(shards):
        if grid.pool.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the pool of {len(shards)} workers did not start: {grid.pool_log()[offset:][-1500:]}")
        time.sleep(0.2)


def run_client(grid, directory: Path, model_path: Path, n: int, rounds: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / "probe"
    command = [sys.executable, "-m", "benchmarks.probe", "client", "--out", str(probe), "--",
               "submit", "--api", grid.apis[0], "--model", str(model_path), "--rounds", str(rounds),
               "--min-workers", str(n), "--epochs", "1", "--batch-size", "32", "--round-timeout", "600",
               "--join-timeout", "600", "--key", str(directory / "client.key"), "--head-dir", str(directory / "heads"),
               "--job", f"bench-scale-{n}-{secrets.token_hex(3)}", "--json"]
    with open(directory / "stdout.json", "wb") as out, open(directory / "stderr.log", "wb") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=common.child_env(),
                                cwd=common.REPO)
    try:
        finished = common.wait_for_exit(proc, timeout=600 + 600 * rounds)
    finally:
        common.stop_process(proc)
    if finished.returncode != 0:
        raise RuntimeError(f"client exited with {finished.returncode}: "
                           f"{(directory / 'stderr.log').read_text(errors='replace')[-1500:]}")
    job = json.loads((directory / "stdout.json").read_text())
    timings = json.loads(probe.with_suffix(".json").read_text())
    round_s = [r["seconds"] for r in job["rounds"]]
    if any(r["updates"] != n for r in job["rounds"]):
        log(f"scale: a round closed with fewer than {n} updates: {[r['updates'] for r in job['rounds']]}")
    critical = [r["metrics"].get("critical_path_s", float("nan")) for r in job["rounds"]]
    return {"s_per_round": statistics.fmean(round_s), "round_s": [round(x, 2) for x in round_s],
            "first_round_s": round_s[0], "later_round_s": statistics.median(round_s[1:]) if len(round_s) > 1 else None,
            "aggregate_s": statistics.fmean(timings["aggregate_s"]) if timings["aggregate_s"] else None,
            "fetch_s": sum(timings["cat_s"]) / len(round_s), "client_peak_rss_mb": timings["peak_rss_mb"],
            "critical_s": statistics.fmean(critical),
            "coordination": statistics.fmean(1 - c / s for c, s in zip(critical, round_s))}


def render(rows: list[dict]) -> str:
    body = table(["workers", "nodes", "s/round", "round 1 s", "rounds 2+ s", "fresh job / next job",
                  "critical path s", "coordination share", "fetch updates s/round", "owner peak RSS MB"],
                 [[r["workers"], r["nodes"], cell(r, "s_per_round"), cell(r, "first_round_s"), cell(r, "later_round_s"),
                   "-" if r.get("fresh_over_warm") is None else f"{r['fresh_over_warm']:.2f}", cell(r, "critical_s"),
                   cell(r, "coordination", "{:.0%}"), cell(r, "fetch_s"), cell(r, "client_peak_rss_mb", "{:.0f}")]
                  for r in rows])
    if not rows:
        return body
    first, last = rows[0], rows[-1]
    growth = last["client_peak_rss_mb"] - first["client_peak_rss_mb"]
    copies = growth / first["weights_mb"]
    target = (f"Owner peak RSS from {first['workers']} to {last['workers']} workers grows by {growth:.0f} MB = "
              f"{copies:.1f} model copies (target < {RSS_TARGET_COPIES:g}): "
              f"{verdict(copies < RSS_TARGET_COPIES)}." if last["workers"] > first["workers"] else "")
    return (f"{body}\n\n{target}\n\nWide digits MLP ({first['weights_mb']:.1f} MB of float32 weights), "
            f"{first['rounds']} rounds per job, 1 epoch per round on ~22 examples per worker, every count's "
            f"workers hosted in one `grid_ipfs.pool` process; median (min–max) over {first['repeats']} repeat(s), "
            f"each from its own initial weights (so no repeat finds its updates already in the owner's node). "
            f"`fresh job / next job` divides the first repeat's s/round (the first job these workers run) by the "
            f"last one's (a later job on the same daemons and workers). "
            f"`critical path` is the blocks' `critical_path_s`: the slowest worker's own compute, the round's "
            f"length if every worker had its own machine; `coordination share` is the rest of the round "
            f"(announcing, fetching, aggregating, and here also the hosted workers' turns at the one Keras "
            f"runtime, which separate machines would not queue for). `fetch updates` is the client's time in "
            f"`IPFSClient.cat` per round, summed over its 4 fetch threads (so it can exceed s/round). Peak RSS "
            f"is the client process's own high-water mark (VmHWM, read as it ends); FedAvg adds each update to "
            f"its running mean as it arrives (`client.collect.Stream`), so what the owner holds does not grow "
            f"with the workers.")


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
