"""A worker's witness: the chain heads it signed updates against, one small JSON-lines file per job.

Before a worker trains on a round it checks that the round's head descends from the last head it
signed against (`check_extends`): the same head (another attempt of the round) or a block whose `prev`
links lead back to exactly that head. So the owner cannot roll the job back, or fork it, under the
worker's signature: a worker that saw head H at seq S refuses any round whose chain has another block
at seq S. After checking it appends the round to its witness (`Witness.record`, fsynced before the
update is published) so the record survives a crash and outlives the job.

The file is also evidence for third parties: `python -m grid_ipfs.chain verify --witness FILE` checks a
chain against it (`check_chain_against`): every witnessed head must be the chain's block at its seq,
and a block that credits the worker in a witnessed round must credit it with weights the worker
announced for that round. A witness can be a stranger's, so reading one is bounded (`MAX_WITNESS_BYTES`,
`MAX_RECORDS`, `MAX_LINE_CHARS`) and every bad line is refused with one line naming the file and line.

One line per record: {"job", "owner", "worker", "round", "attempt", "head", "seq", "base", "update",
"time"}. A final line without its newline is a write torn by a crash (its update was never published):
it is ignored, and the next `record` cuts it off before appending.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from multiformats import CID

from ..identity import is_public_id
from ..ipfs.cids import InvalidCID, cid_str, parse_cid, same_cid
from ..ipfs.errors import DaemonUnreachable, IPFSError
from ..messages import valid_job_id
from ..text import printable
from .blocks import ChainError, decode_block

__all__ = ["MAX_LINE_CHARS", "MAX_RECORDS", "MAX_WITNESS_BYTES", "Witness", "WitnessError", "WitnessRecord",
           "check_chain_against", "check_extends"]

MAX_WITNESS_BYTES = 64 * 1024 * 1024
"""Largest witness file read: ~350 bytes a record, so ~190,000 rounds of one job (a chain holds at most
`MAX_BLOCKS`, 100,000 blocks, by default) with room for retried attempts."""
MAX_RECORDS = 250_000
"""Most records one witness file may hold."""
MAX_LINE_CHARS = 4096
"""Longest line of a witness file: a record's fields are short (ids, CIDs, numbers)."""
MAX_STEPS = 10_000
"""Most blocks `check_extends` walks back from a round's head to the last witnessed one."""

_FIELDS = ("job", "owner", "worker", "round", "attempt", "head", "seq", "base", "update", "time")


