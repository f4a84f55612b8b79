"""The pubsub protocol: round trips, every rejection reason, signatures, canonical encoding."""

from __future__ import annotations

import json

import pytest
from multiformats import CID, multihash

from grid_ipfs.identity import Identity, b64url_encode
from grid_ipfs.messages import (
    JOBS_TOPIC,
    MAX_MESSAGE_BYTES,
    Done,
    Head,
    Job,
    Join,
    MessageError,
    Round,
    Update,
    canonical_json,
    decode,
    encode,
    job_topic,
    topic_of,
)

ME = Identity.generate()
OTHER = Identity.generate()
CID_A = str(CID("base32", 1, "raw", multihash.digest(b"a", "sha2-256")))
CID_V0 = "QmZEz1P1e4NaLf3KYQgeP3UUavetnBSUPRtJUs4K9srzvm"


def samples():
    return [
        Job("job-1", CID_V0, ME.id, {"epochs": 2, "batch_size": 32, "rounds": 5, "val_split": 0.1}),
        Round("job-1", 1, CID_A, 1.7e9, [OTHER.id, ME.id], attempt=2),
        Round("job-1", 2, CID_V0, 1700000000.5, None),
        Update("job-1", 1, CID_A, 120, {"loss": 0.5, "accuracy": 0.75}, {"val_loss": 0.6}),
        Round("job-1", 2, CID_A, 1.7e9, None, head=CID_V0),
        Update("job-1", 2, CID_A, 120, {"loss": 0.5}, {}, attempt=2, head=CID_V0, base=CID_A),
        Head("job-1", 0, CID_A, CID_V0),
        Done("job-1", CID_A),
        Done("job.2_x", CID_A, reason="stopped by owner"),
        Join("job-1", "hospital-a", 1200),
    ]


def signed(obj: dict, identity: Identity = ME) -> bytes:
    """Sign an arbitrary object the way `encode` does, to test what `decode` makes of it."""
    obj = {k: v for k, v in obj.items() if k != "sig"}
    obj["sig"] = b64url_encode(identity.sign(canonical_json(obj)))
    return json.dumps(obj).encode()


def update_obj(**changes) -> dict:
    obj = json.loads(encode(Update("job-1", 3, CID_A, 10, {"loss": 1.0}, {}), ME))
    obj.update(changes)
    return obj


def reason_of(data: bytes) -> str:
    with pytest.raises(MessageError) as info:
        decode(data)
    return info.value.reason


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    envelope = decode(encode(msg, ME))
    assert envelope.message == msg
    assert type(envelope.message) is type(msg)
    assert envelope.sender == ME.id


def test_topics():
    job, *others = samples()
    assert topic_of(job) == JOBS_TOPIC == "grid-ipfs/v1/jobs"
    assert {topic_of(m) for m in others} == {"grid-ipfs/v1/job/job-1", "grid-ipfs/v1/job/job.2_x"}
    with pytest.raises(MessageError, match="bad job id"):
        job_topic("a/b")


def test_encoding_is_canonical_and_independent_of_dict_order():
    a = Update("j", 1, CID_A, 5, {"b": 2.0, "a": 1.0}, {"y": 1.0, "x": 0.0})
    b = Update("j", 1, CID_A, 5, {"a": 1.0, "b": 2.0}, {"x": 0.0, "y": 1.0})
    assert encode(a, ME) == encode(b, ME)  # Ed25519 is deterministic, so equal bytes
    assert canonical_json({"b": 1, "a": [1, {"d": 1, "c": "é"}]}) == '{"a":[1,{"c":"é","d":1}],"b":1}'.encode()


def test_receiver_accepts_any_key_order_and_spacing():
    obj = json.loads(encode(samples()[3], ME))
    respaced = json.dumps(dict(reversed(list(obj.items()))), indent=2).encode()
    assert decode(respaced).message == samples()[3]


def test_tampered_value_breaks_the_signature():
    data = encode(Round("job-1", 3, CID_A, 1.7e9, None), ME)
    assert b'"round":3' in data
    assert reason_of(data.replace(b'"round":3', b'"round":4')) == f"bad signature from {ME.id}"


def test_every_single_byte_flip_is_rejected():
    data = encode(samples()[1], ME)
    for i in range(len(data)):
        flipped = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
        with pytest.raises(MessageError):
            decode(flipped)


def test_signature_by_someone_else_is_rejected():
    obj = update_obj()
    obj["sig"] = b64url_encode(OTHER.sign(canonical_json({k: v for k, v in obj.items() if k != "sig"})))
    assert reason_of(json.dumps(obj).encode()) == f"bad signature from {ME.id}"


