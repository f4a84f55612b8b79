"""A job's chain as TensorBoard scalars: one step per round, one run for the job and one per worker.

`block_scalars(block)` is the one place a block becomes scalars; the client's live `TensorBoard`
callback (`grid_ipfs.client.tensorboard`, `client submit --tensorboard DIR`) and `python -m
grid_ipfs.chain tensorboard` (any chain, after the fact) both call it on the block as stored, so both
write the same events. The layout under the log directory:

    global/               the block's metrics under their own names (loss, accuracy, val_loss,
                          val_accuracy, eval_*, staleness_mean, ...) and round/updates,
                          round/examples, round/seconds (since the previous block)
    workers/<worker id>/  each update entry's metrics under the same names (so TensorBoard draws
                          every worker's `loss` on the global `loss` chart), round/examples and,
                          in async jobs, round/staleness

The step is the block's `round` (genesis is step 0: the held-out metrics of the initial weights), in
async jobs too; the event's wall time is the block's `time`. A try the acceptance rule rejected
(`metrics.accepted == 0.0`) writes the same tags prefixed `rejected/` at its round: the accepted
round's curves hold only what the job kept, and the turned-down tries stay visible beside them.

Everything here comes from whoever wrote the chain and from its workers, so nothing becomes a path
but a worker's canonical public id (43 base64url characters: no `/`, no `.`); a tag is a metric name
with every character outside `[A-Za-z0-9_.-]` replaced by `_`, cut at `MAX_TAG` characters (so no
name reaches the `round/` and `rejected/` tags); only finite real numbers are written; and a block
writes at most `MAX_METRICS` metrics per map and per-worker scalars for at most `MAX_WORKERS` entries,
while a writer opens at most `MAX_RUNS` runs. Values are stored as TensorBoard's float32 scalars
(`simple_value`), which any TensorBoard reads.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import GridError
from ..identity import is_public_id
from ..ipfs.cids import InvalidCID, cid_str

__all__ = ["GLOBAL_RUN", "MAX_METRICS", "MAX_RUNS", "MAX_TAG", "MAX_WORKERS", "Scalar", "ScalarWriter",
           "TensorBoardError", "block_scalars", "safe_tag", "worker_run", "write_chain"]

log = logging.getLogger("grid_ipfs.tensorboard")

GLOBAL_RUN = "global"
"""The run of the block's own metrics (the aggregate's)."""
WORKERS = "workers"
"""The folder of the per-worker runs, each named by its worker's public id."""
MAX_TAG = 64
"""Longest tag written for a metric name (longer names are cut; the first of two names cut alike wins)."""
MAX_METRICS = 64
"""Most metrics written from one map (a block's, or one update entry's), in sorted name order."""
MAX_WORKERS = 256
"""Most update entries of one block that get per-worker scalars (in the block's order, by worker id)."""
MAX_RUNS = 1024
"""Most runs (folders) one writer creates; scalars of further runs are left out, with one warning."""
MAX_OPEN = 32
"""Most event files one writer keeps open; the least recently written is closed, and reopened for
appending if its run is written again (one file per run, however many runs take turns)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_FILES = itertools.count(1)


class TensorBoardError(GridError):
    """The scalars cannot be written as asked (tensorboard not installed, a log directory that is a file...)."""


@dataclass(frozen=True)
class Scalar:
    run: str
    """The run's folder under the log directory: `global` or `workers/<worker id>`."""
    tag: str
    step: int
    value: float
    walltime: float | None = None


def safe_tag(name: object) -> str | None:
    """A metric name as a tag: `[A-Za-z0-9_.-]` kept, anything else `_`, at most `MAX_TAG` characters;
    None for a name that is not a non-empty string."""
    if not isinstance(name, str) or not name:
        return None
    return _UNSAFE.sub("_", name[:MAX_TAG])


