"""Unit tests for grid_ipfs.aggregate (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from grid_ipfs.aggregate import (
    AcceptRule,
    RunningFedAvg,
    dp_fedavg,
    fedavg,
    krum,
    median,
    multi_krum,
    parse_accept,
    trimmed_mean,
    update_norm,
)
from grid_ipfs.strategies import STRATEGIES, aggregate, make, strategy_class


def make_weights(rng: np.random.Generator, scale: float = 1.0, dtype=np.float32) -> list[np.ndarray]:
    return [(rng.normal(size=(4, 3)) * scale).astype(dtype), (rng.normal(size=(3,)) * scale).astype(dtype)]


def honest_and_outlier(n_honest: int = 4):
    """Honest updates clustered around a common model, plus one update scaled by 100."""
    rng = np.random.default_rng(0)
    base = make_weights(rng)
    honest = [[w + 0.01 * rng.normal(size=w.shape).astype(np.float32) for w in base] for _ in range(n_honest)]
    outlier = [w * 100 for w in honest[0]]
    results = [(w, 10) for w in honest] + [(outlier, 10)]
    return base, results


def test_fedavg_equals_hand_computed_weighted_mean():
    a = [np.array([[1.0, 2.0]], np.float32), np.array([0.0], np.float32)]
    b = [np.array([[3.0, 6.0]], np.float32), np.array([4.0], np.float32)]
    out = fedavg([(a, 1), (b, 3)])
    # (1*a + 3*b) / 4
    np.testing.assert_array_equal(out[0], np.array([[2.5, 5.0]], np.float32))
    np.testing.assert_array_equal(out[1], np.array([3.0], np.float32))


def test_fedavg_returns_first_results_dtypes():
    rng = np.random.default_rng(1)
    out = fedavg([(make_weights(rng), 5), (make_weights(rng), 7)])
    assert [w.dtype for w in out] == [np.float32, np.float32]


def test_fedavg_is_the_exact_weighted_mean_rounded_to_float32_bit_for_bit():
    """`chain verify` recomputes every aggregate and compares bytes: FedAvg must be exactly the float64
    weighted mean cast to float32. The expected values are computed apart: each coordinate's sum of
    n * w exactly (math.fsum; each product is exact in float64), one division, one cast."""
    import math

    rng = np.random.default_rng(2)
    results = [(make_weights(rng), int(n)) for n in rng.integers(1, 1000, size=7)]
    total = sum(n for _, n in results)
    for tensor, got in enumerate(fedavg(results)):
        columns = [w[tensor].astype(np.float64).ravel() * n for w, n in results]
        expected = np.array([math.fsum(col[i] for col in columns) / total for i in range(columns[0].size)])
        expected = expected.astype(np.float32).reshape(results[0][0][tensor].shape)
        assert got.dtype == np.float32 and got.tobytes() == expected.tobytes(), tensor


def test_running_fedavg_streams_and_counts():
    rng = np.random.default_rng(3)
    updates = [(make_weights(rng), n) for n in (2, 5, 9)]
    running = RunningFedAvg()
    for weights, n in updates:
        running.add(weights, n)
    assert running.count == 3 and running.total_examples == 16
    assert all(np.array_equal(a, b) for a, b in zip(running.result(), fedavg(updates)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_examples_must_be_a_positive_integer(bad):
    w = [np.zeros(2, np.float32)]
    with pytest.raises(ValueError, match="num_examples"):
        fedavg([(w, 1), (w, bad)])


def test_shape_mismatch_is_rejected():
    a = [np.zeros((4, 3), np.float32)]
    b = [np.zeros((4, 2), np.float32)]
    with pytest.raises(ValueError, match=r"result 1, tensor 0: shape \(4, 2\), expected \(4, 3\)"):
        fedavg([(a, 1), (b, 1)])
    with pytest.raises(ValueError, match="tensor 0"):
        median([(a, 1), (b, 1)])


def test_tensor_count_mismatch_is_rejected():
    with pytest.raises(ValueError, match="has 2 tensors, expected 1"):
        fedavg([([np.zeros(2)], 1), ([np.zeros(2), np.zeros(1)], 1)])


def test_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="no updates"):
        RunningFedAvg().result()
    for rule in (fedavg, median, trimmed_mean, krum):
        with pytest.raises(ValueError, match="no results"):
            rule([])


def test_median_and_krum_resist_a_scaled_outlier_where_fedavg_does_not():
    base, results = honest_and_outlier()
    assert update_norm(fedavg(results), base) > 10
    for robust in (median(results), krum(results, byzantine=1), multi_krum(results, byzantine=1),
                   trimmed_mean(results, trim=0.2)):
        assert update_norm(robust, base) < 0.1


def test_median_is_coordinatewise_and_ignores_num_examples():
    # the heavy update is an extreme: a median weighted by examples would answer [1, 9], the plain one [2, 8]
    results = [([np.array([1.0, 9.0])], 1000), ([np.array([2.0, 7.0])], 1), ([np.array([3.0, 8.0])], 1)]
    np.testing.assert_array_equal(median(results)[0], [2.0, 8.0])
    # an even count: the mean of the two middle values, whatever the weights
    results.append(([np.array([4.0, 6.0])], 1000))
    np.testing.assert_array_equal(median(results)[0], [2.5, 7.5])


def test_trimmed_mean_drops_extremes_per_coordinate():
    values = [0.0, 1.0, 2.0, 3.0, 100.0]
    results = [([np.array([v, -v])], 1) for v in values]
    np.testing.assert_allclose(trimmed_mean(results, trim=0.2)[0], [2.0, -2.0])
    np.testing.assert_allclose(trimmed_mean(results, trim=0.0)[0], [21.2, -21.2])
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(results, trim=0.5)


def test_krum_picks_the_most_central_update_and_multi_krum_averages():
    # n=5, byzantine=1: each score sums the squared distances to the 2 nearest others.
    # Scores: 0 -> 5, 1 -> 2, 2 -> 2, 3 -> 5, 50 -> 2210; ties go to the earlier update.
    results = [([np.array([v])], 1) for v in (0.0, 1.0, 2.0, 3.0, 50.0)]
    np.testing.assert_array_equal(krum(results, byzantine=1)[0], [1.0])
    np.testing.assert_array_equal(krum(results, byzantine=1, multi=3)[0], [1.0])  # mean of 0, 1, 2
    np.testing.assert_array_equal(multi_krum(results, byzantine=1)[0], [1.5])  # keeps n - 1: 0, 1, 2, 3
    with pytest.raises(ValueError, match="multi"):
        krum(results, multi=6)


def test_integer_tensors_are_rounded_not_truncated():
    results = [([np.array([1, 2], np.int64)], 1), ([np.array([2, 2], np.int64)], 2)]
    out = fedavg(results)[0]  # (1 + 4) / 3 = 1.67 -> 2
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [2, 2])


def test_registry_dispatches_and_names_unknown_rules():
    built_in = {n for n, cls in STRATEGIES.items() if cls.__module__.startswith("grid_ipfs.")}
    assert built_in == {"fedavg", "fedprox", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "dp-fedavg",
                        "secure-fedavg", "secure-dp-fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    results = [([np.array([1.0])], 1), ([np.array([3.0])], 1), ([np.array([4.0])], 2)]
    np.testing.assert_array_equal(aggregate("fedavg", results)[0], [3.0])
    np.testing.assert_array_equal(aggregate("trimmed-mean", results, trim=0.34)[0], [3.0])
    with pytest.raises(ValueError, match=r"unknown aggregation 'mean'; known: bulyan, dp-fedavg, fedadagrad"):
        aggregate("mean", results)


def test_update_norm_is_l2_over_all_tensors():
    reference = [np.zeros((2,), np.float32), np.zeros((1,), np.float32)]
    weights = [np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)]
    assert update_norm(weights, reference) == 5.0
    with pytest.raises(ValueError, match="shape"):
        update_norm([np.zeros(3)], [np.zeros(2)])


# -- DP-FedAvg -------------------------------------------------------------------------------------------


def delta_norms(results, reference):
    return [update_norm(w, reference) for w, _ in results]


def dp_setup(n: int = 4, shape=(50, 40), scale: float = 1.0):
    """A reference model and n updates whose deltas have norms of a few units (times `scale`)."""
    rng = np.random.default_rng(5)
    reference = [rng.normal(size=shape).astype(np.float32), rng.normal(size=shape[1:]).astype(np.float32)]
    results = [([r + (0.1 * scale * (i + 1) * rng.normal(size=r.shape)).astype(np.float32) for r in reference], 10 + i)
               for i in range(n)]
    return reference, results


def clipped_mean(results, reference, clip):
    """The textbook computation, separately written: clip each delta to `clip`, average with equal weight."""
    total = [np.zeros(r.shape) for r in reference]
    for weights, _ in results:
        deltas = [w.astype(np.float64) - r.astype(np.float64) for w, r in zip(weights, reference)]
        norm = np.sqrt(sum(float(np.sum(d * d)) for d in deltas))
        for t, d in zip(total, deltas):
            t += d * min(1.0, clip / norm)
    return [r.astype(np.float64) + t / len(results) for r, t in zip(reference, total)]


def test_dp_fedavg_clipping_bounds_each_delta():
    reference, results = dp_setup()
    norms = delta_norms(results, reference)
    assert min(norms) > 3.0  # every delta is larger than the clip below
    for (weights, n) in results:  # one update alone: its delta comes out with norm exactly the clip
        out = dp_fedavg([(weights, n)], reference=reference, clip=1.0, noise_multiplier=0.0)
        assert update_norm(out, reference) == pytest.approx(1.0, rel=1e-5)
    out = dp_fedavg(results, reference=reference, clip=1.0, noise_multiplier=0.0)
    assert update_norm(out, reference) <= 1.0 + 1e-5  # a mean of vectors of norm <= C has norm <= C
    expected = clipped_mean(results, reference, 1.0)
    for a, e in zip(out, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-6)
    # a delta below the clip passes unchanged
    small = [r + np.float32(1e-3) for r in reference]
    out = dp_fedavg([(small, 1)], reference=reference, clip=1e6, noise_multiplier=0.0)
    for a, w in zip(out, small):
        np.testing.assert_array_equal(a, w)


def test_dp_fedavg_bounds_one_attackers_influence_to_clip_over_n():
    reference, results = dp_setup()
    attacker = ([r + 1000 * np.ones_like(r) for r in reference], 10**6)  # huge delta, lies about its examples
    honest = dp_fedavg(results, reference=reference, clip=1.0, noise_multiplier=0.0)
    attacked = dp_fedavg(results + [attacker], reference=reference, clip=1.0, noise_multiplier=0.0)
    # (H + a)/5 - H/4 = a/5 - H/20 with |a| <= C and |H| <= 4C: the attacker moves the result by <= 2C/n
    assert update_norm(attacked, honest) <= 2 * 1.0 / 5 + 1e-5
    assert update_norm(fedavg(results + [attacker]), reference) > 1000


def test_dp_fedavg_adds_gaussian_noise_of_std_z_c_over_n():
    reference, results = dp_setup(shape=(200, 100))
    z, clip, n = 1.5, 2.0, len(results)
    plain = dp_fedavg(results, reference=reference, clip=clip, noise_multiplier=0.0, seed=3, round=2, seq=2)
    noisy = dp_fedavg(results, reference=reference, clip=clip, noise_multiplier=z, seed=3, round=2, seq=2)
    noise = np.concatenate([(a.astype(np.float64) - b).ravel() for a, b in zip(noisy, plain)])
    assert noise.size == 200 * 100 + 100
    assert noise.std() == pytest.approx(z * clip / n, rel=0.03)  # 0.75
    assert abs(noise.mean()) < 4 * noise.std() / np.sqrt(noise.size)


def test_dp_fedavg_noise_is_a_function_of_seed_round_and_seq():
    reference, results = dp_setup()

    def run(**context):
        params = {"clip": 1.0, "noise_multiplier": 1.0, "seed": 7, "round": 3, "seq": 3, **context}
        return b"".join(w.tobytes() for w in aggregate("dp-fedavg", results, reference=reference,
                                                       **{k: params[k] for k in ("round", "seq")},
                                                       **{k: params[k] for k in ("clip", "noise_multiplier",
                                                                                  "seed")}))

    first = run()
    assert run() == first  # same seed, round, seq: identical bytes
    assert len({first, run(seed=8), run(round=4), run(seq=4)}) == 4


def test_dp_fedavg_needs_the_reference_and_valid_params():
    reference, results = dp_setup()
    assert strategy_class("dp-fedavg").needs_reference and not strategy_class("fedavg").needs_reference
    with pytest.raises(ValueError, match="previous global weights"):
        aggregate("dp-fedavg", results, clip=1.0, noise_multiplier=1.0)
    for bad in ({"clip": 0.0}, {"clip": float("inf")}, {"noise_multiplier": -1.0}, {"seed": -1}, {"seed": 1.5}):
        params = {"clip": 1.0, "noise_multiplier": 1.0, "seed": 0, **bad}
        with pytest.raises(ValueError, match="dp-fedavg"):
            dp_fedavg(results, reference=reference, **params)
    with pytest.raises(ValueError, match="tensors"):
        dp_fedavg(results, reference=[reference[0]], clip=1.0, noise_multiplier=0.0)


def test_context_goes_only_to_rules_that_take_it_and_accept_is_record_only():
    results = [([np.array([1.0])], 1), ([np.array([3.0])], 3)]
    out = aggregate("fedavg", results, reference=[np.array([0.0])], round=4, seq=9, accept="val_accuracy>=0.5")
    np.testing.assert_array_equal(out[0], [2.5])
    assert make("trimmed-mean", {"trim": 0.2, "accept": "improves:val_loss"}).given == {"trim": 0.2}


# -- acceptance rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rule", [
    ("val_accuracy>=0.6", AcceptRule("val_accuracy", ">=", 0.6)),
    ("  val_loss <  0.25 ", AcceptRule("val_loss", "<", 0.25)),
    ("accuracy>1", AcceptRule("accuracy", ">", 1.0)),
    ("val_mae<=1e-3", AcceptRule("val_mae", "<=", 0.001)),
    ("improves:val_loss", AcceptRule("val_loss", "improves")),
    ("improves: val_accuracy", AcceptRule("val_accuracy", "improves")),
])
def test_accept_rules_parse_and_print_canonically(text, rule):
    assert parse_accept(text) == rule
    assert parse_accept(str(rule)) == rule


@pytest.mark.parametrize("text", ["", "val_accuracy", "val_accuracy=>0.6", "val_accuracy==0.6",
                                  "val_accuracy>=abc", "val_accuracy>=inf", "val_accuracy>=nan",
                                  "improves:", "improves:val loss", "0.6<=val_accuracy", "val_accuracy>=0.6; rm"])
def test_bad_accept_rules_are_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="acceptance rule"):
        parse_accept(text)


def test_accept_rule_verdicts():
    at_least = parse_accept("val_accuracy>=0.6")
    assert at_least.check({"val_accuracy": 0.6})[0] and not at_least.check({"val_accuracy": 0.59})[0]
    assert "fails val_accuracy>=0.6" in at_least.check({"val_accuracy": 0.5})[1]
    with pytest.raises(ValueError, match="no metric 'val_accuracy'.*have: loss"):
        at_least.check({"loss": 1.0})
    loss = parse_accept("improves:val_loss")
    assert loss.lower_is_better and not parse_accept("improves:val_accuracy").lower_is_better
    assert loss.check({"val_loss": 0.4}, {"val_loss": 0.5})[0]
    assert not loss.check({"val_loss": 0.5}, {"val_loss": 0.5})[0]  # strictly better
    assert loss.check({"val_loss": 9.0}, None)[0] and loss.check({"val_loss": 9.0}, {"loss": 1.0})[0]
    acc = parse_accept("improves:val_accuracy")
    assert acc.check({"val_accuracy": 0.8}, {"val_accuracy": 0.7})[0]
    assert not acc.check({"val_accuracy": 0.6}, {"val_accuracy": 0.7})[0]


def test_running_fedavg_adds_large_tensors_in_slices_with_the_same_bits():
    """`RunningFedAvg.add` folds a tensor larger than SLICE in pieces (a bounded float64 temporary):
    every value goes through the same multiply and add, so the mean is bit for bit the one-shot one,
    also for an update that is not contiguous."""
    from grid_ipfs.aggregate import SLICE, RunningFedAvg

    rng = np.random.default_rng(5)
    updates = [[rng.standard_normal((2, SLICE + 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
               for _ in range(3)]
    updates[0][0] = np.asfortranarray(updates[0][0])  # the sum is C-ordered whatever the first update's order
    updates[2][0] = np.repeat(updates[2][0], 2, axis=1)[:, ::2]  # a non-contiguous view of the same values
    counts = [7, 1, 2 ** 40]
    running = RunningFedAvg()
    for weights, n in zip(updates, counts):
        running.add(weights, n)
    for i in range(2):
        total = sum(w[i].astype(np.float64) * n for w, n in zip(updates, counts))
        assert (running.mean_float64()[i] == total / sum(counts)).all()


def test_update_norm_over_several_slices_is_the_l2_distance():
    """update_norm works in SLICE pieces (bounded temporaries); the distance is the same."""
    from grid_ipfs.aggregate import SLICE

    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((3, SLICE + 7)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    reference = [rng.standard_normal(w.shape).astype(np.float32) for w in weights]
    naive = np.sqrt(sum(np.sum((w.astype(np.float64) - r.astype(np.float64)) ** 2) for w, r in zip(weights, reference)))
    assert np.isclose(update_norm(weights, reference), naive, rtol=1e-12)
    assert update_norm(weights, weights) == 0.0
