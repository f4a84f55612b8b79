"""FedBuff's rebasing, server step and staleness weights (`grid_ipfs.strategies.fedbuff`): the math an async job's
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
from grid_ipfs.strategies.fedbuff import AsyncConfig, Staleness, rebase, server_step, too_stale


def model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]


def test_fresh_updates_at_server_lr_one_are_fedavg_of_the_buffer_bit_for_bit():
    """A fresh update (from the newest global, tau = 0) is itself after rebasing, so a buffer of fresh
    updates at server_lr 1 is exactly FedAvg of them, as a synchronous round would compute it."""
    base = model(0)
    updates = [(model(i), n) for i, n in ((1, 10), (2, 30), (3, 5))]
    for weights, _ in updates:
        for got, want in zip(rebase(weights, base, base, 1.0), weights):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    rebased = [(rebase(w, base, base, Staleness().weight(0)), n) for w, n in updates]
    for got, want in zip(server_step(base, fedavg(rebased), 1.0), fedavg(updates)):
        assert got.tobytes() == want.tobytes()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                min_size=2, max_size=8))
def test_fuzz_a_fresh_update_is_itself_after_rebasing(values):
    half = len(values) // 2
    weights = [np.array(values[:half], np.float32)]
    base = [np.array(values[half:2 * half], np.float32)]
    assert rebase(weights, base, base, 1.0)[0].tobytes() == weights[0].tobytes()


def test_a_stale_update_counts_for_less_and_the_default_is_one_over_sqrt():
    assert Staleness().weight(0) == 1.0 and Staleness().weight(3) == pytest.approx(0.5)
    assert Staleness("hinge", {"a": 10.0, "b": 4.0}).weight(4) == 1.0
    assert Staleness("hinge", {"a": 10.0, "b": 4.0}).weight(5) == pytest.approx(1 / 11)
    base, moved = model(0), model(1)
    fresh = rebase(moved, base, base, Staleness().weight(0))
    stale = rebase(moved, base, base, Staleness().weight(8))
    for f, s, b in zip(fresh, stale, base):
        np.testing.assert_allclose(s - b, (f - b) / 3, rtol=1e-5, atol=1e-6)  # 1/sqrt(1 + 8)


def test_each_update_contributes_its_change_from_the_version_it_names():
    """A worker two versions behind moves the newest global by what it learned, not back to its old base."""
    old, newest = model(0), model(5)
    trained = [w + 0.25 for w in old]
    rebased = rebase(trained, old, newest, 1.0)
    for got, g in zip(server_step(newest, rebased, 0.5), newest):
        np.testing.assert_allclose(got, g + 0.125, rtol=1e-6)


def test_with_fedavg_it_is_fedbuff_s_formula():
    """rebase -> FedAvg -> server step is global + lr * sum s n (w - base) / sum n (to float32 rounding)."""
    newest = model(0)
    updates = [(model(i), model(10 + i), 3 + i, i % 3) for i in range(1, 8)]  # (weights, base, n, tau)
    rebased = [(rebase(w, b, newest, Staleness().weight(tau)), n) for w, b, n, tau in updates]
    got = server_step(newest, fedavg(rebased), 0.7)
    for k, g in enumerate(newest):
        total = sum(((1.0 / math.sqrt(1 + tau)) * n) * (w[k].astype(np.float64) - b[k].astype(np.float64))
                    for w, b, n, tau in updates)
        want = g.astype(np.float64) + 0.7 * (total / sum(n for _, _, n, _ in updates))
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)


def test_each_step_is_its_float64_formula_rounded_once():
    """What `chain verify` recomputes: the same arithmetic, so the same bits."""
    newest, w, b = model(0), model(1), model(2)
    got = rebase(w, b, newest, 0.5)
    for k in range(len(newest)):
        w64, b64 = w[k].astype(np.float64), b[k].astype(np.float64)
        shift = (newest[k].astype(np.float64) - b64) + (0.5 - 1.0) * (w64 - b64)
        want = np.where(shift == 0.0, w64, w64 + shift)
        assert got[k].tobytes() == want.astype(np.float32).tobytes()
    stepped = server_step(newest, w, 0.3)
    for k in range(len(newest)):
        ref = newest[k].astype(np.float64)
        assert stepped[k].tobytes() == (ref + 0.3 * (w[k].astype(np.float64) - ref)).astype(np.float32).tobytes()


def test_defaults_are_each_function_s_own_and_numpy_counts_are_counts():
    assert Staleness("constant").weight(50) == 1.0
    assert Staleness("hinge").weight(5) == pytest.approx(1 / 11)  # a = 10, b = 4
    assert Staleness("polynomial", {"a": 1.0}).weight(np.int64(3)) == 0.25
    assert Staleness().record() == {"name": "polynomial", "params": {}}


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
        Staleness().weight(tau)
    with pytest.raises(StrategyError, match="staleness must be a non-negative integer of at most"):
        AsyncConfig().weight(tau)


def test_wrong_shapes_bad_weights_a_bad_server_lr_and_overflow_are_refused():
    with pytest.raises(StrategyError, match="do not match the shapes of the version"):
        rebase(model(1)[:1], model(0), model(0), 1.0)
    with pytest.raises(StrategyError, match="do not match the shapes of the version"):
        rebase(model(1), model(0), [w.T for w in model(0)], 1.0)
    for weight in (-0.1, 1.5, math.nan, True, "1"):
        with pytest.raises(StrategyError, match="staleness weight must be a number in"):
            rebase(model(1), model(0), model(0), weight)
    for lr in (0, -1.0, math.inf, True, 11):
        with pytest.raises(StrategyError, match="server_lr must be a number"):
            server_step(model(0), model(1), lr)
    with pytest.raises(StrategyError, match="global weights do not match"):
        server_step(model(0)[:1], model(1), 0.5)
    huge = [np.full_like(w, 3e38) for w in model(0)]
    with pytest.raises(StrategyError, match="does not fit float32"):
        rebase(huge, [-h for h in huge], huge, 1.0)
    with pytest.raises(StrategyError, match="does not fit float32"):
        server_step([-h for h in huge], huge, 10.0)


@pytest.mark.parametrize("record, match", [
    (None, "expected a map of exactly"),
    ({"buffer_size": 4}, "expected a map of exactly"),
    ({**AsyncConfig().record(), "extra": 1}, "expected a map of exactly"),
    ({**AsyncConfig().record(), "buffer_size": 0}, "buffer_size must be a positive integer"),
    ({**AsyncConfig().record(), "buffer_size": 10**9}, "buffer_size must be a positive integer"),
    ({**AsyncConfig().record(), "max_staleness": -1}, "max_staleness must be a non-negative integer"),
    ({**AsyncConfig().record(), "server_lr": math.nan}, "server_lr must be a number"),
    ({**AsyncConfig().record(), "server_lr": "1"}, "server_lr must be a number"),
    ({**AsyncConfig().record(), "staleness": "polynomial"}, "staleness must be {name, params}"),
    ({**AsyncConfig().record(), "staleness": {"name": ["x"], "params": {}}}, "staleness must be {name, params}"),
    ({**AsyncConfig().record(), "staleness": {"name": "lru", "params": {}}}, "unknown staleness function"),
    ({**AsyncConfig().record(), "staleness": {"name": "hinge", "params": [1]}}, "params must be a mapping"),
])
def test_a_recorded_async_config_that_is_not_one_is_refused_in_one_line(record, match):
    with pytest.raises(StrategyError, match=match):
        AsyncConfig.from_record(record)


def test_an_async_config_round_trips_through_its_record_and_refuses_beyond_its_bound():
    config = AsyncConfig(3, Staleness("hinge", {"a": 2.0}), 0.5, 2)
    assert AsyncConfig.from_record(config.record()) == config
    assert config.weight(2) == 1.0
    with pytest.raises(StrategyError, match="3 versions behind, at most 2"):
        config.weight(3)


def test_too_stale_names_the_bound():
    assert too_stale(3, 3) is None
    assert too_stale(4, 3) == "stale beyond the bound: 4 versions behind, at most 3 accepted"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["constant", "polynomial", "hinge"]))
def test_fuzz_staleness_weights_stay_in_zero_one(tau, name):
    weight = Staleness(name, {}).weight(tau)
    assert 0.0 < weight <= 1.0 and math.isfinite(weight)
