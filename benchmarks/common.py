"""What every benchmark shares: its command line, statistics over repeats, table cells, process hygiene.

A benchmark module defines `NAME`, `DEFAULT_REPEATS = (full, quick)`, `run(ctx) -> result` and
`render(result) -> str` (a markdown section), and ends with `sys.exit(common.main_for(sys.modules[__name__]))`.
`main_for` gives it the command line that `run.py` uses (`--repeats`, `--quick`, `--workdir`, `--out`,
`--context`) and that a person uses to run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent


def setup_env() -> None:
    """Quiet TensorFlow, and let every child process import `benchmarks` and `grid_ipfs` from this checkout."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ["PYTHONUNBUFFERED"] = "1"
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


setup_env()

_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr (stdout is for the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr,
          flush=True)


@dataclass
class Context:
    """What `run(ctx)` gets: how many repeats, quick or full, a private directory, earlier results."""

    repeats: int
    quick: bool
    workdir: Path
    previous: dict = field(default_factory=dict)
    """Results of the benchmarks run before this one in the same `run.py` invocation."""
    info: dict = field(default_factory=dict)
    """Filled by `run`: parameters and notes that go to results.json's meta (not to the result)."""


# -- statistics --------------------------------------------------------------------------------------------


def stats(samples: Sequence[float]) -> dict[str, float]:
    """`{"median", "min", "max"}` of the samples (all NaN when there are none)."""
    values = [float(v) for v in samples if v is not None]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fold(repeats: Sequence[dict], keys: Iterable[str], digits: int = 4) -> dict:
    """One row from per-repeat rows: `key` is the median over repeats, `key_min` / `key_max` the extremes;
    None when no repeat measured it (so a table shows "-" and no target is judged on a NaN)."""
    out: dict = {}
    for key in keys:
        if all(r.get(key) is None for r in repeats):
            out[key] = out[f"{key}_min"] = out[f"{key}_max"] = None
            continue
        s = stats([r[key] for r in repeats if r.get(key) is not None])
        out[key] = round(s["median"], digits)
        out[f"{key}_min"] = round(s["min"], digits)
        out[f"{key}_max"] = round(s["max"], digits)
    return out


def cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    """A table cell: the median, then (min–max) over repeats."""
    if row.get(key) is None:
        return "-"
    median, lo, hi = row[key], row.get(f"{key}_min"), row.get(f"{key}_max")
    text = fmt.format(median)
    if lo is not None and hi is not None:
        text += f" ({fmt.format(lo)}–{fmt.format(hi)})"
    return text


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- processes ---------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONUNBUFFERED": "1",
            **extra}


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: this one process, by PID."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


@dataclass
class Finished:
    returncode: int
    seconds: float


def wait_for_exit(proc: subprocess.Popen, timeout: float) -> Finished:
    """Wait for `proc`; on timeout it is killed and TimeoutError raised.

    Not for memory: the kernel's ru_maxrss of an exec'd child (`os.wait4`) starts at its parent's
    high-water mark, which Linux carries over exec, so it reported this runner's ~0.8 GB as the owner's
    peak. A child measures its own with `peak_rss_mb()` before it exits.
    """
    started = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, timeout=10)
        raise TimeoutError(f"{proc.args[:4]}... still running after {timeout:.0f}s (killed)") from None
    return Finished(proc.returncode, time.monotonic() - started)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A live process's own peak resident set in MB (VmHWM: this program's, from its exec on)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def _proc_mentions(pid: int, needle: bytes) -> bool:
    for name in ("cmdline", "environ"):
        try:
            if needle in Path(f"/proc/{pid}/{name}").read_bytes():
                return True
        except OSError:
            continue
    return False


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def leftovers(directory: Path) -> list[int]:
    """PIDs of live processes whose command line or environment names `directory` (ours, by construction:
    daemons get IPFS_PATH under it, workers and clients get shard/key paths under it)."""
    needle = str(Path(directory).resolve()).encode()
    mine = _ancestors()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid in mine:
            continue
        try:
            state = (entry / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if state != "Z" and _proc_mentions(pid, needle):
            found.append(pid)
    return sorted(found)


def kill_leftovers(directory: Path, grace: float = 10.0) -> list[int]:
    """Stop, by PID, every process that `leftovers` finds for `directory`; returns their PIDs."""
    from grid_ipfs.ipfs.devnet import Devnet

    for devnet_dir in sorted({p.parent for p in Path(directory).glob("**/devnet.json")}
                             | {p.parent.parent for p in Path(directory).glob("**/node*/daemon.pid")}):
        with contextlib.suppress(Exception):
            Devnet.down(devnet_dir)
    pids = leftovers(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in leftovers(directory)):
        time.sleep(0.1)
    for pid in leftovers(directory):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "httpcore", "absl", "tensorflow", "flwr"):
        logging.getLogger(name).setLevel(logging.WARNING)


