"""`Strategy`: what an aggregation rule is, in one class, asked by everyone who needs to know.

In the spirit of Flower's `Strategy`, policy lives apart from orchestration: a strategy declares its
parameters (with their ranges), the round context it needs, and what it promises (updates readable or
masked, noise added, open to miners); `aggregate` is a pure function of the round's updates and that
context. The client, `chain verify`, the miners and `chain privacy` ask the strategy instead of keeping
tables of rule names.

Server state (FedAdam's moments, FedAvgM's momentum) is never read from the owner: `aggregate` returns
the state that holds *if this aggregate is accepted*, and whoever replays the chain from genesis (the
client on `resume`, `chain verify`) advances it only on accepted blocks, so every party derives the
same state from the same chain and recomputes every aggregate bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from ..aggregate import Results, Weights, check_num_examples
from ..errors import GridError
from ..limits import number_problem

RECORD_ONLY = ("accept",)
"""Params recorded in a block's aggregation params that are not arguments of the rule: the acceptance
rule says whether a result is kept, not how it is computed."""


class StrategyError(GridError, ValueError):
    """An unknown strategy, a param out of range, or a round it cannot aggregate; one line saying which."""


# -- declared params ---------------------------------------------------------------------------------


REQUIRED = object()
"""A `Param.default` meaning the param must be given (e.g. dp-fedavg's `clip`)."""


@dataclass(frozen=True)
class Param:
    """One declared parameter: its default (or `REQUIRED`) and the check of a given value (None when
    fine, else why)."""

    default: Any
    check: Callable[[object], str | None]
    doc: str = ""


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable:
    """A check for a finite real number in [low, high] (ends open on request): `limits.number_problem`."""
    return lambda value: number_problem(value, low, high, low_open=low_open, high_open=high_open)


def integer(low: int, high: int, *, optional: bool = False) -> Callable:
    """A check for an integer in low..high (or None when `optional`); bools are not integers."""
    def check(value: object) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return "must be an integer"
        return None if low <= value <= high else f"must be an integer in {low}..{high}"
    return check


def _generic(value: object) -> str | None:
    """What a registered strategy without declared params takes: plain finite numbers, short strings."""
    if isinstance(value, str):
        return None if len(value) <= 200 else "must be a string of <= 200 characters"
    return number(-1e300, 1e300)(value)


# -- one round ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundContext:
    """What a round's aggregate may depend on besides its updates: all of it derived from the chain.

    `reference` is the newest accepted global weights (what the round's workers trained from), `round`
    and `seq` the block's round and chain position, `state` the strategy's server state after the
    newest accepted block (None before the first: the strategy starts from its initial state).
    """

    reference: Weights | None = None
    round: int = 0
    seq: int = 0
    state: Any = None


@dataclass(frozen=True)
class Aggregate:
    """A round's result: the new global weights and the server state that holds if they are accepted."""

    weights: Weights
    state: Any = None


class Fold(Protocol):
    """A round's aggregate built one update at a time (`Strategy.fold`): `add` in a fixed order, then
    `result` once. The order of `add` is part of the result (float sums): whoever recomputes adds in
    the same order, which the block records."""

    def add(self, weights: Weights, num_examples: int) -> None: ...

    def result(self) -> Aggregate: ...


class Strategy:
    """An aggregation rule. Subclass it, declare `name`, `params` and flags, implement `aggregate`, and
    decorate it with `@register`: the client, `chain verify`, miners and `chain privacy` then know it."""

    name: ClassVar[str] = ""
    """The name recorded in blocks (`aggregation.name`) and given to `--aggregation`."""
    aliases: ClassVar[tuple[str, ...]] = ()
    """Other names that select it (Flower's, e.g. `FedMedian`); blocks record `name`."""
    params: ClassVar[Mapping[str, Param] | None] = {}
    """Declared params with defaults and range checks; None: any plain number or short string."""
    needs_reference: ClassVar[bool] = False
    """It reads the newest accepted global weights (`RoundContext.reference`)."""
    needs_position: ClassVar[bool] = False
    """It reads the block's round and seq (e.g. to seed noise)."""
    stateful: ClassVar[bool] = False
    """It keeps server state across rounds (replayed from the chain, advanced by accepted blocks only)."""
    readable_updates: ClassVar[bool] = True
    """False for rules over masked updates (secure aggregation): no single update can be read."""
    adds_noise: ClassVar[bool] = False
    """Its releases are differentially private Gaussian mechanisms (`chain privacy` counts them), so a
    rival aggregate with another rule would break the job's promise."""

    def __init__(self, **params: Any) -> None:
        check_params(type(self), params)
        self.given = {k: v for k, v in params.items() if k not in RECORD_ONLY}
        """The params as given (recorded in blocks); `self.values` adds the defaults."""
        declared = type(self).params or {}
        missing = [k for k, p in declared.items() if p.default is REQUIRED and k not in self.given]
        if missing:
            raise StrategyError(f"{self.name} needs the param(s) {', '.join(missing)}")
        self.values = {**{k: p.default for k, p in declared.items()}, **self.given}

    @classmethod
    def minable(cls) -> bool:
        """Whether a miner may propose a rival aggregate with this rule: it must read single updates, add
        no noise the job promised, and keep no server state (a rival's state would fork the job's)."""
        return cls.readable_updates and not cls.adds_noise and not cls.stateful

    def fit_config(self) -> dict:
        """Settings the workers need to train for this rule, sent in the job message (Flower's
        `configure_fit`): e.g. FedProx's `proximal_mu`, secure aggregation's flag."""
        return {}

    def fold(self, context: RoundContext) -> Fold | None:
        """A running aggregate that takes the round's updates one at a time, or None when the rule must
        see them all at once (the robust rules). With a fold, the owner adds each update as it is fetched
        and holds one model copy, not one per worker; `aggregate` is then the fold over the results in
        order, so the owner's streaming and `chain verify`'s recompute are the same arithmetic."""
        return None

    def aggregate(self, results: Results, context: RoundContext) -> Aggregate:
        """The round's new global weights from its updates (in the caller's fixed order) and context."""
        fold = self.fold(context)
        if fold is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither fold nor aggregate")
        for weights, num_examples in results:
            fold.add(weights, num_examples)
        return fold.result()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.given.items())})"


