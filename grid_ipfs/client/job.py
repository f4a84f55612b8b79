"""What a client's caller deals with: the job it asks for (`JobSpec`), what comes back (`JobResult`, one
`RoundResult` per round), the one error (`JobFailed`) and the progress hooks (`ClientCallback`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import messages
from ..aggregate import AcceptRule, parse_accept
from ..errors import GridError
from ..limits import MAX_COUNT, MAX_NUM_EXAMPLES, number_problem
from ..payloads import COMPRESSIONS
from ..secagg import masked_like
from ..strategies import STRATEGIES, RoundContext, Strategy, StrategyError, make, run, strategy_class
from ..strategies.fedbuff import AsyncConfig

SECURE_RULES = tuple(name for name, cls in STRATEGIES.items() if not cls.readable_updates)
"""The registered rules over masked updates (`grid_ipfs.secagg`), as the strategies declare them."""


class JobFailed(GridError, RuntimeError):
    """The job cannot go on (too few workers, ...); the message says why in one line."""


class InvalidJobSpec(JobFailed, ValueError):
    """A `JobSpec` that describes no job (a count out of range, an unknown rule, ...), raised when it is
    built: before anything is added to IPFS, written to a chain or published. A `JobFailed` for callers
    of `submit`/`resume`, and a `ValueError` for anyone treating it as the bad argument it is."""


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def _integer_problem(value: object, low: int, high: int) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return None if ok else f"must be an integer in {low}..{high}, got {_shown(value)}"


def _number_problem(value: object, *, positive: bool, at_most: float = math.inf) -> str | None:
    """None if `value` is a finite real number > 0 (`positive`) or >= 0, and <= `at_most`."""
    problem = number_problem(value, 0.0, at_most, low_open=positive)
    return None if problem is None else f"{problem}, got {_shown(value)}"


@dataclass
class JobSpec:
    """What the owner asks for. Everything but the paths is recorded in the genesis block's `config`,
    so `resume` (and any auditor) knows the job's settings without the original command line."""

    model_path: Path | None
    rounds: int
    min_workers: int = 1
    fraction: float = 1.0
    epochs: int = 1
    batch_size: int = 32
    round_timeout: float = 120.0
    join_timeout: float = 120.0
    max_retries: int = 2
    """Times an attempt short of `min_workers` updates is announced again before the job fails."""
    max_norm_ratio: float = 10.0
    eval_data: Path | None = None
    job_id: str | None = None
    aggregation: str = "fedavg"
    aggregation_params: dict = field(default_factory=dict)
    seed: int = 0
    proximal_mu: float = 0.0
    """FedProx: workers add mu/2 * ||w - w_global||^2 to their loss (0: plain local training)."""
    accept: str | None = None
    """Acceptance rule for each round's aggregate (`aggregate.parse_accept`), or None: keep every round."""
    accept_retries: int = 2
    """Times a round whose aggregate fails `accept` is tried again (fresh updates) before the job fails."""
    miners: int = 0
    """Rival proposals to wait for each round (proof of federated learning, `grid_ipfs.contest`); 0: none."""
    proposal_timeout: float = 60.0
    """Seconds a round waits for the miners' proposals."""
    secure_aggregation: bool = False
    """Pairwise-masked updates (`grid_ipfs.secagg`): the client sees only each round's sum."""
    max_examples: int | None = None
    """Ceiling on a worker's `num_examples` (FedAvg's weight): larger joins are dropped and larger updates
    refused. None: only each worker's own join claim bounds its updates (an update may never claim more
    than its join did). No default number fits every federation, and a wrong one silently reweights
    honest workers; an owner who knows the shard sizes sets it, everyone else relies on allow-lists and
    robust rules."""
    compression: str | None = None
    """What the workers send (`payloads.COMPRESSIONS`): "float16" or "int8" deltas from the round's base
    weights, deflated; None: full float32 weights. Recorded in genesis; each update's file says its own."""
    async_config: AsyncConfig | None = None
    """Asynchronous rounds (FedBuff, `strategies.fedbuff`): workers train on the newest global they have,
    and a block aggregates every `buffer_size` accepted updates, each weighed by its staleness. None:
    synchronous rounds. Recorded in genesis as `async`."""

    _RECORDED = ("rounds", "min_workers", "fraction", "epochs", "batch_size", "round_timeout", "max_retries",
                 "max_norm_ratio", "aggregation", "aggregation_params", "seed", "proximal_mu", "accept",
                 "accept_retries", "miners", "proposal_timeout", "secure_aggregation", "max_examples", "compression")

    def __post_init__(self) -> None:
        """Paths given as strings become `Path`s, and a spec that describes no job fails here, in one line
        naming the field: not mid-job, after the genesis block was written. What needs the model or the
        eval data (the rule tried on the real weights, an acceptance rule on `val_*`) is checked by
        `Client.submit`."""
        for name in ("model_path", "eval_data"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise InvalidJobSpec(f"job spec: {name} must be a path, got {type(value).__name__}")
                setattr(self, name, Path(value))
        problem = self._problem()
        if problem is not None:
            raise InvalidJobSpec(f"job spec: {problem}")

    def _problem(self) -> str | None:
        counts = {"rounds": 1, "min_workers": 1, "epochs": 1, "batch_size": 1, "max_retries": 0, "accept_retries": 0,
                  "miners": 0}
        for name, low in counts.items():  # the bounds messages.decode holds a job's config to
            problem = _integer_problem(getattr(self, name), low, MAX_COUNT)
            if problem:
                return f"{name} {problem}"
        if self.max_examples is not None and (problem := _integer_problem(self.max_examples, 1, MAX_NUM_EXAMPLES)):
            return f"max_examples {problem} (or None)"
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            return f"seed must be an integer, got {_shown(self.seed)}"
        numbers = (("round_timeout", True, math.inf), ("join_timeout", True, math.inf), ("fraction", True, 1),
                   ("proposal_timeout", True, math.inf), ("max_norm_ratio", False, math.inf),
                   ("proximal_mu", False, math.inf))
        for name, positive, at_most in numbers:
            problem = _number_problem(getattr(self, name), positive=positive, at_most=at_most)
            if problem:
                return f"{name} {problem}"
        if self.job_id is not None and not messages.valid_job_id(self.job_id):
            return f"job_id must be 1-64 characters of [A-Za-z0-9_.-], got {_shown(self.job_id)}"
        try:
            cls = strategy_class(self.aggregation)  # an unknown rule too
            self.aggregation = cls.name  # recorded under its own name: `FedMedian` is `median` on the chain
            make(cls.name, self.aggregation_params)  # the params' ranges, and the required ones given
            if self.accept is not None:
                parse_accept(self.accept)
        except ValueError as exc:
            return str(exc)
        secure = not cls.readable_updates
        if not isinstance(self.secure_aggregation, bool) or self.secure_aggregation != secure:
            return (f"secure_aggregation goes with the {' / '.join(SECURE_RULES)} rules and only with them, got "
                    f"{_shown(self.secure_aggregation)} with {_shown(self.aggregation)}")
        if self.secure_aggregation and self.miners:
            return "secure aggregation hides single updates, so miners cannot aggregate them their way"
        if self.compression is not None and self.compression not in COMPRESSIONS:
            return f"compression must be one of {', '.join(COMPRESSIONS)} or None, got {_shown(self.compression)}"
        if self.compression is not None and secure:
            return "compression quantizes readable updates; masked updates (secure aggregation) go as they are"
        if self.async_config is not None:
            if not isinstance(self.async_config, AsyncConfig):
                return f"async_config must be an AsyncConfig or None, got {type(self.async_config).__name__}"
            if not cls.minable():  # readable, noiseless, stateless: what a rebased update can be fed to
                return (f"async rounds rebase each update onto the newest global weights; {cls.name} "
                        "masks updates, adds noise or keeps server state, so it runs synchronously")
            if self.miners:
                return "async rounds are aggregated as updates arrive, without a contest: run them without miners"
        if cls.stateful and self.miners:
            return (f"{cls.name} keeps server state across rounds; a miner's rival aggregate would fork it, so "
                    "it runs without miners")
        return None

    @property
    def strategy(self) -> Strategy:
        """The job's aggregation rule as a `Strategy` (built from the checked name and params)."""
        try:
            return make(self.aggregation, self.aggregation_params)
        except StrategyError as exc:  # params edited after construction
            raise InvalidJobSpec(f"job spec: {exc}") from None

    def preflight(self, weights: list, has_eval_data: bool) -> AcceptRule | None:
        """Fail before anything is published: the rule must work on the model's real weights (it is tried
        on them), and rules about the client's evaluation need its eval data. The parsed acceptance rule."""
        strategy = self.strategy
        trial = weights if strategy.readable_updates else masked_like(weights)
        try:
            run(strategy, [(trial, 1)] * max(1, self.min_workers), RoundContext(weights, 1, 1))
        except (ValueError, TypeError) as exc:
            raise JobFailed(f"aggregation {self.aggregation} with {self.aggregation_params}: {exc}") from None
        if self.miners and not has_eval_data:
            raise JobFailed("with miners the client evaluates every rival aggregate itself: pass --eval-data")
        if self.accept is None:
            return None
        rule = parse_accept(self.accept)  # checked at construction
        if rule.metric.startswith("val_") and not has_eval_data:
            raise JobFailed(f"acceptance rule {rule} is about the client's evaluation: pass --eval-data")
        return rule

    def config(self) -> dict:
        """The recorded settings; `proximal_mu`, `accept` and the miners' only when used (older chains
        lack them)."""
        config = {key: getattr(self, key) for key in self._RECORDED}
        if not self.proximal_mu:
            del config["proximal_mu"]
        if self.accept is None:
            del config["accept"], config["accept_retries"]
        if not self.miners:
            del config["miners"], config["proposal_timeout"]
        if not self.secure_aggregation:
            del config["secure_aggregation"]
        if self.max_examples is None:
            del config["max_examples"]
        if self.compression is None:
            del config["compression"]
        if self.async_config is not None:
            config["async"] = self.async_config.record()
        return config

    @classmethod
    def from_config(cls, config: dict, **overrides) -> JobSpec:
        known = {k: v for k, v in config.items() if k in cls._RECORDED}
        if "async" in config:
            try:
                known["async_config"] = AsyncConfig.from_record(config["async"])
            except StrategyError as exc:
                raise InvalidJobSpec(f"job config: {exc}") from None
        if "accept" in known and "accept_retries" not in known and "max_retries" in known:
            known["accept_retries"] = known["max_retries"]  # chains from before the two settings were apart
        known.update({k: v for k, v in overrides.items() if v is not None})
        known.setdefault("model_path", None)
        return cls(**known)


@dataclass
class RoundResult:
    round: int
    weights: str
    head: str
    updates: int
    metrics: dict
    seconds: float
    attempts: int = 1
    rejected: dict = field(default_factory=dict)
    """Updates refused this round, by reason (not selected, replay, bad weights, outlier norm, ...)."""
    accepted: bool = True
    """False for a try whose aggregate failed the job's acceptance rule (recorded, then tried again)."""
    tries: int = 1
    """Which try of the round this is: 1 unless earlier aggregates were rejected by the acceptance rule."""
    winner: str = ""
    """With miners: the id whose aggregate won the round (the client's own, or a miner's)."""
    proposals: list = field(default_factory=list)
    """With miners: per candidate, `{"signer", "block", "verdict", "score"}` (the client's own first; the score
    is the ranking metric on the client's data)."""
    endorsements: dict = field(default_factory=dict)
    """With miners: miner id -> its verdict on the appended block ("accepted" or "disputed: ...")."""


@dataclass
class JobResult:
    job: str
    model: str
    head: str
    weights: str
    rounds: list[RoundResult] = field(default_factory=list)
    dropped: dict = field(default_factory=dict)
    """Messages dropped on the job topic over the whole job, by reason."""
    turned_down: list[RoundResult] = field(default_factory=list)
    """Tries whose aggregate the acceptance rule rejected (each is a block in the chain)."""
    rejected: dict = field(default_factory=dict)
    """Updates refused over the whole job, by reason (per round: `RoundResult.rejected`); not counted
    in `dropped`, which is about messages."""

    def as_dict(self) -> dict:
        def row(r: RoundResult) -> dict:
            return {"round": r.round, "weights": r.weights, "head": r.head, "updates": r.updates,
                    "metrics": r.metrics, "seconds": round(r.seconds, 3), "attempts": r.attempts,
                    "rejected": r.rejected, "accepted": r.accepted, "tries": r.tries,
                    **({"winner": r.winner, "proposals": r.proposals, "endorsements": r.endorsements}
                       if r.proposals else {})}

        return {"job": self.job, "head": self.head, "model": self.model, "weights": self.weights,
                "rounds": [row(r) for r in self.rounds], "turned_down": [row(r) for r in self.turned_down],
                "dropped": self.dropped, "rejected": self.rejected}


class ClientCallback:
    """Hooks called as a job runs. Override what you need (like `keras.callbacks.Callback`).

    `block_fields` is the one hook whose answer is written down: it brings your own fields into each
    round's chain block (a custom block type), in the block's signed `ext` map.
    """

    def block_fields(self, round: int, weights: list, updates: list, metrics: dict) -> dict | None:
        """Custom fields for the block of `round`, or None. Called before the block is signed, for every
        try of the round (one the acceptance rule rejects included), not for genesis.

        `weights` is the round's new global weights (numpy arrays, in `model.get_weights()` order),
        `updates` the block's update entries (`{worker, weights (a CID string), num_examples, metrics}`,
        sorted by worker), `metrics` the block's metrics (`accepted` included under an acceptance
        rule); all are copies. The returned map is merged into the block's signed `ext`: plain dag-cbor
        values (ints, finite floats, str, bytes, bool, CIDs, lists and maps of those; numpy scalars and
        arrays are converted). A bad value, or a key another callback also returns, fails the job.
        Auditors re-check the fields with `verify_chain(..., check_ext=...)`.
        """
        return None

    def on_job_start(self, job: messages.Job, genesis: str) -> None: ...
    def on_worker_joined(self, worker: str, name: str, joined: int, needed: int) -> None: ...
    def on_round_start(self, round: int, expected: int, deadline: float) -> None: ...
    def on_update(self, round: int, worker: str, received: int, expected: int) -> None: ...
    def on_round_retry(self, round: int, attempt: int, received: int, needed: int) -> None: ...
    def on_round_rejected(self, result: RoundResult, why: str) -> None: ...
    def on_round_end(self, result: RoundResult) -> None: ...
    def on_job_end(self, result: JobResult) -> None: ...
    def on_job_failed(self, job: messages.Job, error: BaseException) -> None: ...


class CallbackList(ClientCallback):
    """Several callbacks called as one, in order (Keras' `CallbackList`). `block_fields` answers are
    merged and checked by the client instead (`blocks.callback_fields`)."""

    def __init__(self, callbacks: list[ClientCallback] | None = None):
        self.callbacks = list(callbacks or [])

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_job_start(self, job, genesis): self._call("on_job_start", job, genesis)
    def on_worker_joined(self, worker, name, joined, needed):
        self._call("on_worker_joined", worker, name, joined, needed)
    def on_round_start(self, round, expected, deadline): self._call("on_round_start", round, expected, deadline)
    def on_update(self, round, worker, received, expected): self._call("on_update", round, worker, received, expected)
    def on_round_retry(self, round, attempt, received, needed):
        self._call("on_round_retry", round, attempt, received, needed)
    def on_round_rejected(self, result, why): self._call("on_round_rejected", result, why)
    def on_round_end(self, result): self._call("on_round_end", result)
    def on_job_end(self, result): self._call("on_job_end", result)
    def on_job_failed(self, job, error): self._call("on_job_failed", job, error)


def load_eval(path: Path, model) -> tuple:
    """The client's eval data (x, y), checked against the model's input."""
    from ..data import check_shard_for_model, load_shard

    x, y = load_shard(path)
    check_shard_for_model(x, y, tuple(model.input_shape))
    return x, y
