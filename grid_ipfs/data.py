"""Worker data: shard files, partitioning into shards, and small example datasets that work offline.

Shard file format
-----------------
A shard is a NumPy `.npz` archive holding exactly two arrays:

* `x` — the inputs, shape `(n, *features)` where `features` matches the model's input shape without the
  batch dimension (e.g. `(64,)` for the digits MLP, `(28, 28, 1)` for the Fashion-MNIST CNN);
* `y` — the targets, shape `(n, ...)`: class indices `(n,)` for sparse categorical losses, one-hot
  `(n, k)`, or regression targets `(n, 1)`.

`n >= 1`, and both arrays hold plain numeric data: shards are read with `allow_pickle=False`, so an
object array (which would need pickle) is refused instead of executing anything. Write shards with
`save_shard` or `np.savez(path, x=x, y=y)`.

Partitioning
------------
`split_iid` deals examples out uniformly at random; `split_dirichlet` gives each shard a label mix drawn
from a Dirichlet distribution (Hsu et al., 2019), the usual way to simulate non-IID federations: small
`alpha` means each worker sees mostly a few classes.

Example datasets
----------------
`digits`, `diabetes` (scikit-learn, bundled with the package) and `fashion_mnist` (Debian package
`dataset-fashion-mnist`) all load without network access and return
`(x_train, y_train, x_test, y_test)` with float32 inputs.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import GridError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` package installs the idx files."""

Shard = tuple[np.ndarray, np.ndarray]


class DataError(GridError, ValueError):
    """Data that cannot be used: missing or malformed shard file, or data that does not fit the model."""


# -- shard files ----------------------------------------------------------------------------------------


