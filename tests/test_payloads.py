"""Unit tests for grid_ipfs.payloads: .keras models, safetensors weights and canonical JSON."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402  (only to build a hostile payload)
import zipfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402

from grid_ipfs.payloads import (  # noqa: E402
    MAX_JSON_BYTES,
    MAX_MODEL_BYTES,
    MAX_WEIGHTS_BYTES,
    WEIGHTS_FORMAT,
    PayloadError,
    json_from_bytes,
    json_to_bytes,
    model_from_bytes,
    model_to_bytes,
    weights_from_bytes,
    weights_to_bytes,
)

MiB = 1024 * 1024


def test_limits():
    assert MAX_MODEL_BYTES == MAX_WEIGHTS_BYTES == 256 * MiB and MAX_JSON_BYTES == MiB


# -- models ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def model_bytes(small_model):
    return model_to_bytes(small_model)


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_model_round_trip_predicts_the_same_and_keeps_compile_settings(small_model, model_bytes):
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    loaded = model_from_bytes(model_bytes, source="bafy-model")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), small_model.predict(x, verbose=0))
    assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.SGD)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(0.05)


def test_model_can_load_uncompiled(model_bytes):
    assert not model_from_bytes(model_bytes, compile=False).compiled


def test_model_over_size_is_rejected_before_parsing(model_bytes):
    with pytest.raises(PayloadError, match=r"bafyBIG: expected a .keras archive of at most 100 bytes"):
        model_from_bytes(model_bytes, source="bafyBIG", max_bytes=100)


@pytest.mark.parametrize("payload", [
    pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
    pytest.param(pickle.dumps({"weights": [1, 2, 3]}), id="pickle"),
    pytest.param(b"", id="empty"),
])
def test_model_non_zip_is_rejected(payload):
    with pytest.raises(PayloadError, match=r"^bafyX: expected a .keras archive \(not a zip file"):
        model_from_bytes(payload, source="bafyX")


def test_model_zip_without_config_is_rejected():
    payload = zip_bytes({"metadata.json": b"{}", "model.weights.h5": b"\0" * 10})
    with pytest.raises(PayloadError, match=r"bafyZ: expected a .keras archive \(missing config.json"):
        model_from_bytes(payload, source="bafyZ")


def test_model_zip_bomb_is_rejected():
    bomb = zip_bytes({"config.json": b"{}", "metadata.json": b"{}", "model.weights.h5": b"\0" * (5 * MiB)},
                     compression=zipfile.ZIP_DEFLATED)
    assert len(bomb) < 64 * 1024  # tiny on the wire...
    with pytest.raises(PayloadError, match="zip bomb"):  # ...but declares 5 MiB > 4 x 1 MiB unpacked
        model_from_bytes(bomb, source="bafyBOMB", max_bytes=1 * MiB)


def test_model_with_too_many_members_is_rejected_before_parsing_them():
    crowd = zip_bytes({f"asset{i}": b"" for i in range(1001)})
    with pytest.raises(PayloadError, match="declares 1001 members, more than 1000"):
        model_from_bytes(crowd, source="bafyMANY")


def test_model_with_bad_config_is_wrapped(model_bytes):
    with zipfile.ZipFile(io.BytesIO(model_bytes)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    members["config.json"] = b'{"class_name": "NoSuchLayer", "config": {}}'
    with pytest.raises(PayloadError, match=r"bafyC: model: class \"NoSuchLayer\" .* is not Sequential or Functional"):
        model_from_bytes(zip_bytes(members), source="bafyC")


def test_model_with_lambda_code_is_refused_before_keras():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2)])
    with pytest.raises(PayloadError, match=r"bafyLAMBDA: layer 'lambda' \(Lambda\): not an allowed layer class"):
        model_from_bytes(model_to_bytes(model), source="bafyLAMBDA")


# -- weights --------------------------------------------------------------------------------------------


def sample_weights():
    rng = np.random.default_rng(1)
    return [rng.normal(size=(64, 10)).astype(np.float32), rng.normal(size=(10,)).astype(np.float32),
            np.arange(4, dtype=np.int64), np.float32(rng.normal(size=())).reshape(())]


def test_weights_round_trip_keeps_order_shapes_dtypes_and_is_writable():
    weights = sample_weights()
    loaded = weights_from_bytes(weights_to_bytes(weights), like=weights)
    assert len(loaded) == len(weights)
    for got, want in zip(loaded, weights):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable
        got += 1  # must not raise


def test_weights_from_a_buffer_are_views_into_it_and_from_bytes_are_copies():
    """The owner reads each update into one bytearray and parses it in place: the arrays point into
    that buffer (one copy of the update in memory). From immutable bytes they are writable copies."""
    weights = sample_weights()
    data = weights_to_bytes(weights)
    buffer = bytearray(data)
    views = weights_from_bytes(buffer, like=weights)
    raw = np.frombuffer(buffer, np.uint8)
    assert all(np.shares_memory(v, raw) and v.flags.writeable for v in views)
    copies = weights_from_bytes(data, like=weights)
    assert not any(np.shares_memory(c, np.frombuffer(data, np.uint8)) for c in copies)
    for view, copy, want in zip(views, copies, weights):
        np.testing.assert_array_equal(view, want)
        np.testing.assert_array_equal(copy, want)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}, "dtype 'BF16' is not one of"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "4 bytes for shape \\[2\\] of F32"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape must be at most 32 ints"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape must be at most 32 ints"),
    ({"dtype": "F32", "shape": [1] * 33, "data_offsets": [0, 4]}, "shape must be at most 32 ints"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, "starts at 4, not at 0"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, "data_offsets must be"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}, "data_offsets must be"),
    ({"dtype": "F32", "shape": [1]}, "needs exactly dtype, shape and data_offsets"),
    ({"dtype": "U8", "shape": [0, 2 ** 20], "data_offsets": [0, 0]}, "bytes after the last tensor"),
    ({"dtype": "U8", "shape": [0, 2 ** 40, 2 ** 40], "data_offsets": [0, 0]}, "non-zero ones multiply to at most"),
])
def test_weights_tensor_table_is_checked_before_any_view_is_made(entry, message):
    header = {"__metadata__": {"format": WEIGHTS_FORMAT, "count": "1"}, "w0000": entry}
    text = json.dumps(header).encode()
    data = len(text).to_bytes(8, "little") + text + b"\0" * 8
    with pytest.raises(PayloadError, match=f"^bad: expected a safetensors weights file \\(.*{message}"):
        weights_from_bytes(bytearray(data), source="bad")


@pytest.mark.parametrize("header, message", [
    (b'{"w0000": {"dtype": "F32", "dtype": "I32", "shape": [1], "data_offsets": [0, 4]}', "a key appears twice"),
    (b'{"w0000": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w0000": {"dtype": "I32", '
     b'"shape": [1], "data_offsets": [0, 4]}', "a key appears twice"),
    (b'{"w0000": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}', "NaN is not JSON"),
    (b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', "surrogate"),
])
def test_weights_header_is_read_as_strictly_as_safetensors_reads_it(header, message):
    """Python's json keeps the last of two equal keys, NaN and lone surrogates; the format's own reader
    (and so any other verifier of the chain) refuses them, so this parser does too."""
    text = header + b', "__metadata__": {"format": "%s", "count": "1"}}' % WEIGHTS_FORMAT.encode()
    text += b" " * (-len(text) % 8)
    data = len(text).to_bytes(8, "little") + text + bytes(4)
    with pytest.raises(PayloadError, match=f"header is not JSON: .*{message}"):
        weights_from_bytes(bytearray(data))


def test_weights_metadata_must_map_strings_to_strings():
    text = json.dumps({"__metadata__": {"format": WEIGHTS_FORMAT, "count": 1},
                       "w0000": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(PayloadError, match="__metadata__ must map strings to strings"):
        weights_from_bytes(len(text).to_bytes(8, "little") + text + bytes(4))


def test_weights_bytes_are_deterministic_with_ordered_keys_and_metadata():
    # safetensors itself orders the metadata keys at random; the canonical header must hide that.
    data = weights_to_bytes(sample_weights())
    assert {weights_to_bytes(sample_weights()) for _ in range(20)} == {data}
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {"format": WEIGHTS_FORMAT, "count": "4"}
    assert sorted(k for k in header if k != "__metadata__") == ["w0000", "w0001", "w0002", "w0003"]


def test_weights_like_mismatch_names_the_first_difference():
    weights = sample_weights()
    other = [weights[0][:, :9].copy(), *weights[1:]]
    with pytest.raises(PayloadError, match=r"^upd: tensor 0: expected shape \(64, 10\) float32, "
                                           r"got \(64, 9\) float32$"):
        weights_from_bytes(weights_to_bytes(other), source="upd", like=weights)
    retyped = [weights[0], weights[1].astype(np.float64), *weights[2:]]
    with pytest.raises(PayloadError, match=r"tensor 1: expected shape \(10,\) float32, got \(10,\) float64"):
        weights_from_bytes(weights_to_bytes(retyped), like=weights)
    with pytest.raises(PayloadError, match="expected 4 tensors, got 3"):
        weights_from_bytes(weights_to_bytes(weights[:3]), like=weights)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weights_non_finite_values_are_rejected(bad):
    weights = sample_weights()
    weights[1][3] = bad
    with pytest.raises(PayloadError, match=r"bafyNaN: tensor 1 has 1 non-finite values"):
        weights_from_bytes(weights_to_bytes(weights), source="bafyNaN")


def test_weights_wrong_keys_or_foreign_files_are_rejected():
    arrays = {"w0000": np.zeros(2, np.float32), "w0002": np.zeros(2, np.float32)}
    gap = st_save(arrays, metadata={"format": WEIGHTS_FORMAT, "count": "2"})
    with pytest.raises(PayloadError, match=r"unexpected keys \['w0002'\]"):
        weights_from_bytes(gap, source="gap")
    foreign = st_save({"dense/kernel": np.zeros(2, np.float32)})
    with pytest.raises(PayloadError, match="foreign: expected a safetensors weights file with metadata format"):
        weights_from_bytes(foreign, source="foreign")
    wrong_count = st_save({"w0000": np.zeros(2, np.float32)}, metadata={"format": WEIGHTS_FORMAT, "count": "3"})
    with pytest.raises(PayloadError, match="metadata says '3' tensors, the file holds 1"):
        weights_from_bytes(wrong_count)


@pytest.mark.parametrize("payload", [b"", b"\xff" * 64, pickle.dumps([np.zeros(3)]),
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"])
def test_weights_garbage_is_rejected(payload):
    with pytest.raises(PayloadError, match="^bafyW: expected a safetensors weights file"):
        weights_from_bytes(payload, source="bafyW")


def test_weights_over_size_is_rejected():
    with pytest.raises(PayloadError, match="at most 10 bytes"):
        weights_from_bytes(weights_to_bytes(sample_weights()), max_bytes=10)


# -- JSON -----------------------------------------------------------------------------------------------


def test_json_is_canonical_and_round_trips():
    doc = {"b": [1, 2.5, None], "a": "héllo", "c": {"z": True, "y": False}}
    data = json_to_bytes(doc)
    assert data == '{"a":"héllo","b":[1,2.5,null],"c":{"y":false,"z":true}}'.encode()
    assert json_from_bytes(data) == doc
    assert json_to_bytes(json_from_bytes(data)) == data


def test_json_rejects_nan_both_ways():
    with pytest.raises(ValueError):
        json_to_bytes({"loss": float("nan")})
    with pytest.raises(PayloadError, match=r"msg: expected a UTF-8 JSON document \(NaN is not valid JSON"):
        json_from_bytes(b'{"loss": NaN}', source="msg")


def test_json_rejects_oversize_and_malformed():
    with pytest.raises(PayloadError, match=f"at most {MAX_JSON_BYTES} bytes"):
        json_from_bytes(b" " * (MAX_JSON_BYTES + 1))
    with pytest.raises(PayloadError, match="^m: expected a UTF-8 JSON document"):
        json_from_bytes(b'{"a": ', source="m")
    with pytest.raises(PayloadError, match="^m: expected a UTF-8 JSON document"):
        json_from_bytes(b"\xff\xfe", source="m")
    with pytest.raises(PayloadError, match="as bytes, got str"):
        json_from_bytes("{}")
