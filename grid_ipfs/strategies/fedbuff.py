"""Buffered asynchronous aggregation (FedBuff; Nguyen et al., 2022): the pure math of `--mode async`.

In an asynchronous job a worker trains from whichever global version it has and names it; by the time
its update arrives the owner may have moved on `staleness` versions. FedBuff keeps a buffer: each
update contributes its *change* from the version it started from, down-weighted by a function of its
staleness, and every K accepted updates the owner applies the buffer's weighted mean change to the
newest global weights with a server learning rate:

    new = global + server_lr * sum_i s(tau_i) * n_i * (w_i - base_i) / sum_i n_i

Here that is two steps around the job's own rule, so robust rules apply to async jobs too. `rebase`
turns each update into the model it stands for on the newest global, `global + s(tau) * (w - base)`
(a fresh update, tau = 0 from the newest global, is itself bit for bit); the job's rule aggregates the
rebased updates as it would a synchronous round's (FedAvg then gives the formula above); `server_step`
moves the global weights `server_lr` of the way to that aggregate (1: all the way, the aggregate
itself). Each step computes in float64 and rounds once to the weights' dtype, so whoever replays the
recorded order of arrival gets the same bits. Staleness only ever shrinks an update's change (s <= 1).
Nothing here knows about IPFS, messages or blocks: which versions exist is the roles' business.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..limits import MAX_STALENESS, number_problem
from .base import StrategyError, integer

Weights = Sequence[np.ndarray]


def _constant(staleness: int) -> float:
    return 1.0


def _polynomial(staleness: int, a: float = 0.5) -> float:
    if a == 0.5:  # FedBuff's default through sqrt, which IEEE 754 rounds exactly; pow is libm's to round
        return 1.0 / math.sqrt(1.0 + staleness)
    return (1.0 + staleness) ** -a


def _hinge(staleness: int, a: float = 10.0, b: float = 4.0) -> float:
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


STALENESS_FUNCTIONS: dict[str, tuple[Callable[..., float], dict[str, tuple[float, float]]]] = {
    "constant": (_constant, {}),
    "polynomial": (_polynomial, {"a": (0.0, 10.0)}),
    "hinge": (_hinge, {"a": (0.0, 1000.0), "b": (0.0, 1000.0)}),
}
"""Staleness weights s(tau) from FedAsync (Xie et al., 2019) that FedBuff uses, with each parameter's
allowed range. `polynomial` with a = 0.5 is FedBuff's 1/sqrt(1 + tau), the default."""


