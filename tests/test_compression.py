"""Compressed updates (`payloads.update_to_bytes`): float16 / int8 deltas from the round's base weights,
deflated; decoded exactly, only against a base, and never past the size the model's weights need."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from grid_ipfs.client.job import InvalidJobSpec, JobSpec
from grid_ipfs.payloads import (
    COMPRESSIONS,
    DELTA_FORMAT,
    PayloadError,
    update_to_bytes,
    weights_from_bytes,
    weights_to_bytes,
)
from grid_ipfs.payloads import DEFLATE_MAGIC as MAGIC
from grid_ipfs.worker import compression


def _model(rng, scale=0.01):
    base = [rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32),
            np.array(7, np.int64)]
    new = [base[0] + (rng.standard_normal((64, 32)) * scale).astype(np.float32),
           base[1] + np.float32(0.5), np.array(8, np.int64)]
    return base, new


@pytest.mark.parametrize("kind, tolerance", [("float16", 1e-4), ("int8", None)])
def test_a_compressed_update_decodes_against_its_base_within_the_quantization_step(kind, tolerance):
    base, new = _model(np.random.default_rng(0))
    data = update_to_bytes(new, base, kind)
    assert data.startswith(MAGIC)
    decoded = weights_from_bytes(data, like=base, base=base)
    assert [d.dtype for d in decoded] == [b.dtype for b in base] and decoded[2] == 8  # ints go as they are
    for d, n, b in zip(decoded[:2], new[:2], base[:2]):
        step = np.max(np.abs(n - b)) / 127 / 2 * 1.0001 if tolerance is None else tolerance
        assert np.max(np.abs(d - n)) <= step
    again = weights_from_bytes(data, like=base, base=base)  # exact arithmetic: the same bits every time
    assert [a.tobytes() for a in again] == [d.tobytes() for d in decoded]
    assert update_to_bytes(new, base, kind) == data  # and the same bytes: the same CID


def test_int8_updates_are_over_four_times_smaller_than_float32_ones():
    rng = np.random.default_rng(1)
    base = [rng.standard_normal((512, 256)).astype(np.float32)]
    new = [base[0] + (rng.standard_normal((512, 256)) * 0.01).astype(np.float32)]  # a gaussian change: the worst case
    assert len(weights_to_bytes(new)) / len(update_to_bytes(new, base, "int8")) >= 4


def test_an_unchanged_tensor_has_scale_zero_and_decodes_to_its_base():
    base, _ = _model(np.random.default_rng(2))
    decoded = weights_from_bytes(update_to_bytes(base, base, "int8"), like=base, base=base)
    assert all(d.tobytes() == b.tobytes() for d, b in zip(decoded, base))


def test_a_compressed_file_is_refused_where_no_base_is_given():
    """Global weights are never deltas: readers of a block's or a round's weights pass no base."""
    base, new = _model(np.random.default_rng(3))
    with pytest.raises(PayloadError, match="no base weights to decode it against"):
        weights_from_bytes(update_to_bytes(new, base, "int8"), like=base)


def _delta_file(tensors: dict, metadata: dict | None = None, deflate=True) -> bytes:
    from safetensors.numpy import save

    data = save(tensors, metadata=metadata or {"format": DELTA_FORMAT, "count": "1", "compression": "int8"})
    return MAGIC + zlib.compress(data) if deflate else data


BASE = [np.zeros(4, np.float32)]


@pytest.mark.parametrize("tensors, metadata, reason", [
    ({"w0000": np.zeros(4, np.int8), "s0000": np.array(np.nan, np.float32)}, None, "finite float32 >= 0"),
    ({"w0000": np.zeros(4, np.int8), "s0000": np.array(-1, np.float32)}, None, "finite float32 >= 0"),
    ({"w0000": np.zeros(4, np.int8), "s0000": np.array(np.inf, np.float32)}, None, "finite float32 >= 0"),
    ({"w0000": np.zeros(4, np.int8), "s0000": np.zeros(2, np.float32)}, None, "finite float32 >= 0"),
    ({"w0000": np.zeros(4, np.int8), "s0000": np.array(1, np.float64)}, None, "finite float32 >= 0"),
    ({"w0000": np.zeros(4, np.int8)}, None, "a compressed update of 1 tensors"),
    ({"w0000": np.zeros(4, np.int8), "s0000": np.array(1, np.float32), "x": np.zeros(1, np.int8)}, None,
     "a compressed update of 1 tensors"),
    ({"w0000": np.zeros(5, np.int8), "s0000": np.array(1, np.float32)}, None, "shape"),
    ({"w0000": np.zeros(4, np.int16), "s0000": np.array(1, np.float32)}, None, "a int8 update holds int8"),
    ({"w0000": np.zeros(4, np.float32)}, {"format": DELTA_FORMAT, "count": "1", "compression": "float16"},
     "a float16 update holds float16"),
    ({"w0000": np.zeros(4, np.int8)}, {"format": DELTA_FORMAT, "count": "1", "compression": "zstd"},
     "compression 'zstd'"),
    ({"w0000": np.zeros(4, np.int8), "s0000": np.array(1, np.float32)},
     {"format": DELTA_FORMAT, "count": "2", "compression": "int8"}, "a compressed update of 1 tensors"),
    ({"w0000": np.full(4, 127, np.int8), "s0000": np.array(3e38, np.float32)}, None, "non-finite"),
    ({"w0000": np.full(4, 65504, np.float16)}, {"format": DELTA_FORMAT, "count": "1", "compression": "float16"},
     None),
])
def test_hostile_compressed_updates_are_refused_in_one_line(tensors, metadata, reason):
    data = _delta_file(tensors, metadata)
    if reason is None:  # the largest float16 delta is still a finite float32 weight
        assert weights_from_bytes(data, like=BASE, base=BASE)[0].tolist() == [65504.0] * 4
        return
    with pytest.raises(PayloadError, match=reason) as refused:
        weights_from_bytes(data, like=BASE, base=BASE)
    assert "\n" not in str(refused.value)


def test_a_deflate_bomb_stops_at_the_size_the_weights_could_need():
    bomb = MAGIC + zlib.compress(b"\0" * (64 * 1024 * 1024), 9)  # 64 MiB of zeros in ~64 KB; BASE is 16 bytes
    assert len(bomb) < 100_000
    with pytest.raises(PayloadError, match="inflating past 4176 bytes"):
        weights_from_bytes(bomb, like=BASE, base=BASE)


@pytest.mark.parametrize("data, reason", [
    (MAGIC + b"not deflate", "expected a deflated weights file"),
    (MAGIC + zlib.compress(b"x" * 100)[:-6], "ends early"),
    (MAGIC, "ends early"),
])
def test_broken_deflate_streams_are_refused(data, reason):
    with pytest.raises(PayloadError, match=reason):
        weights_from_bytes(data, like=BASE, base=BASE)


def test_an_undeflated_delta_file_still_needs_its_base_and_decodes_like_one():
    data = _delta_file({"w0000": np.full(4, 2, np.int8), "s0000": np.array(0.5, np.float32)}, deflate=False)
    assert struct.unpack("<Q", data[:8])[0] < len(data)
    assert weights_from_bytes(data, like=BASE, base=[np.ones(4, np.float32)])[0].tolist() == [2.0] * 4


def test_the_job_and_the_worker_accept_only_known_compressions():
    assert COMPRESSIONS == ("float16", "int8")
    assert JobSpec(model_path=None, rounds=1, compression="int8").config()["compression"] == "int8"
    assert "compression" not in JobSpec(model_path=None, rounds=1).config()
    assert JobSpec.from_config({"rounds": 1, "compression": "float16"}).compression == "float16"
    for bad in ("gzip", 8, True):
        with pytest.raises(InvalidJobSpec, match="compression must be one of float16, int8 or None"):
            JobSpec(model_path=None, rounds=1, compression=bad)
    with pytest.raises(InvalidJobSpec, match="masked updates"):
        JobSpec(model_path=None, rounds=1, compression="int8", aggregation="secure-fedavg", secure_aggregation=True)
    assert compression({}) is None and compression({"compression": "int8"}) == "int8"
    for config, reason in (({"compression": "lz4"}, "must be one of"), ({"compression": ["int8"]}, "must be one of"),
                           ({"compression": "int8", "secure_aggregation": True}, "masked updates")):
        with pytest.raises(ValueError, match=reason):
            compression(config)
