"""CARv1 archives: a DAG in one file, read without a daemon and safely from a stranger.

A CARv1 file (https://ipld.io/specs/transport/car/carv1/) is a varint-prefixed dag-cbor header
`{version: 1, roots: [CID, ...]}` followed by sections, each a varint length, a CID's bytes and the
block's bytes. `CarReader` streams one and refuses, with one `CarError` line naming the offset and the
reason, anything that is not exactly that: a header over 64 KiB or nested past what the decoder takes,
a version other than 1, more than 256 roots, a varint over 9 bytes or not minimal, a section longer
than a block may be (refused before it is read), a truncated file, a file or block count over its cap,
a CID other than v0/v1 or with a hash other than sha2-256, and a block whose bytes do not hash to its
CID. Nothing here knows about the chain: raw, dag-cbor and dag-pb blocks are all just blocks.

`CarStore` indexes a CAR file (offsets only, so memory grows with the block count, not the file) and
answers the `BlockStore` calls the chain's readers make: `block_get` (hash checked again on every read,
so a file changed underneath is caught) and `cat`, which reassembles a UnixFS file (what `ipfs add`
writes: dag-pb nodes with UnixFS data over raw or dag-pb leaves) with a bounded depth, node count and
size. A block that is absent raises `NotFound`, as a daemon would, so a verifier reports it as "not
retrievable".

Why hand-written: PyPI's dag-pb/CAR readers (ipld-car, ipld-dag-pb: single 0.0.1 releases, no UnixFS;
unix-fs-exporter needs protobuf<4, which TensorFlow's pin excludes) do not fit; the wire formats needed
here (varints, a CID's bytes, two protobuf messages) are small and fully bounded below.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import dag_cbor
from multiformats import CID

from .cids import cid_str, parse_cid
from .errors import IPFSError, NotFound, TooLarge
from .timeouts import DEFAULT, TimeoutTypes

__all__ = ["CarError", "CarReader", "CarBlock", "CarStore", "read_car", "unixfs_cat", "decode_pbnode",
           "MAX_HEADER_BYTES", "MAX_ROOTS", "MAX_BLOCK_BYTES", "MAX_CAR_BYTES", "MAX_CAR_BLOCKS",
           "MAX_FILE_DEPTH", "MAX_FILE_NODES"]

MAX_HEADER_BYTES = 64 << 10
"""Largest header accepted (a real one is ~60 bytes per root)."""
MAX_ROOTS = 256
MAX_BLOCK_BYTES = 4 << 20
"""Largest block (daemons cap blocks at 1-2 MiB; `ipfs add` chunks files at 256 KiB by default, and
grid_ipfs adds them in 1 MiB raw leaves)."""
MAX_CAR_BYTES = 64 << 30
"""Largest CAR file a reader takes by default; `CarStore` keeps only an index, never the file."""
MAX_CAR_BLOCKS = 1 << 22
"""Most blocks a reader takes by default (~4M: an index of ~0.5 GiB at worst)."""
MAX_FILE_DEPTH = 32
"""Deepest UnixFS file tree `cat` walks (a balanced tree of 174-link nodes is 5 deep for 1 TiB)."""
MAX_FILE_NODES = 1 << 18
"""Most UnixFS nodes one `cat` visits (64 GiB of 256 KiB chunks): links that fan out to the same empty
node again and again cost bounded work, not an exponential walk."""

_SHA2_256, _DAG_PB, _RAW = 0x12, "dag-pb", "raw"
_MAX_VARINT = 9  # the CAR spec's limit: varints are unsigned and below 2^63


class CarError(IPFSError, ValueError):
    """A CAR file (or a UnixFS file in one) that is malformed, over a limit, or not what its CIDs say;
    the message is one line naming the file, the offset and the reason."""


class _Bad(Exception):
    """A reason and the position it applies to, turned into a CarError by whoever knows the file."""

    def __init__(self, reason: str, position: int = 0):
        super().__init__(reason)
        self.reason, self.position = reason, position


class CarBlock(NamedTuple):
    cid: CID
    data: bytes
    offset: int
    """Where the block's bytes start in the file."""


# -- wire formats ------------------------------------------------------------------------------------------


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """An unsigned LEB128 varint at `pos`: (value, position after it). At most 9 bytes, minimal."""
    value = shift = 0
    for i in range(_MAX_VARINT):
        if pos + i >= len(buf):
            raise _Bad("truncated varint", pos)
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise _Bad("non-minimal varint", pos)
            return value, pos + i + 1
    raise _Bad(f"varint longer than {_MAX_VARINT} bytes", pos)


