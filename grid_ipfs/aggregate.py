"""Aggregation rules: turn the workers' weight updates of one round into the next global weights.

Pure numpy, in the style of Flower's `flwr/server/strategy/aggregate.py`. Every rule takes
`results: Sequence[tuple[Weights, int]]` — each worker's weight list (`model.get_weights()` order) and its
number of training examples — and returns a new weight list cast back to the dtypes of the first result.

Reproducibility is a feature here, not an accident: the chain records each round's updates and the
aggregate, and `python -m grid_ipfs.chain verify` recomputes the aggregate and compares it *bit for bit*.
So every rule

* works in float64 and casts once at the end;
* consumes results in the order given (the caller sorts them, e.g. by worker id) and combines them with
  element-wise arithmetic only (IEEE-754 exact rounding makes that identical on every machine; Krum's
  selection scores are sums, but they only choose which updates to average);
* breaks ties by position, never by chance.

`fedavg` is the example-weighted mean (McMahan et al., 2017). `median`, `trimmed_mean` and `krum` ignore
the example counts — a Byzantine worker could lie about them — and bound the influence of outliers.
`fedavg` streams (one float64 model copy in memory); the robust rules look at all updates at once and
hold them all in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Weights = list[np.ndarray]
"""A model's weights as `model.get_weights()` returns them."""

Results = Sequence[tuple[Weights, int]]
"""One round's updates: (weights, num_examples) per worker, in a deterministic order."""


class RunningFedAvg:
    """Streaming example-weighted mean: add updates one by one, read the average at the end.

    Only the float64 running sum is kept (one model copy), so a client can fold in updates as they are
    fetched instead of holding every worker's weights at once. Summation order is the order of `add`.
    """

    def __init__(self) -> None:
        self._sums: list[np.ndarray] | None = None
        self._dtypes: list[np.dtype] = []
        self.count = 0
        """Number of updates added."""
        self.total_examples = 0
        """Sum of their `num_examples`."""

    def add(self, weights: Weights, num_examples: int) -> None:
        """Fold in one update weighted by `num_examples` (> 0); shapes must match the first update."""
        n = _check_num_examples(num_examples)
        arrays = [np.asarray(w) for w in weights]
        if self._sums is None:
            self._dtypes = [a.dtype for a in arrays]
            self._sums = [a.astype(np.float64) * n for a in arrays]
        else:
            _check_shapes(arrays, self._sums, index=self.count)
            for total, a in zip(self._sums, arrays):
                total += a.astype(np.float64) * n
        self.count += 1
        self.total_examples += n

    def result(self) -> Weights:
        """The weighted mean so far, cast to the first update's dtypes."""
        if self._sums is None:
            raise ValueError("RunningFedAvg.result(): no updates were added")
        return _cast([total / self.total_examples for total in self._sums], self._dtypes)


def fedavg(results: Results) -> Weights:
    """FedAvg: the mean of the updates weighted by their number of examples."""
    _check_nonempty(results)
    running = RunningFedAvg()
    for weights, num_examples in results:
        running.add(weights, num_examples)
    return running.result()


def median(results: Results) -> Weights:
    """Coordinate-wise median (Yin et al., 2018); ignores `num_examples`.

    Robust while fewer than half of the updates are arbitrary; with an even count it is the mean of the
    two middle values.
    """
    layers, dtypes = _stack(results)
    return _cast([np.median(layer, axis=0) for layer in layers], dtypes)


