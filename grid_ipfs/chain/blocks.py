"""Chain blocks: signed dag-cbor maps whose links are real IPLD links.

One block per aggregated round, plus a genesis block (seq 0, round 0, aggregation "init") that records
the model and the initial weights. Links are CIDs encoded as dag-cbor tag 42, so any IPFS node can walk
the history (`ipfs dag get HEAD/prev/prev/round`) and a recursive pin of the head keeps all of it.

    v, job, seq, round, prev (absent in genesis), model, weights,
    aggregation {name, params}, updates [{worker, weights, num_examples, metrics, message}] sorted by worker,
    metrics {str: float}, time, signer, sig, and in genesis only an optional config {str: value}
    (the job's training settings: epochs, batch size, rounds, ... so `client resume` and auditors
    know what was asked of the workers), and in any block an optional ext {str: value} and an
    optional fold [int]

`fold` is the order in which the aggregate added its updates, as indices into `updates`, when that was
not their listed order: an owner streaming a round adds each update as its weights arrive (memory for
one model, not one per worker), and float sums depend on the order, so `chain verify` adds them in the
recorded one (`summation_order`). It is omitted when the order is the listed one.

`ext` is where an application brings its own block fields (a custom block type: `{"kind": "linreg",
"coef": [...], ...}`); the client fills it from `ClientCallback.block_fields`, and `verify_chain`'s
`check_ext` lets an auditor re-check it. Its keys are non-empty strings; its values plain dag-cbor
data: ints (signed 64-bit), finite floats, strings, bytes, bools, IPLD links (CIDs), and lists and
maps (non-empty string keys) of those, nested at most `EXT_MAX_DEPTH` levels. null is refused (omit the
key) and so is an empty ext (omit the field), so every value has one encoding. It is signed like
every other field: changing it breaks the signature.

Versions: `v` 2 (written since signed contributions) links from each update entry the worker's signed
`update` message (`message`, a raw block holding the message exactly as published; see
`contributions`), so the entry can be checked against the worker's own words. Version 1 entries have
no `message`: such blocks still decode and verify, their contributions reported as unproven.

`sig` is the signer's Ed25519 signature over the dag-cbor encoding of the block without `sig`.
dag-cbor is canonical (one encoding per value), so a block's CID can be recomputed from its fields by
anyone, and `decode_block` refuses bytes that would not re-encode identically. Numbers are typed
strictly: counters are ints (never bools or floats), metrics and time are finite floats.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from typing import Any

import dag_cbor
from multiformats import CID, multihash

from ..errors import GridError
from ..identity import Identity, is_public_id, verify
from ..ipfs.cids import InvalidCID, cid_str, parse_cid
from ..limits import MAX_NUM_EXAMPLES, MAX_STALENESS
from ..messages import valid_job_id

__all__ = [
    "BLOCK_VERSION", "EXT_MAX_DEPTH", "GENESIS_AGGREGATION", "ChainError",
    "encode_block", "decode_block", "sign_block", "check_signature", "validate_block", "block_cid",
    "normalise_ext", "summation_order", "READABLE_VERSIONS", "ROUND_FIELDS", "MAX_UPDATES", "MAX_CBOR_DEPTH",
    "check_cbor_depth",
]

BLOCK_VERSION = 2
"""The version `sign_block` writes. `decode_block` reads `READABLE_VERSIONS`."""
READABLE_VERSIONS = (1, 2)
ROUND_FIELDS = ("job", "round", "seq", "prev", "model", "updates")
"""The fields that fix which round of which chain a block aggregates, and over which updates: rival
blocks of the same round (competing aggregators, `grid_ipfs.contest`) share them."""
GENESIS_AGGREGATION = "init"

_REQUIRED = {"v", "job", "seq", "round", "model", "weights", "aggregation", "updates", "metrics", "time",
             "signer", "sig"}
_UPDATE_KEYS = {1: {"worker", "weights", "num_examples", "metrics"},
                2: {"worker", "weights", "num_examples", "metrics", "message"}}
_ASYNC_KEYS = {"base", "staleness"}
"""What an update entry of an asynchronous job's block adds (version 2): the block its worker trained
from (the head its signed message names) and how many blocks older than this block's prev that is."""
_OPTIONAL = {"prev", "config", "ext", "fold"}
EXT_MAX_DEPTH = 16
"""How deeply lists and maps may nest inside `ext` (the ext map itself is level 1)."""
_INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_UPDATES = 10_000
"""Most updates one block may record: an auditor fetches and parses each, so a block cannot ask for more."""
MAX_CBOR_DEPTH = 64
"""How deeply lists, maps and tags may nest in any dag-cbor bytes decoded here (a block needs 4, plus ext's
`EXT_MAX_DEPTH`). Checked before decoding: the dag-cbor decoder recurses once per level."""
_CID_TAG = 42  # the one CBOR tag dag-cbor allows: a CID