@pytest.mark.parametrize("data, reason", [
    (b"x" * (MAX_MESSAGE_BYTES + 1), f"message too large ({MAX_MESSAGE_BYTES + 1} bytes > {MAX_MESSAGE_BYTES})"),
    (b'{"v":1,"type":"\xff"}', "not UTF-8"),
    (b'{"v":1,', None),  # not JSON; the parser's position is appended
    (b"[1,2]", "not a JSON object but list"),
    (b'{"type":"round"}', "missing protocol version v"),
    (b'{"v":2,"type":"round"}', "unsupported protocol version 2"),
    (b'{"v":true,"type":"round"}', "unsupported protocol version True"),
    (b'{"v":1,"type":"gossip"}', "unknown message type 'gossip'"),
    (b'{"v":1,"type":{}}', "unknown message type {}"),
    (b'{"v":1,"v":1,"type":"round"}', "duplicate key in JSON object"),
    (b'{"v":1,"type":"round","deadline":NaN}', "non-finite number NaN"),
])
def test_envelope_rejections(data, reason):
    got = reason_of(data)
    if reason is None:
        assert got.startswith("not JSON (")
    else:
        assert got == reason


DELETE = object()


@pytest.mark.parametrize("changes, reason", [
    ({"weights": DELETE}, "update message: missing field weights"),
    ({"from": DELETE}, "update message: missing field from"),
    ({"extra": 1}, "update message: unexpected field 'extra'"),
    ({"round": True}, "round: expected an integer >= 1, got True"),
    ({"round": 0}, "round: expected an integer >= 1, got 0"),
    ({"round": 2.0}, "round: expected an integer >= 1, got 2.0"),
    ({"num_examples": "10"}, "num_examples: expected an integer >= 1, got '10'"),
    ({"metrics": {"loss": True}}, "metrics.loss: expected a number, got True"),
    ({"metrics": [1.0]}, "metrics: expected an object of numbers, got [1.0]"),
    ({"weights": "Qmnotacid"}, "weights: not a valid CID: 'Qmnotacid' ("),
    ({"weights": 5}, "weights: not a valid CID: 5 (expected a CID string)"),
    ({"job": "bad/job"}, "bad job id 'bad/job'"),
    ({"job": "x" * 65}, "bad job id 'xxx"),
    ({"from": "someone"}, "from: not a public id: 'someone'"),
    ({"attempt": 0}, "attempt: expected an integer >= 1, got 0"),
])
def test_field_rejections(changes, reason):
    """Each message is correctly signed, so the reason is the field check's, not the signature's."""
    obj = update_obj()
    for key, value in changes.items():
        if value is DELETE:
            del obj[key]
        else:
            obj[key] = value
    assert reason_of(signed(obj)).startswith(reason)


def test_overflowing_number_is_non_finite():
    """1e999 is valid JSON that parses as inf; it must not reach a metric."""
    data = signed(update_obj(metrics={"loss": 12345.5})).replace(b"12345.5", b"1e999")
    assert reason_of(data) == "metrics.loss: non-finite number inf"


def test_huge_integer_is_non_finite_not_a_crash():
    """A 400-digit integer is valid JSON, and too large for a float."""
    assert reason_of(signed(update_obj(metrics={"loss": 10 ** 400}))) == "metrics.loss: non-finite number inf"


def test_malformed_signature_field():
    assert reason_of(json.dumps(update_obj(sig="not base64!")).encode()) == "sig: not base64url: 'not base64!'"
    assert reason_of(json.dumps(update_obj(sig=5)).encode()) == "sig: not base64url: 5"


def test_missing_signature_only_is_reported():
    obj = update_obj()
    del obj["sig"]
    assert reason_of(json.dumps(obj).encode()) == "update message: missing field sig"


def test_optional_attempt_defaults_to_one():
    obj = update_obj()
    del obj["attempt"]
    assert decode(signed(obj)).message.attempt == 1


@pytest.mark.parametrize("config, reason", [
    ({"epochs": 1, "batch_size": 8}, "config: missing rounds"),
    ({"epochs": True, "batch_size": 8, "rounds": 1}, "config.epochs: expected an integer >= 1, got True"),
    ({"epochs": 1, "batch_size": 0, "rounds": 1}, "config.batch_size: expected an integer >= 1, got 0"),
    ({"epochs": 1, "batch_size": 8, "rounds": 1, "val_split": 1.0},
     "config.val_split: expected a number in [0, 1), got 1.0"),
    ({"epochs": 1, "batch_size": 8, "rounds": 1, "val_split": "0.1"},
     "config.val_split: expected a number, got '0.1'"),
    ([1], "config: expected an object, got [1]"),
])
def test_job_config_rejections(config, reason):
    obj = json.loads(encode(samples()[0], ME))
    obj["config"] = config
    assert reason_of(signed(obj)) == reason


def test_job_config_keeps_unknown_keys():
    job = Job("j", CID_A, ME.id, {"epochs": 1, "batch_size": 8, "rounds": 1, "aggregation": "median"})
    assert decode(encode(job, ME)).message.config["aggregation"] == "median"


def test_job_owner_must_be_the_sender():
    obj = json.loads(encode(samples()[0], ME))
    obj["owner"] = OTHER.id
    assert reason_of(signed(obj)) == f"job owner {OTHER.id} is not the sender {ME.id}"
    with pytest.raises(MessageError, match="is not the signer"):
        encode(samples()[0], OTHER)


