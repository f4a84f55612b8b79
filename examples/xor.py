"""XOR over IPFS, the classic Grid-notebook flow: share a trained model by CID, no training rounds.

    python examples/xor.py [--epochs E] [--dir D]

Two loopback IPFS daemons start. "Alice" trains the XOR network of `grid_ipfs.zoo` on the four points,
adds it to node 0 as `.keras` bytes and gets a CID. "Bob", on node 1, fetches the bytes by that CID
(node 1 never saw the file: it comes over the swarm), loads them with Keras `safe_mode=True` and
predicts the four points. Both daemons are stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

from grid_ipfs.ipfs import cid_str  # noqa: E402
from grid_ipfs.ipfs.devnet import Devnet  # noqa: E402

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
Y = np.array([[0], [1], [1], [0]], dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100, help="local training epochs (default 100)")
    parser.add_argument("--dir", type=Path, help="keep the daemons' repos here instead of a temp dir")
    args = parser.parse_args(argv)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="grid-ipfs-xor-") as tmp:
        root = (args.dir or Path(tmp)).resolve()
        # Daemons first: they are separate processes, started before TensorFlow is loaded here.
        with Devnet.up(2, root / "devnet") as net:
            print(f"devnet up: node 0 {net.apis[0]}, node 1 {net.apis[1]}")

            from grid_ipfs import zoo  # imports Keras/TensorFlow (a few seconds)
            from grid_ipfs.payloads import MAX_MODEL_BYTES, model_from_bytes, model_to_bytes

            # Alice, on node 0: train briefly and publish the model.
            model = zoo.xor_mlp(seed=0)
            history = model.fit(X, Y, epochs=args.epochs, batch_size=4, verbose=0)
            print(f"alice trained {args.epochs} epochs: loss {history.history['loss'][-1]:.4f}")
            with net.nodes[0].client() as alice:
                cid = cid_str(alice.add(model_to_bytes(model)))
            print(f"alice added the model to node 0: {cid}")

            # Bob, on node 1: fetch by CID, load safely, predict.
            with net.nodes[1].client() as bob:
                data = bob.cat(cid, max_size=MAX_MODEL_BYTES, timeout=30)
            print(f"bob fetched {len(data)} bytes from node 1")
            loaded = model_from_bytes(data, source=cid)  # safe_mode=True: refuses code-carrying layers
            predictions = loaded.predict(X, verbose=0)[:, 0]

    correct = 0
    for (a, b), p, want in zip(X.astype(int), predictions, Y[:, 0].astype(int)):
        ok = int(p > 0.5) == want
        correct += ok
        print(f"  {a} xor {b} -> {p:.3f}  (want {want}) {'ok' if ok else 'WRONG'}")
    print(f"predictions: {correct}/4 correct; devnet stopped; {time.monotonic() - started:.1f}s")
    return 0 if correct == 4 else 1


if __name__ == "__main__":
    sys.exit(main())
