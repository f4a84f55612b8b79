"""`make bench` = `python -m benchmarks.run [--only NAME[,NAME]] [--repeats N] [--quick]`.

Runs each benchmark in its own process (`python -m benchmarks.NAME`, a private temporary directory, a time
limit), then rewrites `benchmarks/results.json` and `benchmarks/RESULTS.md` with what this run measured:
every figure is the median over repeats with its min and max, next to the machine, the versions and the
exact command. After each benchmark, anything still running that names its directory is stopped by PID.
With `--only`, the other benchmarks keep their sections from the results.json being replaced, marked as
carried over from the run that measured them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import ORDER, common
from benchmarks.common import log, table, verdict

RESULTS_JSON = common.BENCH_DIR / "results.json"
RESULTS_MD = common.BENCH_DIR / "RESULTS.md"
TIME_LIMIT = {False: 7200.0, True: 1200.0}  # seconds per benchmark: full run, --quick


# -- machine and versions -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _version(*dists: str) -> str | None:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def _run_text(command: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=common.REPO)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _daemon() -> str:
    from grid_ipfs.ipfs.devnet import Daemon, DevnetError

    try:
        daemon = Daemon.find()
    except DevnetError as exc:
        return f"none ({exc})"
    if daemon.kind == "kubo":
        return f"Kubo {_run_text([daemon.binary, 'version', '--number']) or '?'}"
    package = common.REPO / "node_modules" / "ipfs" / "package.json"
    with contextlib.suppress(OSError, ValueError):
        return f"js-ipfs {json.loads(package.read_text())['version']} on Node {_run_text(['node', '--version'])}"
    return "js-ipfs"


def collect_meta(command: str) -> dict:
    import grid_ipfs

    commit = _run_text(["git", "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
                    "memory_gib": _memory_gib(), "loadavg_start": common.loadavg()},
        "versions": {
            "python": platform.python_version(),
            "grid_ipfs": f"{grid_ipfs.__version__} ({commit or 'no git'}{', uncommitted changes' if dirty else ''})",
            "tensorflow": _version("tensorflow-cpu", "tensorflow"), "keras": _version("keras"),
            "numpy": _version("numpy"), "httpx": _version("httpx"), "daemon": _daemon(),
        },
    }


# -- running ------------------------------------------------------------------------------------------------


def run_one(name: str, args: argparse.Namespace, root: Path, results: dict) -> dict:
    """Run `benchmarks.NAME` in its own process; returns `{"result", "info"}`."""
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    out, context = root / f"{name}.out.json", root / f"{name}.context.json"
    context.write_text(json.dumps({k: v for k, v in results.items() if k != "meta"}))
    command = [sys.executable, "-m", f"benchmarks.{name}", "--workdir", str(workdir), "--out", str(out),
               "--context", str(context)]
    if args.quick:
        command.append("--quick")
    if args.repeats:
        command += ["--repeats", str(args.repeats)]
    limit = TIME_LIMIT[args.quick]
    log(f"{name}: starting ({'quick, ' if args.quick else ''}limit {limit / 60:.0f} min)")
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=common.REPO, env=common.child_env())
    error = None
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        error = f"time limit of {limit:.0f}s reached; stopped"
        proc.send_signal(signal.SIGTERM)  # the benchmark's finally blocks stop its daemons and workers
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    except BaseException:
        common.stop_process(proc, timeout=90)
        raise
    finally:
        stopped = common.kill_leftovers(workdir)
        if stopped:
            log(f"{name}: stopped {len(stopped)} leftover process(es) by PID: {stopped}")
    if out.is_file():
        payload = json.loads(out.read_text())
    else:
        payload = {"result": {"error": error or f"exited with code {proc.returncode} without a result"},
                   "info": {"status": "error"}}
    payload["info"].setdefault("seconds", round(time.monotonic() - started, 1))
    log(f"{name}: {payload['info'].get('status')} in {payload['info']['seconds']:.0f}s")
    return payload


# -- RESULTS.md ---------------------------------------------------------------------------------------------


def _targets(results: dict) -> list[list[str]]:
    rows = []

    def ok(result) -> bool:
        return isinstance(result, (dict, list)) and not (isinstance(result, dict)
                                                         and ({"error", "skipped"} & set(result)))

    t = results.get("transfer")
    if ok(t):
        from benchmarks.transfer import MB, TARGET_RATIO

        for r in t:
            rows.append(["transfer", f"{r['bytes'] / MB:.0f} MB: grid/raw throughput >= {TARGET_RATIO}",
                         f"{r['ratio']:.3f}", verdict(r["ratio"] >= TARGET_RATIO)])
    p = results.get("pubsub")
    if ok(p):
        from benchmarks.pubsub import TARGET_P50_MS

        rows.append(["pubsub", f"p50 < {TARGET_P50_MS:.0f} ms", f"{p['p50_ms']:.1f} ms",
                     verdict(p["p50_ms"] < TARGET_P50_MS)])
    from benchmarks.overhead import TARGET_ACC_DIFF, TARGET_OVERHEAD_S

    for key in ("overhead", "overhead_cnn"):
        o = results.get(key)
        if not ok(o):
            continue
        rows.append([key, f"overhead <= {TARGET_OVERHEAD_S} s/round", f"{o['overhead_s_per_round']:.3f} s",
                     verdict(o["overhead_s_per_round"] <= TARGET_OVERHEAD_S)])
        rows.append([key, f"grid and in-process accuracy within {TARGET_ACC_DIFF}", f"{o['acc_diff']:.4f}",
                     verdict(o["acc_diff"] <= TARGET_ACC_DIFF)])
        if key == "overhead_cnn":
            from benchmarks.overhead_cnn import TARGET_RATIO as CNN_RATIO

            rows.append([key, f"overhead / in-process time <= {CNN_RATIO}", f"{o['overhead_ratio']:.3f}",
                         verdict(o["overhead_ratio"] <= CNN_RATIO)])
            if o.get("coordination") is not None:
                from benchmarks.overhead_cnn import TARGET_COORDINATION

                rows.append([key, f"coordination <= {TARGET_COORDINATION:.0%} of the round",
                             f"{o['coordination']:.1%}", verdict(o["coordination"] <= TARGET_COORDINATION)])
    f = results.get("flower")
    if ok(f):
        from benchmarks.flower import TARGET_RATIO as FLOWER_RATIO
        from benchmarks.flower import flower_rows

        for r in flower_rows(f):
            rows.append(["flower", f"{r['task']}: grid / Flower s/round <= {FLOWER_RATIO:g}",
                         f"{r['ratio_grid_over_flower']:.2f}", verdict(r["ratio_grid_over_flower"] <= FLOWER_RATIO)])
    s = results.get("strategies")
    if ok(s):
        from benchmarks.strategies import BASELINE, TARGET_ACC_DROP

        for r in s["rows"]:
            if r.get("error"):
                measured = "failed"
            else:
                delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
                measured = f"{r['val_accuracy']:.4f} ({delta}), verify {'ok' if r['verify_ok'] else 'FAILED'}"
            rows.append(["strategies", f"{r['strategy']}: val_accuracy >= {BASELINE}'s - {TARGET_ACC_DROP}, chain "
                         "verifies", measured, verdict(r["met"])])
    sc = results.get("scale")
    if ok(sc) and len(sc) > 1 and sc[-1]["workers"] > sc[0]["workers"]:
        from benchmarks.scale import RSS_TARGET_COPIES

        growth = sc[-1]["client_peak_rss_mb"] - sc[0]["client_peak_rss_mb"]
        copies = growth / sc[0]["weights_mb"]
        rows.append(["scale", f"owner peak RSS growth {sc[0]['workers']} -> {sc[-1]['workers']} workers < "
                     f"{RSS_TARGET_COPIES:g} model copies", f"{growth:.0f} MB = {copies:.1f} copies",
                     verdict(copies < RSS_TARGET_COPIES)])
    c = results.get("compression")
    if ok(c):
        from benchmarks.compression import TARGET_POINTS, TARGET_RATIO

        for r in c["rows"]:
            if r["met"] is not None:
                rows.append(["compression", f"{r['task']} int8: >= {TARGET_RATIO:g}x fewer bytes, <= {TARGET_POINTS} "
                             "points lost", f"{r['ratio']:.2f}x, {r['points']:+.2f} points", verdict(r["met"])])
    a = results.get("asynchrony")
    if ok(a):
        from benchmarks.asynchrony import TARGET_POINTS as ASYNC_POINTS
        from benchmarks.asynchrony import TARGET_RATIO as ASYNC_RATIO

        for r in a["rows"]:
            if r["met"] is None:
                continue
            if r["speeds"] == "one slowed":
                measured = "never reached" if r["ratio"] is None else f"{r['ratio']:.2f}x sooner"
                rows.append(["asynchrony", f"{r['task']}, one worker 5x slower: async reaches {r['target']:g} > "
                             f"{ASYNC_RATIO:g}x sooner than sync", measured, verdict(r["met"])])
            else:
                rows.append(["asynchrony", f"{r['task']}, equal speeds: async final accuracy within {ASYNC_POINTS:g} "
                             "point of sync", f"{r['points']:+.2f} points", verdict(r["met"])])
    for name in ORDER:
        r = results.get(name)
        if isinstance(r, dict) and "skipped" in r:
            rows.append([name, "-", "not measured", "n/a"])
        elif isinstance(r, dict) and "error" in r:
            rows.append([name, "-", "failed", "n/a"])
    return rows


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    m, v = meta["machine"], meta["versions"]
    cores = m.get("cores") or 1
    load = m.get("loadavg_start") or [0.0]
    parts = [
        "# grid_ipfs benchmarks",
        f"Generated by `{meta['command']}` on {meta['started']} in {meta.get('total_seconds', 0) / 60:.1f} min"
        f"{' (**--quick**: smaller sizes, fewer repeats)' if meta.get('quick') else ''}. Rewritten on every run; "
        "`benchmarks/results.json` holds the same numbers. Every figure is the **median (min–max) over repeats**; "
        "how many repeats is stated under each table.",
    ]
    busy = max([*load, *(m.get("loadavg_end") or [])]) > 0.5 * cores
    if busy:
        parts.append(f"> **Noisy machine**: load average {load} at the start and {m.get('loadavg_end')} at the "
                     f"end on {cores} cores; other work was running, so treat timings as rough.")
    parts.append(table(["", ""], [
        ["machine", f"{m['cpu']}, {cores} cores, {m.get('memory_gib')} GiB, {m['platform']}"],
        ["load average (1, 5, 15 min)", f"{load} at start, {m.get('loadavg_end')} at end"],
        *[[k, str(val)] for k, val in v.items()],
    ]))
    carried = {n: i["carried_over"] for n, i in meta.get("benchmarks", {}).items() if i.get("carried_over")}
    for source in sorted(set(carried.values())):
        names = ", ".join(f"`{n}`" for n, src in carried.items() if src == source)
        parts.append(f"> **Carried over**: {names} did not run this time (`--only`); their sections are those of "
                     f"the run of {source}: measured on that run's machine and versions, not the ones above.")
    targets = _targets(results)
    if targets:
        parts += ["## Targets", table(["benchmark", "target", "measured (median)", "verdict"], targets)]
    for name in ORDER:
        if name not in results:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        title = "Profile" if name == "profile" else name
        parts += [f"## {title}", (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
                  common.render_safely(module.render, results[name])]
    runs = meta.get("benchmarks", {})
    if runs:
        parts += ["## Run log", table(["benchmark", "status", "seconds", "repeats", "load avg start", "load avg end"],
                                      [[n, f"{i.get('status')}{' (carried over)' if i.get('carried_over') else ''}",
                                        i.get("seconds"), i.get("repeats"), i.get("loadavg_start"),
                                        i.get("loadavg_end")] for n, i in runs.items()])]
    return "\n\n".join(parts) + "\n"


def carry_over(results: dict, ran: list[str]) -> list[str]:
    """With `--only`, keep the other benchmarks' sections of the results.json being replaced (labelled with
    the run they came from), so measuring one benchmark does not erase the last full run's figures."""
    try:
        previous = json.loads(RESULTS_JSON.read_text())
        source = f"{previous['meta']['started']} (`{previous['meta']['command']}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return []
    carried = [n for n in ORDER if n not in ran and n in previous]
    for name in carried:
        results[name] = previous[name]
        info = previous["meta"].get("benchmarks", {}).get(name, {})
        results["meta"]["benchmarks"][name] = {**info, "carried_over": info.get("carried_over", source)}
    if "flower" in carried and previous["meta"].get("versions", {}).get("flwr"):
        results["meta"]["versions"]["flwr"] = previous["meta"]["versions"]["flwr"]
    return carried


