"""What a running job holds on the client side: the newest accepted block as one value, and the
per-job state that lives exactly as long as the job (its inbox, drop counts, members, contests)."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

from .. import messages
from ..aggregate import AcceptRule
from ..chain import ChainLog
from ..ipfs.pubsub import PubsubMessage
from ..strategies import Strategy
from .job import JobResult, JobSpec


@dataclass(frozen=True)
class Accepted:
    """The newest accepted block (genesis at first): what the next round trains from and is judged by.

    One value, replaced whole when a block is accepted, so the weights, their CID, the metrics an
    `improves:` rule compares with and the strategy's server state can never describe different blocks.
    """

    head: str
    """The block's CID."""
    seq: int
    weights: list
    weights_cid: str
    metrics: dict
    """Its metrics: the baseline of `improves:` acceptance rules."""
    state: object = None
    """The strategy's server state after this block (None: the initial state)."""


@dataclass
class JobRun:
    """One job while `Client` runs it; made by `submit`/`resume`, dropped when the job ends."""

    message: messages.Job
    spec: JobSpec
    chain: ChainLog
    model: object
    eval_xy: tuple | None
    strategy: Strategy
    accepted: Accepted
    result: JobResult
    accept: AcceptRule | None = None
    workers: dict[str, messages.Join] = field(default_factory=dict)
    """Joined workers by id (their join message: claimed examples, mask key)."""
    inbox: queue.Queue[PubsubMessage] = field(default_factory=queue.Queue)
    dropped: Counter = field(default_factory=Counter)
    """Messages dropped on the job topic, by reason."""
    rejected: Counter = field(default_factory=Counter)
    """Updates refused, by reason kind (not selected, replay, bad weights, outlier norm, ...)."""
    last_join: float = 0.0
    announced: float = float("-inf")
    """When (monotonic) the job message was last published: `Client.announce`."""
    proposals: list = field(default_factory=list)
    """(Proposal, sender) as they arrive; taken by the round that asked for them."""
    endorsements: dict = field(default_factory=dict)
    """round -> {miner id: verdict} as endorsements arrive."""
    endorse_messages: dict = field(default_factory=dict)
    """block CID -> {miner id: its signed endorse message, as published}: what the next block links."""
    extends: str | None = None
    """The head the current round's announcements name: its workers sign against it, its block links it."""
    pinned: str | None = None
    """The head this node pins recursively: every block, model, weights and message the chain links."""
    to_pin: str | None = None
    """The newest head, which the client's pin thread moves `pinned` to (off the rounds' path)."""
    pinning: Future | None = None
    """The newest move of the pin handed to that thread; the job waits for it before it returns."""
    pin_rest_until: float = 0.0
    """When (monotonic) the pin thread may move the pin again: `core.PIN_SHARE`."""
    pin_now: threading.Event = field(default_factory=threading.Event)
    """Set when the job ends: the pin thread stops resting and pins the newest head."""
    bases: dict = field(default_factory=dict)
    """Async jobs: recent heads updates may name -> `buffered.Base` (round, global weights)."""
    used: dict = field(default_factory=dict)
    """Async jobs: (worker, update weights CID) of updates recent blocks took -> their round."""
    carried: list = field(default_factory=list)
    """Async jobs: updates that arrived after a buffer filled, for the next one."""

    @property
    def id(self) -> str:
        return self.message.job

    @property
    def next_seq(self) -> int:
        """The seq of the block this round appends: one past the head its announcements name
        (`ChainLog.append(extends=)` refuses if the head moved, so the block lands there)."""
        return self.chain.read(self.extends)["seq"] + 1