def test_selected_must_be_unique_public_ids():
    obj = json.loads(encode(samples()[1], ME))
    obj["selected"] = ["nobody"]
    assert reason_of(signed(obj)) == "selected[0]: not a public id: 'nobody'"
    obj["selected"] = [ME.id, ME.id]
    assert reason_of(signed(obj)) == "selected: duplicate worker id"


def test_constructing_an_invalid_message_fails_early():
    with pytest.raises(MessageError, match="weights: not a valid CID"):
        Round("j", 1, "nope", 1.0, None)
    with pytest.raises(MessageError, match="deadline: non-finite number inf"):
        Round("j", 1, CID_A, float("inf"), None)


@pytest.mark.parametrize("field", ["head", "base"])
def test_a_bad_head_or_base_cid_is_refused_naming_the_field(field):
    with pytest.raises(MessageError, match=f"^{field}: not a valid CID"):
        Update("j", 1, CID_A, 5, {}, {}, **{field: "nope"})
    with pytest.raises(MessageError, match=f"^{field}: .*whitespace"):
        Update("j", 1, CID_A, 5, {}, {}, **{field: f" {CID_A}"})
    assert reason_of(signed(update_obj(**{field: "nope"}))).startswith(f"{field}: not a valid CID")
    assert reason_of(signed(update_obj(**{field: 7}))).startswith(f"{field}: ")
    if field == "head":
        with pytest.raises(MessageError, match="^head: not a valid CID"):
            Round("j", 1, CID_A, 1.0, None, head="nope")
        obj = json.loads(encode(Round("j", 1, CID_A, 1.0, None), ME))
        assert reason_of(signed({**obj, "head": "nope"})).startswith("head: not a valid CID")


def test_head_and_base_are_optional_and_absent_from_the_wire_when_unset():
    assert b'"head"' not in encode(Round("j", 1, CID_A, 1.0, None), ME)
    assert b'"head"' not in encode(Update("j", 1, CID_A, 5, {}, {}), ME)
    assert b'"base"' not in encode(Update("j", 1, CID_A, 5, {}, {}), ME)
    bound = decode(encode(Update("j", 1, CID_A, 5, {}, {}, head=CID.decode(CID_V0), base=CID_A), ME)).message
    assert (bound.head, bound.base) == (CID_V0, CID_A)  # CID objects stored as text, as for weights


def test_numpy_numbers_become_plain_json_numbers():
    import numpy as np

    msg = Update("j", np.int64(2), CID_A, np.int32(7), {"loss": np.float32(0.5)}, {})
    assert type(msg.round) is int and type(msg.num_examples) is int and type(msg.metrics["loss"]) is float
    assert decode(encode(msg, ME)).message == msg
    with pytest.raises(MessageError, match="expected an integer >= 1, got np.True_|got True"):
        Update("j", np.bool_(True), CID_A, 1, {}, {})


def test_cid_objects_are_accepted_and_stored_as_text():
    cid = CID.decode(CID_A)
    assert Head("j", 1, cid, cid).head == CID_A


def test_oversized_message_is_refused_when_encoding():
    huge = Update("j", 1, CID_A, 1, {f"m{i:05d}": 0.0 for i in range(10000)}, {})
    with pytest.raises(MessageError, match="message too large"):
        encode(huge, ME)


def test_join_needs_a_name_and_at_least_one_example():
    assert reason_of(signed({"v": 1, "type": "join", "job": "j", "from": ME.id, "name": "a",
                             "num_examples": 0})) == "num_examples: expected an integer >= 1, got 0"
    assert "name" in reason_of(signed({"v": 1, "type": "join", "job": "j", "from": ME.id, "name": "",
                                       "num_examples": 3}))


def test_mask_keys_travel_with_their_signatures():
    from grid_ipfs.secagg import MaskKey, sign_mask_key

    key = MaskKey().public
    sig = sign_mask_key(ME, "job-1", key)
    join = Join("job-1", "hospital-a", 12, mask_key=key, mask_sig=sig)
    assert decode(encode(join, ME)).message == join
    with pytest.raises(MessageError, match="mask_key and mask_sig go together"):
        Join("job-1", "hospital-a", 12, mask_key=key)
    with pytest.raises(MessageError, match="mask_sig: not an Ed25519 signature"):
        Join("job-1", "hospital-a", 12, mask_key=key, mask_sig=key)
    round_ = Round("job-1", 1, CID_A, 1.7e9, [ME.id], mask_keys={ME.id: key}, mask_sigs={ME.id: sig})
    assert decode(encode(round_, OTHER)).message == round_
    with pytest.raises(MessageError, match="mask_keys and mask_sigs go together"):
        Round("job-1", 1, CID_A, 1.7e9, [ME.id], mask_keys={ME.id: key})
    with pytest.raises(MessageError, match="not the same workers"):
        Round("job-1", 1, CID_A, 1.7e9, None, mask_keys={ME.id: key}, mask_sigs={OTHER.id: sig})
    with pytest.raises(MessageError, match="missing"):
        Round("job-1", 1, CID_A, 1.7e9, None, mask_keys={ME.id: key}, mask_sigs={ME.id: None})
