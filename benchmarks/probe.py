"""Run the real worker or client CLI with measurement hooks: `python -m benchmarks.probe ROLE --out F -- ARGS`.

* `worker`: `grid_ipfs.worker.main(ARGS)` under pyinstrument; at exit (SIGTERM stops the worker cleanly)
  writes `F.json` (time spent per step, see `profiling.WORKER_STEPS`) and `F.txt` (the call tree).
* `client`: the client CLI's `main(ARGS)` with the client's aggregation (`strategies.run` as
  `grid_ipfs.client.core` calls it) and `IPFSClient.cat` timed
  (thin wrappers: a few bytes of memory, no change to what the client does); writes `F.json`
  `{"aggregate_s": [...], "cat_s": [...], "peak_rss_mb": ...}` (the process's own peak resident set,
  read as it ends), plus a profile like the worker's with `--profile`.

Both exit with the CLI's exit code, and leave the CLI's stdout (`--json`) untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import common  # also sets the environment: TF quiet, PYTHONPATH


def _profiled(main, argv: list[str], out: Path, steps) -> int:
    from pyinstrument import Profiler

    from benchmarks import profiling

    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        return main(argv)
    finally:
        profiler.stop()
        session = profiler.last_session
        root = session.root_frame()
        _, function, suffix = steps[0]
        # the text tree first: rendering a long session takes seconds, and the .json, written last, is
        # what tells the benchmark that both files are complete
        out.with_suffix(".txt").write_text(profiler.output_text(unicode=False, color=False))
        out.with_suffix(".json").write_text(json.dumps(
            {"steps": profiling.breakdown(root, steps), "duration_s": session.duration,
             "tree": profiling.subtree_text(root, function, suffix)}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe")
    parser.add_argument("role", choices=["worker", "client"])
    parser.add_argument("--out", type=Path, required=True, help="output path stem (.json, .txt)")
    parser.add_argument("--profile", action="store_true", help="client: also run under pyinstrument")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    cli_args = argv[cut + 1:]  # everything after `--` is the CLI's own

    from benchmarks import profiling

    if args.role == "worker":
        from grid_ipfs import worker

        return _profiled(worker.main, cli_args, args.out, profiling.WORKER_STEPS)

    from grid_ipfs.client import core
    from grid_ipfs.client.__main__ import main as client_main
    from grid_ipfs.ipfs.rpc import IPFSClient

    timings: dict[str, list[float]] = {"aggregate_s": [], "cat_s": []}
    real_aggregate, real_cat = core.run, IPFSClient.cat

    def timed_aggregate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_aggregate(*a, **kw)
        finally:
            timings["aggregate_s"].append(time.perf_counter() - t0)

    def timed_cat(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real_cat(self, *a, **kw)
        finally:
            timings["cat_s"].append(time.perf_counter() - t0)

    core.run = timed_aggregate
    IPFSClient.cat = timed_cat
    try:
        if args.profile:
            return _profiled(client_main, cli_args, args.out.with_name(args.out.name + "-profile"),
                             profiling.CLIENT_STEPS)
        return client_main(cli_args)
    finally:
        args.out.with_suffix(".json").write_text(json.dumps({**timings, "peak_rss_mb": common.peak_rss_mb()}))


if __name__ == "__main__":
    sys.exit(main())