def _cid_at(buf: bytes | memoryview, pos: int) -> tuple[CID, int]:
    """The binary CID at `pos` (v0: a bare sha2-256 multihash; v1: version, codec, multihash)."""
    start = pos
    if buf[pos:pos + 1] == b"\x12":
        if bytes(buf[pos:pos + 2]) != b"\x12\x20":
            raise _Bad("CIDv0 with a digest that is not 32 bytes", pos)
        end = pos + 34
    else:
        version, pos = _varint(buf, pos)
        if version != 1:
            raise _Bad(f"CID version {version} (only 0 and 1 exist)", start)
        codec, pos = _varint(buf, pos)
        code, pos = _varint(buf, pos)
        size, pos = _varint(buf, pos)
        if code != _SHA2_256 or size != 32:
            raise _Bad(f"CID with hash function 0x{code:x} of {size} bytes (only sha2-256 is accepted)", start)
        end = pos + 32
    if end > len(buf):
        raise _Bad("truncated CID", start)
    try:
        return CID.decode(bytes(buf[start:end])), end
    except Exception as exc:  # noqa: BLE001 - multiformats raises KeyError, ValueError...: an unknown codec
        raise _Bad(f"CID not understood ({_first_line(exc)})", start) from None


def _fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each protobuf field in `buf`: an int for varints, a view of
    the bytes for length-delimited fields; fixed-width fields are skipped (value 0)."""
    buf, pos = memoryview(buf), 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, after = _varint(buf, pos)
            if after + size > len(buf):
                raise _Bad(f"protobuf field {field} runs past the end", pos)
            value, pos = buf[after:after + size], after + size
        elif wire in (1, 5):
            pos, value = pos + (8 if wire == 1 else 4), 0
            if pos > len(buf):
                raise _Bad(f"protobuf field {field} runs past the end", pos)
        else:
            raise _Bad(f"protobuf wire type {wire}", pos)
        yield field, wire, value


def decode_pbnode(data: bytes) -> tuple[list[CID], bytes | None]:
    """A dag-pb PBNode's link targets, in order, and its Data (None when absent). `_Bad` when malformed."""
    links: list[CID] = []
    payload: bytes | None = None
    for field, wire, value in _fields(data):
        if field == 2 and wire == 2:
            target = None
            for link_field, link_wire, link_value in _fields(value):
                if link_field == 1 and link_wire == 2:
                    target, end = _cid_at(link_value, 0)
                    if end != len(link_value):
                        raise _Bad("link hash has bytes after its CID")
            if target is None:
                raise _Bad("dag-pb link without a hash")
            links.append(target)
        elif field == 1 and wire == 2:
            payload = bytes(value)
        else:
            raise _Bad(f"dag-pb field {field} (wire type {wire}) is not part of a PBNode")
    return links, payload


_UNIXFS_RAW, _UNIXFS_FILE = 0, 2


def _unixfs_chunk(data: bytes | None) -> bytes:
    """The bytes a UnixFS File or Raw node contributes itself (before its children's)."""
    if data is None:
        raise _Bad("dag-pb node without UnixFS data")
    kind, chunk = None, b""
    for field, wire, value in _fields(data):
        if field == 1 and wire == 0:
            kind = value
        elif field == 2 and wire == 2:
            chunk = bytes(value)
    if kind not in (_UNIXFS_RAW, _UNIXFS_FILE):
        raise _Bad("UnixFS node is not a file" + ("" if kind is None else f" (type {kind})"))
    return chunk


