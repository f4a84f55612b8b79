"""Buffered asynchronous aggregation (FedBuff; Nguyen et al., 2022), the pure math of issue 15's async mode.

In an asynchronous job a worker trains from whichever global version it has and names it; by the time
its update arrives the owner may have moved on `staleness` versions. FedBuff keeps a buffer: each
update contributes its *change* from the version it started from, down-weighted by a function of its
staleness, and every K accepted updates the owner applies the buffer's weighted mean change to the
newest global weights with a server learning rate:

    new = global + server_lr * sum_i s(tau_i) * n_i * (w_i - base_i) / sum_i n_i

This weighs updates by their examples, as FedAvg does; the paper's (1/K) sum_i s(tau_i) * delta_i is
the case of equal counts. Staleness only ever shrinks an update's share (s <= 1, the sum of examples
does not shrink with it), so a buffer of stale updates moves the model less. With every update
fresh (tau = 0), s = 1 and server_lr = 1 this is FedAvg of the buffer's models
started from `global`. The sums run in float64 in the order the updates were added (recorded on the
chain), then round to the global weights' dtype once, so whoever replays that order gets the same bits.
Nothing here knows about IPFS, messages or blocks: the orchestration (who sends what, which versions
exist) lives in the roles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..limits import MAX_NUM_EXAMPLES, number_problem
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


MAX_STALENESS = 1 << 20
"""Largest staleness (versions behind) the math takes; a job's own bound is far below."""

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
        if self.name not in STALENESS_FUNCTIONS:
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


class Buffer:
    """FedBuff's server buffer for one aggregation: `add` each accepted update in arrival order, then
    `apply` to the newest global weights. Holds one float64 sum (two model copies), whatever K is."""

    def __init__(self, staleness: Staleness | None = None):
        self.staleness = staleness or Staleness()
        self.total: list[np.ndarray] | None = None
        self.examples = 0
        self.count = 0

    def add(self, weights: Weights, base: Weights, num_examples: int, staleness: int) -> None:
        """Fold one update: `weights` trained from `base` (the version it names), `staleness` versions ago."""
        num_examples = _count(num_examples, "num_examples", 1, MAX_NUM_EXAMPLES)
        if len(weights) != len(base) or any(w.shape != b.shape for w, b in zip(weights, base)):
            raise StrategyError("an update's tensors do not match the shapes of the version it names")
        scale = self.staleness.weight(staleness) * num_examples
        change = [scale * (np.asarray(w, np.float64) - np.asarray(b, np.float64)) for w, b in zip(weights, base)]
        if self.total is None:
            self.total = change
        else:
            if len(change) != len(self.total) or any(t.shape != c.shape for t, c in zip(self.total, change)):
                raise StrategyError("an update's tensors do not match the buffer's")
            for t, c in zip(self.total, change):
                t += c
        self.examples += num_examples
        self.count += 1

    def apply(self, global_weights: Weights, server_lr: float = 1.0) -> list[np.ndarray]:
        """The new global weights: `global_weights` moved by `server_lr` times the buffer's mean change."""
        if self.total is None:
            raise StrategyError("an empty buffer has nothing to apply")
        if number_problem(server_lr, 0, 10, low_open=True) is not None:
            raise StrategyError(f"server_lr must be a number in (0, 10], not {server_lr!r}")
        if len(global_weights) != len(self.total) or any(g.shape != t.shape
                                                          for g, t in zip(global_weights, self.total)):
            raise StrategyError("the global weights do not match the buffer's tensors")
        out = []
        for g, t in zip(global_weights, self.total):
            dtype = np.asarray(g).dtype
            with np.errstate(over="ignore", invalid="ignore"):
                moved = (np.asarray(g, np.float64) + server_lr * (t / self.examples)).astype(dtype)
            if not np.isfinite(moved).all():
                raise StrategyError(f"the buffer's aggregate does not fit {dtype} (an update overflowed)")
            out.append(moved)
        return out
