"""Server optimizers: FedAvgM (Hsu et al., 2019) and FedAdam, FedYogi, FedAdagrad (Reddi et al., 2021,
"Adaptive Federated Optimization").

Each round's FedAvg of the updates gives a pseudo-gradient `delta = mean - reference`, and a server-side
optimizer steps the global weights with it, keeping momentum or moments across rounds. The formulas are
Flower's (`flwr.server.strategy.fedavgm/fedadam/fedyogi/fedadagrad`, 1.41), defaults included, so a
Flower user gets the same model; `tests/test_flower_parity.py` runs both on the same inputs.

Deliberate differences, for bit-for-bit recomputation from the chain:
* everything is float64 with one cast at the end (Flower computes in the weights' dtype, float32);
* Adam's bias correction uses `beta ** (t + 1)` at step `t` as Flower does (`server_round + 1.0`), but
  the powers are kept in the state as running products instead of calling `pow`, whose last bit libm
  does not promise; `t` counts accepted aggregates, which is Flower's `server_round` when every round
  is accepted.

The state (momentum, moments, step, powers) is a function of the chain: `aggregate` returns the state
after this step, and the client and `chain verify` keep it only when the block is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import aggregate as math_
from .base import Aggregate, Param, RoundContext, Strategy, number, register

_ETA_RANGE = number(0, 1e6, low_open=True)
_BETA_RANGE = number(0, 1, high_open=True)
_TAU_RANGE = number(0, 1e6, low_open=True)


@dataclass(frozen=True)
class ServerState:
    """A server optimizer's state after `step` accepted aggregates. `owner` names the strategy and params
    it belongs to: another rule's state (a chain that switched rules) is not continued but restarted."""

    owner: tuple
    step: int
    first: tuple
    """Momentum (FedAvgM) or the first moment m (adaptive), float64 per tensor."""
    second: tuple = ()
    """The second moment v (adaptive), float64 per tensor."""
    beta1_power: float = 1.0
    beta2_power: float = 1.0


class _ServerOptimizer(Strategy):
    """FedAvg of the updates, then a server-side step; subclasses give `_step`."""

    needs_reference = True
    stateful = True

    def _owner(self) -> tuple:
        return (self.name, tuple(sorted((k, float(v)) for k, v in self.values.items())))

    def fold(self, context: RoundContext) -> _StepFold:
        return _StepFold(self, context)

    def step(self, mean: list, context: RoundContext) -> Aggregate:
        """The server step from FedAvg's float64 mean of the round's updates."""
        reference = [np.asarray(r) for r in context.reference]
        math_.check_shapes(mean, reference, index=None)
        ref = [r.astype(np.float64) for r in reference]
        delta = [m - r for m, r in zip(mean, ref)]
        state = context.state
        if not isinstance(state, ServerState) or state.owner != self._owner():
            state = None
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by `run`, not warned about
            new, state = self._step(ref, delta, state)
            return Aggregate(math_.cast(new, [r.dtype for r in reference]), state)

    def _step(self, ref: list, delta: list, state: ServerState | None) -> tuple[list, ServerState]:
        raise NotImplementedError


class _StepFold:
    """FedAvg's running mean of the updates; the server step once, in `result`."""

    def __init__(self, strategy: _ServerOptimizer, context: RoundContext) -> None:
        self.strategy, self.context, self.mean = strategy, context, math_.RunningFedAvg()

    def add(self, weights, num_examples: int) -> None:
        self.mean.add(weights, num_examples)

    def result(self) -> Aggregate:
        return self.strategy.step(self.mean.mean_float64(), self.context)


