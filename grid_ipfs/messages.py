"""The pubsub protocol: small signed JSON messages that carry CIDs, never payloads.

Anyone can publish on a pubsub topic, so a message is data to judge, not an instruction: `decode` checks
size (64 KiB), nesting (`limits.MAX_JSON_DEPTH` levels, measured before parsing), encoding, version, type,
the exact set of fields, every field's type and range (integers up to `limits.MAX_COUNT`, example counts up
to `limits.MAX_NUM_EXAMPLES`, strings without control characters), that CIDs parse, and finally the
Ed25519 signature of the sender named in `from` (see `grid_ipfs.identity` for why the
daemon's own peer ID is not used). Whatever fails raises `MessageError`, whose `reason` is short and
precise because it is what gets logged when the message is dropped.

Wire form: one JSON object per pubsub message with `"v": 1`, `"type"`, `"job"`, `"from"` and `"sig"`
plus the type's fields. `sig` is the unpadded base64url Ed25519 signature over the *canonical JSON* of
the object without `sig` (`canonical_json`: sorted keys, no spaces, UTF-8, no NaN), recomputed by the
receiver from the parsed object, so it does not depend on how the sender spaced or ordered its JSON.

Topics: `JOBS_TOPIC` announces jobs; everything about one job goes to `job_topic(job_id)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import GridError
from .identity import SIGNATURE_LENGTH, Identity, b64url_decode, b64url_encode, is_public_id, verify
from .ipfs.cids import CID, cid_str, parse_cid
from .ipfs.errors import InvalidCID
from .limits import MAX_COUNT, MAX_JSON_DEPTH, MAX_NUM_EXAMPLES, json_too_deep, object_depth_over
from .text import control_character

__all__ = [
    "VERSION", "JOBS_TOPIC", "MAX_MESSAGE_BYTES", "MAX_JSON_DEPTH", "MAX_NUM_EXAMPLES", "MessageError", "Envelope",
    "Job", "Join", "Round", "Update", "Head", "Done", "Propose", "Proposal", "Endorse", "Message",
    "BACKENDS", "encode", "decode", "canonical_json", "job_topic", "topic_of", "valid_job_id",
]

VERSION = 1
JOBS_TOPIC = "grid-ipfs/v1/jobs"
MAX_MESSAGE_BYTES = 64 * 1024
"""Our messages are a few hundred bytes; gossipsub would carry up to 1 MiB, we refuse far less."""

_JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENVELOPE = ("v", "type", "job", "from", "sig")


class MessageError(GridError, ValueError):
    """A message that is dropped; `reason` says why in a few words."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def valid_job_id(value: object) -> bool:
    """Job ids are 1-64 characters of `[A-Za-z0-9_.-]`: safe in topic names, file names and logs."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def job_topic(job_id: str) -> str:
    """The topic of one job's rounds, updates, heads and done notice."""
    if not valid_job_id(job_id):
        raise MessageError(f"bad job id {_short(job_id)}")
    return f"grid-ipfs/v1/job/{job_id}"


