"""Where a worker's examples come from: a shard file, a CSV export, a folder of images, or the operator's code.

`open_data(path)` picks the source from what `--data` points at; `Loader("module:function")` runs the
operator's own loader (`--data-loader`). Every source answers one question, `fit_to(input_shape)`: the
examples `(x, y)` shaped for a model whose `model.input_shape` is `input_shape` (batch dimension
first), or a `DataError` naming what was expected. The shape comes from the vetted model config
(`vetting.Report.input_shape`) before any model code runs, so a folder of images is loaded at the size
the job's model takes. The data never leaves the machine: a worker announces only how many examples
it has.

- `--data shard.npz`: arrays `x` and `y` (see `grid_ipfs.data`);
- `--data table.csv --label-column NAME`: one example per row; column NAME is `y`, every other column
  a numeric feature;
- `--data folder/` with one sub-folder of images per class: Keras' `image_dataset_from_directory` at
  the model's image size; `y` is the sub-folder's index;
- `--data-loader module:function`: the function's `(x, y)` arrays, `tf.data.Dataset` or generator of
  `(x, y)` batches.

Images are read as Keras reads them: float32 pixels in 0-255 (put a `Rescaling(1/255)` layer in the
model), sub-folders in sorted order, or in `--class-names` order when some worker lacks a class.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from .data import DataError, Shard, check_shard_for_model, load_shard

MAX_CSV_COLUMNS = 100_000
"""Columns a CSV file may have: a header wider than this is not a table of features."""

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
"""The files `image_dataset_from_directory` reads (other files in a class folder are skipped)."""

MAX_IMAGE_BYTES = 2 << 30
"""Most memory a folder of images may take once loaded (float32 at the model's size). The size comes
from a stranger's model: a job asking for 10000x10000 inputs is refused, not loaded."""

_COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}


class LocalData(Protocol):
    """A worker's examples, shaped on demand for each job's model."""

    description: str
    """What the worker logs at start: the source and its size."""

    def fit_to(self, input_shape: tuple) -> Shard:
        """`(x, y)` for a model whose input shape (batch first) is `input_shape`; DataError if they cannot fit."""

    def nbytes_at(self, input_shape: tuple) -> int | None:
        """About the memory `fit_to(input_shape)` returns, known before anything is loaded; None when
        only loading can tell (the operator's loader)."""


