"""Privacy budget of DP-FedAvg: epsilon at a given delta, composed over every noisy aggregate of a chain.

`dp_fedavg` (`grid_ipfs.aggregate`) clips each worker's update (its delta from the previous global
weights) to L2 norm `clip`, averages the n clipped deltas with equal weight and adds Gaussian noise of
standard deviation `noise_multiplier * clip / n` to every coordinate. Equivalently it releases
`(sum of clipped deltas + N(0, (z C)^2)) / n`: the sum has L2 sensitivity C with respect to one
worker's update, so each aggregate is a Gaussian mechanism with noise multiplier z.

Accounting: T Gaussian mechanisms of sensitivity 1 and noise multipliers z_1..z_T compose *exactly* into
one Gaussian mechanism of noise multiplier (sum of 1 / z_i^2)^(-1/2) (their privacy losses are Gaussian
and add; Dong, Roth and Su 2019, "Gaussian differential privacy"). Its delta(epsilon) is computed by
Google's `dp-accounting` (`GaussianPrivacyLoss`, the Gaussian privacy loss of its PLD accountant,
analytic) and inverted for epsilon. This is the tight value: the PLD accountant composing the rounds one
by one gives the same figure (slowly for small noise), the RDP accountant 4-10% more.

What the number means, and the assumptions it rests on:

- User-level DP with respect to one worker: the neighbouring chain is the one where a single worker's
  whole local data set is replaced by data whose update is zero in every round (the "zero-out"
  relation, n unchanged and public: each block lists its updates). Under replace-one (any data swapped
  for any other) the sensitivity is 2C: use `epsilon(z / 2, ...)`.
- Every worker is assumed to take part in every aggregate (the worst case for any one worker), and there
  is no amplification by subsampling: workers are not drawn at random, the client takes the first good
  updates, so no sampling rate can be claimed.
- Every dp-fedavg block counts, the *rejected* tries of an acceptance rule too: a rejected block's
  weights are published in the chain like any other (and its retry uses fresh updates from the same
  workers). A block of any other rule after genesis releases an aggregate without noise: epsilon is
  then infinite, as it is for a noise multiplier of 0.
- The bound covers the sequence of global weights only. The chain also publishes, by design (so that
  `chain verify` can recompute every aggregate), each worker's raw update and metrics and the noise
  seed: whoever reads the update objects learns each worker's update outright, and whoever knows the
  seed (it is in each block's params, with round and seq) can regenerate the noise and subtract it.
  So the epsilon is what this run's noise buys against someone who sees only global weights (e.g. a
  model from `chain export`) and can neither read the update objects nor guess the seed; the client's
  `--seed` is a small recorded integer, so keep it out of such a recipient's hands, or read the figure
  as the budget DP-FedAvg with secret noise would have spent.
- `secure-dp-fedavg` (DP-FedAvg over secure aggregation) closes that gap: the chain holds only masked
  updates, and the noise is drawn by the workers from their own entropy, one share N(0, (z C)^2 / n)
  each, so nobody can subtract it. The bound then covers everyone who reads the chain, provided the
  workers clip and add their share honestly (unverifiable by design); a worker that colludes with the
  reader knows its own share, leaving noise of variance (n - 1) / n of the nominal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from .limits import check_number

__all__ = ["DEFAULT_DELTA", "Budget", "Release", "chain_epsilon", "compose_epsilon", "epsilon", "gaussian_epsilon"]



def _adds_noise(name: object) -> bool:
    """Whether the rule `name` releases `mean(clipped deltas) + N(0, (z C / n)^2)` (its strategy says
    `adds_noise`): the same Gaussian mechanism, whoever adds the noise (the client from a recorded seed,
    or the workers in shares under secure aggregation). An unknown rule adds none."""
    from .strategies import StrategyError, strategy_class

    try:
        return strategy_class(name).adds_noise
    except StrategyError:
        return False


DEFAULT_DELTA = 1e-5
ACCOUNTANT = "exact-gaussian"
"""How epsilon is computed: the exact privacy profile of the composed Gaussian mechanism (see above)."""


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")


def _check_noise(z) -> float:
    return check_number(z, "noise multiplier")


def gaussian_epsilon(noise_multiplier: float, delta: float = DEFAULT_DELTA) -> float:
    """Epsilon at `delta` of one Gaussian mechanism of L2 sensitivity 1 and noise standard deviation
    `noise_multiplier` (> 0): the smallest epsilon whose delta(epsilon) is at most `delta`."""
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
    from scipy.optimize import brentq

    loss = GaussianPrivacyLoss(standard_deviation=noise_multiplier, sensitivity=1.0)
    excess = lambda eps: loss.get_delta_for_epsilon(eps) - delta  # falls from delta(0) - delta to -delta
    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2.0
    eps = brentq(excess, 0.0, high, xtol=1e-12, rtol=1e-12)
    while excess(eps) > 0:  # round up, never down: the figure is a bound
        eps = eps * (1 + 1e-12) + 1e-12
    return float(eps)


def compose_epsilon(noise_multipliers: Sequence[float], delta: float = DEFAULT_DELTA) -> float:
    """Epsilon at `delta` of the Gaussian mechanisms with these noise multipliers, one after the other
    (each of L2 sensitivity 1 in units of the clip norm). 0.0 for none; `math.inf` if any is 0."""
    _check_delta(delta)
    zs = [_check_noise(z) for z in noise_multipliers]
    if not zs:
        return 0.0
    if any(z == 0 for z in zs):
        return math.inf
    return gaussian_epsilon(_composed(sum(1.0 / (z * z) for z in zs)), delta)


def _composed(inverse_variance: float) -> float:
    """The noise multiplier of the single Gaussian mechanism equal to mechanisms whose 1 / z^2 sum to this."""
    return 1.0 / math.sqrt(inverse_variance)


def epsilon(noise_multiplier: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """Epsilon at `delta` after `rounds` dp-fedavg aggregates with noise multiplier `noise_multiplier`
    (user-level, one worker taking part in every round, no subsampling: see the module docstring).
    Grows with `rounds`, falls as the noise grows; `math.inf` for a noise multiplier of 0."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    return compose_epsilon([noise_multiplier] * rounds, delta)