def unixfs_cat(get: Callable[[CID], bytes], cid: CID, *, max_size: int | None = None,
               max_depth: int = MAX_FILE_DEPTH, max_nodes: int = MAX_FILE_NODES, what: str = "") -> bytes:
    """The bytes of the UnixFS file `cid` (or of a raw block), fetching nodes with `get`.

    Depth first, in link order: a node's own data, then its children's. Raises CarError for a tree
    deeper than `max_depth` (so also for links that loop), more than `max_nodes` nodes, or a node that is
    not a file, and TooLarge as soon as the bytes so far pass `max_size`.
    """
    what = what or f"file {cid_str(cid)}"
    out = bytearray()
    stack: list[tuple[CID, int]] = [(cid, 0)]
    visited = read = 0
    budget = None if max_size is None else 2 * max_size + (1 << 20)  # node bytes read: data plus link overhead
    while stack:
        node, depth = stack.pop()
        visited += 1
        if visited > max_nodes:
            raise CarError(f"{what}: more than {max_nodes} UnixFS nodes")
        if depth > max_depth:
            raise CarError(f"{what}: UnixFS tree deeper than {max_depth} levels (at {cid_str(node)})")
        data = get(node)
        read += len(data)
        if budget is not None and read > budget:  # nodes that add nothing must still cost their bytes
            raise CarError(f"{what}: read {read} bytes of UnixFS nodes for a file of at most {max_size}")
        try:
            if node.codec.name == _RAW:
                links, chunk = [], data
            elif node.codec.name == _DAG_PB:
                links, payload = decode_pbnode(data)
                chunk = _unixfs_chunk(payload)
            else:
                raise _Bad(f"a {node.codec.name} block is not a UnixFS file")
        except _Bad as exc:
            raise CarError(f"{what}: node {cid_str(node)}: {exc.reason}") from None
        out += chunk
        if max_size is not None and len(out) > max_size:
            raise TooLarge(what, max_size)
        stack.extend((link, depth + 1) for link in reversed(links))
    return bytes(out)


# -- the reader ------------------------------------------------------------------------------------------


class CarReader:
    """Stream a CARv1 file: `roots` is read on construction, iterating yields each `CarBlock`, checked.

    Every limit is checked before the bytes it concerns are read, so a hostile file costs at most one
    block's worth of memory and a bounded number of reads.
    """

    def __init__(self, stream: BinaryIO, *, name: str = "<stream>", max_bytes: int = MAX_CAR_BYTES,
                 max_blocks: int = MAX_CAR_BLOCKS, max_block_bytes: int = MAX_BLOCK_BYTES):
        self.stream, self.name = stream, name
        self.max_bytes, self.max_blocks, self.max_block_bytes = max_bytes, max_blocks, max_block_bytes
        self.offset = 0
        self.blocks = 0
        size = _stream_size(stream)
        if size is not None and size > max_bytes:
            raise self._error(f"{size} bytes, over the limit of {max_bytes}", 0)
        self.roots = self._header()

    def _error(self, reason: str, offset: int) -> CarError:
        return CarError(f"CAR {self.name}: offset {offset}: {reason}")

    def _read(self, size: int, what: str) -> bytes:
        if self.offset + size > self.max_bytes:
            raise self._error(f"{what} ends past the limit of {self.max_bytes} bytes", self.offset)
        data = self.stream.read(size)
        if len(data) < size:
            raise self._error(f"truncated {what}: {len(data)} of {size} bytes", self.offset)
        self.offset += size
        return data

    def _length(self, what: str) -> int | None:
        """A varint section length read byte by byte; None at a clean end of the file."""
        start, raw = self.offset, b""
        while True:
            byte = self.stream.read(1)
            if not byte:
                if raw:
                    raise self._error(f"truncated {what} length", start)
                return None
            raw += byte
            self.offset += 1
            if not byte[0] & 0x80 or len(raw) > _MAX_VARINT:
                break
        try:
            return _varint(raw, 0)[0]
        except _Bad as exc:
            raise self._error(f"{what} length: {exc.reason}", start) from None

    def _header(self) -> list[CID]:
        size = self._length("header")
        if size is None:
            raise self._error("empty file: no CAR header", 0)
        if not 0 < size <= MAX_HEADER_BYTES:
            raise self._error(f"header of {size} bytes (at most {MAX_HEADER_BYTES})", 0)
        start = self.offset
        raw = self._read(size, "header")
        try:
            header = dag_cbor.decode(raw)
        except Exception as exc:  # noqa: BLE001 - the decoder raises CBOR, value, overflow and recursion errors
            raise self._error(f"header is not dag-cbor ({_first_line(exc)})", start) from None
        if not isinstance(header, dict):
            raise self._error(f"header is a {type(header).__name__}, not a map", start)
        version = header.get("version")
        if version != 1 or isinstance(version, bool):
            raise self._error(f"CAR version {_short(version)} (only CARv1 is read)", start)
        roots = header.get("roots")
        if not isinstance(roots, list) or not all(isinstance(root, CID) for root in roots):
            raise self._error("header roots are not a list of CIDs", start)
        if len(roots) > MAX_ROOTS:
            raise self._error(f"{len(roots)} roots (at most {MAX_ROOTS})", start)
        return roots

    def __iter__(self) -> Iterator[CarBlock]:
        while True:
            start = self.offset
            size = self._length("section")
            if size is None:
                return
            if size == 0:
                raise self._error("empty section", start)
            if size > self.max_block_bytes + 64:  # a block and the longest CID we accept
                raise self._error(f"section of {size} bytes: a block is at most {self.max_block_bytes}", start)
            if self.blocks >= self.max_blocks:
                raise self._error(f"more than {self.max_blocks} blocks", start)
            body_at = self.offset
            section = self._read(size, "section")
            try:
                cid, end = _cid_at(section, 0)
            except _Bad as exc:
                raise self._error(exc.reason, body_at + exc.position) from None
            data = section[end:]
            if len(data) > self.max_block_bytes:
                raise self._error(f"block of {len(data)} bytes: at most {self.max_block_bytes}", body_at + end)
            if hashlib.sha256(data).digest() != cid.raw_digest:
                raise self._error(f"block {cid_str(cid)} does not hash to its CID", body_at + end)
            self.blocks += 1
            yield CarBlock(cid, data, body_at + end)