# -- the registry ------------------------------------------------------------------------------------

STRATEGIES: dict[str, type[Strategy]] = {}
"""Registered strategies by recorded name."""
_BY_ALIAS: dict[str, str] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make `cls` known under its `name` and `aliases` (case-insensitive for aliases)."""
    if not cls.name or cls.name in STRATEGIES:
        raise StrategyError(f"cannot register {cls.__name__}: name {cls.name!r} is empty or taken")
    for alias in (cls.name, *cls.aliases):
        key = alias.lower()
        if _BY_ALIAS.get(key, cls.name) != cls.name:
            raise StrategyError(f"cannot register {cls.__name__}: {alias!r} already names {_BY_ALIAS[key]}")
    STRATEGIES[cls.name] = cls
    for alias in (cls.name, *cls.aliases):
        _BY_ALIAS[alias.lower()] = cls.name
    return cls


def strategy_class(name: object) -> type[Strategy]:
    """The strategy registered as `name` or one of its aliases; StrategyError (listing the known) if none."""
    if isinstance(name, str):
        if name in STRATEGIES:
            return STRATEGIES[name]
        canonical = _BY_ALIAS.get(name.lower())
        if canonical is not None:
            return STRATEGIES[canonical]
    raise StrategyError(f"unknown aggregation {str(name)[:40]!r}; known: {', '.join(names())}")


def canonical_name(name: str) -> str:
    """The recorded name of the strategy `name` selects (`FedMedian` -> `median`)."""
    return strategy_class(name).name


def names(*, with_aliases: bool = False) -> list[str]:
    """Known strategy names, sorted; with their aliases too for a CLI's choices."""
    if not with_aliases:
        return sorted(STRATEGIES)
    return sorted({*STRATEGIES, *(a for cls in STRATEGIES.values() for a in cls.aliases)}, key=str.lower)


def make(name: str, params: Mapping | None = None) -> Strategy:
    """An instance of strategy `name` with `params` (record-only entries such as `accept` dropped)."""
    return strategy_class(name)(**dict(params or {}))