@dataclass
class Release:
    """One aggregate published in the chain, and the epsilon of everything published up to it."""

    seq: int
    round: int
    accepted: bool
    aggregation: str
    clip: float | None
    noise_multiplier: float | None
    """None for a rule without noise (any rule but dp-fedavg)."""
    epsilon: float
    """Cumulative: the budget spent by this block and every one before it."""


@dataclass
class Budget:
    """A chain's privacy budget: `epsilon` at `delta` after all its `releases` (genesis excluded)."""

    job: str | None
    delta: float
    epsilon: float
    releases: list[Release] = field(default_factory=list)
    reason: str = ""
    """Why epsilon is infinite (the first release without noise), else empty."""

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def rounds(self) -> int:
        """Accepted rounds (rejected tries are in `releases` but are not rounds of the model)."""
        return len({r.round for r in self.releases if r.accepted})

    def as_dict(self) -> dict:
        """JSON-ready: infinite epsilons become None (JSON has no infinity)."""
        finite = lambda value: value if value is None or math.isfinite(value) else None
        return {"job": self.job, "delta": self.delta, "epsilon": finite(self.epsilon), "private": self.private,
                "accountant": ACCOUNTANT, "rounds": self.rounds, "reason": self.reason,
                "releases": [{**asdict(r), "epsilon": finite(r.epsilon)} for r in self.releases]}


def chain_epsilon(blocks: Iterable, delta: float = DEFAULT_DELTA) -> Budget:
    """The privacy budget of a chain's blocks (dicts, or (cid, block) pairs as `chain.walk` yields them;
    any order). Every block after genesis is a release: dp-fedavg blocks, accepted or rejected, each
    compose one Gaussian mechanism with their recorded `noise_multiplier`; any other rule (or noise 0)
    makes epsilon infinite from that block on. The recorded params are trusted: `chain verify` is what
    checks that each block's weights are its rule applied to its updates with those params."""
    _check_delta(delta)
    chain = sorted((b[1] if isinstance(b, tuple) else b for b in blocks), key=lambda b: b["seq"])
    budget = Budget(chain[0]["job"] if chain else None, delta, 0.0)
    inverse_variance = 0.0  # sum of 1 / z^2 over the releases so far
    for block in chain:
        if block["seq"] == 0:
            continue  # genesis: the initial weights, no worker's data
        name, params = block["aggregation"]["name"], block["aggregation"]["params"]
        accepted = block["metrics"].get("accepted", 1.0) != 0.0
        label = f"block seq {block['seq']} (round {block['round']})"
        z = clip = None
        if _adds_noise(name):
            try:
                z, clip = _check_noise(params.get("noise_multiplier")), float(params["clip"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{label}: bad {name} params {params}: {exc}") from None
        if budget.private:
            if z is None or z == 0:
                budget.epsilon = math.inf
                budget.reason = (f"{label} releases its aggregate without noise ("
                                 + ("noise multiplier 0" if z == 0 else f"rule {name}, without noise") + ")")
            else:
                inverse_variance += 1.0 / (z * z)
                budget.epsilon = gaussian_epsilon(_composed(inverse_variance), delta)
        budget.releases.append(Release(block["seq"], block["round"], accepted, name, clip, z, budget.epsilon))
    return budget
