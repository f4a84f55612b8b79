"""Local training and evaluation of a Keras model on one worker's data; no IPFS in here.

The model arrives as a compiled `.keras` file, so the job owner — not the worker — chooses the optimizer,
loss and metrics: `fit` trains with the model's own compile settings and never recompiles. Each round
starts from the global weights passed in, and both functions return plain Python floats so their metrics
can go straight into JSON messages and chain blocks.

The optimizer's own state (Adam's moments, the step counter behind a learning-rate schedule) lives in
the model object, not in the federated weights. By default `fit` puts it back to what it was the first
time `fit` saw that model, so every round starts the same way from the global weights: momentum left
over from the previous round's weights would push the new global model in a stale direction, and a
worker's update depends only on (global weights, data, seed), which makes it reproducible.

FedProx (Li et al., 2020): `fit(..., proximal_mu=MU)` minimises the model's own loss plus
`MU/2 * ||w - w_global||^2` over the trainable weights, which keeps a worker's local solution near the
global model on non-IID data. The term rides on Keras's weight-regularizer mechanism (a regularizer on
each trainable variable, composed with any regularizer the owner set), so the optimizer sees its
gradient `MU * (w - w_global)` like any other loss term, inside the compiled train step.

Both functions run under `kerasstate.keras_state_guard`: whatever the job's model or a callback does to
Keras' process-wide configuration during the step is undone when it ends (and logged).

Backend-neutral: the same code trains under `KERAS_BACKEND=tensorflow` (the default), `jax` or `torch`,
through `keras.ops` and NumPy only. Two things differ between backends and are handled here: seeding
(`keras.utils.set_random_seed` imports TensorFlow whenever it is installed, ~0.5 GB and 5 s that a JAX
or PyTorch worker never needs), and the first fit of a freshly loaded model (JAX and PyTorch draw an
extra shuffle while Keras builds the metrics, so the model is built before seeding: the same seed gives
the same update on every fit, the first included).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from .kerasstate import keras_state_guard
from .limits import check_number
from .messages import BACKENDS

log = logging.getLogger("grid_ipfs.training")

Weights = list[np.ndarray]


def fit(model: keras.Model, weights: Weights | None, x: np.ndarray, y: np.ndarray, *, epochs: int = 1,
        batch_size: int = 32, seed: int | None = None, verbose: int = 0,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        reset_optimizer: bool = True, proximal_mu: float = 0.0) -> tuple[Weights, dict[str, float]]:
    """Train `model` from `weights` on (x, y); return the new weights and the last epoch's metrics.

    `weights=None` trains from the model's current weights. With `seed`, Python, NumPy and the backend
    are seeded first (`keras.utils.set_random_seed`), so shuffling and dropout repeat exactly: the same
    seed, data and starting weights give the same update. `callbacks` are ordinary Keras callbacks
    (progress reporting, or a FedProx-style proximal term added by a callback). `reset_optimizer=False`
    keeps the optimizer state of the previous call instead (see the module docstring).

    `proximal_mu > 0` adds FedProx's proximal term `mu/2 * ||w - w_start||^2` (w_start: the weights
    training starts from, i.e. the global weights) to the loss; the reported `loss` then includes it.
    With 0 (the default) training is plain.

    Metrics are named as Keras reports them (`loss`, `accuracy`, ...); non-finite values are dropped so
    the result is always valid JSON.
    """
    _require_compiled(model)
    if len(x) == 0:
        raise ValueError("fit: no training examples")
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
    check_number(proximal_mu, "fit: proximal_mu")
    with _guarded("training"):
        if weights is not None:
            model.set_weights(weights)
        if reset_optimizer:
            _restore_optimizer_state(model)
        _build_for_training(model, x, y)
        if seed is not None:
            set_random_seed(seed)
        proximal = _Proximal.attach(model) if proximal_mu > 0 else _PROXIMAL.get(model)
        if proximal is not None:
            proximal.start(float(proximal_mu))  # anchor = the weights training starts from
        try:
            history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=verbose,
                                callbacks=list(callbacks) if callbacks else None)
        finally:
            if proximal is not None:
                proximal.stop()  # mu back to 0: evaluate() and later plain fits see no extra term
    last_epoch = {name: values[-1] for name, values in history.history.items() if len(values)}
    return [np.array(w, copy=True) for w in model.get_weights()], _plain_metrics(last_epoch)


def evaluate(model: keras.Model, weights: Weights | None, x: np.ndarray, y: np.ndarray, *,
             batch_size: int = 256) -> dict[str, float]:
    """Evaluate `model` with `weights` (None: current weights) on (x, y): `{"loss": ..., ...}`.

    Returns `{}` for empty data, so a worker without a validation split needs no special case.
    """
    if len(x) == 0:
        return {}
    _require_compiled(model)
    with _guarded("evaluation"):
        if weights is not None:
            model.set_weights(weights)
        results = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return _plain_metrics(results)


def backend() -> str | None:
    """The Keras backend this process trains with, as an `update` names it (`messages.BACKENDS`); None
    for a backend outside that list (Keras' numpy and openvino backends cannot train)."""
    name = keras.config.backend()
    return name if name in BACKENDS else None


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and the backend, as `keras.utils.set_random_seed` does, but without importing
    TensorFlow on the JAX and PyTorch backends (Keras' own version imports it whenever it is installed,
    to seed `tf.data`, which those backends' `fit` on arrays never uses)."""
    if keras.config.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)  # recreated from the seed on demand
    random.seed(seed)
    np.random.seed(seed)
    if keras.config.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def _build_for_training(model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
    """Build the model's loss and metrics from one example before seeding. On JAX and PyTorch, Keras'
    `fit` builds them from the first batch of a shuffled pass it then throws away, which uses up one
    shuffle: the first fit of a freshly loaded model would train on another order than every later fit
    with the same seed. (TensorFlow's seeded `tf.data` shuffle was measured repeatable without it.)"""
    build = getattr(model, "_symbolic_build", None)  # Keras 3's own step, run by fit on first use
    if keras.config.backend() != "tensorflow" and build is not None:
        build(data_batch=(x[:1], y[:1]))


@contextmanager
def _guarded(what: str) -> Iterator[None]:
    """Run a step of a (possibly untrusted) model with Keras' process-wide state restored afterwards
    (`kerasstate.keras_state_guard`), and say so in the log when the step had changed any of it."""
    with keras_state_guard() as changed:
        yield
    if changed:
        log.warning("%s changed process-wide Keras state (%s); restored", what, ", ".join(changed))


class _Proximal:
    """FedProx's proximal term on one model: `mu/2 * ||v - anchor_v||^2` summed over its trainable
    variables, installed once as (a wrapper of) each variable's Keras regularizer.

    `mu` and the anchors are non-trainable variables outside the model, so a new round only assigns
    them: the compiled train step is traced once. Between fits `mu` is 0 and the term vanishes.
    """

    def __init__(self, model: keras.Model):
        self.mu = keras.Variable(0.0, dtype="float32", trainable=False, name="proximal_mu")
        self.pairs: list[tuple[Any, Any]] = []
        for variable in model.trainable_variables:
            anchor = keras.Variable(np.zeros(variable.shape, dtype=variable.dtype), dtype=variable.dtype,
                                    trainable=False, name="proximal_anchor")
            variable.regularizer = _ProximalRegularizer(self.mu, anchor, variable.regularizer)
            self.pairs.append((variable, anchor))
        # train/test functions traced before the regularizers existed do not include them: trace again
        model.train_function = model.test_function = None

    @classmethod
    def attach(cls, model: keras.Model) -> _Proximal:
        if model not in _PROXIMAL:
            _PROXIMAL[model] = cls(model)
        return _PROXIMAL[model]

    def start(self, mu: float) -> None:
        for variable, anchor in self.pairs:
            anchor.assign(variable.value)
        self.mu.assign(mu)

    def stop(self) -> None:
        self.mu.assign(0.0)


class _ProximalRegularizer:
    """Callable regularizer: `mu/2 * sum((v - anchor)^2)` plus the variable's own regularizer, if any."""

    def __init__(self, mu, anchor, inner: Callable | None):
        self.mu, self.anchor, self.inner = mu, anchor, inner

    def __call__(self, value):
        ops = keras.ops
        term = 0.5 * ops.cast(self.mu, value.dtype) * ops.sum(ops.square(value - self.anchor))
        return term if self.inner is None else term + self.inner(value)


_PROXIMAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Model -> its _Proximal, once a fit with proximal_mu > 0 installed one."""

_INITIAL_OPTIMIZER_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Optimizer -> its variables' values when `fit` first saw it (weak: dropped with the model)."""


def _restore_optimizer_state(model: keras.Model) -> None:
    """Reset the optimizer's variables to their values at the first `fit` of this model.

    The optimizer is built here if needed, so "first seen" is its freshly initialised state for a model
    that never trained (Adagrad, for one, does not start from zeros, hence a snapshot, not a zeroing),
    or the state saved in the `.keras` file for one that did.
    """
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    saved = _INITIAL_OPTIMIZER_STATE.get(optimizer)
    if saved is None or len(saved) != len(optimizer.variables):
        _INITIAL_OPTIMIZER_STATE[optimizer] = [np.array(v.numpy(), copy=True) for v in optimizer.variables]
        return
    for variable, value in zip(optimizer.variables, saved):
        variable.assign(value)


def _require_compiled(model: keras.Model) -> None:
    """Fail with the fix spelled out: the job owner must compile before saving the `.keras` file."""
    if not getattr(model, "compiled", False):
        raise ValueError("the model is not compiled: call model.compile(optimizer, loss, metrics) before "
                         "saving the .keras file, so workers train with your settings")


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten Keras metric results to `{name: finite python float}`.

    Keras 3 may group the compiled metrics under `compile_metrics` (a dict, or a bare scalar while the
    metrics are not yet built, e.g. on a freshly loaded model); nested dicts are flattened into their
    own names and a bare `compile_metrics` scalar is dropped because its name means nothing to a reader.
    """
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_plain_metrics(value))
            continue
        if name == "compile_metrics":
            continue
        try:
            number = float(np.asarray(value))
        except (TypeError, ValueError):
            continue  # a non-scalar metric (e.g. a confusion matrix) has no place in a JSON summary
        if math.isfinite(number):
            flat[name] = number
    return flat


__all__ = ["backend", "evaluate", "fit", "set_random_seed"]
