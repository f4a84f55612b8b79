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
The averaging rules stream: `RunningFedAvg`, `RunningDPFedAvg` and `RunningMaskedSum` fold updates in
one at a time (one float64 model copy in memory, summed in the order added; the batch functions are
these folds over the list), so a client can add each update as it is fetched. The robust rules look at
all updates at once and hold them all in float64.

`dp_fedavg` (DP-FedAvg with fixed clipping, McMahan et al., 2018) also needs the previous global weights
(`reference`, to form each worker's delta) and the block's position (`round`, `seq`, which seed its
Gaussian noise). Those are not parameters of the job but context of one round: the strategy objects of
`grid_ipfs.strategies` declare what they read and get it from the chain.

`secure_fedavg` and `secure_dp_fedavg` take masked fixed-point updates (uint64, see `grid_ipfs.secagg`):
their sum mod 2**64 cancels the workers' pairwise masks exactly, so even these integer rules recompute
bit for bit, while no single update is ever readable.

`AcceptRule` / `parse_accept` are the acceptance rules of a job (`"val_accuracy>=0.6"`,
`"improves:val_loss"`): a round whose aggregate does not clear the rule is recorded as rejected and run
again. They are recorded as the `accept` entry of a block's aggregation params, which strategies ignore
(`strategies.RECORD_ONLY`): they say whether a result is kept, not how it is computed.

Which rule a name means, its params and ranges, and what context it reads: `grid_ipfs.strategies`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .limits import MAX_NUM_EXAMPLES, check_number

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
        n = check_num_examples(num_examples)
        arrays = [np.asarray(w) for w in weights]
        if self._sums is None:
            self._dtypes = [a.dtype for a in arrays]
            self._sums = [_times(a, n) for a in arrays]
        else:
            check_shapes(arrays, self._sums, index=self.count)
            for total, a in zip(self._sums, arrays):
                _add_times(total, a, n)
        self.count += 1
        self.total_examples += n

    def mean_float64(self) -> list[np.ndarray]:
        """The weighted mean so far in float64, before any cast."""
        if self._sums is None:
            raise ValueError("RunningFedAvg.result(): no updates were added")
        return [total / self.total_examples for total in self._sums]

    def result(self) -> Weights:
        """The weighted mean so far, cast to the first update's dtypes."""
        return cast(self.mean_float64(), self._dtypes)


def _times(a: np.ndarray, n: int) -> np.ndarray:
    """`a.astype(float64) * n`, the same bits, in one float64 copy of `a` instead of two."""
    out = a.astype(np.float64, order="C")  # C order whatever `a`'s: `_add_times` adds into a flat view of it
    out *= n
    return out


def _add_times(total: np.ndarray, a: np.ndarray, n: int) -> None:
    """`total += a.astype(float64) * n` in slices of `SLICE` values: the same bits (each value goes
    through the same two operations), with a fixed 2 MiB float64 temporary instead of one as large as
    the largest tensor, which was 1.7 model copies on the owner at the round's busiest moment."""
    flat_total, flat = total.reshape(-1), a.reshape(-1)  # `total` is ours and contiguous: a view
    for start in range(0, flat.size, SLICE):
        flat_total[start:start + SLICE] += _times(flat[start:start + SLICE], n)


def fedavg_float64(results: Results) -> list[np.ndarray]:
    """FedAvg's weighted mean before the cast: float64 arrays (what server optimizers step from)."""
    _check_nonempty(results)
    running = RunningFedAvg()
    for weights, num_examples in results:
        running.add(weights, num_examples)
    return running.mean_float64()


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
    return cast([np.median(layer, axis=0) for layer in layers], dtypes)


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
    return cast([np.mean(np.sort(layer, axis=0)[cut:kept], axis=0) for layer in layers], dtypes)


def krum(results: Results, byzantine: int = 1, multi: int = 1) -> Weights:
    """Krum (Blanchard et al., 2017), or Multi-Krum when `multi > 1`; ignores `num_examples`.

    Each update is scored by the sum of squared distances to its `n - byzantine - 2` nearest neighbours
    (at least 1, as in Flower, so small rounds still aggregate; the guarantee needs
    `n >= 2 * byzantine + 3`). The `multi` lowest-scoring updates are averaged with equal weight; ties
    go to the earlier update.
    """
    n = len(results)
    _check_nonempty(results)
    _check_pairwise_count("krum", n)
    if byzantine < 0:
        raise ValueError(f"krum: byzantine must be >= 0, got {byzantine}")
    if not 1 <= multi <= n:
        raise ValueError(f"krum: multi must be between 1 and the number of updates ({n}), got {multi}")
    layers, dtypes = _stack(results)
    flat = np.concatenate([layer.reshape(n, -1) for layer in layers], axis=1)
    chosen = np.argsort(_krum_scores(_distances(flat), byzantine), kind="stable")[:multi]
    chosen = np.sort(chosen)  # average in the callers' order, whatever the score order
    return cast([np.mean(layer[chosen], axis=0) for layer in layers], dtypes)


MAX_PAIRWISE_UPDATES = 1000
"""Most updates Krum and Bulyan take in one round: their cost grows with the square (Krum) or the cube
(Bulyan's picks) of the count, and a verifier must not spend days on one hostile block."""


def _check_pairwise_count(name: str, n: int) -> None:
    if n > MAX_PAIRWISE_UPDATES:
        raise ValueError(f"{name}: {n} updates is over the {MAX_PAIRWISE_UPDATES} it compares pairwise")


def _distances(flat: np.ndarray) -> np.ndarray:
    """Squared L2 distances between the rows of `flat` (n updates, flattened), one row at a time."""
    return np.stack([np.sum((flat - row) ** 2, axis=1) for row in flat])


def _krum_scores(distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum's score of each update given their squared `distances`: the sum of the distances to its
    `max(1, n - byzantine - 2)` nearest other updates."""
    n = len(distances)
    others = distances + np.diag(np.full(n, np.inf))  # an update is not its own neighbour
    neighbours = min(n - 1, max(1, n - byzantine - 2))
    if neighbours == 0:  # a single update: its score does not matter
        return np.zeros(n)
    return np.sum(np.sort(others, axis=1)[:, :neighbours], axis=1)


def bulyan(results: Results, byzantine: int = 1) -> Weights:
    """Bulyan (El Mhamdi et al., 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium");
    ignores `num_examples`.

    Krum picks `theta = n - 2f` updates one at a time (each pick scored among the updates not yet
    picked, ties to the earlier one); then, coordinate by coordinate, the `theta - 2f` picked values
    closest to their median are averaged. Needs `n >= 4f + 3`, as Flower's `aggregate_bulyan`. Ties in
    distance to the median go to the earlier update (Flower's `argpartition` leaves them unspecified).
    """
    n = len(results)
    _check_nonempty(results)
    _check_pairwise_count("bulyan", n)
    if isinstance(byzantine, bool) or not isinstance(byzantine, (int, np.integer)) or byzantine < 0:
        raise ValueError(f"bulyan: byzantine must be an integer >= 0, got {byzantine!r}")
    if n < 4 * byzantine + 3:
        raise ValueError(f"bulyan: {n} updates cannot tolerate {byzantine} Byzantine ones (needs n >= 4f + 3 = "
                         f"{4 * byzantine + 3})")
    layers, dtypes = _stack(results)
    flat = np.concatenate([layer.reshape(n, -1) for layer in layers], axis=1)
    distances = _distances(flat)  # once: each pick scores a sub-matrix of it
    remaining, picked = list(range(n)), []
    for _ in range(n - 2 * byzantine):
        best = remaining[int(np.argmin(_krum_scores(distances[np.ix_(remaining, remaining)], byzantine)))]
        picked.append(best)
        remaining.remove(best)
    chosen = np.sort(np.array(picked))
    beta = len(chosen) - 2 * byzantine
    out = []
    for layer in layers:
        values = layer[chosen]
        distance = np.abs(values - np.median(values, axis=0))
        closest = np.take_along_axis(values, np.argsort(distance, axis=0, kind="stable")[:beta], axis=0)
        out.append(np.mean(closest, axis=0))
    return cast(out, dtypes)


def multi_krum(results: Results, byzantine: int = 1, multi: int | None = None) -> Weights:
    """Multi-Krum with the usual default of keeping `n - byzantine` updates (at least 1)."""
    if multi is None:
        multi = max(1, len(results) - byzantine)
    return krum(results, byzantine=byzantine, multi=multi)


def dp_fedavg(results: Results, *, reference: Weights, clip: float, noise_multiplier: float, seed: int = 0,
              round: int = 0, seq: int = 0) -> Weights:
    """DP-FedAvg with fixed clipping (McMahan et al., 2018, "Learning differentially private recurrent
    language models"); ignores `num_examples`.

    Each update's delta from `reference` (the previous global weights) is scaled down to L2 norm at most
    `clip` (over all tensors), the clipped deltas are averaged with equal weight (so one worker moves the
    mean by at most `clip / n`), and Gaussian noise with standard deviation `noise_multiplier * clip / n`
    is added to every coordinate: `reference + mean(clipped deltas) + N(0, (z C / n)^2)`.

    The noise is drawn from `numpy.random.default_rng([seed, round, seq])`, tensor by tensor in order, so
    anyone holding the chain draws the same noise: `chain verify` recomputes the result bit for bit
    (numpy keeps `Generator.standard_normal` streams stable within a release series; a verifier on a very
    different numpy could in principle draw differently). `seq`, the chain position, differs between a
    rejected try of a round and its retry, so two published aggregates never share a noise draw. Norms
    are summed with `math.fsum` (exactly rounded), so clipping does not depend on SIMD summation order.

    The privacy accounting (epsilon over rounds for a given sampling rate) is not done here; with
    `noise_multiplier=0` this is plain clipped federated averaging.
    """
    _check_nonempty(results)
    running = RunningDPFedAvg(reference, clip=clip, noise_multiplier=noise_multiplier, seed=seed, round=round,
                              seq=seq)
    for weights, num_examples in results:
        running.add(weights, num_examples)
    return running.result()


class RunningDPFedAvg:
    """`dp_fedavg` one update at a time: each delta is clipped and summed as it is added (one float64
    model copy besides the reference); the noise is drawn once, in `result`. Same bits as `dp_fedavg`
    over the updates in the order added."""

    def __init__(self, reference: Weights, *, clip: float, noise_multiplier: float, seed: int = 0, round: int = 0,
                 seq: int = 0) -> None:
        check_number(clip, "dp-fedavg: clip", low_open=True)
        check_number(noise_multiplier, "dp-fedavg: noise_multiplier")
        for name, value in (("seed", seed), ("round", round), ("seq", seq)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"dp-fedavg: {name} must be an integer >= 0, got {value!r}")
        if reference is None:
            raise ValueError("dp-fedavg needs the previous global weights (reference=)")
        self._dtypes = [np.asarray(r).dtype for r in reference]
        self._ref = [np.asarray(r, dtype=np.float64) for r in reference]
        self._sums = [np.zeros_like(r) for r in self._ref]
        self._clip, self._z, self._seed = float(clip), float(noise_multiplier), (int(seed), int(round), int(seq))
        self.count = 0

    def add(self, weights: Weights, num_examples: int = 1) -> None:
        """Fold in one update (its example count is ignored: equal weights, one worker moves the mean by at
        most clip / n)."""
        arrays = [np.asarray(w) for w in weights]
        check_shapes(arrays, self._ref, index=self.count)
        if self.count == 0:
            self._dtypes = [a.dtype for a in arrays]
        deltas = [a.astype(np.float64) - r for a, r in zip(arrays, self._ref)]
        norm = _l2(deltas)
        factor = min(1.0, self._clip / norm) if norm > 0 else 1.0
        for total, delta in zip(self._sums, deltas):
            total += delta * factor
        self.count += 1

    def result(self) -> Weights:
        """reference + mean(clipped deltas) + N(0, (z C / n)^2), cast to the first update's dtypes."""
        if self.count == 0:
            raise ValueError("nothing to aggregate: no results")
        n = self.count
        sigma = self._z * self._clip / n
        rng = np.random.default_rng(list(self._seed))
        out = []
        for r, total in zip(self._ref, self._sums):
            noise = rng.standard_normal(r.shape) * sigma  # drawn even when sigma == 0: one stream, whatever z
            out.append(r + total / n + noise)
        return cast(out, self._dtypes)


SCALE_BITS = 24
"""secure-fedavg's fixed point: fractional bits (steps of 6e-8, room for |n * w| up to 5e11)."""


def secure_fedavg(results: Sequence[tuple[Sequence[np.ndarray], int]], scale_bits: int = SCALE_BITS, *,
                  dtype: type = np.float32) -> list:
    """FedAvg of masked fixed-point updates (see `grid_ipfs.secagg`): their sum mod 2**64, in which the
    pairwise masks cancel exactly, over the total examples, as float32. Integer sums: bit-for-bit."""
    if not results:
        raise ValueError("secure-fedavg needs at least one update")
    running = RunningMaskedSum(scale_bits)
    for weights, num_examples in results:
        running.add(weights, num_examples)
    return running.result(dtype)


class RunningMaskedSum:
    """`secure_fedavg` one update at a time: the uint64 sum mod 2**64 (one model copy). Integer addition
    is associative, so any order of adding gives the same bits."""

    def __init__(self, scale_bits: int = SCALE_BITS) -> None:
        self._scale_bits = scale_bits
        self._sums: list[np.ndarray] | None = None
        self.count = 0
        self.total_examples = 0

    def add(self, weights: Sequence[np.ndarray], num_examples: int) -> None:
        arrays = [np.asarray(w) for w in weights]
        first = self._sums if self._sums is not None else arrays
        if len(arrays) != len(first) or any(a.dtype != np.uint64 or a.shape != f.shape for a, f in zip(arrays, first)):
            raise ValueError(f"update {self.count}: masked updates are uint64 tensors shaped like the first one")
        if self._sums is None:
            self._sums = [a.copy() for a in arrays]
        else:
            with np.errstate(over="ignore"):
                for total, a in zip(self._sums, arrays):
                    total += a
        self.count += 1
        self.total_examples += int(num_examples)

    def result(self, dtype: type = np.float32) -> list:
        """The sum read as signed fixed point, over the total examples, as `dtype`."""
        if self._sums is None:
            raise ValueError("secure-fedavg needs at least one update")
        scale, total = float(2 ** self._scale_bits), self.total_examples
        return [(acc.view(np.int64).astype(np.float64) / scale / total).astype(dtype) for acc in self._sums]


def secure_dp_fedavg(results: Results, *, reference: Weights, clip: float, noise_multiplier: float,
                     scale_bits: int = SCALE_BITS) -> Weights:
    """DP-FedAvg over secure aggregation (distributed noise): each worker sent its delta from `reference`,
    clipped to L2 norm `clip`, plus its share of Gaussian noise, N(0, (z C)^2 / n), masked in fixed point
    (`grid_ipfs.secagg`). The masks cancel in the sum, the noise shares add up to N(0, (z C)^2), and the
    result is `reference + sum / n`: DP-FedAvg's `reference + mean(clipped) + N(0, (z C / n)^2)`.

    `clip` and `noise_multiplier` are checked and recorded, not applied: the workers applied them, and
    nobody (the owner included) sees a single update, its clipping or its noise. `num_examples` is
    ignored (equal weights, as in dp-fedavg). Integer sums: recomputed bit for bit.
    """
    running = RunningSecureDPFedAvg(reference, clip=clip, noise_multiplier=noise_multiplier, scale_bits=scale_bits)
    for weights, _ in results:
        running.add(weights)
    return running.result()


class RunningSecureDPFedAvg(RunningMaskedSum):
    """`secure_dp_fedavg` one update at a time: the masked sum with equal weights, offset by `reference`."""

    def __init__(self, reference: Weights, *, clip: float, noise_multiplier: float,
                 scale_bits: int = SCALE_BITS) -> None:
        check_number(clip, "secure-dp-fedavg: clip", low_open=True)
        check_number(noise_multiplier, "secure-dp-fedavg: noise_multiplier")
        if reference is None:
            raise ValueError("secure-dp-fedavg needs the previous global weights (reference=)")
        super().__init__(scale_bits)
        self._reference = reference

    def add(self, weights: Sequence[np.ndarray], num_examples: int = 1) -> None:
        super().add(weights, 1)  # equal weights, as in dp-fedavg: the workers clipped their deltas

    def result(self, dtype: type | None = None) -> Weights:
        mean = super().result(np.float64)
        check_shapes([np.asarray(r) for r in self._reference], mean, index=None)
        return cast([np.asarray(r, np.float64) + m for r, m in zip(self._reference, mean)],
                    [np.asarray(r).dtype for r in self._reference])


# -- acceptance rules -----------------------------------------------------------------------------------

_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "mape", "msle", "hinge", "crossentropy")
_THRESHOLD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|>|<)\s*(\S+)\s*$")
_IMPROVES = re.compile(r"^\s*improves\s*:\s*([A-Za-z_][A-Za-z0-9_.]*)\s*$")
_COMPARE = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


@dataclass(frozen=True)
class AcceptRule:
    """When a round's aggregate is kept: `metric OP threshold`, or `improves:metric`.

    The metric is one of the round block's metrics: the client's evaluation on its `--eval-data`
    (`val_accuracy`, `val_loss`, ...) or the workers' example-weighted training metrics (`accuracy`,
    `loss`, ...). `improves:M` compares with M of the previous accepted block (genesis included) and asks
    for a strict improvement: lower for names containing loss, error, mse, mae, mape, msle, hinge or
    crossentropy, higher for anything else. With no previous value to compare with, it passes.
    """

    metric: str
    op: str
    """`>=`, `<=`, `>`, `<` or `improves`."""
    threshold: float | None = None

    def __str__(self) -> str:
        if self.op == "improves":
            return f"improves:{self.metric}"
        return f"{self.metric}{self.op}{self.threshold!r}"

    @property
    def lower_is_better(self) -> bool:
        return any(word in self.metric.lower() for word in _LOWER_IS_BETTER)

    def check(self, metrics: Mapping[str, float], baseline: Mapping[str, float] | None = None) -> tuple[bool, str]:
        """(passes, why) for a round's `metrics`; `baseline` is the previous accepted block's metrics.

        Raises ValueError when `metrics` lacks the rule's metric (the rule cannot be decided).
        """
        if self.metric not in metrics:
            known = ", ".join(sorted(metrics)) or "none"
            raise ValueError(f"acceptance rule {self}: no metric {self.metric!r} in this round's metrics "
                             f"(have: {known})")
        value = float(metrics[self.metric])
        if self.op != "improves":
            ok = _COMPARE[self.op](value, self.threshold)
            return ok, f"{self.metric} {value:.6g} {'meets' if ok else 'fails'} {self}"
        if baseline is None or self.metric not in baseline:
            return True, f"{self.metric} {value:.6g}: no previous value to improve on"
        before = float(baseline[self.metric])
        ok = value < before if self.lower_is_better else value > before
        return ok, f"{self.metric} {value:.6g} vs {before:.6g} before: {'improves' if ok else 'does not improve'}"


def held_out(metrics: Mapping[str, float]) -> dict[str, float]:
    """An evaluation on held-out data (the client's, a miner's, an auditor's) named as blocks record it:
    `loss` -> `val_loss`, so acceptance rules and verify compare like with like."""
    return {f"val_{k}": v for k, v in metrics.items()}


def parse_accept(text: str) -> AcceptRule:
    """Parse `"METRIC>=X"` (also `<=`, `>`, `<`) or `"improves:METRIC"`; ValueError names what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"acceptance rule: expected a string, got {text!r}")
    match = _IMPROVES.match(text)
    if match:
        return AcceptRule(match.group(1), "improves")
    match = _THRESHOLD.match(text)
    if not match:
        raise ValueError(f"acceptance rule {text!r}: expected METRIC>=NUMBER (or <=, >, <) or improves:METRIC, "
                         "e.g. 'val_accuracy>=0.6' or 'improves:val_loss'")
    metric, op, number = match.groups()
    try:
        threshold = float(number)
    except ValueError:
        raise ValueError(f"acceptance rule {text!r}: {number!r} is not a number") from None
    if not math.isfinite(threshold):
        raise ValueError(f"acceptance rule {text!r}: the threshold must be finite")
    return AcceptRule(metric, op, threshold)


def update_norm(weights: Weights, reference: Weights) -> float:
    """L2 norm of `weights - reference` over all tensors, in float64: how far an update moved the model.

    Used to flag outliers (an update far larger than its peers' is suspect). Taken in slices of
    `SLICE` values, so the owner measures each update as it arrives with a fixed 2 MiB of float64
    temporaries, not three model-sized ones (which made it the owner's peak with many workers).
    """
    arrays = [np.asarray(w) for w in weights]
    check_shapes(arrays, [np.asarray(r) for r in reference], index=None)
    squared = 0.0
    for w, r in zip(arrays, reference):
        w, r = w.reshape(-1), np.asarray(r).reshape(-1)
        for start in range(0, w.size, SLICE):
            delta = np.subtract(w[start:start + SLICE], r[start:start + SLICE], dtype=np.float64)
            squared += float(np.dot(delta, delta))
    return math.sqrt(squared)


SLICE = 1 << 18
"""Values per slice where a model-sized float64 temporary is avoided (`update_norm`, `RunningFedAvg.add`)."""


# -- helpers --------------------------------------------------------------------------------------------


def _l2(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm over float64 arrays, summed with math.fsum: the same bits whatever the SIMD summation order."""
    return math.sqrt(math.fsum(math.fsum(np.square(a).ravel()) for a in arrays))


def check_num_examples(num_examples: int, where: str = "") -> int:
    """The one range check of a peer's example count: an integer in 1..MAX_NUM_EXAMPLES (so sums and
    float64 products with it stay exact and finite)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise ValueError(f"{where}num_examples must be an integer, got {str(num_examples)[:40]}")
    if num_examples <= 0:
        raise ValueError(f"{where}num_examples must be > 0, got {num_examples}")
    if num_examples > MAX_NUM_EXAMPLES:
        raise ValueError(f"{where}num_examples is over the limit {MAX_NUM_EXAMPLES}")
    return int(num_examples)


def _check_nonempty(results: Results) -> None:
    if len(results) == 0:
        raise ValueError("nothing to aggregate: no results")


def check_shapes(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], index: int | None) -> None:
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
        check_shapes([np.asarray(w) for w in weights], first, index=index)
    layers = [np.stack([np.asarray(weights[i], dtype=np.float64) for weights, _ in results])
              for i in range(len(first))]
    return layers, [a.dtype for a in first]


def cast(arrays: Sequence[np.ndarray], dtypes: Sequence[np.dtype]) -> Weights:
    """Cast float64 results back to the models' dtypes; integer tensors are rounded, not truncated."""
    out = []
    for a, dtype in zip(arrays, dtypes):
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            a = np.rint(a)
        out.append(np.asarray(a).astype(dtype))
    return out


__all__ = ["AcceptRule", "Results", "RunningDPFedAvg", "RunningFedAvg", "RunningMaskedSum", "RunningSecureDPFedAvg",
           "SCALE_BITS", "Weights", "bulyan", "cast", "check_num_examples", "check_shapes", "dp_fedavg", "fedavg",
           "fedavg_float64", "held_out", "krum", "median", "multi_krum", "parse_accept", "secure_dp_fedavg",
           "secure_fedavg", "trimmed_mean", "update_norm"]
