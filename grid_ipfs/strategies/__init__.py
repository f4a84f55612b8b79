"""Aggregation strategies as objects: one class per rule, registered by name (see `base`).

    from grid_ipfs.strategies import make, run, RoundContext
    strategy = make("fedadam", {"eta": 0.05})
    out = run(strategy, [(weights, 100), (weights, 50)], RoundContext(reference=weights, round=1, seq=1))
    out.weights, out.state   # the new global weights; the server state if this aggregate is accepted

Adding one is one class: subclass `Strategy`, declare `name`, `params` and its flags, implement
`aggregate`, decorate with `@register` (docs/strategies.md has a 20-line example).
"""

from .base import (
                   RECORD_ONLY,
                   REQUIRED,
                   STRATEGIES,
                   Aggregate,
                   Fold,
                   Param,
                   RoundContext,
                   Running,
                   Strategy,
                   StrategyError,
                   aggregate,
                   canonical_name,
                   check_params,
                   integer,
                   make,
                   names,
                   number,
                   register,
                   run,
                   strategy_class,
                   streams,
)
from .builtin import (
                   Bulyan,
                   DPFedAvg,
                   FedAvg,
                   FedProx,
                   Krum,
                   Median,
                   MultiKrum,
                   SecureDPFedAvg,
                   SecureFedAvg,
                   TrimmedMean,
)
from .fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerState

__all__ = ["Aggregate", "Bulyan", "DPFedAvg", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "FedYogi",
           "Fold", "Krum", "Median", "MultiKrum", "Param", "RECORD_ONLY", "REQUIRED", "RoundContext", "Running",
           "STRATEGIES", "SecureDPFedAvg", "SecureFedAvg", "ServerState", "Strategy", "StrategyError", "TrimmedMean",
           "aggregate", "canonical_name", "check_params", "integer", "make", "names", "number", "register", "run",
           "strategy_class", "streams"]