# -- command line -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(ORDER)}")
    parser.add_argument("--repeats", type=int, help="repeats for every benchmark (default: each one's own)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a few minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, repos)")
    args = parser.parse_args(argv)
    names = ORDER
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ORDER]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
        names = [n for n in ORDER if n in names]  # dependency order (flower after overhead)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")

    signal.signal(signal.SIGTERM, common.raise_interrupt)  # stop the running benchmark, then write what we have
    raw_argv = sys.argv[1:] if argv is None else argv
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(common.REPO)
    command = shlex.join([str(python), "-m", "benchmarks.run", *raw_argv])
    results: dict = {"meta": collect_meta(command)}
    results["meta"].update(quick=args.quick, repeats=args.repeats, benchmarks={})
    root = Path(tempfile.mkdtemp(prefix="grid-bench-")).resolve()
    started = time.monotonic()
    log(f"benchmarks {', '.join(names)} in {root}")
    try:
        for name in names:
            payload = run_one(name, args, root, results)
            results[name] = payload["result"]
            results["meta"]["benchmarks"][name] = payload["info"]
            if name == "flower" and isinstance(payload["result"], dict):
                results["meta"]["versions"]["flwr"] = payload["result"].get("flwr_version")
    finally:
        common.kill_leftovers(root)
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        if args.only:
            carried = carry_over(results, names)
            if carried:
                log(f"kept the sections of {', '.join(carried)} from the previous {RESULTS_JSON.name}")
        results["meta"]["machine"]["loadavg_end"] = common.loadavg()
        results["meta"]["total_seconds"] = round(time.monotonic() - started, 1)
        RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
        RESULTS_MD.write_text(render_markdown(results))
        log(f"wrote {RESULTS_JSON.relative_to(common.REPO)} and {RESULTS_MD.relative_to(common.REPO)}")
    failed = [n for n in names if results["meta"]["benchmarks"].get(n, {}).get("status") == "error"]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