class ChainError(GridError):
    """A block or chain that is malformed, does not hash to its CID, or cannot be extended."""


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40


def _brief(value: object) -> str:
    """A short repr of a value from a block for an error message: however long or deeply nested the
    value, the message stays one short line (reprlib stops at `maxlevel`, so no recursion limit)."""
    return _BRIEF.repr(value)


def _is_id(value: object) -> bool:
    return isinstance(value, str) and is_public_id(value)  # a str first: never repr a peer's nested value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metrics(where: str, metrics: object) -> None:
    if not isinstance(metrics, dict):
        raise ChainError(f"{where}: expected a map of floats")
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ChainError(f"{where}: metric names must be non-empty strings, got {_brief(key)}")
        if not isinstance(value, float) or not math.isfinite(value):
            raise ChainError(f"{where}.{key}: expected a finite float, got {_brief(value)}")


def _check_ext_value(where: str, value: object, depth: int) -> None:
    if isinstance(value, (bool, str, bytes, CID)):  # bool before int: True is an int in Python
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ChainError(f"{where}: integer out of the signed 64-bit range: {value}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ChainError(f"{where}: expected a finite float, got {_brief(value)}")
        return
    if isinstance(value, (list, dict)) and depth >= EXT_MAX_DEPTH:
        raise ChainError(f"{where}: nested deeper than {EXT_MAX_DEPTH} levels")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_ext_value(f"{where}[{i}]", item, depth + 1)
        return
    if isinstance(value, dict):
        _check_ext_map(where, value, depth + 1)
        return
    if value is None:
        raise ChainError(f"{where}: null is not allowed (omit the key)")
    raise ChainError(f"{where}: {type(value).__name__} is not plain dag-cbor data (int, float, str, bytes, bool, "
                     "CID, list, map)")


def _check_ext_map(where: str, value: dict, depth: int) -> None:
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ChainError(f"{where}: keys must be non-empty strings, got {_brief(key)}")
        _check_ext_value(f"{where}.{key}", item, depth)


def _check_ext(ext: object) -> None:
    if not isinstance(ext, dict):
        raise ChainError(f"ext: expected a map with non-empty string keys, got {type(ext).__name__}")
    if not ext:
        raise ChainError("ext: an empty map (omit the field instead)")
    _check_ext_map("ext", ext, 1)


def validate_block(block: object, *, signed: bool = True) -> None:
    """Raise ChainError naming the first field that does not fit the block layout.

    With `signed=False` the block may lack `sig` (what `sign_block` checks before signing).
    Signature validity is not checked here; see `check_signature`.
    """
    if not isinstance(block, dict):
        raise ChainError(f"a block is a map, got {type(block).__name__}")
    required = _REQUIRED if signed else _REQUIRED - {"sig"}
    genesis = block.get("seq") == 0
    missing = sorted((required - set(block)) | ({"prev"} - set(block) if not genesis else set()))
    if missing:
        raise ChainError(f"missing field {missing[0]}")
    extra = sorted(set(block) - _REQUIRED - _OPTIONAL)
    if extra:
        raise ChainError(f"unexpected field {_brief(extra[0])}")
    if "config" in block:
        if not genesis:
            raise ChainError(f"config at seq {_brief(block['seq'])}: the job's config lives in genesis only")
        if not isinstance(block["config"], dict) or not all(isinstance(k, str) and k for k in block["config"]):
            raise ChainError("config: expected a map with non-empty string keys")
    if "ext" in block:
        _check_ext(block["ext"])
    if not _is_int(block["v"]) or block["v"] not in READABLE_VERSIONS:
        raise ChainError(f"unsupported block version {_brief(block['v'])}")
    if not valid_job_id(block["job"]):
        raise ChainError(f"bad job id {_brief(block['job'])}")
    for key in ("seq", "round"):
        if not _is_int(block[key]) or block[key] < 0:
            raise ChainError(f"{key}: expected an integer >= 0, got {_brief(block[key])}")
    if genesis and "prev" in block:
        raise ChainError("genesis (seq 0) has a prev link")
    if genesis != (block["round"] == 0):
        raise ChainError(f"round {block['round']} at seq {block['seq']}: round 0 is genesis only")
    for key in ("prev", "model", "weights"):
        if key in block and not isinstance(block[key], CID):
            raise ChainError(f"{key}: expected an IPLD link, got {type(block[key]).__name__}")

    aggregation = block["aggregation"]
    if (not isinstance(aggregation, dict) or set(aggregation) != {"name", "params"}
            or not isinstance(aggregation["name"], str) or not aggregation["name"]
            or not isinstance(aggregation["params"], dict)):
        raise ChainError("aggregation: expected {name: str, params: map}")
    if genesis != (aggregation["name"] == GENESIS_AGGREGATION):
        raise ChainError(f"aggregation {_brief(aggregation['name'])} at seq {block['seq']}: "
                         f"{GENESIS_AGGREGATION!r} is for genesis only")

    updates = block["updates"]
    if not isinstance(updates, list) or genesis != (not updates):
        raise ChainError("updates: expected a list, empty in genesis only")
    if len(updates) > MAX_UPDATES:
        raise ChainError(f"updates: {len(updates)} updates, more than {MAX_UPDATES}")
    keys = _UPDATE_KEYS[block["v"]]
    if block["v"] >= 2 and updates and isinstance(updates[0], dict) and _ASYNC_KEYS <= set(updates[0]):
        keys = keys | _ASYNC_KEYS  # an async block: every entry says its base and staleness
    for i, update in enumerate(updates):
        where = f"updates[{i}]"
        if not isinstance(update, dict) or set(update) != keys:
            raise ChainError(f"{where}: expected exactly {sorted(keys)} (block version {block['v']})")
        if "base" in keys and not isinstance(update["base"], CID):
            raise ChainError(f"{where}.base: expected an IPLD link to the block its worker trained from")
        if "staleness" in keys and not (_is_int(update["staleness"]) and 0 <= update["staleness"] <= MAX_STALENESS):
            raise ChainError(f"{where}.staleness: expected an integer from 0 to {MAX_STALENESS}, "
                             f"got {_brief(update['staleness'])}")
        if not _is_id(update["worker"]):
            raise ChainError(f"{where}.worker: not a public id: {_brief(update['worker'])}")
        if i and not updates[i - 1]["worker"] < update["worker"]:
            raise ChainError(f"{where}: updates must be sorted by worker id, each worker once")
        if not isinstance(update["weights"], CID):
            raise ChainError(f"{where}.weights: expected an IPLD link")
        if "message" in update and not (isinstance(update["message"], CID) and update["message"].codec.name == "raw"):
            raise ChainError(f"{where}.message: expected an IPLD link to a raw block (the signed update message)")
        if not _is_int(update["num_examples"]) or not 1 <= update["num_examples"] <= MAX_NUM_EXAMPLES:
            raise ChainError(f"{where}.num_examples: expected an integer from 1 to {MAX_NUM_EXAMPLES}, "
                             f"got {_brief(update['num_examples'])}")
        _check_metrics(f"{where}.metrics", update["metrics"])

    if "fold" in block:
        _check_fold(block["fold"], len(updates))

    _check_metrics("metrics", block["metrics"])
    if not isinstance(block["time"], float) or not math.isfinite(block["time"]):
        raise ChainError(f"time: expected a finite float, got {_brief(block['time'])}")
    if not _is_id(block["signer"]):
        raise ChainError(f"signer: not a public id: {_brief(block['signer'])}")
    if signed and not (isinstance(block["sig"], bytes) and len(block["sig"]) == 64):
        raise ChainError("sig: expected 64 bytes")


def _check_fold(fold: object, n: int) -> None:
    if not isinstance(fold, list) or not all(_is_int(i) for i in fold) or sorted(fold) != list(range(n)):
        raise ChainError(f"fold: expected the update indices 0..{n - 1}, each once, got {_brief(fold)}")
    if fold == list(range(n)):
        raise ChainError("fold: the updates' own order; omit the field (one encoding per block)")


def summation_order(block: dict) -> list[int]:
    """The order in which the block's updates were added into its aggregate: `fold` when recorded (an
    owner folds updates in as they arrive), else the listed order. Whoever recomputes the aggregate adds
    them in this order: float sums depend on it."""
    return list(block.get("fold", range(len(block["updates"]))))


def block_cid(data: bytes) -> CID:
    """The CIDv1 (dag-cbor, sha2-256) of encoded block bytes, as `ipfs block put` computes it."""
    return CID("base32", 1, "dag-cbor", multihash.digest(data, "sha2-256"))


def encode_block(block: dict) -> tuple[bytes, CID]:
    """Validate a signed block and return its dag-cbor bytes and CID."""
    validate_block(block)
    data = _encode(block)
    return data, block_cid(data)


def _encode(block: dict) -> bytes:
    """dag-cbor bytes of a block; ChainError for a value dag-cbor cannot hold (e.g. a param beyond 64 bits)."""
    try:
        return dag_cbor.encode(block)
    except Exception as exc:  # dag_cbor raises its own errors, ValueError and TypeError by value
        raise ChainError(f"not encodable as dag-cbor: {_first_line(exc)}") from None


def decode_block(data: bytes, cid: str | CID | None = None) -> dict:
    """Parse block bytes, checking (when `cid` is given) that they hash to it, and validate the layout."""
    data = bytes(data)
    if cid is not None:
        cid = parse_cid(cid)
        try:
            ok = cid.codec.name == "dag-cbor" and multihash.digest(data, cid.hashfun.name) == cid.digest
        except Exception:  # an unknown hash function: we cannot recompute it, so we cannot trust it
            ok = False
        if not ok:
            raise ChainError(f"block {cid_str(cid)}: bytes do not hash to its CID")
    check_cbor_depth(data)
    try:
        block = dag_cbor.decode(data)
    except Exception as exc:  # untrusted bytes: any decoder failure (CBOR errors, bad CID bytes) is ours
        raise ChainError(f"not canonical dag-cbor: {_first_line(exc)}") from None
    validate_block(block)
    if dag_cbor.encode(block) != data:  # belt and braces: the decoder should refuse non-canonical input
        raise ChainError("not canonical dag-cbor: re-encoding differs")
    return block


def _first_line(exc: BaseException) -> str:
    """A decoder error as one line: its first line, whitespace collapsed (dag_cbor messages go on to
    draw a caret under the offending bytes, which means nothing in a log line)."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def check_cbor_depth(data: bytes, max_depth: int = MAX_CBOR_DEPTH) -> None:
    """Raise ChainError when the CBOR items in `data` nest lists, maps and tags deeper than `max_depth`,
    or carry a tag other than 42 (the only tag dag-cbor allows).

    A scan of the item heads with an explicit stack (no recursion, no values built), run before
    `dag_cbor.decode`, whose recursion would otherwise be bounded only by Python's recursion limit.
    Malformed bytes are left to the decoder, which names the problem; this only measures nesting.
    """
    pending = [1]  # per open level: how many items are still to be read in it
    pos, end = 0, len(data)
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= end:
            return
        major, info = data[pos] >> 5, data[pos] & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            arg, pos = int.from_bytes(data[pos:pos + size], "big"), pos + size
        else:
            return  # indefinite lengths and reserved values: not dag-cbor, the decoder refuses them
        if major in (2, 3):  # byte and text strings: skip the payload
            pos += arg
        elif major in (4, 5):  # list, map: a new level of `arg` items (twice that for a map)
            if len(pending) > max_depth:
                raise ChainError(f"not canonical dag-cbor: nested deeper than {max_depth} levels")
            pending.append(arg * (2 if major == 5 else 1))
        elif major == 6:  # a tag applies to the one item after it: a level, or tags would nest unseen
            if arg != _CID_TAG:
                raise ChainError(f"not canonical dag-cbor: tag {_brief(arg)} (only {_CID_TAG}, a CID, is allowed)")
            if len(pending) > max_depth:
                raise ChainError(f"not canonical dag-cbor: nested deeper than {max_depth} levels")
            pending.append(1)


def _float(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ChainError(f"{where}: expected a number, got {_brief(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ChainError(f"{where}: number out of range") from None


def _link(where: str, value: object) -> CID:
    try:
        return parse_cid(value)  # type: ignore[arg-type]
    except InvalidCID as exc:
        raise ChainError(f"{where}: {exc}") from None


def _plain(value: object) -> object:
    """numpy scalars and arrays -> Python values and lists, tuples -> lists, recursively."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()  # type: ignore[union-attr]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def normalise_ext(ext: object) -> dict | None:
    """`ext` as a block holds it: numpy values and tuples made plain (a callback may return
    `model.get_weights()[0].ravel()` as is), then checked. None or an empty map means "no ext" and
    gives None. Raises ChainError naming the first bad key (`ext.coef[3]: expected a finite float`)."""
    if ext is None or (isinstance(ext, dict) and not ext):
        return None
    ext = _plain(ext)
    _check_ext(ext)
    return ext  # type: ignore[return-value]


def _normalise(fields: dict) -> dict[str, Any]:
    """Accept what callers naturally hold (CID strings, numpy scalars, ints for floats, unsorted
    updates) and turn it into the exact types the layout requires."""
    block = dict(fields)
    for key in ("prev", "model", "weights"):
        if key in block and block[key] is not None:
            block[key] = _link(key, block[key])
        elif key == "prev":
            block.pop("prev", None)
    if "ext" in block:
        ext = normalise_ext(block["ext"])
        if ext is None:
            del block["ext"]
        else:
            block["ext"] = ext
    if isinstance(block.get("metrics"), dict):
        block["metrics"] = {k: _float(f"metrics.{k}", v) for k, v in block["metrics"].items()}
    if "time" in block:
        block["time"] = _float("time", block["time"])
    if isinstance(block.get("updates"), (list, tuple)):
        updates = []
        for i, u in enumerate(block["updates"]):
            if not isinstance(u, dict):
                raise ChainError(f"updates[{i}]: expected a map")
            u = dict(u)
            for key in ("weights", "message", "base"):
                if key in u:
                    u[key] = _link(f"updates[{i}].{key}", u[key])
            if isinstance(u.get("num_examples"), numbers.Integral) and not isinstance(u["num_examples"], bool):
                u["num_examples"] = int(u["num_examples"])  # numpy ints from len(x) arithmetic
            if isinstance(u.get("metrics"), dict):
                u["metrics"] = {k: _float(f"updates[{i}].metrics.{k}", v) for k, v in u["metrics"].items()}
            updates.append(u)
        block["updates"] = sorted(updates, key=lambda u: str(u.get("worker")))
    return block


def sign_block(fields: dict, identity: Identity) -> dict:
    """Return the block `fields` signed by `identity` (sets `v`, `signer` and `sig`).

    The fields are normalised first (see `_normalise`) and validated, so a malformed block is never
    signed: a signature must only ever vouch for a block that other nodes will accept.
    """
    block = _normalise({k: v for k, v in fields.items() if k != "sig"})
    block["v"] = BLOCK_VERSION
    block["signer"] = identity.id
    validate_block(block, signed=False)
    block["sig"] = identity.sign(_encode(block))
    return block


def check_signature(block: dict) -> bool:
    """True when `sig` is the signer's signature over the block without `sig`; never raises."""
    try:
        unsigned = {k: v for k, v in block.items() if k != "sig"}
        return verify(block["signer"], dag_cbor.encode(unsigned), block["sig"])
    except Exception:  # a malformed block is simply not validly signed
        return False