def raise_interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so `finally` blocks stop what was started."""
    raise KeyboardInterrupt(f"signal {signum}")


def main_for(module: ModuleType, argv: list[str] | None = None) -> int:
    """The command line of one benchmark module: run it, write `--out` JSON, print its table."""
    name = module.NAME
    full, quick = module.DEFAULT_REPEATS
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=module.__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, help=f"repeats (default {full}, {quick} with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--workdir", type=Path, help="private directory (default: a new temporary one)")
    parser.add_argument("--out", type=Path, help="write {result, info} as JSON here")
    parser.add_argument("--context", type=Path, help="JSON of results from earlier benchmarks of this run")
    args = parser.parse_args(argv)
    repeats = args.repeats or (quick if args.quick else full)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    signal.signal(signal.SIGTERM, raise_interrupt)  # so `finally` blocks stop what was started
    quiet_logging()

    own_dir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"grid-bench-{name}-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.context.read_text()) if args.context and args.context.is_file() else {}
    ctx = Context(repeats=repeats, quick=args.quick, workdir=workdir, previous=previous)
    ctx.info.update(repeats=repeats, quick=args.quick, loadavg_start=loadavg())
    started = time.monotonic()
    status, result = "ok", None
    try:
        result = module.run(ctx)
        if isinstance(result, dict) and "skipped" in result:
            status = "skipped"
    except KeyboardInterrupt:
        status, result = "error", {"error": "interrupted"}
    except Exception as exc:  # recorded, not raised: one broken benchmark must not lose the others
        traceback.print_exc()
        status, result = "error", {"error": f"{type(exc).__name__}: {exc}".strip()[:2000]}
    finally:
        stopped = kill_leftovers(workdir)
        if stopped:
            log(f"{name}: stopped {len(stopped)} leftover process(es) by PID: {stopped}")
        if own_dir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    ctx.info.update(status=status, seconds=round(time.monotonic() - started, 1), loadavg_end=loadavg())
    payload = {"result": result, "info": ctx.info}
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\n## {name}\n\n{render_safely(module.render, result)}\n")
    return 0 if status != "error" else 1


def render_safely(render: Callable[[object], str], result: object) -> str:
    if isinstance(result, dict) and "error" in result:
        return f"Failed: `{result['error']}`"
    if isinstance(result, dict) and "skipped" in result:
        return f"Not measured: {result['skipped']}"
    try:
        return render(result)
    except Exception as exc:  # a rendering bug must not lose the numbers
        return f"(could not render: {type(exc).__name__}: {exc})\n\n```json\n{json.dumps(result, indent=1)}\n```"


# -- CPU accounting ----------------------------------------------------------------------------------------


class CpuSampler:
    """CPU seconds of groups of processes, polled on a thread, so that what each group spent between two
    instants can be read afterwards. Instants are `time.perf_counter()` values, which on Linux is
    CLOCK_MONOTONIC, the same clock in every process: a child's own round timestamps can be used.

    Why: on one machine, everything a round costs competes for the same cores, so seconds per round
    hide who spent them; CPU seconds per round by process kind (workers, daemons, owner) say it."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.groups: dict[str, set[int]] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, group: str, pid: int) -> None:
        self.groups.setdefault(group, set()).add(pid)

    def __enter__(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._poll, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.sample()))
            self._stop.wait(self.interval)

    def sample(self) -> dict[str, float]:
        """CPU seconds (user + system) of each group now; a process gone keeps its last reading."""
        out = {}
        for group, pids in list(self.groups.items()):
            total = 0.0
            for pid in list(pids):
                seconds = process_cpu_seconds(pid)
                if seconds is not None:
                    self._last[pid] = seconds
                total += self._last.get(pid, 0.0)
            out[group] = total
        return out

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each group spent from `start` to `end` (perf_counter), from the nearest samples."""
        if not self.samples:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - start))[1]
        last = min(self.samples, key=lambda s: abs(s[0] - end))[1]
        return {group: last.get(group, 0.0) - first.get(group, 0.0) for group in last}


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` (all its threads) from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS
