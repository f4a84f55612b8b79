"""Bytes <-> things: Keras models, weight lists and JSON documents, with size limits.

Everything a worker or client fetches from IPFS arrives as untrusted bytes named by a CID. This module is
the one place that turns such bytes into Python objects, so it is where the safety rules live:

* Models are `.keras` archives (a zip holding `config.json`, `metadata.json` and the weights). The archive
  is inspected *before* Keras sees it (size, member count, declared uncompressed size, required members),
  then vetted by `grid_ipfs.vetting` (an allow-list of building blocks, parameter and activation caps,
  HDF5 datasets bounded by declared shape), then loaded with `safe_mode=True`. Nothing is ever unpickled
  or executed.
* Weights are safetensors files: a JSON header plus raw little-endian tensors, so parsing runs no code.
  Keys are `w0000`, `w0001`, ... in `model.get_weights()` order; the header metadata carries the format
  name and the tensor count so a stray safetensors file from elsewhere is recognised as such.
* A worker may send its update compressed (`update_to_bytes`: the change from the round's base weights
  as float16 or per-tensor-scaled int8, deflated); it decodes only against those base weights, and the
  inflation stops at the size the model's weights could need.
* JSON is canonical (sorted keys, no spaces, UTF-8, no NaN), so equal documents are equal bytes and get
  equal CIDs.

Every failure raises `PayloadError` naming the source (usually the CID) and what was expected, because a
worker log line such as "bafy...: expected a .keras archive (not a zip file)" is what an operator needs.

Keras/TensorFlow are imported lazily inside the model functions: importing TensorFlow takes seconds, and
the weights/JSON paths (the client's aggregation, chain verification) never need it.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
import warnings
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GridError

MiB = 1024 * 1024

MAX_MODEL_BYTES = 256 * MiB
"""Largest `.keras` archive accepted (compressed size, i.e. the bytes fetched)."""

MAX_WEIGHTS_BYTES = 256 * MiB
"""Largest safetensors weights file accepted."""

MAX_JSON_BYTES = 1 * MiB
"""Largest JSON document accepted; protocol messages and metrics are far smaller."""

MODEL_UNCOMPRESSED_FACTOR = 4
"""A `.keras` archive may declare at most this many times `max_bytes` of uncompressed content.

Keras stores its members uncompressed, so an honest archive sits near 1x; the slack allows for archives
re-zipped with compression. Anything far beyond is a zip bomb meant to fill the disk or memory."""

MAX_MODEL_MEMBERS = 1000
"""Most members a `.keras` archive may hold (real ones hold three, plus any assets)."""

WEIGHTS_FORMAT = "grid_ipfs.weights.v1"
"""The `format` value in the safetensors metadata of every weights file this module writes."""

MAX_TENSORS = 65_536
"""Most tensors a weights file may hold (Keras models have hundreds, the largest a few thousand)."""

MAX_WEIGHTS_HEADER_BYTES = 8 * MiB
"""Largest safetensors header accepted, checked before the header is parsed: parsing JSON in Python
costs ~20 bytes of memory per byte. An honest header takes ~70 bytes per tensor, so this leaves room
for `MAX_TENSORS` tensors of many dimensions."""

_MODEL_REQUIRED = ("config.json", "metadata.json")
_WEIGHTS_MEMBER_PREFIX = "model.weights."  # model.weights.h5 (current Keras) or model.weights.npz (older)


class PayloadError(GridError, ValueError):
    """Fetched bytes are not the payload they should be (too large, malformed, wrong shape...).

    `source` names where the bytes came from (a CID, a file path) so the message is actionable on its own.
    """

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


# -- models ---------------------------------------------------------------------------------------------


def model_to_bytes(model) -> bytes:
    """Serialise a Keras model (architecture, weights, compile settings) to `.keras` archive bytes.

    Keras only saves to a path, so this goes through a temporary file. The bytes are not reproducible
    between calls (the archive carries a save date), so do not expect the same CID for the same model.
    """
    with tempfile.TemporaryDirectory(prefix="grid_ipfs-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return path.read_bytes()


def model_from_bytes(data: bytes, *, source: str = "model", max_bytes: int = MAX_MODEL_BYTES,
                     compile: bool = True, policy=None):
    """Load a Keras model from untrusted `.keras` archive bytes, refusing anything else.

    The archive is checked before Keras touches it, because the checks are cheap and Keras's own errors
    on garbage are confusing (or, for a zip bomb, arrive only after the disk filled up):

    * at most `max_bytes` long;
    * a zip archive with at most `MAX_MODEL_MEMBERS` members whose declared uncompressed sizes add up to
      at most `MODEL_UNCOMPRESSED_FACTOR * max_bytes` (Python's zipfile never inflates a member past its
      declared size, so bounding the declarations bounds what loading can write);
    * containing `config.json`, `metadata.json` and a `model.weights.*` file.

    Then `grid_ipfs.vetting` reads the config itself and refuses (`ModelRefused`) anything outside
    `policy` (a `vetting.Policy`; None: the default vocabulary and caps) before Keras builds anything:
    `safe_mode` alone lets a config call public Keras functions and allocate without bound.

    Loading then uses `safe_mode=True`. With `compile=True` (the default) the model comes back with the
    optimizer, loss and metrics it was saved with, ready for `training.fit`.
    """
    _check_size(data, max_bytes, source, "a .keras archive")
    _check_keras_archive(data, max_bytes, source)
    from .vetting import vet_model  # vetting imports this module

    vet_model(bytes(data), source=source, policy=policy, max_bytes=max_bytes)

    from keras.src.saving import saving_lib  # lazy: see module docstring

    from .kerasstate import keras_state_guard

    try:
        # From memory, not a temp file: loading writes nothing (an isolated job runs with file writes off),
        # and the guard undoes any change the config made to Keras' process-wide settings. The public
        # keras.saving.load_model takes paths only; for a .keras path it calls this very function.
        with keras_state_guard(), warnings.catch_warnings():  # the guard first: its lock makes the filter ours
            # A model saved after compile() but before any training has an unbuilt optimizer; Keras
            # then warns that it skips loading the optimizer variables. Nothing is lost (the optimizer
            # is built fresh on the first fit), so the warning would only alarm operators.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return saving_lib.load_model(BytesIO(bytes(data)), safe_mode=True, compile=compile)
    except Exception as exc:  # Keras raises many unrelated types for a bad archive
        raise PayloadError(source, f"expected a .keras archive (Keras could not load it: "
                                   f"{type(exc).__name__}: {_shorten(str(exc))})") from exc


def _check_keras_archive(data: bytes, max_bytes: int, source: str) -> None:
    """Structural checks of a `.keras` zip, without extracting anything."""
    expected = "expected a .keras archive"
    declared = _declared_member_count(data)
    if declared is not None and declared > MAX_MODEL_MEMBERS:
        raise PayloadError(source, f"{expected} (it declares {declared} members, more than {MAX_MODEL_MEMBERS})")
    try:
        with zipfile.ZipFile(BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise PayloadError(source, f"{expected} (not a zip file: {exc})") from exc
    if len(members) > MAX_MODEL_MEMBERS:
        raise PayloadError(source, f"{expected} (it has {len(members)} members, more than "
                                   f"{MAX_MODEL_MEMBERS})")
    uncompressed = sum(member.file_size for member in members)
    limit = MODEL_UNCOMPRESSED_FACTOR * max_bytes
    if uncompressed > limit:
        raise PayloadError(source, f"{expected} (its members unpack to {uncompressed} bytes, more than "
                                   f"{limit}: refusing a possible zip bomb)")
    names = {member.filename for member in members}
    missing = [name for name in _MODEL_REQUIRED if name not in names]
    if not any(name.startswith(_WEIGHTS_MEMBER_PREFIX) for name in names):
        missing.append(_WEIGHTS_MEMBER_PREFIX + "*")
    if missing:
        raise PayloadError(source, f"{expected} (missing {', '.join(missing)}; found "
                                   f"{sorted(names)[:10]})")


def _declared_member_count(data: bytes) -> int | None:
    """The entry count in a zip's end-of-central-directory record, or None if there is no such record.

    Read before `zipfile` parses the central directory, because that builds one object per entry: a
    256 MiB archive of empty entries would take gigabytes of memory before the member count could be
    checked. A zip64 archive reports 0xFFFF here and is refused too (a model needs neither).
    """
    tail = bytes(data[-(22 + 0xFFFF):])  # the record is 22 bytes plus a comment of up to 64 KiB
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None  # not a zip: zipfile will say so
    return int.from_bytes(tail[at + 10:at + 12], "little")


# -- weights --------------------------------------------------------------------------------------------


def weight_key(index: int) -> str:
    """The safetensors key of the `index`-th tensor of `model.get_weights()`: `w0000`..`w9999`, then
    `w10000`, ... (at least four digits, so files of fewer than 10,000 tensors keep their bytes and CIDs).
    Order is the index, never the string: `w10000` sorts before `w1001`."""
    return f"w{index:04d}"


def weights_to_bytes(weights: list[np.ndarray]) -> bytes:
    """Serialise a weight list (as from `model.get_weights()`) to safetensors bytes.

    Order is encoded in the keys (`w0000`, `w0001`, ...) because safetensors itself keeps a dict; the
    metadata records the format and count so readers can tell our files from other safetensors files.
    The output is deterministic — equal weights give equal bytes, hence equal CIDs, which lets anyone
    re-derive an aggregate's CID — so the header is rewritten canonically (see `_canonical_header`).
    """
    from safetensors.numpy import save

    if len(weights) > MAX_TENSORS:
        raise ValueError(f"{len(weights)} tensors, more than the {MAX_TENSORS} a weights file may hold")
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d tensors into shape (1,).
    tensors = {weight_key(i): np.asarray(w, order="C") for i, w in enumerate(weights)}
    return _canonical_header(save(tensors, metadata={"format": WEIGHTS_FORMAT, "count": str(len(tensors))}))


def _canonical_header(data: bytes) -> bytes:
    """Re-serialise a safetensors header with sorted keys, leaving the tensor data untouched.

    safetensors stores `__metadata__` in a Rust HashMap, so its key order (and thus the file's bytes)
    changes from call to call. Offsets in the header are relative to the end of the header, so a header
    of another length stays valid; it is space-padded to a multiple of 8 as the format recommends.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + header_len:]


