"""Property-based fuzzing of every decoder that takes a peer's bytes (hypothesis).

Each target states the boundary's promise: whatever a peer sends, the decoder either returns a checked
value or raises its one documented error (`MessageError`, `ChainError`, `PayloadError`); nothing else
escapes, and a verifier returns a verdict instead of raising. Mutations are *re-signed* where a signature
would otherwise stop them at the door, so the field checks behind it are what gets fuzzed.

`make test` runs the `ci` profile (a few hundred examples per target, seconds); `make fuzz` runs the
`fuzz` profile (tens of thousands, minutes). Profiles are registered in tests/conftest.py.
"""

from __future__ import annotations

import json
import re

import dag_cbor
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from grid_ipfs import messages
from grid_ipfs.chain import ChainError, decode_block, encode_block, sign_block, validate_block, verify_chain
from grid_ipfs.chain.contributions import message_cid
from grid_ipfs.identity import b64url_encode
from grid_ipfs.payloads import PayloadError, weights_from_bytes, weights_to_bytes
from grid_ipfs.text import control_character

from .test_chain_format import OWNER, WORKERS, MemoryStore, build_chain, get_block
from .test_messages import ME, samples

# -- values a peer can send ------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.sampled_from(["[/x]", "[bold]done: head bafy\n", "\x1b[2J", "$\\frac{", "../../etc"]),
)
json_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=30)


class Nested:
    """`[[[...0...]]]` `depth` deep, built without recursion; drawn as this small object so that
    hypothesis can print a failing example (its printer recurses too)."""

    def __init__(self, depth: int):
        self.depth = depth

    def __repr__(self) -> str:
        return f"Nested({self.depth})"

    def value(self) -> object:
        value: object = 0
        for _ in range(self.depth):
            value = [value]
        return value


def plain(value: object) -> object:
    """A drawn peer value as the peer would send it."""
    return value.value() if isinstance(value, Nested) else value


peer_values = st.one_of(json_values, st.integers(min_value=0, max_value=3000).map(Nested))

_SETTINGS = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- pubsub messages -------------------------------------------------------------------------------------


def _decode_or_drop(data: bytes) -> messages.Envelope | None:
    try:
        return messages.decode(data)
    except messages.MessageError as exc:
        assert exc.reason and "\n" not in exc.reason  # the reason is one log line
        return None


@settings(**_SETTINGS)
@given(st.binary(max_size=4096))
@example(b"[" * 60_000)
@example(b'{"v":1,"type":"job","config":' + b"[" * 30_000 + b"]" * 30_000 + b"}")
def test_decode_takes_any_bytes(data):
    _decode_or_drop(data)


@settings(**_SETTINGS)
@given(json_values)
def test_decode_takes_any_json(value):
    _decode_or_drop(json.dumps(value).encode())


def _resign(obj: dict, identity=ME) -> bytes:
    """`obj` with a valid signature by `identity`, so decode gets past the signature to the field checks."""
    obj = {k: v for k, v in obj.items() if k != "sig"}
    try:
        obj["sig"] = b64url_encode(identity.sign(messages.canonical_json(obj)))
    except (ValueError, TypeError, RecursionError):
        obj["sig"] = "A" * 86  # not canonical-encodable here: decode must still refuse it cleanly
    try:
        return json.dumps(obj).encode()
    except RecursionError:
        return b"{}"


_SAMPLES = [json.loads(messages.encode(m, ME)) for m in samples()]


@settings(**_SETTINGS)
@given(st.sampled_from(_SAMPLES), st.data())
def test_decode_checks_every_field_of_a_resigned_message(sample, data):
    obj = dict(sample)
    key = data.draw(st.sampled_from(sorted(obj) + ["extra"]))
    obj[key] = plain(data.draw(peer_values))
    envelope = _decode_or_drop(_resign(obj))
    if envelope is None:
        return
    message = envelope.message  # accepted: every field it holds is one the roles can use as it is
    for name in ("round", "attempt", "num_examples"):
        value = getattr(message, name, 1)
        assert isinstance(value, int) and 0 <= value < 2 ** 63
    for name in ("metrics", "eval_metrics"):
        for metric, number in (getattr(message, name, None) or {}).items():
            assert control_character(metric) is None and np.isfinite(number)
    for name in ("name", "reason", "verdict"):
        text = getattr(message, name, None)
        # no control or format character gets in (what the decoder promises); unassigned or private-use
        # code points and look-alike spaces may, and `printable` escapes those in every log line
        assert text is None or control_character(text) is None
    messages.canonical_json(envelope.message.fields())  # what was accepted can be signed again