class WitnessError(ChainError):
    """A witness file or record that cannot be read or is malformed (the message names file and line)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CANONICAL_V1 = re.compile(r"b[a-z2-7]{58}")
"""A CIDv1 in base32 of 36 bytes: version 1, a one-byte codec, a sha2-256 multihash (what IPFS writes)."""
_FAST_CODECS = (0x55, 0x70, 0x71)  # raw, dag-pb, dag-cbor
_B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def _cid(name: str, value: object) -> str:
    """`value` as canonical CID text. The common case (canonical base32 CIDv1, sha2-256) is checked with
    the standard library: multiformats takes ~1 ms per CID, which made a 100,000-record witness take
    minutes to read; anything else goes through `parse_cid`."""
    if isinstance(value, str) and _CANONICAL_V1.fullmatch(value):
        head = base64.b32decode(value[1:9].upper())  # the first 5 bytes: version, codec, hash code and length
        if (head[0] == 1 and head[1] in _FAST_CODECS and head[2:4] == b"\x12\x20"
                and _B32_ALPHABET.index(value[-1]) & 0b11 == 0):  # 290 bits for 288: the last 2 are zero
            return value
    if not isinstance(value, (str, CID)):
        raise WitnessError(f"{name}: expected a CID string, got {type(value).__name__}")
    try:
        return cid_str(parse_cid(value))
    except InvalidCID as exc:
        raise WitnessError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class WitnessRecord:
    """One round a worker signed an update in: job `job` of owner `owner`, round `round` attempt
    `attempt`, trained from global weights `base`, extending chain head `head` (the block at seq `seq`,
    which the worker's update names), announcing its weights `update` at `time` (Unix seconds).

    Fields are validated on construction (a CID given as a CID object or in another base is kept in
    its canonical text form), so a record that exists is well-formed."""

    job: str
    owner: str
    worker: str
    round: int
    attempt: int
    head: str
    seq: int
    base: str
    update: str
    time: float

    def __post_init__(self) -> None:
        if not valid_job_id(self.job):
            raise WitnessError(f"job: not a job id: {printable(self.job, 80)}")
        for name in ("owner", "worker"):
            if not (isinstance(getattr(self, name), str) and is_public_id(getattr(self, name))):
                raise WitnessError(f"{name}: not a public id: {printable(getattr(self, name), 80)}")
        for name, low in (("round", 1), ("attempt", 1), ("seq", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise WitnessError(f"{name}: expected an integer >= {low}, got {printable(value, 40)}")
        for name in ("head", "base", "update"):
            object.__setattr__(self, name, _cid(name, getattr(self, name)))
        if isinstance(self.time, bool) or not isinstance(self.time, (int, float)) or not math.isfinite(self.time):
            raise WitnessError(f"time: expected a finite number, got {printable(self.time, 40)}")
        object.__setattr__(self, "time", float(self.time))

    def to_json(self) -> str:
        """One line of JSON (no newline), keys in a fixed order."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> WitnessRecord:
        """Parse one line; WitnessError (one line) for bad JSON, a missing or extra key, or a bad value."""
        if len(line) > MAX_LINE_CHARS:
            raise WitnessError(f"a line of {len(line)} characters, more than {MAX_LINE_CHARS}")
        try:
            data = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise WitnessError(f"not JSON: {printable(str(exc), 120)}") from None
        if not isinstance(data, dict):
            raise WitnessError(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in _FIELDS if k not in data]
        extra = sorted(set(data) - set(_FIELDS))
        if missing:
            raise WitnessError(f"missing field {missing[0]}")
        if extra:
            raise WitnessError(f"unexpected field {printable(extra[0], 40)}")
        return cls(**data)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


class Witness:
    """A witness file. `Witness.for_job` names one per (owner, job) in a directory; `Witness(path)`
    opens any (e.g. a stranger's, for `verify --witness`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0  # bytes of complete lines already parsed into _records
        self._records: list[WitnessRecord] = []

    @classmethod
    def for_job(cls, directory: str | os.PathLike, owner: str, job: str) -> Witness:
        """The witness of `owner`'s job `job` in `directory`: `<job>.<owner>.jsonl`. Both parts are
        checked (job ids are `[A-Za-z0-9_.-]`, ids unpadded base64url: no `/`, no NUL), so the name
        stays inside `directory` and is unique per (owner, job)."""
        if not valid_job_id(job):
            raise WitnessError(f"not a job id: {printable(job, 80)}")
        if not (isinstance(owner, str) and is_public_id(owner)):
            raise WitnessError(f"not a public id: {printable(owner, 80)}")
        directory = Path(directory)
        path = directory / f"{job}.{owner}.jsonl"
        if path.parent != directory:  # belt and braces: the checks above ensure it
            raise WitnessError(f"witness name for job {job} escapes {directory}")
        return cls(path)

    def records(self) -> list[WitnessRecord]:
        """Every record, in file order ([] when the file does not exist yet). WitnessError naming the
        file and line for a bad line, or when the file is larger than the bounds.

        Records already read are kept: a witness only grows by appends, so a later call parses only
        the lines added since (a worker asks every round). A file that shrank is read again whole."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_WITNESS_BYTES:
                    raise WitnessError(f"witness {self.path}: larger than {MAX_WITNESS_BYTES} bytes")
                if size < self._offset:
                    self._offset, self._records = 0, []
                f.seek(self._offset)
                data = f.read(MAX_WITNESS_BYTES + 1 - self._offset)
        except FileNotFoundError:
            self._offset, self._records = 0, []
            return []
        except OSError as exc:
            raise WitnessError(f"witness {self.path}: {exc.strerror or exc}") from None
        if self._offset + len(data) > MAX_WITNESS_BYTES:
            raise WitnessError(f"witness {self.path}: larger than {MAX_WITNESS_BYTES} bytes")
        lines = data.split(b"\n")
        lines.pop()  # b"" after the final newline, or a torn last write: never a complete record
        if len(self._records) + len(lines) > MAX_RECORDS:
            raise WitnessError(f"witness {self.path}: {len(self._records) + len(lines)} lines, more than "
                               f"{MAX_RECORDS}")
        records = []
        for number, raw in enumerate(lines, len(self._records) + 1):
            try:
                records.append(WitnessRecord.from_json(raw.decode("utf-8")))
            except UnicodeDecodeError:
                raise WitnessError(f"witness {self.path} line {number}: not UTF-8") from None
            except WitnessError as exc:
                raise WitnessError(f"witness {self.path} line {number}: {exc}") from None
        self._records += records
        self._offset += sum(len(raw) + 1 for raw in lines)
        return list(self._records)

    def last(self) -> WitnessRecord | None:
        """The record with the highest seq (the newest of those), or None for an empty witness."""
        best = None
        for record in self.records():
            if best is None or record.seq >= best.seq:
                best = record
        return best

    def record(self, rec: WitnessRecord) -> None:
        """Append `rec` durably: under a file lock (workers may share a directory), on a fresh line,
        flushed and fsynced before returning. Creates the directory (mode 0o700) and the file (0o600)."""
        from filelock import FileLock

        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = (rec.to_json() + "\n").encode("utf-8")
        with FileLock(f"{self.path}.lock"):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "r+b") as f:
                self._drop_torn_tail(f)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def _drop_torn_tail(self, f) -> None:
        """Cut a last line that has no newline (a write torn by a crash: never a published record)."""
        size = f.seek(0, os.SEEK_END)
        tail = min(size, 4 * MAX_LINE_CHARS)
        f.seek(size - tail)
        chunk = f.read(tail)
        if not chunk or chunk.endswith(b"\n"):
            return
        cut = chunk.rfind(b"\n")
        if cut < 0 and tail < size:
            raise WitnessError(f"witness {self.path}: its last line is longer than {4 * MAX_LINE_CHARS} bytes")
        f.truncate(size - tail + cut + 1)


