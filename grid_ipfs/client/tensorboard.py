"""`TensorBoard`: a `ClientCallback` that writes each round's scalars as the job runs (Keras' callback of
the same name, for federated rounds): `client submit --tensorboard DIR`, then `tensorboard --logdir DIR`.

It reads each new block back from the daemon and writes what `grid_ipfs.chain.tensorboard.block_scalars`
makes of it, so `python -m grid_ipfs.chain tensorboard` writes the same events for the same chain
afterwards (the layout, the limits and how rejected tries are kept apart are described there).
"""

from __future__ import annotations

import logging
import os

from ..chain import ChainError, decode_block
from ..chain.tensorboard import ScalarWriter, TensorBoardError, block_scalars
from ..ipfs import IPFSError, cid_str
from ..text import printable
from .job import ClientCallback

__all__ = ["TensorBoard", "TensorBoardError"]

log = logging.getLogger("grid_ipfs.client")


class TensorBoard(ClientCallback):
    """Write every block of the job (genesis at step 0, each round, each rejected try) as TensorBoard
    scalars under `log_dir`, reading the blocks from `store` (the client's `IPFSClient`).

    The folder is created here (TensorBoardError now, not mid-job, when it cannot be or the tensorboard
    package is missing). A block that cannot be read or written later costs a warning, never the job.
    On `resume` the rounds run from then on are written (`chain tensorboard` writes the whole chain).
    """

    def __init__(self, log_dir: str | os.PathLike, store):
        self.writer = ScalarWriter(log_dir)
        self.store = store
        self._times: dict[str, float] = {}  # block CID -> time, for the next block's round/seconds

    def on_job_start(self, job, genesis):
        block = self._read(genesis)  # the job's head: genesis, or on resume the block it resumes after
        if block is not None and block.get("seq") == 0:
            self._write(genesis, block)
        elif block is not None:
            self._times = {cid_str(genesis): block["time"]}

    def on_round_end(self, result):
        self._write_head(result.head)

    def on_round_rejected(self, result, why):
        self._write_head(result.head)

    def on_job_end(self, result):
        self.writer.close()

    def on_job_failed(self, job, error):
        self.writer.close()

    def _write_head(self, cid: str) -> None:
        block = self._read(cid)
        if block is not None:
            self._write(cid, block)

    def _write(self, cid: str, block: dict) -> None:
        prev = block.get("prev")
        previous = None
        if prev is not None:
            previous = self._times.get(cid_str(prev))
            if previous is None and (before := self._read(prev)) is not None:  # resumed: the block before ours
                previous = before["time"]
        try:
            self.writer.write(block_scalars(block, previous))
        except OSError as exc:
            log.warning("TensorBoard: could not write block %s under %s: %s", cid_str(cid), self.writer.logdir,
                        printable(exc.strerror or exc))
        self._times = {cid_str(cid): block["time"]}  # only the newest is ever a next block's prev

    def _read(self, cid) -> dict | None:
        try:
            return decode_block(self.store.block_get(cid), cid)
        except (ChainError, IPFSError) as exc:
            log.warning("TensorBoard: could not read block %s: %s", cid_str(cid), printable(exc))
            return None
