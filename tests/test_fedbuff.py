"""FedBuff's buffer and staleness weights (`grid_ipfs.strategies.fedbuff`): the math an async job's
blocks will be recomputed with, checked against FedAvg where the two must agree, and attacked with
what a peer can put in an update (its staleness, its example count, its tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grid_ipfs.aggregate import fedavg
from grid_ipfs.strategies import StrategyError
from grid_ipfs.strategies.fedbuff import Buffer, Staleness, too_stale


def model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]


def test_fresh_updates_at_server_lr_one_are_fedavg_of_the_buffer():
    base = model(0)
    updates = [(model(i), n) for i, n in ((1, 10), (2, 30), (3, 5))]
    buffer = Buffer(Staleness("constant", {}))
    for weights, n in updates:
        buffer.add(weights, base, n, staleness=0)
    for got, want in zip(buffer.apply(base), fedavg(updates)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_stale_update_counts_for_less_and_the_default_is_one_over_sqrt():
    assert Staleness().weight(0) == 1.0 and Staleness().weight(3) == pytest.approx(0.5)
    assert Staleness("hinge", {"a": 10.0, "b": 4.0}).weight(4) == 1.0
    assert Staleness("hinge", {"a": 10.0, "b": 4.0}).weight(5) == pytest.approx(1 / 11)
    base, moved = model(0), model(1)
    fresh, stale = Buffer(), Buffer()
    fresh.add(moved, base, 10, staleness=0)
    stale.add(moved, base, 10, staleness=8)
    step_fresh = [a - b for a, b in zip(fresh.apply(base), base)]
    step_stale = [a - b for a, b in zip(stale.apply(base), base)]
    for f, s in zip(step_fresh, step_stale):
        np.testing.assert_allclose(s, f / 3, rtol=1e-5, atol=1e-6)  # 1/sqrt(1 + 8)


def test_each_update_contributes_its_change_from_the_version_it_names():
    """A worker two versions behind moves the newest global by what it learned, not back to its old base."""
    old, newest = model(0), model(5)
    trained = [w + 0.25 for w in old]
    buffer = Buffer(Staleness("constant", {}))
    buffer.add(trained, old, 7, staleness=2)
    for got, g in zip(buffer.apply(newest, server_lr=0.5), newest):
        np.testing.assert_allclose(got, g + 0.125, rtol=1e-6)


def test_the_result_is_the_recorded_formula_bit_for_bit_in_the_order_added():
    """What `chain verify` will recompute: float64 sums in the order added, one cast at the end."""
    base = model(0)
    updates = [(model(i), 3 + i, i % 3) for i in range(1, 8)]
    buffer = Buffer()
    for weights, n, tau in updates:
        buffer.add(weights, base, n, tau)
    got = buffer.apply(base, server_lr=0.7)
    for k, g in enumerate(base):
        total = np.zeros(g.shape, np.float64)
        for weights, n, tau in updates:
            total += ((1.0 / math.sqrt(1 + tau)) * n) * (weights[k].astype(np.float64) - g.astype(np.float64))
        want = (g.astype(np.float64) + 0.7 * (total / sum(n for _, n, _ in updates))).astype(np.float32)
        assert got[k].tobytes() == want.tobytes()


def test_defaults_are_each_function_s_own_and_numpy_counts_are_counts():
    assert Staleness("constant").weight(50) == 1.0
    assert Staleness("hinge").weight(5) == pytest.approx(1 / 11)  # a = 10, b = 4
    assert Staleness("polynomial", {"a": 1.0}).weight(np.int64(3)) == 0.25
    assert Staleness().record() == {"name": "polynomial", "params": {}}


def test_an_update_with_fewer_tensors_than_the_buffer_is_refused():
    buffer = Buffer()
    buffer.add(model(1), model(0), 5, 0)
    with pytest.raises(StrategyError, match="do not match the buffer's"):
        buffer.add(model(2)[:1], model(0)[:1], 5, 0)
    assert buffer.count == 1


@pytest.mark.parametrize("name, params, match", [
    ("lru", {}, "unknown staleness function 'lru'"),
    ("polynomial", {"b": 1.0}, "takes no param 'b'"),
    ("polynomial", {"a": math.nan}, "param a must be a number in"),
    ("polynomial", {"a": True}, "param a must be a number in"),
    ("hinge", {"a": -1.0}, "param a must be a number in"),
    ("polynomial", {"a": "0.5"}, "param a must be a number in"),
])
def test_bad_staleness_functions_are_refused_in_one_line(name, params, match):
    with pytest.raises(StrategyError, match=match):
        Staleness(name, params)


@pytest.mark.parametrize("tau", [-1, True, 1.5, "2", None, 10**400, 2**20 + 1])
def test_a_staleness_that_is_not_a_count_is_refused(tau):
    with pytest.raises(StrategyError, match="staleness must be a non-negative integer of at most"):
        Buffer().add(model(1), model(0), 5, tau)


@pytest.mark.parametrize("n", [0, -3, True, 2.0, None, 10**400])
def test_an_example_count_that_is_not_positive_is_refused(n):
    with pytest.raises(StrategyError, match="num_examples must be a positive integer of at most"):
        Buffer().add(model(1), model(0), n, 0)


def test_wrong_shapes_an_empty_buffer_a_bad_server_lr_and_overflow_are_refused():
    buffer = Buffer()
    with pytest.raises(StrategyError, match="do not match the shapes of the version"):
        buffer.add(model(1)[:1], model(0), 5, 0)
    with pytest.raises(StrategyError, match="empty buffer"):
        buffer.apply(model(0))
    buffer.add(model(1), model(0), 5, 0)
    for lr in (0, -1.0, math.inf, True, 11):
        with pytest.raises(StrategyError, match="server_lr must be a number"):
            buffer.apply(model(0), server_lr=lr)
    with pytest.raises(StrategyError, match="global weights do not match"):
        buffer.apply(model(0)[:1])
    huge = [np.full_like(w, 3e38) for w in model(0)]
    overflowing = Buffer(Staleness("constant", {}))
    overflowing.add(huge, [np.zeros_like(w) for w in huge], 1, 0)
    with pytest.raises(StrategyError, match="does not fit float32"):
        overflowing.apply(huge, server_lr=1.0)


def test_too_stale_names_the_bound():
    assert too_stale(3, 3) is None
    assert too_stale(4, 3) == "stale beyond the bound: 4 versions behind, at most 3 accepted"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["constant", "polynomial", "hinge"]))
def test_fuzz_staleness_weights_stay_in_zero_one(tau, name):
    weight = Staleness(name, {}).weight(tau)
    assert 0.0 < weight <= 1.0 and math.isfinite(weight)
