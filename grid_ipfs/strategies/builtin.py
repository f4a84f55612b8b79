"""The stateless strategies: FedAvg and FedProx, the robust rules, DP-FedAvg and the secure rules.

Each is a thin declaration over a pure function of `grid_ipfs.aggregate` (the math lives there, in
float64, one cast at the end, so `chain verify` recomputes it bit for bit). The averaging rules give a
`fold` over the module's running aggregates, so the owner adds updates as they arrive. Flower's names select them
too: `FedMedian`, `FedTrimmedAvg`, `Krum`, `MultiKrum`, `FedProx`, `Bulyan`.
"""

from __future__ import annotations

from .. import aggregate as math_
from ..limits import MAX_COUNT
from .base import REQUIRED, Aggregate, Param, RoundContext, Strategy, integer, number, register

_CLIP = Param(REQUIRED, number(0, 1e6, low_open=True), "L2 bound on each update's change to the global model")
_NOISE = Param(REQUIRED, number(0, 1e6), "Gaussian noise standard deviation, in multiples of clip / n")
_SCALE_BITS = Param(math_.SCALE_BITS, integer(0, 63), "fractional bits of the masked fixed point")
_BYZANTINE = Param(1, integer(0, MAX_COUNT), "number of arbitrary (Byzantine) updates tolerated")


class WeightsFold:
    """A `Fold` over one of `grid_ipfs.aggregate`'s running aggregates (`add`, `result() -> weights`)."""

    def __init__(self, running) -> None:
        self.running = running

    def add(self, weights, num_examples: int) -> None:
        self.running.add(weights, num_examples)

    def result(self) -> Aggregate:
        return Aggregate(self.running.result())


@register
class FedAvg(Strategy):
    """The mean of the updates weighted by their examples (McMahan et al., 2017)."""

    name, aliases = "fedavg", ("FedAvg",)

    def fold(self, context: RoundContext) -> WeightsFold:
        return WeightsFold(math_.RunningFedAvg())


@register
class FedProx(FedAvg):
    """FedAvg's aggregate; the workers add `proximal_mu / 2 * ||w - w_global||^2` to their loss
    (Li et al., 2020). The same as `JobSpec(proximal_mu=...)` with fedavg, recorded in the rule."""

    name, aliases = "fedprox", ("FedProx",)
    params = {"proximal_mu": Param(0.0, number(0, 1e6), "weight of the proximal term")}

    def fit_config(self) -> dict:
        mu = float(self.values["proximal_mu"])
        return {"proximal_mu": mu} if mu else {}


@register
class Median(Strategy):
    """Coordinate-wise median (Yin et al., 2018); ignores the example counts."""

    name, aliases = "median", ("FedMedian",)

    def aggregate(self, results, context: RoundContext) -> Aggregate:
        return Aggregate(math_.median(results))


@register
class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (scipy's `trim_mean`, as Flower's FedTrimmedAvg; Flower calls the
    fraction `beta` and defaults it to 0.2)."""

    name, aliases = "trimmed-mean", ("FedTrimmedAvg",)
    params = {"trim": Param(0.1, number(0, 0.5, high_open=True), "fraction cut at each end")}

    def aggregate(self, results, context: RoundContext) -> Aggregate:
        return Aggregate(math_.trimmed_mean(results, trim=self.values["trim"]))


@register
class Krum(Strategy):
    """Krum (Blanchard et al., 2017): the update closest to its neighbours; Multi-Krum with `multi > 1`."""

    name, aliases = "krum", ("Krum",)
    params = {"byzantine": _BYZANTINE, "multi": Param(1, integer(1, MAX_COUNT), "updates averaged")}

    def aggregate(self, results, context: RoundContext) -> Aggregate:
        return Aggregate(math_.krum(results, byzantine=self.values["byzantine"], multi=self.values["multi"]))


@register
class MultiKrum(Strategy):
    """Multi-Krum keeping `n - byzantine` updates unless `multi` is given. Averages the kept updates with
    equal weight, as in the paper; Flower's Multi-Krum (`Krum(num_clients_to_keep=k)`; 1.41 has no
    MultiKrum class, the alias is for the name) weights them by their examples."""

    name, aliases = "multi-krum", ("MultiKrum",)
    params = {"byzantine": _BYZANTINE, "multi": Param(None, integer(1, MAX_COUNT, optional=True), "updates kept")}

    def aggregate(self, results, context: RoundContext) -> Aggregate:
        return Aggregate(math_.multi_krum(results, byzantine=self.values["byzantine"], multi=self.values["multi"]))


@register
class Bulyan(Strategy):
    """Bulyan (El Mhamdi et al., 2018): Krum picks `n - 2f` updates one by one, then each coordinate is
    the mean of the `n - 4f` picked values closest to their median. Needs `n >= 4f + 3`."""

    name, aliases = "bulyan", ("Bulyan",)
    params = {"byzantine": _BYZANTINE}

    def aggregate(self, results, context: RoundContext) -> Aggregate:
        return Aggregate(math_.bulyan(results, byzantine=self.values["byzantine"]))


@register
class DPFedAvg(Strategy):
    """DP-FedAvg with fixed clipping (McMahan et al., 2018): clipped deltas from the previous global
    weights, averaged, plus Gaussian noise seeded by the block's position (`aggregate.dp_fedavg`)."""

    name, aliases = "dp-fedavg", ("DPFedAvgFixed",)
    params = {"clip": _CLIP, "noise_multiplier": _NOISE,
              "seed": Param(0, integer(0, 2 ** 64 - 1), "seeds the noise with the block's round and seq")}
    needs_reference = needs_position = adds_noise = True

    def fold(self, context: RoundContext) -> WeightsFold:
        v = self.values
        return WeightsFold(math_.RunningDPFedAvg(context.reference, clip=v["clip"],
                                                 noise_multiplier=v["noise_multiplier"], seed=v["seed"],
                                                 round=context.round, seq=context.seq))


@register
class SecureFedAvg(Strategy):
    """FedAvg of pairwise-masked fixed-point updates (`grid_ipfs.secagg`): only the sum is readable."""

    name = "secure-fedavg"
    params = {"scale_bits": _SCALE_BITS}
    readable_updates = False

    def fit_config(self) -> dict:
        return {"secure_aggregation": True}

    def fold(self, context: RoundContext) -> WeightsFold:
        return WeightsFold(math_.RunningMaskedSum(self.values["scale_bits"]))


@register
class SecureDPFedAvg(Strategy):
    """DP-FedAvg over secure aggregation: the workers clip and add their share of the noise."""

    name = "secure-dp-fedavg"
    params = {"clip": _CLIP, "noise_multiplier": _NOISE, "scale_bits": _SCALE_BITS}
    needs_reference = adds_noise = True
    readable_updates = False

    def fit_config(self) -> dict:
        return {"secure_aggregation": True, "dp_clip": float(self.values["clip"]),
                "dp_noise": float(self.values["noise_multiplier"])}

    def fold(self, context: RoundContext) -> WeightsFold:
        v = self.values
        return WeightsFold(math_.RunningSecureDPFedAvg(context.reference, clip=v["clip"],
                                                       noise_multiplier=v["noise_multiplier"],
                                                       scale_bits=v["scale_bits"]))