READ_ATTEMPTS = 3
"""Tries per block when our own daemon drops the connection (`DaemonUnreachable`): a transport hiccup
of the worker's side must not become a refusal of the owner's round."""


def _read_block(store, cid: CID, deadline: float | None) -> bytes | None:
    """Block `cid`, within `deadline` (a `time.monotonic()` bound on the whole walk: an owner's slow node
    cannot hold us longer; None once it passed). Retried when the daemon connection drops, not when the
    block is missing or slow."""
    attempt = 1
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return None
        try:
            return store.block_get(cid) if left is None else store.block_get(cid, timeout=left)
        except DaemonUnreachable:
            if attempt == READ_ATTEMPTS:
                raise
        time.sleep(0.1 * attempt)  # a back-off before the next try, not a wait for a condition
        attempt += 1


def check_extends(store, last: WitnessRecord | None, head: CID | str, head_block: dict, *,
                  max_steps: int = MAX_STEPS, deadline: float | None = None) -> str | None:
    """None when the round's chain head `head` (whose decoded block is `head_block`) descends from the
    last witnessed head `last.head`: it is that head (another attempt on it), or `prev` links from it
    reach seq `last.seq` at exactly `last.head`. Otherwise a one-line reason: another job, a rollback
    (a lower seq), a fork (another block at the witnessed seq), too many steps, or a block on the way
    that cannot be fetched or decoded. Never walks below `last.seq`, nor more than `max_steps` blocks."""
    if last is None:
        return None
    if head_block.get("job") != last.job:
        return f"head {cid_str(head)} is of job {printable(head_block.get('job'), 80)}, the witness of job {last.job}"
    if same_cid(head, last.head):
        return None
    seq = head_block["seq"]
    if seq < last.seq:
        return (f"rollback: head {cid_str(head)} is at seq {seq}, below the head {last.head} at seq {last.seq} "
                f"this worker signed round {last.round} against")
    if seq - last.seq > max_steps:
        return (f"head {cid_str(head)} at seq {seq} is {seq - last.seq} blocks above the last witnessed head "
                f"at seq {last.seq}, more than {max_steps} (max_steps)")
    head_cid = parse_cid(head)
    if seq == last.seq + 1 and head_block.get("prev") is not None and same_cid(head_block["prev"], last.head):
        return None  # the usual round: the head's parent is the witnessed head, read when we signed on it
    cid, block = head_cid, head_block
    while block["seq"] > last.seq:
        prev = block.get("prev")
        if prev is None:  # a valid block has prev above seq 0, so this is a defensive check only
            return f"block {cid_str(cid)} at seq {block['seq']} has no prev"
        try:
            data = _read_block(store, prev, deadline)
            if data is None:
                return f"walking from head {cid_str(head)} down to seq {last.seq} took too long (at seq {seq})"
            block = decode_block(data, prev)
        except (IPFSError, ChainError) as exc:
            return f"cannot read block {cid_str(prev)} below head {cid_str(head)}: {printable(str(exc), 200)}"
        if block["seq"] != seq - 1 or block.get("job") != last.job:
            return (f"block {cid_str(prev)} has seq {block['seq']} of job {printable(block.get('job'), 80)}, "
                    f"expected seq {seq - 1} of job {last.job}")
        cid, seq = prev, seq - 1
    if not same_cid(cid, last.head):
        via = "" if cid is head_cid else f" descends from block {cid_str(cid)} there"
        return (f"fork at seq {last.seq}: head {cid_str(head)}{via}, but this worker signed round {last.round} "
                f"against block {last.head} at that seq")
    return None


