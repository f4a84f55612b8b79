"""Unit tests for grid_ipfs.training: local fit/evaluate of a small Keras MLP on sklearn digits."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from grid_ipfs import data  # noqa: E402
from grid_ipfs.payloads import model_from_bytes, model_to_bytes  # noqa: E402
from grid_ipfs.training import evaluate, fit  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    x_tr, y_tr, x_te, y_te = data.digits()
    return x_tr[:600], y_tr[:600], x_te, y_te


def make_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_fit_trains_and_returns_plain_metrics(digits):
    x, y, _, _ = digits
    model = make_mlp()
    start = [w.copy() for w in model.get_weights()]
    before = evaluate(model, None, x, y)
    weights, metrics = fit(model, start, x, y, epochs=2, batch_size=32, seed=1)
    after = evaluate(model, weights, x, y)
    assert set(metrics) == {"loss", "accuracy"} and all(type(v) is float for v in metrics.values())
    assert after["loss"] < before["loss"]
    assert [w.shape for w in weights] == [w.shape for w in start]
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start))


def test_fit_with_a_seed_is_reproducible(digits):
    x, y, _, _ = digits
    model = make_mlp()
    start = [w.copy() for w in model.get_weights()]
    first, m1 = fit(model, start, x, y, epochs=1, seed=7)
    second, m2 = fit(model, start, x, y, epochs=1, seed=7)  # Adam's moments are reset in between
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and m1 == m2
    stale, _ = fit(model, start, x, y, epochs=1, seed=7, reset_optimizer=False)
    assert any(not np.array_equal(a, b) for a, b in zip(first, stale))


def test_two_workers_loading_the_same_bytes_compute_the_same_update(digits):
    x, y, _, _ = digits
    blob = model_to_bytes(make_mlp())
    updates = [fit(model_from_bytes(blob), None, x, y, epochs=1, seed=3)[0] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*updates))


def test_fit_passes_callbacks(digits):
    x, y, _, _ = digits
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, float(logs["loss"])))

    _, metrics = fit(make_mlp(), None, x, y, epochs=2, callbacks=[Record()])
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert metrics["loss"] == pytest.approx(seen[-1][1])


def test_evaluate_returns_loss_and_accuracy_and_empty_for_no_data(digits):
    _, _, x_te, y_te = digits
    model = make_mlp()
    metrics = evaluate(model, model.get_weights(), x_te, y_te)
    assert set(metrics) == {"loss", "accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert evaluate(model, None, x_te[:0], y_te[:0]) == {}


def test_uncompiled_model_is_refused_with_the_fix(digits):
    x, y, _, _ = digits
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match=r"not compiled: call model.compile"):
        fit(model, None, x, y)


def test_reloaded_model_fits_without_recompiling(digits):
    x, y, x_te, y_te = digits
    original = make_mlp()
    loaded = model_from_bytes(model_to_bytes(original), source="digits.keras")
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(0.01)
    first = evaluate(loaded, None, x_te, y_te)
    assert set(first) == {"loss", "accuracy"}  # metrics come back under their compile names
    weights, metrics = fit(loaded, original.get_weights(), x, y, epochs=2, seed=0)
    assert set(metrics) == {"loss", "accuracy"}
    assert evaluate(loaded, weights, x_te, y_te)["loss"] < first["loss"]
