"""The job chain: an append-only, hash-linked, signed log of rounds stored as dag-cbor IPLD blocks.

`blocks` defines and checks one block, `log` appends to and walks a chain, `verify` audits a whole chain
down to recomputing every aggregate. `python -m grid_ipfs.chain` shows and verifies chains from a daemon.
"""

from .blocks import (
    BLOCK_VERSION,
    GENESIS_AGGREGATION,
    ChainError,
    block_cid,
    check_signature,
    decode_block,
    encode_block,
    sign_block,
    validate_block,
)
from .log import BlockStore, ChainLog, read_head, store_block, walk, write_head
from .verify import BlockCheck, VerifyReport, verify_chain

__all__ = [
    "BLOCK_VERSION", "GENESIS_AGGREGATION", "ChainError",
    "block_cid", "check_signature", "decode_block", "encode_block", "sign_block", "validate_block",
    "BlockStore", "ChainLog", "read_head", "store_block", "walk", "write_head",
    "BlockCheck", "VerifyReport", "verify_chain",
]
