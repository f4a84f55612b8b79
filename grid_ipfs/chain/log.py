"""The append-only log: a head file naming the newest block, and blocks linked back to genesis.

The head file is the only mutable state. It is changed under a file lock (read head, build the next
block on it, store the block, replace the file atomically), so concurrent appenders from several
processes serialise into one line of blocks and none is lost; readers never see a half-written head.
The store is anything with the `BlockStore` methods, an `IPFSClient` in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from multiformats import CID

from ..identity import Identity
from ..ipfs.cids import InvalidCID, cid_str, parse_cid, same_cid, same_data
from ..ipfs.errors import IPFSError
from ..ipfs.timeouts import DEFAULT, TimeoutTypes
from .blocks import ChainError, decode_block, encode_block, sign_block

__all__ = ["BlockStore", "ChainLog", "MAX_BLOCKS", "walk", "read_head", "write_head", "store_block"]

MAX_BLOCKS = 100_000
"""Longest chain `walk` and `verify_chain` read by default (a round a minute for ten weeks): a head from
a stranger cannot send an auditor's tools on an endless walk."""


class BlockStore(Protocol):
    """The slice of `grid_ipfs.ipfs.rpc.IPFSClient` the chain needs."""

    def block_put(self, data: bytes, *, codec: str = "dag-cbor") -> CID: ...

    def block_get(self, cid: str | CID) -> bytes: ...

    def cat(self, cid: str | CID, *, max_size: int | None = None, timeout: TimeoutTypes = DEFAULT,
            sink: Callable[[bytes], object] | None = None) -> bytes: ...

    def add(self, data: bytes) -> CID: ...


def read_head(head_file: str | os.PathLike) -> CID | None:
    """The CID in `head_file`, or None when the file does not exist yet (an empty chain)."""
    path = Path(head_file)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    try:
        return parse_cid(text)
    except InvalidCID as exc:
        raise ChainError(f"head file {path}: {exc}") from None