# -- chain blocks ----------------------------------------------------------------------------------------


def _cbor_or_none(value: object) -> bytes | None:
    try:
        return dag_cbor.encode(value)
    except Exception:  # noqa: BLE001 - not encodable is not this test's subject
        return None


@settings(**_SETTINGS)
@given(st.binary(max_size=2048))
@example(b"\x81" * 50_000 + b"\x00")  # a CBOR array nested 50,000 deep
def test_decode_block_takes_any_bytes(data):
    try:
        decode_block(data)
    except ChainError as exc:
        assert "\n" not in str(exc)


_STORE = MemoryStore()
_CIDS = build_chain(_STORE, rounds=2)[1]
_BLOCK = get_block(_STORE, _CIDS[1])


@settings(**_SETTINGS)
@given(st.sampled_from(sorted(_BLOCK) + ["extra"]), peer_values)
def test_validate_block_refuses_cleanly_whatever_a_field_holds(key, value):
    block = {**_BLOCK, key: plain(value)}
    data = _cbor_or_none(block)
    try:
        validate_block(block)
        if data is not None:
            decode_block(data)
    except ChainError:
        pass


def _mutated_chain(key: str, value: object) -> tuple[MemoryStore, object] | None:
    """A copy of the 2-round chain whose round-1 block has `key` set to `value`, re-signed by the owner
    (so only the checks behind the signature can refuse it), and the round-2 block re-linked onto it."""
    store = MemoryStore()
    store.objects = dict(_STORE.objects)
    fields = {k: v for k, v in _BLOCK.items() if k not in ("sig", "signer")}
    fields[key] = plain(value)
    try:
        first = sign_block(fields, OWNER)
        data, cid = encode_block(first)
    except (ChainError, ValueError, TypeError, OverflowError, RecursionError):
        return None  # the writer refuses it: nothing to verify
    store.block_put(data)
    second = {k: v for k, v in get_block(_STORE, _CIDS[2]).items() if k not in ("sig", "signer")}
    second["prev"] = cid
    data, head = encode_block(sign_block(second, OWNER))
    store.block_put(data)
    return store, head


@settings(**_SETTINGS, max_examples=60)
@given(st.sampled_from(["round", "seq", "weights", "updates", "metrics", "aggregation", "model", "time", "ext"]),
       peer_values)
def test_verify_returns_a_verdict_for_any_resigned_block(key, value):
    made = _mutated_chain(key, value)
    if made is None:
        return
    store, head = made
    report = verify_chain(store, head)
    assert report.ok or (report.reason and "\n" not in report.reason)


_ENTRY = _BLOCK["updates"][0]
_MESSAGE = _STORE.block_get(_ENTRY["message"])
_WORKER = next(w for w in WORKERS if w.id == _ENTRY["worker"])


def _what_it_says(data: bytes) -> tuple:
    """What verify holds an update message to (all but `attempt`, which no block records)."""
    m = messages.decode(data).message
    return m.job, m.round, m.weights, m.num_examples, m.metrics, m.eval_metrics, m.head, m.base


@settings(**_SETTINGS, max_examples=60)
@given(st.sampled_from(sorted(json.loads(_MESSAGE)) + ["extra"]), peer_values, st.none() | st.binary(max_size=512))
def test_verify_returns_a_verdict_for_any_linked_update_message(key, value, raw):
    """The round-1 block's first entry links other bytes as its worker's message: arbitrary bytes, or the
    genuine message with one field changed and re-signed by the worker itself. Verify gives a one-line
    verdict at that block, and passes only if the message still says what the entry says."""
    data = raw if raw is not None else _resign({**json.loads(_MESSAGE), key: plain(value)}, _WORKER)
    made = _mutated_chain("updates", [{**_ENTRY, "message": message_cid(data)}, *_BLOCK["updates"][1:]])
    assert made is not None
    store, head = made
    store.block_put(data, codec="raw")
    report = verify_chain(store, head)  # a changed block 1 fails round 2: its workers signed against the old one
    assert report.ok or (report.reason and "\n" not in report.reason), report.reason
    if report.checks[1].ok:
        assert _what_it_says(data) == _what_it_says(_MESSAGE)
    else:
        assert report.first_bad_seq == 1, report.reason


# -- weights ---------------------------------------------------------------------------------------------

_WEIGHTS = weights_to_bytes([np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, dtype=np.float32)])


@settings(**_SETTINGS)
@given(st.binary(max_size=2048))
def test_weights_decoder_takes_any_bytes(data):
    try:
        weights_from_bytes(data)
    except PayloadError:
        pass


