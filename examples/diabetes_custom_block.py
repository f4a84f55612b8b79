"""A custom block type: federated linear regression whose chain records the fitted line itself.

    python examples/diabetes_custom_block.py [--rounds 3] [--workers 3] [--accept RULE] [--dir D]

FlexBlock's custom-chain tutorial fits a linear regression on sklearn's diabetes data and defines its
own block class holding the model's coefficients. Here the same task (`examples/diabetes.py`: a Keras
`Dense(1)`, MSE loss, MAE metric, the patients dealt IID to the workers) gets its block type without
subclassing anything:

- `LinRegBlock`, a `ClientCallback`, answers `block_fields` for every round's block with
  `{"kind": "linreg", "coef": [10 floats], "intercept": float, "val_mse": float}`; the client signs
  it into the block's `ext` map, so `ipfs dag get HEAD/ext/coef` reads the model without Keras;
- the job's acceptance rule (`--accept`, default `val_loss<=1.0`: better than predicting the mean on
  the held-out patients) decides which rounds' models are kept, as `client submit --accept` does;
- `check_linreg` is the auditor's half: `verify_chain(..., check_ext=check_linreg)` recomputes coef
  and intercept from each block's global weights, so a block whose custom fields lie does not verify.

The script walks the chain from another node and prints the coefficients per round from the custom
field next to sklearn's closed-form least squares on all the training patients, verifies the chain
with the check, and shows that a head whose `coef` was altered (re-signed by the owner's own key, so
the signature is fine) is caught by the check and only by it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
from diabetes import PrintRounds  # noqa: E402  (examples/diabetes.py: one line per round)

from grid_ipfs import data  # noqa: E402
from grid_ipfs.chain import decode_block, encode_block, sign_block, verify_chain, walk  # noqa: E402
from grid_ipfs.chain.verify import is_accepted  # noqa: E402
from grid_ipfs.client import Client, ClientCallback, JobResult, JobSpec  # noqa: E402
from grid_ipfs.identity import Identity  # noqa: E402
from grid_ipfs.ipfs import cid_str  # noqa: E402
from grid_ipfs.localgrid import LocalGrid  # noqa: E402

KIND = "linreg"
FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")  # sklearn's order, standardised


def linreg_fields(weights: list, metrics: dict) -> dict:
    """The custom block's fields for a Dense(1) model's weights [kernel (n, 1), bias (1,)]."""
    kernel, bias = weights
    fields = {"kind": KIND, "coef": [float(c) for c in np.asarray(kernel).ravel()], "intercept": float(bias[0])}
    if "val_loss" in metrics:  # the client's held-out evaluation (its --eval-data)
        fields["val_mse"] = float(metrics["val_loss"])
    return fields


class LinRegBlock(ClientCallback):
    """The block type, as a Keras-style callback: one hook, called before each round's block is signed."""

    def block_fields(self, round, weights, updates, metrics):
        return linreg_fields(weights, metrics)


def check_linreg(block: dict, weights: list) -> str | None:
    """`verify_chain`'s `check_ext`: every round's block is a linreg block whose fields are exactly
    (float32 -> float64 is exact) the coefficients of its own global weights."""
    if block["round"] == 0:
        return None if "ext" not in block else "genesis carries custom fields"
    ext = block.get("ext", {})
    if ext.get("kind") != KIND:
        return f"not a {KIND} block (kind {ext.get('kind')!r})"
    expected = linreg_fields(weights, block["metrics"])
    for key in sorted(set(expected) | set(ext)):
        got, want = ext.get(key), expected.get(key)
        if got == want:
            continue
        if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):  # name the coefficient
            i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
            key, got, want = f"{key}[{i}]", got[i], want[i]
        return f"{key} is {got!r}, but the block's weights give {want!r}"
    return None


def forge_head(store, head, identity: Identity, **changes):
    """A copy of the head block with `changes` in its ext, re-signed by `identity` (same seq and prev)."""
    block = decode_block(store.block_get(head), head)
    data, cid = encode_block(sign_block({**block, "ext": {**block["ext"], **changes}}, identity))
    store.block_put(data)
    return cid