def check_params(strategy: str | type[Strategy], params: object) -> None:
    """StrategyError (one line: rule, param, range) unless `params` suit the strategy: the one range check
    of aggregation params, run by the client before a job starts, by every `Strategy` built and by `chain
    verify` before recomputing a block. Record-only entries (`accept`) must be short strings."""
    cls = strategy if isinstance(strategy, type) else strategy_class(strategy)
    if not isinstance(params, Mapping):
        raise StrategyError(f"{cls.name}: params must be a map, got {type(params).__name__}")
    declared = cls.params
    for key, value in params.items():
        if key in RECORD_ONLY:
            problem = None if isinstance(value, str) and len(value) <= 200 else "must be a string of <= 200 characters"
        elif declared is None:
            problem = _generic(value)
        elif key not in declared:
            raise StrategyError(f"{cls.name}: unexpected param {str(key)[:40]!r} "
                                f"(takes {', '.join(declared) or 'none'})")
        else:
            problem = declared[key].check(value)
        if problem is not None:
            shown = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else "a huge integer"
            raise StrategyError(f"{cls.name}: {str(key)[:40]} {problem}, got {shown[:40]}")


def aggregate(name: str, results: Results, *, reference: Weights | None = None, round: int = 0, seq: int = 0,
              state: Any = None, **params: Any) -> Weights:
    """The weights of strategy `name` with `params` over `results` (the state it returns is dropped: use
    `make(...).aggregate` to keep it). Every example count is range-checked first, whatever the rule."""
    return run(make(name, params), results, RoundContext(reference, round, seq, state)).weights


def run(strategy: Strategy, results: Results, context: RoundContext) -> Aggregate:
    """`strategy.aggregate` with the checks every rule gets: example counts in range, and the reference
    weights present when the strategy reads them. Rules' own ValueErrors become StrategyErrors."""
    for index, (_, num_examples) in enumerate(results):  # no peer number reaches arithmetic unchecked
        check_num_examples(num_examples, f"result {index}: ")
    if len(results) == 0:
        raise StrategyError("nothing to aggregate: no results")
    _check_context(strategy, context)
    try:
        out = strategy.aggregate(results, context)
    except StrategyError:
        raise
    except ValueError as exc:
        raise StrategyError(str(exc)) from None
    return _checked(strategy, out)


class Running:
    """`run` one update at a time, for a strategy with a `fold`: the same checks (example counts, the
    reference, finite output) and the same bits as `run` over the updates in the order added."""

    def __init__(self, strategy: Strategy, context: RoundContext) -> None:
        _check_context(strategy, context)
        try:
            fold = strategy.fold(context)
        except ValueError as exc:
            raise StrategyError(str(exc)) from None
        if fold is None:
            raise StrategyError(f"{strategy.name} cannot aggregate one update at a time")
        self.strategy, self._fold, self.count = strategy, fold, 0

    def add(self, weights: Weights, num_examples: int) -> None:
        """Fold in one update; StrategyError (the fold unchanged) when it does not fit the first."""
        try:
            check_num_examples(num_examples, f"result {self.count}: ")
            self._fold.add(weights, num_examples)
        except StrategyError:
            raise
        except ValueError as exc:
            raise StrategyError(str(exc)) from None
        self.count += 1

    def result(self) -> Aggregate:
        if self.count == 0:
            raise StrategyError("nothing to aggregate: no results")
        try:
            out = self._fold.result()
        except StrategyError:
            raise
        except ValueError as exc:
            raise StrategyError(str(exc)) from None
        return _checked(self.strategy, out)


def streams(strategy: Strategy) -> bool:
    """Whether `strategy` aggregates one update at a time (it overrides `Strategy.fold`)."""
    return type(strategy).fold is not Strategy.fold


def _check_context(strategy: Strategy, context: RoundContext) -> None:
    if strategy.needs_reference and context.reference is None:
        raise StrategyError(f"{strategy.name} needs the previous global weights (reference=)")


def _checked(strategy: Strategy, out: object) -> Aggregate:
    if not isinstance(out, Aggregate):
        raise StrategyError(f"{type(strategy).__name__}.aggregate returned {type(out).__name__}, not an Aggregate")
    for index, tensor in enumerate(out.weights):  # no reader accepts such weights: never publish them
        array = np.asarray(tensor)
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise StrategyError(f"{strategy.name}: the aggregate's tensor {index} holds non-finite values (updates "
                                "too large for the rule's arithmetic)")
    return out
