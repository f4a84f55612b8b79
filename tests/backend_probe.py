"""One Keras backend's view of a model and its weights, for tests/test_backends.py (run in its own process:
the backend is chosen by KERAS_BACKEND before Keras loads, and TensorFlow must not have run in a parent
that forks).

`python -m tests.backend_probe MODEL.keras WEIGHTS.safetensors OUT.safetensors` loads the model as a
worker does (`payloads.model_from_bytes`, vetted), sets the weights read from WEIGHTS, writes what
`get_weights()` then returns to OUT, evaluates them on 200 held-out digits, trains twice from them with
the same seed (the first fit of the loaded model, then a second one) and prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model_path: str, weights_path: str, out_path: str) -> None:
    from grid_ipfs import data, payloads, training

    model = payloads.model_from_bytes(Path(model_path).read_bytes(), source=model_path)
    like = model.get_weights()
    weights = payloads.weights_from_bytes(Path(weights_path).read_bytes(), source=weights_path, like=like)
    model.set_weights(weights)
    Path(out_path).write_bytes(payloads.weights_to_bytes(model.get_weights()))
    x_train, y_train, x_test, y_test = data.digits()
    metrics = training.evaluate(model, None, x_test[:200], y_test[:200])
    first, _ = training.fit(model, weights, x_train[:256], y_train[:256], epochs=1, seed=7, proximal_mu=0.01)
    second, _ = training.fit(model, weights, x_train[:256], y_train[:256], epochs=1, seed=7, proximal_mu=0.01)
    print(json.dumps({"backend": training.backend(), "tensorflow_loaded": "tensorflow" in sys.modules,
                      "eval": metrics, "repeatable": all((a == b).all() for a, b in zip(first, second))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