def canonical_json(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8, non-finite floats refused.

    MessageError for anything nested deeper than MAX_JSON_DEPTH: `json.dumps` recurses per level, and a
    deep enough value would raise RecursionError instead of a reason."""
    if object_depth_over(obj, MAX_JSON_DEPTH):
        raise MessageError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


# -- field checks: each takes (field name, value) and returns the value to store, or raises ----------------


def _short(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: object) -> bool:
    # True is an int to Python, not to us; numpy integers (len() arithmetic) are welcome.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _job(name: str, value: object) -> str:
    if not valid_job_id(value):
        raise MessageError(f"bad job id {_short(value)}")
    return value  # type: ignore[return-value]


def _int(minimum: int, maximum: int = MAX_COUNT) -> Callable[[str, object], int]:
    """An integer in [minimum, maximum]: a peer's number never overflows a float, a seed or a loop later."""
    def check(name: str, value: object) -> int:
        if not _is_int(value) or value < minimum:  # type: ignore[operator]
            raise MessageError(f"{name}: expected an integer >= {minimum}, got {_short(value)}")
        if value > maximum:  # type: ignore[operator]
            raise MessageError(f"{name}: {_short(value, 30)} is over the limit {maximum}")
        return int(value)  # type: ignore[call-overload]
    return check


_num_examples = _int(1, MAX_NUM_EXAMPLES)


def _float(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # Keras metrics: often np.float32
        raise MessageError(f"{name}: expected a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:  # a 400-digit JSON integer is valid JSON
        number = math.inf
    if not math.isfinite(number):
        raise MessageError(f"{name}: non-finite number {number}")
    return number


def _cid(name: str, value: object) -> str:
    if isinstance(value, CID):
        return cid_str(value)  # callers may pass what IPFSClient.add returned
    try:
        parse_cid(value)  # type: ignore[arg-type]
        if value != value.strip():  # type: ignore[union-attr]
            raise InvalidCID(value, "surrounding whitespace")
    except InvalidCID as exc:
        raise MessageError(f"{name}: {exc}") from None
    return value  # type: ignore[return-value]


def _optional(check: Callable[[str, object], Any]) -> Callable[[str, object], Any]:
    """None (the field is absent), or a value passing `check`."""
    def optional(name: str, value: object) -> Any:
        return None if value is None else check(name, value)
    return optional


def _public_id(name: str, value: object) -> str:
    if not is_public_id(value):
        raise MessageError(f"{name}: not a public id: {_short(value)}")
    return value  # type: ignore[return-value]


def _str(name: str, value: object) -> str:
    """1-200 characters of plain text: names, reasons, verdicts and metric names end up in logs and on
    the owner's terminal, so control and format characters (newlines, ANSI escapes, bidi overrides)
    are refused here rather than escaped everywhere."""
    if not isinstance(value, str) or not value or len(value) > 200:
        raise MessageError(f"{name}: expected a string of 1-200 characters, got {_short(value)}")
    bad = control_character(value)
    if bad is not None:
        raise MessageError(f"{name}: control character {bad} in {_short(value)}")
    return value


def _metrics(name: str, value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise MessageError(f"{name}: expected an object of numbers, got {_short(value)}")
    return {_str(f"{name} key", k): _float(f"{name}.{k}", v) for k, v in value.items()}


def _selected(name: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"{name}: expected a list of worker ids or null, got {_short(value)}")
    ids = [_public_id(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if len(set(ids)) != len(ids):
        raise MessageError(f"{name}: duplicate worker id")
    return ids


def _mask_key(name: str, value: object) -> str | None:
    """None, or an X25519 public key as unpadded base64url (43 characters: 32 bytes)."""
    if value is None:
        return None
    try:
        ok = isinstance(value, str) and len(b64url_decode(value)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise MessageError(f"{name}: not an X25519 public key: {_short(value)}")
    return value  # type: ignore[return-value]


def _mask_sig(name: str, value: object) -> str | None:
    """None, or an Ed25519 signature as unpadded base64url (86 characters: 64 bytes)."""
    if value is None:
        return None
    try:
        ok = isinstance(value, str) and len(b64url_decode(value)) == SIGNATURE_LENGTH
    except ValueError:
        ok = False
    if not ok:
        raise MessageError(f"{name}: not an Ed25519 signature: {_short(value)}")
    return value  # type: ignore[return-value]


def _per_worker(what: str, check: Callable[[str, object], str | None]) -> Callable[[str, object], dict | None]:
    """None, or {worker id: value} for a round's selected workers, each value passing `check`."""
    def per_worker(name: str, value: object) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not value or len(value) > 1000:
            raise MessageError(f"{name}: expected an object of 1-1000 worker {what}, got {_short(value)}")
        for worker, item in value.items():
            _public_id(f"{name} key", worker)
            if item is None:
                raise MessageError(f"{name}.{worker[:12]}: missing")
            check(f"{name}.{worker[:12]}", item)
        return dict(value)
    return per_worker


def _both_or_neither(msg: object, first: str, second: str) -> None:
    if (getattr(msg, first) is None) != (getattr(msg, second) is None):
        raise MessageError(f"{first} and {second} go together")


BACKENDS = ("tensorflow", "jax", "torch")
"""The Keras backends a worker may name in its `update` (`Update.backend`): the ones Keras 3 trains with."""


def _backend(name: str, value: object) -> str | None:
    """None (not said, as by workers from before the field), or one of `BACKENDS` spelled exactly: the
    value reaches logs and the chain, so nothing else is accepted."""
    if value is None or (isinstance(value, str) and value in BACKENDS):
        return value  # type: ignore[return-value]
    raise MessageError(f"{name}: expected one of {', '.join(BACKENDS)}, got {_short(value)}")


_CONFIG_INTS = ("epochs", "batch_size", "rounds")


def _config(name: str, value: object) -> dict[str, Any]:
    """Training settings. Known keys are type-checked; unknown keys are kept, so a client can add an
    option (workers ignore what they do not know) without a protocol version bump."""
    if not isinstance(value, dict):
        raise MessageError(f"{name}: expected an object, got {_short(value)}")
    config = dict(value)
    for key in _CONFIG_INTS:
        if key not in config:
            raise MessageError(f"{name}: missing {key}")
        _int(1)(f"{name}.{key}", config[key])
    if config.get("val_split") is not None:
        split = _float(f"{name}.val_split", config["val_split"])
        if not 0.0 <= split < 1.0:
            raise MessageError(f"{name}.val_split: expected a number in [0, 1), got {split}")
        config["val_split"] = split
    try:
        canonical_json(config)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{name}: not JSON-encodable ({exc})") from None
    return config


# -- messages --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    """Base of the message types: validates every field on construction (decoded or built locally)."""

    TYPE: ClassVar[str]
    _CHECKS: ClassVar[dict[str, Callable[[str, Any], Any]]]

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = self._CHECKS[field.name](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)

    def fields(self) -> dict[str, Any]:
        """The type's own fields as JSON values (no envelope); optional fields left at None are omitted,
        so messages without them look exactly as before those fields existed."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.default is None and getattr(self, f.name) is None)}


@dataclass(frozen=True)
class Job(_Message):
    """Announces a job on `JOBS_TOPIC`: the model to train and how; `owner` must be the sender."""

    TYPE: ClassVar[str] = "job"
    _CHECKS: ClassVar[dict] = {"job": _job, "model": _cid, "owner": _public_id, "config": _config}
    job: str
    model: str
    owner: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Join(_Message):
    """A worker offers to train `job` on `num_examples` local examples; the worker is the sender.

    Sent on the job's topic after the worker fetched the model and checked its data fits. `name` is for
    humans (logs, progress); the sender's id is what identifies the worker. In a job with secure
    aggregation, `mask_key` is the worker's X25519 public key for this job and `mask_sig` its signature
    binding that key to the worker and the job (`grid_ipfs.secagg.sign_mask_key`), which the round
    passes on to the other workers.
    """

    TYPE: ClassVar[str] = "join"
    _CHECKS: ClassVar[dict] = {"job": _job, "name": _str, "num_examples": _num_examples, "mask_key": _mask_key,
                               "mask_sig": _mask_sig}
    job: str
    name: str
    num_examples: int
    mask_key: str | None = None
    mask_sig: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _both_or_neither(self, "mask_key", "mask_sig")


@dataclass(frozen=True)
class Round(_Message):
    """Starts round `round` from global `weights`; only `selected` workers (all if None) take part.

    `attempt` counts restarts of the same round (e.g. after a deadline passed with too few updates), so an
    update for an abandoned attempt is recognisable. With secure aggregation, `mask_keys` holds every
    selected worker's mask key and `mask_sigs` each worker's own signature of its key (from its join):
    each worker masks its update against all the others, once it has checked those signatures
    (`grid_ipfs.secagg`).
    """

    TYPE: ClassVar[str] = "round"
    _CHECKS: ClassVar[dict] = {"job": _job, "round": _int(1), "weights": _cid, "deadline": _float,
                               "selected": _selected, "attempt": _int(1),
                               "mask_keys": _per_worker("mask keys", _mask_key),
                               "mask_sigs": _per_worker("mask signatures", _mask_sig), "head": _optional(_cid)}
    job: str
    round: int
    weights: str
    deadline: float
    selected: list[str] | None
    attempt: int = 1
    mask_keys: dict[str, str] | None = None
    mask_sigs: dict[str, str] | None = None
    head: str | None = None
    """The chain block this round extends (the newest block, which the round's block will name as
    `prev`). Workers sign their update against it and refuse a head that does not descend from the
    last one they signed against; a round without it gets no update from them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _both_or_neither(self, "mask_keys", "mask_sigs")
        if self.mask_keys is not None and set(self.mask_keys) != set(self.mask_sigs or {}):
            raise MessageError("mask_sigs: not the same workers as mask_keys")


@dataclass(frozen=True)
class Update(_Message):
    """A worker's trained weights for one round; the worker is the message's sender."""

    TYPE: ClassVar[str] = "update"
    _CHECKS: ClassVar[dict] = {"job": _job, "round": _int(1), "weights": _cid, "num_examples": _num_examples,
                               "metrics": _metrics, "eval_metrics": _metrics, "attempt": _int(1),
                               "head": _optional(_cid), "base": _optional(_cid), "backend": _backend}
    job: str
    round: int
    weights: str
    num_examples: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    attempt: int = 1
    head: str | None = None
    """The chain head the round named (the block the round's block will link as `prev`)."""
    base: str | None = None
    """The global weights trained from (the round's `weights`). With `head`, it ties the signature to
    one history: the owner stores this message byte for byte and links it from the block that counts the
    update (`grid_ipfs.chain.contributions`), so a replay under another head or job does not verify."""
    backend: str | None = None
    """The Keras backend the worker trained with (one of `BACKENDS`; None: not said). Signed, so it
    reaches the chain inside the stored message and `chain verify` checks it like every other field."""


@dataclass(frozen=True)
class Head(_Message):
    """The job's chain grew: `head` is the new block, `weights` the global weights it records."""

    TYPE: ClassVar[str] = "head"
    _CHECKS: ClassVar[dict] = {"job": _job, "round": _int(0), "head": _cid, "weights": _cid}
    job: str
    round: int
    head: str
    weights: str


@dataclass(frozen=True)
class Done(_Message):
    """The job ended; `head` is its final chain block."""

    TYPE: ClassVar[str] = "done"
    _CHECKS: ClassVar[dict] = {"job": _job, "head": _cid, "reason": _str}
    job: str
    head: str
    reason: str = "completed"


@dataclass(frozen=True)
class Propose(_Message):
    """The owner closed round `round`'s updates and asks aggregators ("miners") for rival aggregates.

    `candidate` is the owner's own candidate block (staged, not yet on the chain): it fixes the round's
    updates, `seq` and `prev`; `reference` is the global weights the round started from. Proposals are
    taken until `deadline` (unix time). See `grid_ipfs.contest`.
    """

    TYPE: ClassVar[str] = "propose"
    _CHECKS: ClassVar[dict] = {"job": _job, "round": _int(1), "candidate": _cid, "reference": _cid,
                               "deadline": _float}
    job: str
    round: int
    candidate: str
    reference: str
    deadline: float


@dataclass(frozen=True)
class Proposal(_Message):
    """A miner's answer to a `propose`: `block` is its rival block for `candidate`'s round, signed by it."""

    TYPE: ClassVar[str] = "proposal"
    _CHECKS: ClassVar[dict] = {"job": _job, "round": _int(1), "candidate": _cid, "block": _cid}
    job: str
    round: int
    candidate: str
    block: str


@dataclass(frozen=True)
class Endorse(_Message):
    """A miner checked the block the owner appended for `round` (`head`) itself: `verdict` is
    "accepted" or "disputed: <why>"."""

    TYPE: ClassVar[str] = "endorse"
    _CHECKS: ClassVar[dict] = {"job": _job, "round": _int(1), "head": _cid, "verdict": _str}
    job: str
    round: int
    head: str
    verdict: str


Message = Job | Join | Round | Update | Head | Done | Propose | Proposal | Endorse
_TYPES: dict[str, type[_Message]] = {cls.TYPE: cls for cls in (Job, Join, Round, Update, Head, Done, Propose,
                                                                Proposal, Endorse)}


@dataclass(frozen=True)
class Envelope:
    """A decoded, verified message and the public id that signed it."""

    message: Message
    sender: str


def topic_of(msg: Message) -> str:
    """Where `msg` is published."""
    return JOBS_TOPIC if isinstance(msg, Job) else job_topic(msg.job)


def encode(msg: Message, identity: Identity) -> bytes:
    """Sign `msg` as `identity` and return the bytes to publish."""
    if isinstance(msg, Job) and msg.owner != identity.id:
        raise MessageError(f"job owner {msg.owner} is not the signer {identity.id}")
    obj = {"v": VERSION, "type": msg.TYPE, "from": identity.id, **msg.fields()}
    obj["sig"] = b64url_encode(identity.sign(canonical_json(obj)))
    data = canonical_json(obj)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message too large ({len(data)} bytes > {MAX_MESSAGE_BYTES})")
    return data


def _no_constants(name: str) -> None:
    raise MessageError(f"non-finite number {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise MessageError("duplicate key in JSON object")
    return obj


def decode(data: bytes) -> Envelope:
    """Parse, validate and verify one pubsub message; MessageError(reason) if it must be dropped."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message too large ({len(data)} bytes > {MAX_MESSAGE_BYTES})")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("not UTF-8") from None
    depth = json_too_deep(text)  # before json.loads, which recurses per level
    if depth is not None:
        raise MessageError(f"JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        obj = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except ValueError as exc:  # MessageError is a ValueError too: keep its reason
        raise (exc if isinstance(exc, MessageError) else MessageError(f"not JSON ({exc})")) from None
    except RecursionError:  # not reachable within MAX_JSON_DEPTH; kept so decode never raises past here
        raise MessageError("JSON nested too deep") from None
    if not isinstance(obj, dict):
        raise MessageError(f"not a JSON object but {type(obj).__name__}")

    if "v" not in obj:
        raise MessageError("missing protocol version v")
    if not _is_int(obj["v"]) or obj["v"] != VERSION:
        raise MessageError(f"unsupported protocol version {_short(obj['v'])}")
    kind = obj.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {_short(obj.get('type'))}")

    names = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [k for k in (*_ENVELOPE, *required) if k not in obj]
    if missing:
        raise MessageError(f"{cls.TYPE} message: missing field {missing[0]}")
    extra = sorted(set(obj) - set(_ENVELOPE) - set(names))
    if extra:
        raise MessageError(f"{cls.TYPE} message: unexpected field {_short(extra[0])}")

    sender = obj["from"]
    if not is_public_id(sender):
        raise MessageError(f"from: not a public id: {_short(sender)}")
    try:
        sig = b64url_decode(obj["sig"])
    except ValueError:
        raise MessageError(f"sig: not base64url: {_short(obj['sig'])}") from None
    message = cls(**{k: obj[k] for k in names if k in obj})
    if isinstance(message, Job) and message.owner != sender:
        raise MessageError(f"job owner {message.owner} is not the sender {sender}")

    signed = {k: v for k, v in obj.items() if k != "sig"}
    try:
        payload = canonical_json(signed)
    except MessageError:
        raise
    except ValueError:  # e.g. 1e999 parses as inf inside an unchecked config value
        raise MessageError("non-finite number in message") from None
    if not verify(sender, payload, sig):
        raise MessageError(f"bad signature from {sender}")
    return Envelope(message, sender)