def prepare(root: Path, workers: int) -> tuple[list[Path], tuple]:
    """Shards for the workers, the held-out file and the compiled model under `root`; returns the shard
    paths and the (x_train, y_train, x_test, y_test) arrays."""
    arrays = data.diabetes()
    x_train, y_train, x_test, y_test = arrays
    shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, workers, seed=0))
    data.save_shard(root / "test.npz", x_test, y_test)
    from grid_ipfs import zoo  # Keras: used only to write the compiled model

    zoo.diabetes_linear(seed=0).save(root / "diabetes.keras")
    return shards, arrays


def train(ipfs, root: Path, identity: Identity, *, rounds: int, workers: int, epochs: int = 5,
          accept: str | None = "val_loss<=1.0", callbacks: list | None = None) -> JobResult:
    """Run the job from `ipfs` (workers already started on `prepare`'s shards), LinRegBlock plugged in."""
    client = Client(ipfs, identity, head_dir=root / "heads", callbacks=[*(callbacks or []), LinRegBlock()])
    return client.submit(JobSpec(model_path=root / "diabetes.keras", rounds=rounds, min_workers=workers,
                                 epochs=epochs, batch_size=16, eval_data=root / "test.npz", accept=accept))


def print_chain(store, head) -> list[dict]:
    """Print the custom fields of every round's block, read from the chain; return them, oldest first."""
    found = []
    for _, block in reversed(list(walk(store, head))):
        ext = block.get("ext")
        if ext is None or ext.get("kind") != KIND:
            continue
        verdict = "" if is_accepted(block) else " (rejected by the acceptance rule)"
        print(f"  round {block['round']}: intercept {ext['intercept']:+.3f} coef "
              f"[{' '.join(f'{c:+.3f}' for c in ext['coef'])}] held-out MSE {ext['val_mse']:.4f}{verdict}")
        found.append(ext)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round (default 5)")
    parser.add_argument("--accept", default="val_loss<=1.0",
                        help="keep a round's model only if it passes this rule (default: val_loss<=1.0)")
    parser.add_argument("--dir", type=Path, help="keep shards, repos, logs and heads here instead of a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="grid-ipfs-linreg-") as tmp:
        root = (args.dir or Path(tmp)).resolve()
        shards, (x_train, y_train, x_test, y_test) = prepare(root, args.workers)
        print(f"diabetes: {len(x_train)} patients in {args.workers} shards, {len(x_test)} held out")
        from sklearn.linear_model import LinearRegression

        ols = LinearRegression().fit(x_train, y_train)
        ols_mse = float(np.mean((ols.predict(x_test) - y_test) ** 2))

        owner = Identity.generate()
        with LocalGrid(root / "grid", shards, nodes=min(args.workers, 3)) as grid:
            print(f"devnet up ({len(grid.apis)} nodes); {args.workers} workers starting", flush=True)
            with grid.client(0) as ipfs:
                result = train(ipfs, root, owner, rounds=args.rounds, workers=args.workers, epochs=args.epochs,
                               accept=args.accept, callbacks=[PrintRounds()])
            print(f"chain head: {result.head}")
            node = len(grid.apis) - 1
            with grid.client(node) as reader:
                print(f"the {KIND} blocks, read from node {node} (coef order: {' '.join(FEATURES)}):")
                fields = print_chain(reader, result.head)
                print(f"  sklearn least squares on all {len(x_train)} patients: intercept {ols.intercept_[0]:+.3f} "
                      f"coef [{' '.join(f'{c:+.3f}' for c in ols.coef_.ravel())}] held-out MSE {ols_mse:.4f}")
                report = verify_chain(reader, result.head, check_ext=check_linreg)
                print(f"chain verified from node {node} with the {KIND} check: {report.ok} ({report.blocks} blocks) "
                      f"{report.reason}".rstrip())
                forged = forge_head(reader, result.head, owner, coef=[0.0] * len(fields[-1]["coef"]))
                plain = verify_chain(reader, forged)
                caught = verify_chain(reader, forged, check_ext=check_linreg)
                print(f"a copy of the head with coef zeroed, re-signed by the owner ({cid_str(forged)}): "
                      f"plain verify {plain.ok}, with the {KIND} check {caught.ok}: {caught.reason}")
    print(f"final held-out MSE {fields[-1]['val_mse']:.4f} (least squares {ols_mse:.4f}); everything stopped; "
          f"{time.monotonic() - started:.1f}s")
    return 0 if report.ok and plain.ok and not caught.ok and len(fields) >= args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