@register
class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum: `v = momentum * v + (reference - mean)`, `w = reference - lr * v`
    (PyTorch's SGD convention, as Flower). With momentum 0 and learning rate 1 it is FedAvg."""

    name, aliases = "fedavgm", ("FedAvgM",)
    params = {"server_learning_rate": Param(1.0, _ETA_RANGE, "server step size"),
              "server_momentum": Param(0.0, _BETA_RANGE, "server momentum (0: none)")}

    def _step(self, ref, delta, state):
        lr, beta = float(self.values["server_learning_rate"]), float(self.values["server_momentum"])
        gradient = [-d for d in delta]  # an update is the opposite of a gradient
        if beta > 0.0 and state is not None:
            gradient = [beta * v + g for v, g in zip(state.first, gradient)]
        new = [r - lr * g for r, g in zip(ref, gradient)]
        step = 0 if state is None else state.step
        return new, ServerState(self._owner(), step + 1, tuple(gradient) if beta > 0.0 else ())


class _Adaptive(_ServerOptimizer):
    """m = beta_1 m + (1 - beta_1) delta; v per subclass; w = reference + eta' m / (sqrt(v) + tau)."""

    bias_correction = False

    def _step(self, ref, delta, state):
        v = self.values
        eta, tau = float(v["eta"]), float(v["tau"])
        beta1, beta2 = float(v.get("beta_1", 0.0)), float(v.get("beta_2", 0.0))
        if state is None:
            zeros = tuple(np.zeros_like(d) for d in delta)
            state = ServerState(self._owner(), 0, zeros, zeros, beta1, beta2)  # powers start at beta^1
        m = [beta1 * m_ + (1 - beta1) * d for m_, d in zip(state.first, delta)]
        second = [self._second(v_, d * d, beta2) for v_, d in zip(state.second, delta)]
        b1, b2 = state.beta1_power * beta1, state.beta2_power * beta2  # beta^(t+1) after step t, as Flower
        if self.bias_correction:
            eta = eta * np.sqrt(1.0 - b2) / (1.0 - b1)
        new = [r + eta * m_ / (np.sqrt(s) + tau) for r, m_, s in zip(ref, m, second)]
        return new, ServerState(self._owner(), state.step + 1, tuple(m), tuple(second), b1, b2)

    def _second(self, v: np.ndarray, squared: np.ndarray, beta2: float) -> np.ndarray:
        raise NotImplementedError


def _moment_params(*, eta: float, tau: float) -> dict[str, Param]:
    """The params of Adam and Yogi, with Flower's defaults for `eta` and `tau` (betas 0.9 and 0.99)."""
    return {"eta": Param(eta, _ETA_RANGE, "server learning rate"),
            "beta_1": Param(0.9, _BETA_RANGE, "first moment decay"),
            "beta_2": Param(0.99, _BETA_RANGE, "second moment decay"),
            "tau": Param(tau, _TAU_RANGE, "adaptivity (added to sqrt(v))")}


@register
class FedAdam(_Adaptive):
    """Adam on the server: `v = beta_2 v + (1 - beta_2) delta^2`, with bias correction."""

    name, aliases = "fedadam", ("FedAdam",)
    params = _moment_params(eta=0.1, tau=1e-9)
    bias_correction = True

    def _second(self, v, squared, beta2):
        return beta2 * v + (1 - beta2) * squared


@register
class FedYogi(_Adaptive):
    """Yogi on the server: `v = v - (1 - beta_2) delta^2 sign(v - delta^2)` (no bias correction)."""

    name, aliases = "fedyogi", ("FedYogi",)
    params = _moment_params(eta=0.01, tau=1e-3)

    def _second(self, v, squared, beta2):
        return v - (1.0 - beta2) * squared * np.sign(v - squared)


@register
class FedAdagrad(_Adaptive):
    """Adagrad on the server: `v = v + delta^2`, `m = delta` (Flower fixes beta_1 at 0)."""

    name, aliases = "fedadagrad", ("FedAdagrad",)
    params = {"eta": Param(0.1, _ETA_RANGE, "server learning rate"),
              "tau": Param(1e-9, _TAU_RANGE, "adaptivity (added to sqrt(v))")}

    def _second(self, v, squared, beta2):
        return v + squared