@settings(**_SETTINGS)
@given(st.lists(st.tuples(st.integers(0, len(_WEIGHTS) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_weights_decoder_takes_any_mutation_of_a_real_file(flips):
    """As bytes, and as the owner reads an update: into a bytearray, parsed in place (views into it)."""
    data = bytearray(_WEIGHTS)
    for at, byte in flips:
        data[at] = byte
    try:
        copies = weights_from_bytes(bytes(data))
    except PayloadError as refused:
        with pytest.raises(PayloadError, match=re.escape(str(refused))):
            weights_from_bytes(data)  # the same verdict from a buffer
        return
    views = weights_from_bytes(data)
    raw = np.frombuffer(data, np.uint8)
    for copy, view in zip(copies, views, strict=True):
        assert view.flags.writeable and (np.shares_memory(view, raw) or view.size == 0)
        assert copy.tobytes() == view.tobytes()
        assert not np.issubdtype(copy.dtype, np.inexact) or np.isfinite(copy).all()


# A header drawn field by field, so that the tensor table's checks (dtype, shape, offsets tiling the data
# section) are what gets fuzzed, not only the JSON around them.
_DTYPES = st.one_of(st.sampled_from(["F32", "F16", "F64", "I8", "I64", "U8", "U64", "BOOL"]),
                    st.sampled_from(["BF16", "F8_E4M3", "f32", "", 7, None, ["F32"]]))
_SHAPES = st.one_of(st.lists(st.integers(0, 5), max_size=4),
                    st.lists(st.integers(-2, 5), max_size=4),
                    st.lists(st.sampled_from([0, 1, 2 ** 40, 2 ** 41, 2 ** 64, True, 2.0, "3", None]), max_size=3),
                    st.sampled_from([None, 3, "3", {}]))
_NUDGE = st.sampled_from([0, 0, 0, 0, 0, 0, -2, -1, 1, 2])


_VALID_DTYPES = st.sampled_from(["F32", "F16", "F64", "I8", "I64", "U8", "U64", "BOOL"])
_SIZES = {"F32": 4, "F16": 2, "F64": 8, "I64": 8, "U64": 8, "BF16": 2}


@st.composite
def safetensors_files(draw):
    """Mostly well-formed files of 1-3 tensors (so that acceptance is reached and compared), each entry
    with one chance in three of a drawn-anything dtype, shape or offsets, and the data section of the
    declared length or a byte or two off."""
    header, position = {}, 0
    count = draw(st.integers(1, 3))
    for i in range(count):
        odd = draw(st.integers(0, 2)) == 0
        dtype = draw(_DTYPES if odd else _VALID_DTYPES)
        shape = draw(_SHAPES if odd else st.lists(st.integers(0, 5), max_size=4))
        honest = isinstance(shape, list) and all(type(d) is int and 0 <= d < 64 for d in shape)
        size = _SIZES.get(str(dtype), 1) * int(np.prod(shape)) if honest else draw(st.integers(0, 16))
        nudge = _NUDGE if odd else st.just(0)
        offsets = [position + draw(nudge), position + size + draw(nudge)]
        if odd and draw(st.integers(0, 3)) == 0:
            offsets = draw(st.sampled_from([[0], [0, 1, 2], ["0", 4], [0.0, 4.0], None, [-4, 0], [2 ** 64, 2 ** 64]]))
        header[f"w{i:04d}"] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        position += size
    header["__metadata__"] = {"format": "grid_ipfs.weights.v1", "count": str(count)}
    items = list(header.items())
    order = draw(st.permutations(range(len(items))))
    text = json.dumps(dict(items[i] for i in order)).encode()
    text += b" " * (-len(text) % 8)
    length = max(position + draw(_NUDGE), 0)
    return len(text).to_bytes(8, "little") + text + draw(st.binary(min_size=length, max_size=length))


def test_the_in_place_weights_parser_accepts_nothing_safetensors_refuses_and_reads_the_same_values():
    """Differential: `weights_from_bytes` parses safetensors itself (views into the caller's buffer, no
    copy). Whatever it accepts, the safetensors library must accept too and read to the same dtypes,
    shapes and bytes; whatever it refuses is a `PayloadError`."""
    from safetensors.numpy import load

    @settings(**_SETTINGS)
    @given(safetensors_files())
    def check(data):
        try:
            ours = weights_from_bytes(bytearray(data))
        except PayloadError:
            return
        theirs = load(data)
        assert len(ours) == len(theirs)
        for i, array in enumerate(ours):
            reference = theirs[f"w{i:04d}"]
            assert array.dtype == reference.dtype and array.shape == reference.shape
            assert array.tobytes() == reference.tobytes()

    check()