def write_head(head_file: str | os.PathLike, cid: str | CID) -> None:
    """Replace the head file's content atomically (temp file, fsync, rename)."""
    path = Path(head_file)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(cid_str(cid) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def walk(store: BlockStore, head: str | CID, *, max_blocks: int = MAX_BLOCKS) -> Iterator[tuple[CID, dict]]:
    """Yield (cid, block) from `head` back to genesis, each block checked against its CID and layout.

    Stops with ChainError when a block's seq is not one less than its successor's: a chain that skips
    or repeats is not a log anyone should read as history. Because seq falls by exactly one per step
    down to genesis at 0, the head's seq tells the chain's length before anything else is fetched: a
    head at seq `max_blocks` or more is refused at once, and no walk goes on for ever (nor in a cycle).
    Use `verify_chain` for a full audit.
    """
    cid: CID | None = parse_cid(head)
    expected: int | None = None
    while cid is not None:
        block = decode_block(store.block_get(cid), cid)
        if expected is None and block["seq"] >= max_blocks:
            raise ChainError(f"block {cid_str(cid)} has seq {block['seq']}: the chain is longer than "
                             f"the {max_blocks} blocks allowed (max_blocks)")
        if expected is not None and block["seq"] != expected:
            raise ChainError(f"block {cid_str(cid)} has seq {block['seq']}, expected {expected}")
        yield cid, block
        expected = block["seq"] - 1
        cid = block.get("prev")


class ChainLog:
    """A job's chain as seen by its writer: `store` holds the blocks, `head_file` names the newest.

    With `head_file=None` the head lives in this object only (tests, throwaway runs).
    """

    def __init__(self, store: BlockStore, head_file: str | os.PathLike | None):
        self.store = store
        self.head_file = Path(head_file) if head_file is not None else None
        self._head: CID | None = None
        self._stored: tuple[CID, bytes] | None = None
        """The block this log appended last, as stored: the next append's parent and the round's head,
        read without a round trip to the daemon (blocks are content-addressed: these bytes are that CID)."""

    @property
    def head(self) -> CID | None:
        """The newest block, or None for an empty chain."""
        return read_head(self.head_file) if self.head_file is not None else self._head

    def append(self, fields: dict, identity: Identity, *, extends: str | CID | None = None) -> CID:
        """Sign `fields` as the next block on the current head, store it, advance the head; return its CID.

        `seq` and `prev` are set here (genesis when the chain is empty), `time` defaults to now. The
        block's job and model must match the head's: one chain, one job, one architecture. With
        `extends`, ChainError unless the head is still that block: a round's workers signed their
        updates against the head it announced, so its block must link exactly that one as `prev`.
        """
        if "seq" in fields or "prev" in fields:
            raise ChainError("append sets seq and prev itself; do not pass them")
        if self.head_file is None:
            return self._append(fields, identity, extends)
        from filelock import FileLock

        self.head_file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.head_file}.lock"):
            return self._append(fields, identity, extends)

    def stage(self, fields: dict, identity: Identity, *, extends: str | CID | None = None) -> CID:
        """Sign and store `fields` as the next block on the current head, without advancing the head.

        A staged block is a candidate others can fetch and build on (see `grid_ipfs.contest`); it joins
        the chain only if a later `append` links it, or never (an orphan, like a losing proposal).
        """
        if "seq" in fields or "prev" in fields:
            raise ChainError("stage sets seq and prev itself; do not pass them")
        return store_block(self.store, self._next(fields, extends), identity)

    def read(self, cid: str | CID) -> dict:
        """Block `cid`, checked by `decode_block`: the one this log appended last from memory, any other
        from the store."""
        cid = parse_cid(cid)
        if self._stored is not None and same_cid(self._stored[0], cid):
            return decode_block(self._stored[1], cid)
        return decode_block(self.store.block_get(cid), cid)

    def _append(self, fields: dict, identity: Identity, extends: str | CID | None) -> CID:
        cid, data = _store(self.store, self._next(fields, extends), identity)
        self._stored = (cid, data)
        if self.head_file is None:
            self._head = cid
        else:
            write_head(self.head_file, cid)
        return cid

    def _next(self, fields: dict, extends: str | CID | None = None) -> dict:
        """`fields` with `seq`, `prev` (and a default `time`) for the block after the current head."""
        head = self.head
        if extends is not None and (head is None or not same_cid(head, extends)):
            where = f"head file {self.head_file}" if self.head_file is not None else "this log"
            raise ChainError(f"the chain moved: the block was to extend {cid_str(extends)}, but {where} names "
                             f"{_written_by(self.store, head)}")
        block = {"time": time.time(), **fields}
        if head is None:
            block["seq"] = 0
        else:
            parent = self.read(head)
            for key in ("job", "model"):
                if key in block and not same_data(block[key], parent[key]):
                    raise ChainError(f"{key} {_show(block[key])} differs from the head's {_show(parent[key])}")
            block["seq"] = parent["seq"] + 1
            block["prev"] = head
        return block

def store_block(store: BlockStore, block: dict, identity: Identity) -> CID:
    """Sign `block` (a complete block but for `v`, `signer`, `sig`), put it in `store`, return its CID."""
    return _store(store, block, identity)[0]


def _store(store: BlockStore, block: dict, identity: Identity) -> tuple[CID, bytes]:
    data, cid = encode_block(sign_block(block, identity))
    stored = store.block_put(data, codec="dag-cbor")
    if not same_cid(stored, cid):
        raise ChainError(f"the store answered CID {cid_str(stored)} for block {cid_str(cid)}")
    return cid, data


def _written_by(store: BlockStore, head: CID | None) -> str:
    """The head another writer left, for the error that refuses to build past it: its CID, seq and signer
    (the one to stop), or only its CID when the block cannot be read."""
    if head is None:
        return "no head"
    try:
        block = decode_block(store.block_get(head), head)
    except (ChainError, IPFSError):
        return f"{cid_str(head)} (another writer?)"
    return f"{cid_str(head)} (seq {block['seq']}), appended by {block['signer']}"


def _show(value: object) -> str:
    return cid_str(value) if isinstance(value, CID) else repr(value)