class Arrays:
    """Examples already in memory (a shard file, a CSV export, a loader's result): fitted by reshaping
    each example to the model's input when the sizes agree (64 columns fit an (8, 8, 1) input)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, where: str, features: str = "features"):
        self.x, self.y, self.where, self.features = x, y, where, features
        self.description = f"{where}: {len(x)} examples"

    def nbytes_at(self, input_shape: tuple) -> int:
        return self.x.nbytes + self.y.nbytes  # a reshape, never a copy

    def fit_to(self, input_shape: tuple) -> Shard:
        x, dims = self.x, _single_input(input_shape, self.where)
        if x.shape[1:] != dims and None not in dims and math.prod(x.shape[1:]) == math.prod(dims):
            x = x.reshape((len(x), *dims))
        try:
            check_shard_for_model(x, self.y, (None, *dims))
        except DataError:
            raise DataError(f"{self.where}: {_shape_words(self.x.shape[1:], self.features)} but the model expects "
                            f"{dims}") from None
        return x, self.y


def open_data(path: str | os.PathLike, *, label_column: str | None = None,
              class_names: list[str] | None = None) -> LocalData:
    """The source `path` names: a directory of class folders, a `.csv` file (needs `label_column`), or
    an `.npz` shard. Raises DataError with the accepted kinds when it is none of them."""
    path = Path(path)
    if label_column is not None and path.suffix.lower() != ".csv":
        raise DataError(f"--label-column is for CSV files; {path} is not a .csv file")
    if class_names is not None and not path.is_dir():
        raise DataError(f"--class-names is for folders of images; {path} is not a directory")
    if path.is_dir():
        return ImageFolder(path, class_names=class_names)
    if path.suffix.lower() == ".csv":
        if label_column is None:
            raise DataError(f"{path}: a CSV file needs --label-column NAME (the column holding the labels)")
        return read_csv(path, label_column)
    if path.suffix.lower() == ".npz" or path.is_file():
        x, y = load_shard(path)
        return Arrays(x, y, where=str(path))
    raise DataError(f"{path}: not found (expected an .npz shard, a .csv file with --label-column, or a folder "
                    f"of class sub-folders of images)")


# -- CSV ------------------------------------------------------------------------------------------------


def read_csv(path: str | os.PathLike, label_column: str) -> Arrays:
    """A CSV export with a header row: column `label_column` is `y`, every other column a numeric feature
    of `x` (float32). Labels that are all whole numbers are class indices (int64), others targets
    (float32). An empty or non-numeric cell is an error naming its row and column."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header row and one row per example)")
            if len(header) > MAX_CSV_COLUMNS:
                raise DataError(f"{path}: {len(header)} columns, more than {MAX_CSV_COLUMNS}")
            header = [name.strip() for name in header]
            if label_column not in header:
                raise DataError(f"{path}: no column {label_column!r} for --label-column (columns: "
                                f"{_names(header)})")
            if header.count(label_column) > 1:
                raise DataError(f"{path}: column {label_column!r} appears {header.count(label_column)} times")
            table = [_numbers(row, header, path, line) for line, row in enumerate(rows, start=2) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from exc
    if not table:
        raise DataError(f"{path}: no examples (only a header row)")
    values = np.asarray(table, dtype=np.float64)
    label = header.index(label_column)
    y = values[:, label]
    x = np.delete(values, label, axis=1).astype(np.float32)
    if x.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides the label {label_column!r}")
    y = y.astype(np.int64) if np.all(y == np.round(y)) else y.astype(np.float32)
    features = [name for name in header if name != label_column]
    return Arrays(x, y, where=str(path), features=f"feature columns ({_names(features)})")


def _numbers(row: list[str], header: list[str], path: Path, line: int) -> list[float]:
    if len(row) != len(header):
        raise DataError(f"{path}: row {line} has {len(row)} cells, the header {len(header)}")
    try:
        numbers = [float(cell) for cell in row]
    except ValueError:
        column, cell = next((name, c) for name, c in zip(header, row) if not _is_number(c))
        raise DataError(f"{path}: row {line}, column {column!r}: {cell[:40]!r} is not a number") from None
    if not all(math.isfinite(v) for v in numbers):
        column = next(name for name, v in zip(header, numbers) if not math.isfinite(v))
        raise DataError(f"{path}: row {line}, column {column!r}: not a finite number")
    return numbers


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# -- folders of images ------------------------------------------------------------------------------------


class ImageFolder:
    """`root/<class>/<image>` files, loaded with Keras' `image_dataset_from_directory` at the model's
    (height, width) and channels (1 grayscale, 3 RGB, 4 RGBA); labels are class indices in sorted folder
    order, or in `class_names` order (every worker of a job must agree on it). Loaded once per size."""

    def __init__(self, root: str | os.PathLike, *, class_names: list[str] | None = None):
        self.root = Path(root)
        self.class_names = list(class_names) if class_names is not None else None
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"{self.root}: expected one sub-folder of images per class, found none")
        counts = {name: sum(1 for f in (self.root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                  for name in folders}
        if not sum(counts.values()):
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        if self.class_names is not None and sorted(self.class_names) != folders:
            raise DataError(f"{self.root}: --class-names {_names(self.class_names)} do not match its class "
                            f"folders {_names(folders)}")
        self.images = sum(counts.values())
        self.description = f"{self.root}: {self.images} images in {len(folders)} classes"
        self._loaded: dict[tuple, Shard] = {}

    def fit_to(self, input_shape: tuple) -> Shard:
        dims = _single_input(input_shape, str(self.root))
        if len(dims) != 3 or None in dims[:2] or dims[2] not in _COLOR_MODES:
            raise DataError(f"{self.root}: a folder of images fits a model whose input is (height, width, "
                            f"channels) with 1, 3 or 4 channels; this model expects {dims}")
        size = self.nbytes_at(input_shape)
        if size > MAX_IMAGE_BYTES:
            raise DataError(f"{self.root}: {self.images} images at the model's input {dims} would take "
                            f"{size / 2**30:.1f} GiB, over the {MAX_IMAGE_BYTES / 2**30:.0f} GiB limit")
        if dims not in self._loaded:
            self._loaded = {dims: self._load(*dims)}  # one size at a time: a worker rarely needs two
        return self._loaded[dims]

    def nbytes_at(self, input_shape: tuple) -> int:
        """float32 pixels at the model's input size, and int32 labels (shape checks are `fit_to`'s)."""
        dims = _single_input(input_shape, str(self.root))
        return self.images * (math.prod(d for d in dims if d is not None) + 1) * 4

    def _load(self, height: int, width: int, channels: int) -> Shard:
        from keras.utils import image_dataset_from_directory

        try:
            dataset = image_dataset_from_directory(
                self.root, labels="inferred", label_mode="int", class_names=self.class_names,
                color_mode=_COLOR_MODES[channels], batch_size=256, image_size=(height, width), shuffle=False,
                verbose=False)
            return _concatenate(((np.asarray(x), np.asarray(y)) for x, y in dataset), str(self.root))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupt image (TensorFlow's own error types): one line
            raise DataError(f"{self.root}: cannot read its images ({_one_line(exc)})") from exc


# -- the operator's own loader ----------------------------------------------------------------------------


class Loader:
    """`--data-loader module:function` (or `path/to/file.py:function`): the operator's own code, run on
    the operator's machine. The function returns `(x, y)` arrays, or a `tf.data.Dataset` or any iterable
    of `(x, y)` batches; a function with an `input_shape` parameter is called with each new model input
    shape (so it can size images itself; the shape is a stranger's choice, bounded only by the model
    vetting's activation limit: a loader should check what it is asked for), any other once."""

    def __init__(self, spec: str):
        self.spec = spec
        self.function = _import_function(spec)
        self.per_shape = "input_shape" in _parameters(self.function)
        self._fixed = None if self.per_shape else self._call()
        self._sized: tuple[tuple, Arrays] | None = None  # the newest (input shape, examples) when per_shape
        size = "examples sized per model" if self.per_shape else f"{len(self._fixed.x)} examples"
        self.description = f"--data-loader {spec}: {size}"

    def nbytes_at(self, input_shape: tuple) -> int | None:
        return None if self.per_shape else self._fixed.nbytes_at(input_shape)

    def fit_to(self, input_shape: tuple) -> Shard:
        if not self.per_shape:
            return self._fixed.fit_to(input_shape)
        if self._sized is None or self._sized[0] != tuple(input_shape):  # one shape at a time, as ImageFolder
            self._sized = (tuple(input_shape), self._call(input_shape=tuple(input_shape)))
        return self._sized[1].fit_to(input_shape)

    def _call(self, **kwargs) -> Arrays:
        where = f"--data-loader {self.spec}"
        try:
            result = self.function(**kwargs)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - the operator's code: its failure is a data error, said once
            raise DataError(f"{where} failed: {_one_line(exc)}") from exc
        if isinstance(result, tuple) and len(result) == 2 and all(hasattr(a, "shape") for a in result):
            x, y = (np.asarray(a) for a in result)
            _check_arrays(x, y, where)
            return Arrays(x, y, where=where)
        if hasattr(result, "element_spec") and hasattr(result, "batch"):  # a tf.data.Dataset
            spec = result.element_spec
            if isinstance(spec, tuple) and spec and getattr(spec[0], "shape", None) is not None \
                    and spec[0].shape.rank is not None and (spec[0].shape.rank == 0 or spec[0].shape[0] is not None):
                result = result.batch(256)  # single examples: batch them so they are joined, not glued
            result = result.as_numpy_iterator()
        if isinstance(result, Iterable) and not isinstance(result, (str, bytes, dict)):
            x, y = _concatenate(_pairs(result, where), where)
            return Arrays(x, y, where=where)
        raise DataError(f"{where}: returned {type(result).__name__}; expected (x, y) arrays, a tf.data.Dataset "
                        f"or an iterable of (x, y) batches")


def _import_function(spec: str) -> Callable:
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name.isidentifier():
        raise DataError(f"--data-loader {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DataError(f"--data-loader {spec}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"grid_ipfs_data_loader_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - the operator's module failed to import: say so in one line
        raise DataError(f"--data-loader {spec}: cannot import {module_name} ({_one_line(exc)})") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise DataError(f"--data-loader {spec}: {module_name} has no function {name}")
    return function


def _parameters(function: Callable) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def _pairs(batches: Iterable, where: str):
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"{where}: batch {i} is a {type(batch).__name__}, expected an (x, y) pair")
        yield np.asarray(batch[0]), np.asarray(batch[1])


# -- shared checks --------------------------------------------------------------------------------------


def _concatenate(batches: Iterable[tuple[np.ndarray, np.ndarray]], where: str) -> Shard:
    xs, ys = [], []
    for x, y in batches:
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise DataError(f"{where}: a batch of x {x.shape} and y {y.shape}; expected as many x as y")
        if xs and (x.shape[1:] != xs[0].shape[1:] or y.shape[1:] != ys[0].shape[1:]):
            raise DataError(f"{where}: batches of x {xs[0].shape[1:]} and {x.shape[1:]} examples differ in shape")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DataError(f"{where}: no examples")
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_arrays(x, y, where)
    return x, y


def _check_arrays(x: np.ndarray, y: np.ndarray, where: str) -> None:
    for name, a in (("x", x), ("y", y)):
        if a.ndim == 0 or a.dtype.kind not in "biuf":
            raise DataError(f"{where}: {name} has shape {a.shape} and dtype {a.dtype}; expected numbers, "
                            f"one row per example")
    if len(x) != len(y) or not len(x):
        raise DataError(f"{where}: x has {len(x)} examples and y {len(y)}; expected as many, at least one")


def _single_input(input_shape: tuple, where: str) -> tuple:
    if isinstance(input_shape, list) or (input_shape and isinstance(input_shape[0], (tuple, list))):
        raise DataError(f"{where}: models with several inputs are not supported (input shapes {input_shape})")
    return tuple(input_shape)[1:]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception from code or libraries we do not control (TensorFlow, the operator's loader) as the
    one line a `DataError` is: its type and its message, whitespace folded, cut at `limit` characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def _shape_words(features: tuple, what: str) -> str:
    if what != "features":
        return f"{math.prod(features)} {what}"
    return f"data x has feature shape {features}"


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


__all__ = ["Arrays", "ImageFolder", "LocalData", "Loader", "open_data", "read_csv"]