def check_chain_against(records: Iterable[WitnessRecord], blocks_by_seq: Mapping[int, tuple[CID, dict]]
                        ) -> tuple[int, str] | None:
    """Check a chain (`blocks_by_seq`: seq -> (cid, decoded block), genesis to head, as `walk` yields them)
    against a worker's witness records; None when it agrees, else the first disagreement (lowest record
    seq) as (seq of the chain's block at fault, one-line reason):

    - the chain's block at a record's seq is not the record's head: the owner rewrote history the
      worker signed against (or the chain was cut back below it: a record above the head's seq);
    - the block after a record's head, for the record's round, credits the record's worker with
      weights that none of that worker's records for that head and round announced. (Blocks do not
      record attempts, so any attempt's update on that head counts; a block that does not list the
      worker is not checked: an owner may drop a late update.)

    WitnessError for records that are not about this chain at all (another job, or another owner than
    the genesis signer): that is the wrong file, not evidence."""
    if not blocks_by_seq:
        raise WitnessError("no chain to check the witness against")
    top = max(blocks_by_seq)
    job = blocks_by_seq[top][1]["job"]
    owner = blocks_by_seq[0][1]["signer"] if 0 in blocks_by_seq else None
    announced: dict[tuple[str, int, str], list[str]] = {}
    ordered = sorted(records, key=lambda r: r.seq)
    for rec in ordered:
        if rec.job != job:
            raise WitnessError(f"a witness record of job {rec.job}, this chain is job {printable(job, 80)}")
        if owner is not None and rec.owner != owner:
            raise WitnessError(f"a witness record of owner {rec.owner}'s job, this chain's genesis is signed by "
                               f"{printable(owner, 80)}")
        announced.setdefault((rec.head, rec.round, rec.worker), []).append(rec.update)
    for rec in ordered:
        where = f"worker {rec.worker} signed round {rec.round} (attempt {rec.attempt}) against head {rec.head}"
        if rec.seq > top:
            return top, (f"{where} at seq {rec.seq}, above this chain's head at seq {top}: the chain was cut "
                         "back (rollback), or this head is old")
        cid, _ = blocks_by_seq[rec.seq]
        if not same_cid(cid, rec.head):
            return rec.seq, (f"the chain's block at seq {rec.seq} is {cid_str(cid)}, but {where} there: the owner "
                             "rewrote history the worker signed against")
        reason = _check_credit(rec, blocks_by_seq.get(rec.seq + 1), announced[(rec.head, rec.round, rec.worker)])
        if reason:
            return reason
    return None


def _check_credit(rec: WitnessRecord, after: tuple[CID, dict] | None, updates: list[str]
                  ) -> tuple[int, str] | None:
    """The block after `rec.head`, if it is for `rec.round` and lists `rec.worker`, must credit it with one
    of the updates the worker announced on that head in that round."""
    if after is None:
        return None
    cid, block = after
    if block["round"] != rec.round:
        return None
    for entry in block["updates"]:
        if entry["worker"] == rec.worker:
            if any(same_cid(entry["weights"], u) for u in updates):
                return None
            return block["seq"], (f"block {cid_str(cid)} credits worker {rec.worker} in round {rec.round} with "
                                  f"weights {cid_str(entry['weights'])}, but the worker announced "
                                  f"{', '.join(sorted(set(updates)))} against head {rec.head}")
    return None