def worker_run(worker: object) -> str | None:
    """The run of a worker's scalars, `workers/<id>`, for a canonical public id (43 characters of
    `[A-Za-z0-9_-]`: a folder name, never a path); None for anything else."""
    return f"{WORKERS}/{worker}" if is_public_id(worker) else None


def _number(value: object) -> float | None:
    """A finite real number as a float; None for bools, non-numbers, NaN, infinities and huge ints."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


FLOAT32_MAX = 3.4028234663852886e38


def _value(value: object) -> float | None:
    """A scalar's value: a finite number that stays finite as TensorBoard's float32 (a metric of 1e300
    would be written as inf), else None."""
    number = _number(value)
    return number if number is not None and abs(number) <= FLOAT32_MAX else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _metric_scalars(metrics: object, run: str, prefix: str, step: int, walltime: float | None) -> list[Scalar]:
    """The finite numeric metrics of one map, by sorted name, at most `MAX_METRICS` of them."""
    if not isinstance(metrics, dict):
        return []
    out, tags = [], set()
    for name in sorted(key for key in metrics if isinstance(key, str)):
        tag, value = safe_tag(name), _value(metrics[name])
        if tag is None or value is None or tag in tags:
            continue
        tags.add(tag)
        out.append(Scalar(run, prefix + tag, step, value, walltime))
        if len(tags) == MAX_METRICS:
            break
    return out


def block_scalars(block: dict, previous_time: float | None = None) -> list[Scalar]:
    """The scalars of one chain block (see the module docstring), [] for a block without a round.

    `previous_time` is the `time` of the block before it in the chain (its `prev`), for
    `round/seconds`; None for genesis or when unknown. Any dict is taken: what is malformed is left out.
    """
    if not isinstance(block, dict):
        return []
    step = _count(block.get("round"))
    if step is None or step >= 1 << 63:
        return []
    metrics = block.get("metrics") if isinstance(block.get("metrics"), dict) else {}
    prefix = "rejected/" if metrics.get("accepted", 1.0) == 0.0 else ""
    walltime = _number(block.get("time"))
    out = _metric_scalars(metrics, GLOBAL_RUN, prefix, step, walltime)
    updates = block.get("updates") if isinstance(block.get("updates"), list) else []
    examples = [n for u in updates if isinstance(u, dict) and (n := _count(u.get("num_examples"))) is not None]
    extras = {"updates": float(len(updates)), "examples": float(sum(examples)) if examples else None}
    previous = _number(previous_time)
    if walltime is not None and previous is not None:
        extras["seconds"] = walltime - previous
    out += [Scalar(GLOBAL_RUN, f"{prefix}round/{key}", step, value, walltime)
            for key, value in extras.items() if _value(value) is not None]
    seen: set[str] = set()
    for entry in updates[:MAX_WORKERS]:
        run = worker_run(entry.get("worker")) if isinstance(entry, dict) else None
        if run is None or run in seen:
            continue
        seen.add(run)
        out += _metric_scalars(entry.get("metrics"), run, prefix, step, walltime)
        for key in ("num_examples", "staleness"):
            value = _count(entry.get(key))
            if value is not None and value < 1 << 63:
                name = "examples" if key == "num_examples" else key
                out.append(Scalar(run, f"{prefix}round/{name}", step, float(value), walltime))
    return out


class ScalarWriter:
    """Writes `Scalar`s as TensorBoard event files under `logdir`, one folder per run.

    Synchronous, with TensorBoard's own record format and protos (the `tensorboard` package, which
    also shows them): what `write` was given is on disk when it returns, so a TensorBoard watching the
    folder shows a round as soon as its block is written, and no thread or queue outlives a call. The
    folder is created here; TensorBoardError when it cannot be, or when `tensorboard` is missing.
    """

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:
            raise TensorBoardError("TensorBoard output needs the tensorboard package: "
                                   "pip install 'grid-ipfs[tensorboard]'") from None
        self._record_writer, self._event, self._summary = RecordWriter, Event, Summary
        self.logdir = Path(logdir)
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TensorBoardError(f"cannot write TensorBoard logs to {logdir}: {exc.strerror or exc}") from None
        self._open: OrderedDict[str, object] = OrderedDict()
        self._files: dict[str, Path] = {}  # run -> its event file (one per run, at most MAX_RUNS)
        self._host = _UNSAFE.sub("_", socket.gethostname()[:MAX_TAG])
        self.left_out = 0
        """Scalars not written because their run would have been past `MAX_RUNS`."""
        self.written = 0

    @property
    def runs(self) -> list[str]:
        return sorted(self._files)

    def write(self, scalars: Iterable[Scalar]) -> int:
        """Write `scalars` (one event per run, step and wall time) and flush; the number written."""
        grouped: dict[tuple, list[Scalar]] = {}
        for s in scalars:
            grouped.setdefault((s.run, s.step, s.walltime), []).append(s)
        written = 0
        for (run, step, walltime), group in grouped.items():
            writer = self._writer(run)
            if writer is None:
                self.left_out += len(group)
                continue
            summary = self._summary(value=[self._summary.Value(tag=s.tag, simple_value=s.value) for s in group])
            event = self._event(step=step, wall_time=time.time() if walltime is None else walltime, summary=summary)
            writer.write(event.SerializeToString())
            written += len(group)
        self.flush()
        self.written += written
        return written

    def _writer(self, run: str):
        if run in self._open:
            self._open.move_to_end(run)
            return self._open[run]
        if run not in self._files and len(self._files) >= MAX_RUNS:
            if not self.left_out:
                log.warning("TensorBoard: more than %d runs; the scalars of further workers are left out", MAX_RUNS)
            return None
        if len(self._open) >= MAX_OPEN:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        path = self._files.get(run)
        if path is not None:  # closed to stay under MAX_OPEN: appended to, not a new file per turn
            writer = self._open[run] = self._record_writer(open(path, "ab"))  # noqa: SIM115 - kept open
            return writer
        folder = self.logdir.joinpath(*run.split("/"))
        folder.mkdir(parents=True, exist_ok=True)
        # unique (one counter per process) and sorted as written: TensorBoard reads a run's files in name order
        path = folder / f"events.out.tfevents.{int(time.time()):010d}.{self._host}.{os.getpid()}.{next(_FILES):06d}"
        writer = self._record_writer(open(path, "xb"))  # noqa: SIM115 - kept open across writes
        writer.write(self._event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._files[run] = path
        self._open[run] = writer
        return writer

    def flush(self) -> None:
        for writer in self._open.values():
            writer.flush()

    def close(self) -> None:
        while self._open:
            _, writer = self._open.popitem(last=False)
            writer.close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ChainScalars:
    """What `write_chain` wrote: blocks read, scalars written, the runs (folders) and the rounds."""

    blocks: int
    scalars: int
    runs: list[str]
    rounds: tuple[int, int] | None
    left_out: int = 0


def write_chain(blocks: Iterable, logdir: str | os.PathLike) -> ChainScalars:
    """Write a whole chain's scalars under `logdir`: `blocks` are the (cid, block) pairs of
    `reversed(list(walk(store, head)))`, genesis first, each block's `round/seconds` measured from its
    `prev`."""
    times: dict[str | None, float] = {}
    count, rounds = 0, []
    with ScalarWriter(logdir) as writer:
        for cid, block in blocks:
            writer.write(block_scalars(block, times.get(_key(block.get("prev")))))
            if _number(block.get("time")) is not None:
                times[_key(cid)] = block["time"]
            if _count(block.get("round")) is not None:
                rounds.append(block["round"])
            count += 1
        return ChainScalars(count, writer.written, writer.runs, (min(rounds), max(rounds)) if rounds else None,
                            writer.left_out)


def _key(cid: object) -> str | None:
    """A CID's text form, None for anything that is not one (genesis has no `prev`)."""
    try:
        return cid_str(cid) if cid is not None else None
    except (InvalidCID, TypeError, ValueError):
        return None