@dataclass(frozen=True)
class Staleness:
    """A staleness weight s(tau), named and parametrised as the chain records it."""

    name: str = "polynomial"
    params: Mapping[str, float] = field(default_factory=dict)
    """The function's params; those left out take the function's own defaults (polynomial a = 0.5,
    hinge a = 10, b = 4)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in STALENESS_FUNCTIONS:
            raise StrategyError(f"unknown staleness function {self.name!r}; known: {', '.join(STALENESS_FUNCTIONS)}")
        if not isinstance(self.params, Mapping):
            raise StrategyError(f"staleness params must be a mapping, not {type(self.params).__name__}")
        _, ranges = STALENESS_FUNCTIONS[self.name]
        unknown = sorted(set(self.params) - set(ranges))
        if unknown:
            raise StrategyError(f"staleness {self.name} takes no param {unknown[0]!r} (takes: {sorted(ranges)})")
        for key, value in self.params.items():
            low, high = ranges[key]
            if number_problem(value, low, high) is not None:
                raise StrategyError(f"staleness {self.name} param {key} must be a number in [{low:g}, {high:g}], "
                                    f"not {value!r}")

    def weight(self, staleness: int) -> float:
        staleness = _count(staleness, "staleness", 0, MAX_STALENESS)
        function, _ = STALENESS_FUNCTIONS[self.name]
        return float(function(staleness, **self.params))

    def record(self) -> dict:
        """What a block records: {"name", "params"}."""
        return {"name": self.name, "params": dict(self.params)}


def _count(value: object, what: str, low: int, high: int) -> int:
    """`value` as an int in low..high (numpy integers too; bools, floats and strings are not counts)."""
    if integer(low, high)(value) is not None:
        kind = "a non-negative" if low == 0 else "a positive"
        raise StrategyError(f"{what} must be {kind} integer of at most {high}, not {value!r}")
    return int(value)


def too_stale(staleness: int, bound: int) -> str | None:
    """Why an update `staleness` versions behind is refused under `bound`, or None."""
    if staleness > bound:
        return f"stale beyond the bound: {staleness} versions behind, at most {bound} accepted"
    return None


def rebase(weights: Weights, base: Weights, reference: Weights, weight: float) -> list[np.ndarray]:
    """The update `weights` (trained from `base`) as the model it stands for on `reference`, the newest
    global weights: `reference + weight * (weights - base)`, in float64, rounded once to each tensor's
    dtype. It is computed as `weights + shift`, `shift = (reference - base) + (weight - 1) * (weights - base)`
    (kept as is where the shift is 0), so that with `base` equal to `reference` and `weight` 1 it is
    `weights` again, bit for bit, at any magnitude and sign of zero."""
    if number_problem(weight, 0.0, 1.0) is not None:
        raise StrategyError(f"a staleness weight must be a number in [0, 1], not {weight!r}")
    if not (len(weights) == len(base) == len(reference)) or any(
            np.shape(w) != np.shape(b) or np.shape(w) != np.shape(r) for w, b, r in zip(weights, base, reference)):
        raise StrategyError("an update's tensors do not match the shapes of the version it names")
    out = []
    for w, b, r in zip(weights, base, reference):
        dtype = np.asarray(r).dtype
        w64, b64 = np.asarray(w, np.float64), np.asarray(b, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            shift = (np.asarray(r, np.float64) - b64) + (weight - 1.0) * (w64 - b64)
            moved = np.where(shift == 0.0, w64, w64 + shift).astype(dtype)  # -0.0 + 0.0 would be +0.0
        _finite(moved, "a rebased update")
        out.append(moved)
    return out


def server_step(reference: Weights, aggregate: Weights, server_lr: float) -> list[np.ndarray]:
    """The new global weights: `reference` moved `server_lr` of the way to the buffer's `aggregate`
    (float64, one rounding); at 1.0 the aggregate itself."""
    if number_problem(server_lr, 0.0, MAX_SERVER_LR, low_open=True) is not None:
        raise StrategyError(f"server_lr must be a number in (0, {MAX_SERVER_LR:g}], not {server_lr!r}")
    if server_lr == 1.0:
        return [np.asarray(a) for a in aggregate]
    if len(reference) != len(aggregate) or any(np.shape(r) != np.shape(a) for r, a in zip(reference, aggregate)):
        raise StrategyError("the global weights do not match the aggregate's tensors")
    out = []
    for r, a in zip(reference, aggregate):
        dtype = np.asarray(r).dtype
        ref = np.asarray(r, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            moved = (ref + server_lr * (np.asarray(a, np.float64) - ref)).astype(dtype)
        _finite(moved, "the server step")
        out.append(moved)
    return out


def _finite(array: np.ndarray, what: str) -> None:
    if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
        raise StrategyError(f"{what} does not fit {array.dtype} (an update overflowed)")


MAX_SERVER_LR = 10.0
MAX_BUFFER = 10_000
"""Largest buffer (K): a block records at most this many updates (`chain.blocks.MAX_UPDATES`)."""


@dataclass(frozen=True)
class AsyncConfig:
    """An asynchronous job's settings, as its genesis config records them (`record`): aggregate every
    `buffer_size` accepted updates, weigh each by `staleness`, step with `server_lr`, and refuse updates
    more than `max_staleness` versions behind."""

    buffer_size: int = 4
    staleness: Staleness = field(default_factory=Staleness)
    server_lr: float = 1.0
    max_staleness: int = 8

    def __post_init__(self) -> None:
        _count(self.buffer_size, "buffer_size", 1, MAX_BUFFER)
        _count(self.max_staleness, "max_staleness", 0, MAX_STALENESS)
        if not isinstance(self.staleness, Staleness):
            raise StrategyError(f"staleness must be a Staleness, not {type(self.staleness).__name__}")
        if number_problem(self.server_lr, 0.0, MAX_SERVER_LR, low_open=True) is not None:
            raise StrategyError(f"server_lr must be a number in (0, {MAX_SERVER_LR:g}], not {self.server_lr!r}")

    def weight(self, staleness: int) -> float:
        """s(staleness); StrategyError beyond `max_staleness` (such an update is refused, never weighed)."""
        reason = too_stale(_count(staleness, "staleness", 0, MAX_STALENESS), self.max_staleness)
        if reason is not None:
            raise StrategyError(reason)
        return self.staleness.weight(staleness)

    def record(self) -> dict:
        return {"buffer_size": int(self.buffer_size), "staleness": self.staleness.record(),
                "server_lr": float(self.server_lr), "max_staleness": int(self.max_staleness)}

    @classmethod
    def from_record(cls, record: object) -> AsyncConfig:
        """The settings a genesis config records (whoever wrote it); StrategyError naming what is wrong."""
        keys = {"buffer_size", "staleness", "server_lr", "max_staleness"}
        if not isinstance(record, Mapping) or set(record) != keys:
            raise StrategyError(f"async settings: expected a map of exactly {sorted(keys)}")
        staleness = record["staleness"]
        if not isinstance(staleness, Mapping) or set(staleness) != {"name", "params"} or not isinstance(
                staleness["name"], str):
            raise StrategyError("async settings: staleness must be {name, params}")
        params = staleness["params"]
        return cls(record["buffer_size"], Staleness(staleness["name"], dict(params) if isinstance(params, Mapping)
                                                    else params), record["server_lr"], record["max_staleness"])
