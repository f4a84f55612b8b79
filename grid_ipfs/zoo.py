"""Small compiled Keras models for the examples, the demo, the tests and the benchmarks.

Each returns a compiled model: the `.keras` file keeps the compile settings, and workers train with
exactly those (optimizer, loss, metrics), so what the owner compiles is what the grid trains.
"""

from __future__ import annotations

import keras


def _seeded(seed: int | None) -> None:
    if seed is not None:
        keras.utils.set_random_seed(seed)


def digits_mlp(seed: int | None = 0, hidden: int = 64, learning_rate: float = 0.01) -> keras.Model:
    """sklearn digits (8x8 images flattened to 64 features, 10 classes)."""
    _seeded(seed)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="digits_mlp")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def fashion_cnn(seed: int | None = 0) -> keras.Model:
    """Fashion-MNIST (28x28x1, 10 classes): a small CNN that trains in seconds per epoch on a CPU."""
    _seeded(seed)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="fashion_cnn")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def diabetes_linear(seed: int | None = 0, features: int = 10) -> keras.Model:
    """Linear regression (the FlexBlock tutorial's diabetes task)."""
    _seeded(seed)
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(1)], name="diabetes_linear")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model


def xor_mlp(seed: int | None = 0) -> keras.Model:
    """The classic XOR network of the original Grid notebook."""
    _seeded(seed)
    model = keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(1, activation="sigmoid"),
    ], name="xor_mlp")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy", metrics=["accuracy"])
    return model