def read_car(data: bytes, **limits) -> tuple[list[CID], list[CarBlock]]:
    """Roots and blocks of a CAR held in memory (tests, small archives); CarError when it is not one."""
    reader = CarReader(io.BytesIO(data), **limits)
    return reader.roots, list(reader)


# -- the store -------------------------------------------------------------------------------------------


class CarStore:
    """A read-only `BlockStore` over a CAR file: verify, show or export a chain with no daemon.

    The file is read once on opening (every section checked by `CarReader`) into an index of where each
    block lies; blocks are read back on demand and hashed again. Use it as a context manager, or call
    `close()`.
    """

    def __init__(self, path: str | os.PathLike, **limits):
        self.path = Path(path)
        self.index: dict[bytes, tuple[int, int]] = {}
        self.size = 0
        try:
            self._file = open(self.path, "rb", buffering=1 << 20)  # noqa: SIM115 - kept for reads; see close()
        except OSError as exc:
            raise CarError(f"CAR {self.path}: cannot open: {exc.strerror or exc}") from None
        try:
            reader = CarReader(self._file, name=str(self.path), **limits)
            for block in reader:
                self.index.setdefault(bytes(block.cid.digest), (block.offset, len(block.data)))
            self.roots: list[CID] = reader.roots
            self.size = reader.offset
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CarStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, cid: object) -> bool:
        try:
            return bytes(parse_cid(cid).digest) in self.index  # type: ignore[arg-type]
        except IPFSError:
            return False

    def __repr__(self) -> str:
        return f"CarStore({str(self.path)!r})"

    def block_get(self, cid: str | CID, *, max_size: int | None = None, timeout: TimeoutTypes = DEFAULT) -> bytes:
        """The block's bytes, hashed again; NotFound when the CAR does not hold it. `timeout` is taken
        as IPFSClient takes it and ignored: reading a local file does not wait on anyone."""
        cid = parse_cid(cid)
        try:
            offset, size = self.index[bytes(cid.digest)]
        except KeyError:
            raise NotFound(f"block {cid_str(cid)} is not in CAR {self.path}") from None
        if max_size is not None and size > max_size:
            raise TooLarge(f"block {cid_str(cid)}", max_size)
        data = os.pread(self._file.fileno(), size, offset)
        if len(data) != size or hashlib.sha256(data).digest() != cid.raw_digest:
            raise CarError(f"CAR {self.path}: offset {offset}: block {cid_str(cid)} changed since the file was read")
        return data

    def cat(self, cid: str | CID, *, max_size: int | None = None, timeout: TimeoutTypes = DEFAULT,
            sink: Callable[[bytes], object] | None = None) -> bytes:
        """The bytes of the UnixFS file (or raw block) `cid`, as `ipfs cat` would give them; with `sink`,
        handed to it instead (and b"" returned), as `IPFSClient.cat` does."""
        cid = parse_cid(cid)
        data = unixfs_cat(self.block_get, cid, max_size=max_size, what=f"cat {cid_str(cid)} from CAR {self.path}")
        if sink is None:
            return data
        sink(data)
        return b""

    def block_put(self, data: bytes, *, codec: str = "dag-cbor", pin: bool = True) -> CID:
        raise CarError(f"CAR {self.path} is read-only: cannot store a block")

    def add(self, data: bytes, *, pin: bool = True, name: str = "blob") -> CID:
        raise CarError(f"CAR {self.path} is read-only: cannot add a file")


def _stream_size(stream: BinaryIO) -> int | None:
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:200] if text else type(exc).__name__


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