def trimmed_mean(results: Results, trim: float = 0.1) -> Weights:
    """Coordinate-wise trimmed mean; ignores `num_examples`.

    For each coordinate, drops the `int(trim * n)` lowest and as many highest values and averages the
    rest (scipy's `trim_mean` convention, as in Flower). Note that with few updates the cut may be zero:
    5 updates need `trim >= 0.2` to drop anything.
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trimmed_mean: trim must be in [0, 0.5), got {trim}")
    layers, dtypes = _stack(results)
    cut = int(trim * len(results))
    kept = len(results) - cut
    return _cast([np.mean(np.sort(layer, axis=0)[cut:kept], axis=0) for layer in layers], dtypes)


def krum(results: Results, byzantine: int = 1, multi: int = 1) -> Weights:
    """Krum (Blanchard et al., 2017), or Multi-Krum when `multi > 1`; ignores `num_examples`.

    Each update is scored by the sum of squared distances to its `n - byzantine - 2` nearest neighbours
    (at least 1, as in Flower, so small rounds still aggregate; the guarantee needs
    `n >= 2 * byzantine + 3`). The `multi` lowest-scoring updates are averaged with equal weight; ties
    go to the earlier update.
    """
    n = len(results)
    _check_nonempty(results)
    if byzantine < 0:
        raise ValueError(f"krum: byzantine must be >= 0, got {byzantine}")
    if not 1 <= multi <= n:
        raise ValueError(f"krum: multi must be between 1 and the number of updates ({n}), got {multi}")
    layers, dtypes = _stack(results)
    flat = np.concatenate([layer.reshape(n, -1) for layer in layers], axis=1)
    distances = np.array([[float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n)] for i in range(n)])
    neighbours = max(1, n - byzantine - 2)
    scores = [float(np.sum(np.sort(np.delete(distances[i], i))[:neighbours])) for i in range(n)]
    chosen = np.argsort(np.array(scores), kind="stable")[:multi]
    chosen = np.sort(chosen)  # average in the callers' order, whatever the score order
    return _cast([np.mean(layer[chosen], axis=0) for layer in layers], dtypes)


def multi_krum(results: Results, byzantine: int = 1, multi: int | None = None) -> Weights:
    """Multi-Krum with the usual default of keeping `n - byzantine` updates (at least 1)."""
    if multi is None:
        multi = max(1, len(results) - byzantine)
    return krum(results, byzantine=byzantine, multi=multi)


AGGREGATIONS: dict[str, Callable[..., Weights]] = {
    "fedavg": fedavg,
    "median": median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
}
"""Aggregation rules by the name used in job configs and chain blocks."""


def aggregate(name: str, results: Results, **params) -> Weights:
    """Apply the rule registered as `name` (see `AGGREGATIONS`) with its keyword `params`."""
    try:
        rule = AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation {name!r}; known: {', '.join(sorted(AGGREGATIONS))}") from None
    return rule(results, **params)


def update_norm(weights: Weights, reference: Weights) -> float:
    """L2 norm of `weights - reference` over all tensors, in float64: how far an update moved the model.

    Used to flag outliers (an update far larger than its peers' is suspect).
    """
    arrays = [np.asarray(w) for w in weights]
    _check_shapes(arrays, [np.asarray(r) for r in reference], index=None)
    squared = 0.0
    for w, r in zip(arrays, reference):
        squared += float(np.sum((w.astype(np.float64) - np.asarray(r, dtype=np.float64)) ** 2))
    return math.sqrt(squared)


# -- helpers --------------------------------------------------------------------------------------------


def _check_num_examples(num_examples: int) -> int:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise ValueError(f"num_examples must be an integer, got {num_examples!r}")
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    return int(num_examples)


def _check_nonempty(results: Results) -> None:
    if len(results) == 0:
        raise ValueError("nothing to aggregate: no results")


def _check_shapes(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], index: int | None) -> None:
    """Raise ValueError on the first tensor whose shape differs from the reference's."""
    which = "weights" if index is None else f"result {index}"
    if len(arrays) != len(reference):
        raise ValueError(f"{which} has {len(arrays)} tensors, expected {len(reference)}")
    for i, (a, r) in enumerate(zip(arrays, reference)):
        if a.shape != r.shape:
            raise ValueError(f"{which}, tensor {i}: shape {a.shape}, expected {r.shape}")


def _stack(results: Results) -> tuple[list[np.ndarray], list[np.dtype]]:
    """Validate results and stack each tensor across them: float64 arrays of shape (n, *tensor_shape)."""
    _check_nonempty(results)
    first = [np.asarray(w) for w in results[0][0]]
    for index, (weights, _) in enumerate(results):
        _check_shapes([np.asarray(w) for w in weights], first, index=index)
    layers = [np.stack([np.asarray(weights[i], dtype=np.float64) for weights, _ in results])
              for i in range(len(first))]
    return layers, [a.dtype for a in first]


def _cast(arrays: Sequence[np.ndarray], dtypes: Sequence[np.dtype]) -> Weights:
    """Cast float64 results back to the models' dtypes; integer tensors are rounded, not truncated."""
    out = []
    for a, dtype in zip(arrays, dtypes):
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            a = np.rint(a)
        out.append(np.asarray(a).astype(dtype))
    return out


__all__ = ["AGGREGATIONS", "Results", "RunningFedAvg", "Weights", "aggregate", "fedavg", "krum", "median",
           "multi_krum", "trimmed_mean", "update_norm"]