def fetch_weights(store, cid, *, like: list[np.ndarray] | None = None, source: str | None = None,
                  base: list[np.ndarray] | None = None, **timeout) -> list[np.ndarray]:
    """The weights file `cid` from `store` (an `IPFSClient`, or anything with its `cat`), fetched with
    the weights size limit and parsed by `weights_from_bytes` (checked against `like`; a compressed
    update is decoded against `base`). The one way a role reads weights by CID; pass `timeout=` to bound
    the fetch (default: the store's own). The store's `cat` must take `sink=`, as `IPFSClient.cat` does.

    The file is read into one buffer that the tensors then point into: one copy of an update in memory,
    where a list of chunks, their join and parsed copies made two or three."""
    buffer = bytearray()
    store.cat(cid, max_size=MAX_WEIGHTS_BYTES, sink=buffer.extend, **timeout)
    return weights_from_bytes(buffer, source=source or f"weights {cid}", like=like, base=base)


def weights_from_bytes(data: bytes | bytearray, *, source: str = "weights", max_bytes: int = MAX_WEIGHTS_BYTES,
                       like: list[np.ndarray] | None = None, base: list[np.ndarray] | None = None
                       ) -> list[np.ndarray]:
    """Parse safetensors bytes written by `weights_to_bytes` (or a compressed update of `update_to_bytes`,
    decoded against `base`) into a list of writable arrays. From a `bytearray` the arrays are views into
    it, with no copy (the caller hands the buffer over); from `bytes` they are copies.

    Checks, in order: size, safetensors structure (`_tensor_views`), our format metadata, keys exactly
    `w0000..w{n-1}`, and (with `like`, typically `model.get_weights()`) the same count, shapes and
    dtypes. Finally every value must be finite: one NaN from a diverged or malicious worker would poison
    a whole aggregate.
    """
    _check_size(data, max_bytes, source, "a safetensors weights file")
    if bytes(data[:len(DEFLATE_MAGIC)]) == DEFLATE_MAGIC:
        data = _inflate(data, source, like)
    expected = "expected a safetensors weights file"
    header, start = _safetensors_header(data, source)
    metadata = _metadata(header)
    if metadata.get("format") == DELTA_FORMAT:
        weights = _decode_delta(data, metadata, base, source)
        if like is not None:
            _check_like(weights, like, source)
        return _finite(weights, source)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise PayloadError(source, f"{expected} with metadata format {WEIGHTS_FORMAT!r}, got "
                                   f"{metadata.get('format')!r}")

    tensors = _tensor_views(data, header, start, source)
    count = len(tensors)
    keys = [weight_key(i) for i in range(count)]
    if set(tensors) != set(keys):  # as sets: the index gives the order (`w10000` sorts before `w1001`)
        unexpected = sorted(set(tensors) - set(keys))[:5]
        raise PayloadError(source, f"{expected} with keys {keys[0]}..{keys[-1]} for {count} tensors; "
                                   f"found unexpected keys {unexpected}")
    if metadata.get("count") != str(count):
        raise PayloadError(source, f"{expected}: metadata says {_shorten(repr(metadata.get('count')), 40)} tensors, "
                                   f"the file holds {count}")
    copy = not isinstance(data, bytearray)  # views of immutable bytes are read-only
    weights = [np.array(tensors[key], copy=True) if copy else tensors[key] for key in keys]

    if like is not None:
        _check_like(weights, like, source)
    return _finite(weights, source)


SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4",
                      "I64": "<i8", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}
"""The safetensors dtypes NumPy holds natively (little-endian, as the format stores them)."""
MAX_DIMS = 32
"""Most dimensions a tensor's shape may have (NumPy's own limit is 64)."""


def _tensor_views(data: bytes | bytearray, header: dict, start: int, source: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as NumPy views into `data`, after the checks the format's own
    loader makes: each entry names a known dtype, a shape of at most `MAX_DIMS` non-negative ints, and
    data offsets whose span is exactly shape x itemsize; sorted by offset, the spans tile the data
    section from its first byte to the file's last, with no gap and no overlap. (`safetensors.numpy.load`
    copies every tensor: on the owner's path that was a second model copy per update.)"""
    expected = "expected a safetensors weights file"
    body = len(data) - start
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise PayloadError(source, f"{expected} (tensor {_shorten(name, 40)!r}: an entry needs exactly "
                                       f"dtype, shape and data_offsets)")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise PayloadError(source, f"{expected} (tensor {_shorten(name, 40)!r}: dtype "
                                       f"{_shorten(repr(info['dtype']), 20)} is not one of "
                                       f"{', '.join(SAFETENSORS_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and d >= 0 for d in shape)
                or math.prod(max(d, 1) for d in shape) > MAX_WEIGHTS_BYTES):  # NumPy refuses [0, 2^40, 2^40]
            raise PayloadError(source, f"{expected} (tensor {_shorten(name, 40)!r}: shape must be at most "
                                       f"{MAX_DIMS} ints >= 0 whose non-zero ones multiply to at most "
                                       f"{MAX_WEIGHTS_BYTES})")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise PayloadError(source, f"{expected} (tensor {_shorten(name, 40)!r}: data_offsets must be "
                                       f"[begin, end] within the {body} data bytes)")
        itemsize = np.dtype(dtype).itemsize
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise PayloadError(source, f"{expected} (tensor {_shorten(name, 40)!r}: {offsets[1] - offsets[0]} "
                                       f"bytes for shape {shape} of {info['dtype']})")
        spans.append((offsets[0], offsets[1], name, dtype, shape))
    spans.sort()
    position = 0
    for begin, end, name, _, _ in spans:
        if begin != position:
            raise PayloadError(source, f"{expected} (tensor {_shorten(name, 40)!r} starts at {begin}, not at "
                                       f"{position}: tensors overlap or leave a gap)")
        position = end
    if position != body:
        raise PayloadError(source, f"{expected} ({body - position} bytes after the last tensor)")
    try:
        return {name: np.frombuffer(data, dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                                    offset=start + begin).reshape(shape)
                for begin, end, name, dtype, shape in spans}
    except (ValueError, TypeError, OverflowError) as exc:  # not reached by any input found: a backstop
        raise PayloadError(source, f"{expected} ({type(exc).__name__}: {_shorten(str(exc))})") from None


def _finite(weights: list[np.ndarray], source: str) -> list[np.ndarray]:
    for i, w in enumerate(weights):
        if np.issubdtype(w.dtype, np.inexact) and not np.isfinite(w).all():
            bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
            raise PayloadError(source, f"tensor {i} has {bad} non-finite values (NaN or Inf)")
    return weights


# -- compressed updates ---------------------------------------------------------------------------------

COMPRESSIONS = ("float16", "int8")
"""What a job may ask its workers to send (`JobSpec.compression`): the update's change from the round's
base weights, each float tensor as float16, or as int8 with one float32 scale per tensor (max |delta| /
127, round to nearest), then deflated. Decoding is exact float32 arithmetic (`base + q * scale`), so
the owner, miners and `chain verify` turn the same bytes into the same weights, and the chain records
what was sent (the update's CID names the compressed file)."""
DELTA_FORMAT = "grid_ipfs.delta.v1"
DEFLATE_MAGIC = b"grid_ipfs.deflate.v1\n"
"""Prefix of a deflated weights file: unlike a safetensors file's first 8 bytes, never a valid header length."""


def is_delta(data: bytes) -> bool:
    """Whether `data` is a compressed update (decoded only against a base), judged by its first bytes
    or its header's format; anything else (garbage included) is not."""
    if bytes(data[:len(DEFLATE_MAGIC)]) == DEFLATE_MAGIC:
        return True
    try:
        return _safetensors_metadata(data, "weights").get("format") == DELTA_FORMAT
    except PayloadError:
        return False


def update_to_bytes(weights: list[np.ndarray], base: list[np.ndarray], compression: str) -> bytes:
    """A compressed update (see `COMPRESSIONS`): `weights - base` quantized, as a deflated safetensors
    file in `DELTA_FORMAT`. Tensors that are not floating point go as they are."""
    import zlib

    from safetensors.numpy import save

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if len(weights) != len(base):
        raise ValueError(f"{len(weights)} tensors, {len(base)} base tensors")
    tensors: dict[str, np.ndarray] = {}
    for i, (w, b) in enumerate(zip(weights, base)):
        w, b = np.asarray(w), np.asarray(b)
        if not np.issubdtype(w.dtype, np.floating):
            tensors[weight_key(i)] = np.asarray(w, order="C")
            continue
        delta = w.astype(np.float32) - b.astype(np.float32)
        if compression == "float16":
            tensors[weight_key(i)] = np.asarray(delta.astype(np.float16), order="C")
        else:
            peak = float(np.max(np.abs(delta))) if delta.size else 0.0
            scale = np.float32(peak / 127.0)
            q = np.rint(delta / scale) if scale > 0 else np.zeros_like(delta)
            tensors[weight_key(i)] = np.asarray(np.clip(q, -127, 127).astype(np.int8), order="C")
            tensors[_scale_key(i)] = np.asarray(scale, dtype=np.float32)
    data = save(tensors, metadata={"format": DELTA_FORMAT, "count": str(len(weights)), "compression": compression})
    return DEFLATE_MAGIC + zlib.compress(_canonical_header(data), 6)


def _scale_key(index: int) -> str:
    return f"s{index:04d}"


def _inflate(data: bytes, source: str, like: list[np.ndarray] | None) -> bytes:
    """The deflated file, inflated to at most what the weights could need (a bomb stops there)."""
    import zlib

    limit = MAX_WEIGHTS_BYTES
    if like is not None:  # the tensors of `like` at full width, plus room for a header
        limit = min(limit, sum(np.asarray(w).nbytes for w in like) + 64 * len(like) + 4096)
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(bytes(data[len(DEFLATE_MAGIC):]), limit + 1)
    except zlib.error as exc:
        raise PayloadError(source, f"expected a deflated weights file ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadError(source, f"a deflated weights file inflating past {limit} bytes")
    if not inflater.eof:
        raise PayloadError(source, "a deflated weights file that ends early")
    return out


def _decode_delta(data: bytes, metadata: dict, base: list[np.ndarray] | None, source: str) -> list[np.ndarray]:
    from safetensors.numpy import load

    compression = metadata.get("compression")
    if compression not in COMPRESSIONS:
        raise PayloadError(source, f"a compressed update with compression {str(compression)[:20]!r}, "
                                   f"not one of {', '.join(COMPRESSIONS)}")
    if base is None:
        raise PayloadError(source, "a compressed update, and no base weights to decode it against")
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise PayloadError(source, f"expected a compressed update ({type(exc).__name__}: {_shorten(str(exc))})") \
            from None
    n = len(base)
    scales = {_scale_key(i) for i, b in enumerate(base)
              if compression == "int8" and np.issubdtype(np.asarray(b).dtype, np.floating)}
    if metadata.get("count") != str(n) or set(tensors) != {weight_key(i) for i in range(n)} | scales:
        raise PayloadError(source, f"a compressed update of {n} tensors, like its base weights; got keys "
                                   f"{sorted(tensors)[:6]}")
    out = []
    for i, b in enumerate(base):
        b, t = np.asarray(b), tensors[weight_key(i)]
        if t.shape != b.shape:
            raise PayloadError(source, f"tensor {i}: shape {t.shape}, its base's is {b.shape}")
        if not np.issubdtype(b.dtype, np.floating):
            if t.dtype != b.dtype:
                raise PayloadError(source, f"tensor {i}: {t.dtype}, its base's is {b.dtype}")
            out.append(np.array(t, copy=True))
            continue
        want = np.float16 if compression == "float16" else np.int8
        if t.dtype != want:
            raise PayloadError(source, f"tensor {i}: {t.dtype}, a {compression} update holds {np.dtype(want)}")
        delta = t.astype(np.float32)
        if compression == "int8":
            scale = tensors[_scale_key(i)]
            if scale.shape != () or scale.dtype != np.float32 or not (np.isfinite(scale) and scale >= 0):
                raise PayloadError(source, f"tensor {i}: its scale must be one finite float32 >= 0")
            with np.errstate(over="ignore"):
                delta = delta * scale
        with np.errstate(over="ignore", invalid="ignore"):
            out.append((b.astype(np.float32) + delta).astype(b.dtype))
    return out


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """Read the `__metadata__` of a safetensors header (the numpy loader drops it)."""
    return _metadata(_safetensors_header(data, source)[0])


def _metadata(header: dict) -> dict:
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _safetensors_header(data: bytes | bytearray, source: str) -> tuple[dict, int]:
    """A safetensors file's header, parsed, and where its data section starts.

    The layout is an 8-byte little-endian header length, then that many bytes of JSON (an object).
    """
    expected = "expected a safetensors weights file"
    if len(data) < 8:
        raise PayloadError(source, f"{expected} (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > len(data) - 8:
        raise PayloadError(source, f"{expected} (header length {header_len} exceeds the data)")
    if header_len > MAX_WEIGHTS_HEADER_BYTES:  # before parsing: the parse is what costs the memory
        raise PayloadError(source, f"{expected} (header of {header_len} bytes, more than "
                                   f"{MAX_WEIGHTS_HEADER_BYTES})")
    try:
        header = json.loads(bytes(data[8:8 + header_len]).decode("utf-8"), object_pairs_hook=_strict_object,
                            parse_constant=_no_constant)
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise PayloadError(source, f"{expected} (header is not JSON: {_shorten(str(exc))})") from exc
    if not isinstance(header, dict):
        raise PayloadError(source, f"{expected} (header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PayloadError(source, f"{expected} (__metadata__ must map strings to strings)")
    tensors = len(header) - ("__metadata__" in header)
    if tensors > MAX_TENSORS:
        raise PayloadError(source, f"{expected} (it declares {tensors} tensors, more than {MAX_TENSORS})")
    return header, 8 + header_len


def _strict_object(pairs: list[tuple[str, Any]]) -> dict:
    """A header object as safetensors' own reader takes it: no key twice, every string valid UTF-8 (Python's
    `json` keeps the last duplicate and lone surrogates, which another reader of the chain would refuse)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"a key appears twice in one object ({_shorten(repr([k for k, _ in pairs]), 80)})")
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            text.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
    return out


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


def _check_like(weights: list[np.ndarray], like: list[np.ndarray], source: str) -> None:
    """Raise on the first difference in count, shape or dtype from the reference weights."""
    if len(weights) != len(like):
        raise PayloadError(source, f"expected {len(like)} tensors, got {len(weights)}")
    for i, (got, want) in enumerate(zip(weights, like)):
        want = np.asarray(want)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise PayloadError(source, f"tensor {i}: expected shape {want.shape} {want.dtype}, "
                                       f"got {got.shape} {got.dtype}")


# -- JSON -----------------------------------------------------------------------------------------------


def json_to_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, and no NaN/Infinity (they are not JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def json_from_bytes(data: bytes, *, source: str = "json", max_bytes: int = MAX_JSON_BYTES,
                    max_depth: int | None = None) -> Any:
    """Parse untrusted UTF-8 JSON, refusing oversize input, nesting deeper than `max_depth` (default
    `limits.MAX_JSON_DEPTH`, measured before parsing: the parser recurses per level) and the
    non-standard NaN/Infinity tokens."""
    from .limits import MAX_JSON_DEPTH, json_too_deep

    _check_size(data, max_bytes, source, "a JSON document")
    limit = MAX_JSON_DEPTH if max_depth is None else max_depth
    depth = json_too_deep(bytes(data), limit)
    if depth is not None:
        raise PayloadError(source, f"JSON nested {depth} levels deep (at most {limit})")

    def reject_constant(token: str):
        raise ValueError(f"{token} is not valid JSON")

    try:
        return json.loads(bytes(data).decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(source, f"expected a UTF-8 JSON document ({_shorten(str(exc))})") from exc


# -- helpers --------------------------------------------------------------------------------------------


def _check_size(data: bytes, max_bytes: int, source: str, what: str) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(source, f"expected {what} as bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise PayloadError(source, f"expected {what} of at most {max_bytes} bytes, got {len(data)}")


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = [
    "MAX_JSON_BYTES", "MAX_MODEL_BYTES", "MAX_MODEL_MEMBERS", "MAX_TENSORS", "MAX_WEIGHTS_BYTES",
    "MAX_WEIGHTS_HEADER_BYTES", "MODEL_UNCOMPRESSED_FACTOR",
    "PayloadError", "WEIGHTS_FORMAT", "json_from_bytes", "json_to_bytes", "model_from_bytes",
    "model_to_bytes", "weight_key", "weights_from_bytes", "weights_to_bytes",
    "COMPRESSIONS", "DELTA_FORMAT", "is_delta", "update_to_bytes",
]
