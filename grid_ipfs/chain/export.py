"""Export a job's global model from its chain: the genesis model's architecture with a round's weights.

The chain holds the model once (genesis `model` link, a `.keras` archive) and one global weights file
per round (each block's `weights` link, safetensors). `export_model` walks from the head to genesis
(every block checked against its CID, layout and signature), loads the model with Keras
`safe_mode=True` and the weights checked against its shapes and dtypes (`grid_ipfs.payloads`), sets
them, and saves a standalone `.keras` file, or an `.onnx` file when tf2onnx is installed.

This reads the chain, it does not audit it: run `python -m grid_ipfs.chain verify` first to check that
the weights are the aggregate of the recorded updates.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from multiformats import CID

from ..errors import GridError
from ..ipfs.cids import cid_str
from .blocks import ChainError, check_signature
from .log import MAX_BLOCKS, BlockStore, walk

__all__ = ["ExportError", "Exported", "ONNX_MISSING", "check_request", "onnx_available", "select_block",
           "load_genesis_model", "load_global_model", "export_model"]

ONNX_MISSING = "--onnx needs tf2onnx, which is not installed: pip install tf2onnx"

DEFAULT_OPSET = 15


class ExportError(GridError):
    """The export cannot be done as asked (no such round, bad output path, tf2onnx missing...)."""


@dataclass
class Exported:
    """What was written: the file, and which job, round, block and objects it came from."""

    path: str
    format: str
    job: str
    round: int
    block: str
    weights: str
    model: str
    signer: str

    def as_dict(self) -> dict:
        return asdict(self)


def onnx_available() -> bool:
    """True when tf2onnx can be imported (it is an optional extra, never installed by grid_ipfs)."""
    return importlib.util.find_spec("tf2onnx") is not None


def select_block(blocks: list[tuple[CID, dict]], round: int | None) -> tuple[CID, dict]:
    """The block of `round` among (cid, block) pairs (any order), or the newest one for None."""
    if not blocks:
        raise ChainError("empty chain")
    if round is None:
        return max(blocks, key=lambda pair: pair[1]["seq"])
    for cid, block in blocks:
        if block["round"] == round:
            return cid, block
    rounds = sorted(block["round"] for _, block in blocks)
    raise ExportError(f"round {round} is not in this chain (it holds rounds {rounds[0]}..{rounds[-1]})")


def check_request(path: str | os.PathLike, onnx: bool = False) -> None:
    """Raise ExportError for what can be refused before reading anything: tf2onnx missing, a bad output."""
    path = Path(path)
    if onnx and not onnx_available():
        raise ExportError(ONNX_MISSING)
    if onnx and path.suffix != ".onnx":
        raise ExportError(f"output {path} must end in .onnx with --onnx")
    if not onnx and path.suffix != ".keras":
        raise ExportError(f"output {path} must end in .keras (Keras saves only .keras archives; "
                          f"use --onnx for an .onnx file)")
    if not path.parent.is_dir():
        raise ExportError(f"output directory {path.parent} does not exist")
    if path.is_dir():
        raise ExportError(f"output {path} is a directory")


def load_genesis_model(store: BlockStore, genesis: dict, *, timeout: float = 120.0):
    """The job's model: the genesis block's `.keras` archive, loaded in Keras safe mode (compiled, as
    the client saved it), with its initial weights."""
    from ..payloads import MAX_MODEL_BYTES, model_from_bytes

    model_cid = cid_str(genesis["model"])
    return model_from_bytes(store.cat(model_cid, max_size=MAX_MODEL_BYTES, timeout=timeout),
                            source=f"model {model_cid}")


def load_global_model(store: BlockStore, genesis: dict, block: dict, *, timeout: float = 120.0) -> tuple:
    """(model, weights): the genesis `.keras` model (Keras safe mode) and `block`'s global weights,
    checked against the model's shapes and dtypes. The weights are returned, not set on the model."""
    from ..payloads import fetch_weights

    model = load_genesis_model(store, genesis, timeout=timeout)
    weights = fetch_weights(store, cid_str(block["weights"]), like=model.get_weights(), timeout=timeout)
    return model, weights


def export_model(store: BlockStore, head: str | CID, path: str | os.PathLike, *, round: int | None = None,
                 onnx: bool = False, signer: str | None = None, opset: int = DEFAULT_OPSET,
                 max_blocks: int = MAX_BLOCKS) -> Exported:
    """Write the global model of `round` (default: the head's) of the chain at `head` to `path`.

    Raises ExportError (bad request: missing round, output path, tf2onnx), ChainError (a block that
    does not hash, decode or verify its signature; `signer` pins the id that must have signed every
    block), PayloadError (model or weights that do not load) or IPFSError (fetch failures).
    """
    path = Path(path)
    check_request(path, onnx)  # before any fetch: nothing to wait for if the answer is no

    blocks = list(walk(store, head, max_blocks=max_blocks))
    for cid, block in blocks:
        if signer is not None and block["signer"] != signer:
            raise ChainError(f"block {cid_str(cid)} (round {block['round']}) is signed by {block['signer']}, "
                             f"expected {signer}")
        if not check_signature(block):
            raise ChainError(f"block {cid_str(cid)} (round {block['round']}): bad signature from {block['signer']}")
    genesis = blocks[-1][1]
    cid, block = select_block(blocks, round)
    model, weights = load_global_model(store, genesis, block)
    model_cid, weights_cid = cid_str(genesis["model"]), cid_str(block["weights"])
    model.set_weights(weights)

    # Write next to the target and rename, so an interrupted export never leaves half a file at `path`.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix if not onnx else '.onnx'}")
    try:
        if onnx:
            _save_onnx(model, tmp, opset)
        else:
            model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(str(path), "onnx" if onnx else "keras", block["job"], block["round"], cid_str(cid),
                    weights_cid, model_cid, block["signer"])


def _save_onnx(model, path: Path, opset: int) -> None:
    """Convert through a tf.function over the model's inputs (tf2onnx's route for Keras 3 models)."""
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError as exc:  # found by find_spec but broken (e.g. an onnx it cannot import)
        raise ExportError(f"{ONNX_MISSING} ({exc})") from None

    specs = [tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name=f"input_{i}")
             for i, tensor in enumerate(model.inputs)]

    @tf.function(input_signature=specs)
    def serve(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    try:
        tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset, output_path=str(path))
    except Exception as exc:  # tf2onnx raises whatever its converters do; name it in one line
        raise ExportError(f"tf2onnx could not convert the model (opset {opset}): "
                          f"{type(exc).__name__}: {exc}") from None
