"""Unit tests for grid_ipfs.aggregate (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from grid_ipfs.aggregate import (
    AGGREGATIONS,
    RunningFedAvg,
    aggregate,
    fedavg,
    krum,
    median,
    multi_krum,
    trimmed_mean,
    update_norm,
)


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


def test_fedavg_is_bit_identical_across_runs():
    rng = np.random.default_rng(2)
    results = [(make_weights(rng), int(n)) for n in rng.integers(1, 1000, size=7)]
    first, second = fedavg(results), fedavg(results)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))


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
    results = [([np.array([1.0, 9.0])], 1), ([np.array([2.0, 8.0])], 1000), ([np.array([3.0, 7.0])], 1)]
    np.testing.assert_array_equal(median(results)[0], [2.0, 8.0])


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
    assert set(AGGREGATIONS) == {"fedavg", "median", "trimmed-mean", "krum", "multi-krum"}
    results = [([np.array([1.0])], 1), ([np.array([3.0])], 1), ([np.array([4.0])], 2)]
    np.testing.assert_array_equal(aggregate("fedavg", results)[0], [3.0])
    np.testing.assert_array_equal(aggregate("trimmed-mean", results, trim=0.34)[0], [3.0])
    with pytest.raises(ValueError, match=r"unknown aggregation 'mean'; known: fedavg, krum, median, multi-krum"):
        aggregate("mean", results)


def test_update_norm_is_l2_over_all_tensors():
    reference = [np.zeros((2,), np.float32), np.zeros((1,), np.float32)]
    weights = [np.array([3.0, 0.0], np.float32), np.array([4.0], np.float32)]
    assert update_norm(weights, reference) == 5.0
    with pytest.raises(ValueError, match="shape"):
        update_norm([np.zeros(3)], [np.zeros(2)])
