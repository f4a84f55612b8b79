"""Unit tests for grid_ipfs.data: shard files, splits and the offline example datasets."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from grid_ipfs import data
from grid_ipfs.data import (
    DataError,
    check_shard_for_model,
    load_shard,
    save_shard,
    split_dirichlet,
    split_iid,
    train_val_split,
    write_shards,
)


def toy(n: int = 100, classes: int = 5):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int64) % classes
    return x, y


# -- shard files ----------------------------------------------------------------------------------------


def test_shard_round_trip_keeps_name_and_arrays(tmp_path):
    x, y = toy()
    path = save_shard(tmp_path / "sub" / "part.data", x, y)
    assert path == tmp_path / "sub" / "part.data" and path.is_file()  # no ".npz" appended
    x2, y2 = load_shard(path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    assert x2.dtype == np.float32 and y2.dtype == np.int64


def test_load_shard_missing_file(tmp_path):
    with pytest.raises(DataError, match="shard file not found: .*nope.npz"):
        load_shard(tmp_path / "nope.npz")


def test_load_shard_not_an_npz(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match="not an .npz shard file"):
        load_shard(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_shard(single)


def test_load_shard_wrong_keys(tmp_path):
    path = tmp_path / "ab.npz"
    np.savez(path, a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(DataError, match=r"expected arrays 'x' and 'y', found \['a', 'b'\]"):
        load_shard(path)
    extra = tmp_path / "xyz.npz"
    np.savez(extra, x=np.zeros(2), y=np.zeros(2), z=np.zeros(2))
    with pytest.raises(DataError, match=r"found \['x', 'y', 'z'\]"):
        load_shard(extra)


def test_load_shard_mismatched_and_empty(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="x has 5 examples but y has 4"):
        load_shard(path)
    np.savez(path, x=np.zeros((0, 2)), y=np.zeros(0))
    with pytest.raises(DataError, match="empty"):
        load_shard(path)


def test_load_shard_refuses_object_arrays(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    with pytest.raises(DataError, match="plain numeric data"):
        load_shard(path)


def test_save_shard_validates_before_writing(tmp_path):
    with pytest.raises(DataError, match="x has 3 examples but y has 2"):
        save_shard(tmp_path / "s.npz", np.zeros((3, 1)), np.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_write_shards_names_and_order(tmp_path):
    x, y = toy(12)
    paths = write_shards(tmp_path, split_iid(x, y, 3), prefix="node")
    assert [p.name for p in paths] == ["node-000.npz", "node-001.npz", "node-002.npz"]
    assert sum(len(load_shard(p)[0]) for p in paths) == 12


def test_check_shard_for_model():
    x = np.zeros((4, 8, 8), np.float32)
    y = np.zeros(4, np.int64)
    check_shard_for_model(x, y, (None, 8, 8))
    check_shard_for_model(x, y, (None, None, 8))  # None accepts any size
    with pytest.raises(DataError, match=r"data x has feature shape \(8, 8\) but the model expects \(64,\)"):
        check_shard_for_model(x, y, (None, 64))
    with pytest.raises(DataError, match="4 examples but y has 3"):
        check_shard_for_model(x, y[:3], (None, 8, 8))


# -- splits ---------------------------------------------------------------------------------------------


def test_train_val_split_sizes_disjoint_and_seeded():
    x, y = toy(50)
    x_tr, y_tr, x_val, y_val = train_val_split(x, y, 0.2, seed=1)
    assert (len(x_tr), len(x_val)) == (40, 10)
    assert set(x_tr[:, 0]).isdisjoint(x_val[:, 0]) and len(set(x_tr[:, 0]) | set(x_val[:, 0])) == 50
    np.testing.assert_array_equal(y_val, x_val[:, 0].astype(np.int64) // 3 % 5)  # pairs stay together
    again = train_val_split(x, y, 0.2, seed=1)
    other = train_val_split(x, y, 0.2, seed=2)
    np.testing.assert_array_equal(again[2], x_val)
    assert not np.array_equal(other[2], x_val)


def test_train_val_split_zero_gives_empty_val_with_trailing_shape():
    x = np.zeros((6, 28, 28, 1), np.float32)
    y = np.zeros((6, 1), np.float32)
    x_tr, y_tr, x_val, y_val = train_val_split(x, y, 0.0)
    assert x_tr.shape == x.shape and x_val.shape == (0, 28, 28, 1) and y_val.shape == (0, 1)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(x, y, 1.0)


def test_split_iid_partitions_everything():
    x, y = toy(103)
    shards = split_iid(x, y, 4, seed=0)
    assert sorted(len(s[0]) for s in shards) == [25, 26, 26, 26]
    ids = np.concatenate([s[0][:, 0] for s in shards])
    assert sorted(ids) == sorted(x[:, 0])
    with pytest.raises(DataError, match="cannot make 200 shards"):
        split_iid(x, y, 200)


def test_split_dirichlet_is_skewed_nonempty_and_complete():
    x, y = toy(1000, classes=10)
    shards = split_dirichlet(x, y, 5, alpha=0.1, seed=3)
    assert all(len(sx) >= 1 for sx, _ in shards)
    assert sum(len(sx) for sx, _ in shards) == 1000
    ids = np.concatenate([sx[:, 0] for sx, _ in shards])
    assert len(np.unique(ids)) == 1000
    # With alpha=0.1 a shard's most common class dominates it; IID shards would sit near 10%.
    top_share = [np.bincount(sy, minlength=10).max() / len(sy) for _, sy in shards]
    assert np.mean(top_share) > 0.5
    iid_top = [np.bincount(sy, minlength=10).max() / len(sy) for _, sy in split_iid(x, y, 5)]
    assert np.mean(iid_top) < 0.2
    again = split_dirichlet(x, y, 5, alpha=0.1, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(shards, again))


def test_split_dirichlet_accepts_one_hot_and_rejects_regression_targets():
    x, y = toy(200, classes=4)
    one_hot = np.eye(4, dtype=np.float32)[y]
    shards = split_dirichlet(x, one_hot, 3, alpha=1.0, min_size=10)
    assert all(len(s[0]) >= 10 and s[1].shape[1] == 4 for s in shards)
    with pytest.raises(DataError, match="class labels"):
        split_dirichlet(x, np.linspace(0, 1, 200).reshape(-1, 1), 3)


def test_split_dirichlet_explains_impossible_requests():
    x, y = toy(40, classes=2)
    with pytest.raises(DataError, match="larger alpha or fewer shards"):
        split_dirichlet(x, y, 20, alpha=0.01, min_size=2, max_tries=5)


# -- example datasets -----------------------------------------------------------------------------------


def test_digits():
    x_tr, y_tr, x_te, y_te = data.digits(test_fraction=0.2, seed=0)
    assert x_tr.shape[1:] == (64,) and x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == round(0.2 * 1797)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert set(np.unique(y_tr)) == set(range(10))


def test_diabetes_is_standardised_on_the_training_part():
    x_tr, y_tr, x_te, y_te = data.diabetes()
    assert x_tr.shape[1:] == (10,) and y_tr.shape[1:] == (1,) and y_te.shape == (len(x_te), 1)
    assert x_tr.dtype == y_tr.dtype == np.float32
    np.testing.assert_allclose(x_tr.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x_tr.std(axis=0), 1, atol=1e-4)
    np.testing.assert_allclose(y_tr.std(), 1, atol=1e-4)
    assert abs(float(y_te.mean())) < 0.5  # test part uses the training statistics, so it is only near 0


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9], np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 5, 6], np.uint8))
    x_tr, y_tr, x_te, y_te = data.fashion_mnist(tmp_path)
    assert x_tr.shape == (5, 28, 28, 1) and x_te.shape == (3, 28, 28, 1) and x_tr.dtype == np.float32
    np.testing.assert_allclose(x_tr[..., 0], train_images / 255.0, rtol=1e-6)
    assert y_tr.dtype == np.int64 and list(y_te) == [4, 5, 6]


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match=r"Fashion-MNIST not found under .*; install it with: "
                                        r"sudo apt-get install dataset-fashion-mnist"):
        data.fashion_mnist(tmp_path)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(DataError, match=r"shape \(5,\) \(5 bytes\) but 3 bytes follow"):
        data.read_idx(short)