def save_shard(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> Path:
    """Write `x`, `y` as a shard file (see the module docstring); returns the path.

    The arrays are validated first, so a shard that was written can always be loaded. The file is written
    to a temporary name and renamed, so a worker never reads a half-written shard. The name is used as
    given (NumPy would otherwise append `.npz` to names lacking it).
    """
    x, y = _check_xy(np.asarray(x), np.asarray(y), str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, x=x, y=y)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_shard(path: str | os.PathLike) -> Shard:
    """Read and validate a shard file; raises DataError explaining what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not an .npz shard file ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz shard file (it holds a single array; save x and y with "
                        f"np.savez(path, x=x, y=y))")
    with loaded:
        found = sorted(loaded.files)
        if found != ["x", "y"]:
            raise DataError(f"{path}: expected arrays 'x' and 'y', found {found}")
        try:
            x, y = loaded["x"], loaded["y"]
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise DataError(f"{path}: arrays must hold plain numeric data ({exc})") from exc
    return _check_xy(x, y, str(path))


def write_shards(directory: str | os.PathLike, shards: Sequence[Shard], prefix: str = "shard") -> list[Path]:
    """Save shards as `directory/{prefix}-000.npz`, `-001`, ...; returns the paths in shard order."""
    directory = Path(directory)
    width = max(3, len(str(len(shards) - 1)))
    return [save_shard(directory / f"{prefix}-{i:0{width}d}.npz", x, y) for i, (x, y) in enumerate(shards)]


def check_shard_for_model(x: np.ndarray, y: np.ndarray, input_shape: tuple) -> None:
    """Raise DataError unless `x` fits a model whose `model.input_shape` is `input_shape`.

    `input_shape` includes the batch dimension (`(None, *features)`); a `None` feature dimension accepts
    any size. Checked before training so a worker refuses a job it cannot train with a clear reason,
    instead of failing deep inside Keras on the first round.
    """
    if len(x) != len(y):
        raise DataError(f"data x has {len(x)} examples but y has {len(y)}")
    if isinstance(input_shape, list) or (input_shape and isinstance(input_shape[0], (tuple, list))):
        raise DataError(f"models with several inputs are not supported (input shapes {input_shape})")
    expected = tuple(input_shape)[1:]
    features = tuple(x.shape[1:])
    fits = len(features) == len(expected) and all(e is None or e == f for e, f in zip(expected, features))
    if not fits:
        raise DataError(f"data x has feature shape {features} but the model expects {expected}")


def _check_xy(x: np.ndarray, y: np.ndarray, where: str) -> Shard:
    for name, a in (("x", x), ("y", y)):
        if a.ndim == 0:
            raise DataError(f"{where}: array '{name}' is a scalar; expected shape (n, ...)")
        if a.dtype.kind not in "biuf":
            raise DataError(f"{where}: array '{name}' has dtype {a.dtype}; expected numbers")
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} examples but y has {len(y)}")
    if len(x) == 0:
        raise DataError(f"{where}: the shard is empty (x and y have no examples)")
    return x, y


# -- splitting ------------------------------------------------------------------------------------------


def train_val_split(x: np.ndarray, y: np.ndarray, val_fraction: float,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out `round(val_fraction * n)` random examples (at most n - 1): `(x_tr, y_tr, x_val, y_val)`.

    Both parts keep the original relative order, so the result depends only on the data and `seed`.
    `val_fraction = 0` gives empty validation arrays that still have the right trailing shape.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} examples but y has {len(y)}")
    n = len(x)
    n_val = min(int(round(val_fraction * n)), max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return x[train], y[train], x[val], y[val]


def split_iid(x: np.ndarray, y: np.ndarray, n_shards: int, seed: int = 0) -> list[Shard]:
    """Shuffle and deal the examples into `n_shards` shards whose sizes differ by at most one."""
    _check_n_shards(len(x), n_shards, min_size=1)
    order = np.random.default_rng(seed).permutation(len(x))
    return [(x[np.sort(idx)], y[np.sort(idx)]) for idx in np.array_split(order, n_shards)]


def split_dirichlet(x: np.ndarray, y: np.ndarray, n_shards: int, alpha: float = 0.5, seed: int = 0,
                    min_size: int = 1, max_tries: int = 100) -> list[Shard]:
    """Label-skewed (non-IID) split: each class is divided among shards in Dirichlet(alpha) proportions.

    `y` must hold class labels: integers `(n,)` or `(n, 1)`, or one-hot `(n, k)`. Draws are repeated (up to
    `max_tries`, deterministically from `seed`) until every shard has at least `min_size` examples, the
    usual practice that keeps the skew unbiased; if that never happens the request is too extreme for the
    data and DataError says what to change.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_n_shards(len(x), n_shards, min_size)
    labels = _class_labels(y)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_shards)]
        for idx in by_class:
            idx = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(n_shards, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for shard, piece in enumerate(np.split(idx, cuts)):
                parts[shard].append(piece)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return [(x[s], y[s]) for s in shards]
    raise DataError(f"split_dirichlet: no draw in {max_tries} gave every one of {n_shards} shards at least "
                    f"{min_size} examples (alpha={alpha}); use a larger alpha or fewer shards")


def _class_labels(y: np.ndarray) -> np.ndarray:
    """Integer class labels from sparse or one-hot targets, or DataError for regression targets."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1)
    flat = y.reshape(len(y), -1)
    if flat.shape[1] != 1:
        raise DataError(f"split_dirichlet needs class labels, got targets of shape {y.shape}")
    flat = flat[:, 0]
    if flat.dtype.kind == "f" and not np.array_equal(flat, np.round(flat)):
        raise DataError("split_dirichlet needs class labels, got non-integer targets (regression?); "
                        "use split_iid")
    return flat.astype(np.int64)


def _check_n_shards(n: int, n_shards: int, min_size: int) -> None:
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if n < n_shards * max(min_size, 1):
        raise DataError(f"cannot make {n_shards} shards of at least {max(min_size, 1)} examples from "
                        f"{n} examples")


# -- example datasets -----------------------------------------------------------------------------------


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits: x float32 (n, 64) scaled to [0, 1], y int64 classes 0-9."""
    from sklearn.datasets import load_digits  # optional dependency (extra "examples")

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, y_tr, x_te, y_te = train_val_split(x, y, test_fraction, seed=seed)
    return x_tr, y_tr, x_te, y_te


def diabetes(test_fraction: float = 0.2,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's diabetes regression: x float32 (n, 10), y float32 (n, 1), both standardised.

    Mean and standard deviation come from the training part only (no test leakage). The target is
    standardised too, so a mean squared error of 1.0 means "no better than predicting the mean" and
    default learning rates work; multiply by the raw targets' std (about 77) to get disease-progression
    units back.
    """
    from sklearn.datasets import load_diabetes  # optional dependency (extra "examples")

    bunch = load_diabetes(scaled=False)
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.float64).reshape(-1, 1)
    x_tr, y_tr, x_te, y_te = train_val_split(x, y, test_fraction, seed=seed)
    x_mean, x_std = x_tr.mean(axis=0), x_tr.std(axis=0)
    y_mean, y_std = y_tr.mean(axis=0), y_tr.std(axis=0)

    def standardise(a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)

    return (standardise(x_tr, x_mean, x_std), standardise(y_tr, y_mean, y_std),
            standardise(x_te, x_mean, x_std), standardise(y_te, y_mean, y_std))


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def fashion_mnist(root: str | os.PathLike = FASHION_MNIST_ROOT
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST from local idx files: x float32 (n, 28, 28, 1) in [0, 1], y int64 classes 0-9.

    Reads `train-images-idx3-ubyte(.gz)` and friends under `root` with NumPy alone (no download: the
    machines have no network). 60,000 training and 10,000 test images with the Debian package.
    """
    root = Path(root)
    arrays = {}
    for key, name in _FASHION_FILES.items():
        path = next((p for p in (root / f"{name}.gz", root / name) if p.is_file()), None)
        if path is None:
            raise DataError(f"Fashion-MNIST not found under {root} (no {name}.gz); install it with: "
                            f"sudo apt-get install dataset-fashion-mnist")
        arrays[key] = read_idx(path)
    for part in ("train", "test"):
        images, labels = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{root}: Fashion-MNIST {part} images {images.shape} and labels {labels.shape} "
                            f"do not match")
    return (_unit_images(arrays["x_train"]), arrays["y_train"].astype(np.int64),
            _unit_images(arrays["x_test"]), arrays["y_test"].astype(np.int64))


def _unit_images(images: np.ndarray) -> np.ndarray:
    """uint8 (n, h, w) -> float32 (n, h, w, 1) in [0, 1], scaled in place to keep one float copy."""
    out = images[..., None].astype(np.float32)
    out /= 255.0
    return out


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format), gzip-compressed if its name ends in `.gz`.

    Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, one big-endian uint32
    per dimension, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not supported (expected 0x08, uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        raise DataError(f"{path}: IDX header says shape {shape} ({size} bytes) but {len(raw) - header} "
                        f"bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


__all__ = ["DataError", "FASHION_MNIST_ROOT", "check_shard_for_model", "diabetes", "digits", "fashion_mnist",
           "load_shard", "read_idx", "save_shard", "split_dirichlet", "split_iid", "train_val_split",
           "write_shards"]
