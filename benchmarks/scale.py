"""scale: 1, 2, 4, 8 and 16 workers on 4 nodes — seconds per round, aggregation time, the client's peak RSS.

One 4-node devnet; workers are added as the count grows (round-robin over the nodes, so 16 workers are
4 per node), each with its own 90-example IID shard of digits (`split_iid(seed=0)` into 16), so every
point does the same work per worker (weak scaling). The model is a wide digits MLP (`zoo.digits_mlp`
with 16384 hidden units, ~4.9 MB of float32 weights) so that weights transfers and the client's memory
are visible next to the ~0.5 GB a TensorFlow process starts with.

The client runs as its real CLI in a subprocess, `python -m grid_ipfs.client submit ... --json`, through
`benchmarks.probe client` (the same `main`, with `aggregate` and `IPFSClient.cat` timed); its peak RSS
is the kernel's ru_maxrss for that PID from `os.wait4`. `s_per_round` is the mean of the rounds' own
seconds (joining excluded), `aggregate_s` the mean time of the client's `aggregate` call per round,
`fetch_s` the client's time in `IPFSClient.cat` (fetching the updates) per round.
`--quick`: 1, 2 and 4 workers, 2 rounds.
"""

from __future__ import annotations

import json
import secrets
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.common import cell, log, table

NAME = "scale"
DEFAULT_REPEATS = (2, 1)
NODES = 4
HIDDEN = 16384
COUNTS = {False: (1, 2, 4, 8, 16), True: (1, 2, 4)}
ROUNDS = {False: 3, True: 2}
SHARDS = 16


def run(ctx: common.Context) -> list[dict]:
    from grid_ipfs import data, zoo
    from grid_ipfs.localgrid import LocalGrid

    counts, rounds = COUNTS[ctx.quick], ROUNDS[ctx.quick]
    x_train, y_train, _, _ = data.digits()
    shards = data.write_shards(ctx.workdir / "shards", data.split_iid(x_train, y_train, SHARDS, seed=0))
    model_path = ctx.workdir / "digits_wide.keras"
    zoo.digits_mlp(seed=0, hidden=HIDDEN).save(model_path)
    weights_mb = sum(w.nbytes for w in zoo.digits_mlp(seed=0, hidden=HIDDEN).get_weights()) / 1e6
    ctx.info.update(counts=list(counts), rounds=rounds, nodes=NODES, hidden=HIDDEN, weights_mb=round(weights_mb, 2),
                    examples_per_worker=len(data.load_shard(shards[0])[0]), epochs=1, batch_size=32)

    rows = []
    grid = LocalGrid(ctx.workdir / "grid", [], nodes=NODES)
    grid.start()
    try:
        for n in counts:
            while len(grid.workers) < n:
                grid.add_worker(shards[len(grid.workers)])
            samples = []
            for rep in range(ctx.repeats):
                sample = run_client(grid, ctx.workdir / f"client-{n}-{rep}", model_path, n, rounds)
                samples.append(sample)
                log(f"scale {n} worker(s) repeat {rep + 1}/{ctx.repeats}: {sample['s_per_round']:.2f} s/round, "
                    f"aggregate {sample['aggregate_s'] * 1000:.1f} ms, fetch {sample['fetch_s']:.2f} s/round, "
                    f"client peak RSS {sample['client_peak_rss_mb']:.0f} MB, rounds {sample['round_s']}")
            row = {"workers": n}
            row.update(common.fold(samples, ["s_per_round", "aggregate_s", "client_peak_rss_mb", "fetch_s"]))
            row.update(nodes=NODES, rounds=rounds, weights_mb=round(weights_mb, 2), repeats=ctx.repeats)
            rows.append(row)
    finally:
        grid.stop()
    return rows


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
        finished = common.wait_with_rusage(proc, timeout=600 + 600 * rounds)
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
    return {"s_per_round": statistics.fmean(round_s), "round_s": [round(x, 2) for x in round_s],
            "aggregate_s": statistics.fmean(timings["aggregate_s"]) if timings["aggregate_s"] else None,
            "fetch_s": sum(timings["cat_s"]) / len(round_s), "client_peak_rss_mb": finished.peak_rss_mb}


def render(rows: list[dict]) -> str:
    body = table(["workers", "nodes", "s/round", "aggregate s", "fetch updates s/round", "client peak RSS MB",
                  "updates held at once MB"],
                 [[r["workers"], r["nodes"], cell(r, "s_per_round"), cell(r, "aggregate_s", "{:.4f}"),
                   cell(r, "fetch_s"), cell(r, "client_peak_rss_mb", "{:.0f}"), f"{r['workers'] * r['weights_mb']:.0f}"]
                  for r in rows])
    if not rows:
        return body
    first, last = rows[0], rows[-1]
    extra = last["workers"] - first["workers"]
    growth = last["client_peak_rss_mb"] - first["client_peak_rss_mb"]
    per_worker = growth / extra if extra else float("nan")
    return (f"{body}\n\nWide digits MLP ({first['weights_mb']:.1f} MB of float32 weights), {first['rounds']} rounds "
            f"per job, 1 epoch on 90 examples per worker; median (min–max) over {first['repeats']} repeat(s). "
            f"`fetch updates` is the client's time in `IPFSClient.cat` per round, summed over "
            f"its fetch threads (it fetches up to 4 updates at once, so this can exceed s/round). "
            f"Peak RSS is the client process's ru_maxrss (`os.wait4`), a high-water mark that "
            f"TensorFlow's start-up already sets near 0.7 GB, so a few updates hide under it; from "
            f"{first['workers']} to {last['workers']} workers it grows by {growth:.0f} MB ({per_worker:.1f} MB per "
            f"extra worker for {first['weights_mb']:.1f} MB updates). The last column is what the client holds "
            f"by design: `client.collect.collect` keeps every fetched update of the round in `collected` until "
            f"`_close_round` aggregates them (no streaming into `aggregate.RunningFedAvg`), so memory grows "
            f"with workers x model size.")


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
