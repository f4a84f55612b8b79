"""Collecting one attempt's updates: which updates count, fetching their weights, screening outliers.

Every check here is about what a peer sent: an update counts only if its worker was asked, answers
once, claims no more examples than it may, and is signed against this round's head and base weights;
its weights must parse like the global model's (or its masked form). What fails is refused with a
reason, counted, and logged in one line. Rules that fold (`Strategy.fold`) take each update as it
arrives (`Stream`); the others get all of them at the round's close.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from .. import messages
from ..aggregate import update_norm
from ..chain.contributions import message_cid
from ..ipfs import IPFSError, cid_str, same_cid
from ..payloads import MAX_WEIGHTS_BYTES, PayloadError, fetch_weights
from ..secagg import masked_like
from ..strategies import Aggregate, RoundContext, Running, StrategyError
from .inbox import Inbox
from .job import JobFailed
from .state import JobRun

log = logging.getLogger("grid_ipfs.client")

FETCH_TIMEOUT = 30.0  # seconds to fetch one update's weights before the update is rejected
FETCH_THREADS = 4
"""Updates the owner's daemon fetches from the network at once (`prefetch`); the owner itself reads and
parses one update at a time from its daemon, so what it holds does not grow with this or with workers."""


@dataclass
class Collected:
    worker: str
    update: messages.Update
    weights: list | None
    """The update's weights, or None when they went into the round's `Stream` as they arrived."""
    message: bytes
    """The update message exactly as the worker signed and published it: the block links it."""
    norm: float | None = None
    """How far the update moved the model (L2 of its delta), for the outlier screen; None unscreened."""
    base: str | None = None
    """Async jobs: the head the update trained from (None in synchronous rounds: the round's head)."""
    staleness: int | None = None
    """Async jobs: versions between its base and the block it goes into (`client.buffered`)."""
    message_stored: bool = False
    """Whether `message` is already a raw block on the owner's daemon (put while the round waited)."""


class Stream:
    """The round's aggregate, built while its updates arrive: each one is added to the strategy's fold
    as its weights are fetched and then dropped, so the owner holds one model copy, not one per worker.

    The block records the order of adding (`fold`), which `chain verify` repeats. An update refused
    after it was added (the outlier screen, a secure round started over) cannot be taken out of a float
    sum: the kept ones are then added again, in the same order, from the owner's own daemon, which
    holds their blocks since they were fetched (a local read, paid only on that rare path).
    """

    def __init__(self, strategy, context: RoundContext, reload: Callable[[Collected], list]):
        self.strategy, self.context, self.reload = strategy, context, reload
        self.running = Running(strategy, context)
        self.order: list[str] = []
        """Workers in the order their updates were added."""

    def add(self, worker: str, weights: list, num_examples: int) -> None:
        self.running.add(weights, num_examples)  # StrategyError, and nothing added, when they do not fit
        self.order.append(worker)

    def reset(self) -> None:
        self.running, self.order = Running(self.strategy, self.context), []

    def result(self, collected: dict[str, Collected]) -> tuple[Aggregate, list[str]]:
        """The aggregate of exactly `collected`, and the order its updates were added in."""
        kept = [w for w in self.order if w in collected]
        if kept != self.order or len(kept) != len(collected):
            log.info("re-adding %d kept updates from the local daemon (%d were refused after they were added)",
                     len(collected), len(self.order) - len(kept))
            self.reset()
            for worker in kept + sorted(set(collected) - set(kept)):
                self.add(worker, self.reload(collected[worker]), collected[worker].update.num_examples)
        return self.running.result(), list(self.order)


def refusal(job: JobRun, update: messages.Update, sender: str, round_msg: messages.Round, expected: set[str],
            taken: set[str], refused: dict[str, str], allowed: set[str] | None) -> str | None:
    """Why `update` does not count for this attempt, or None. `taken`: workers whose update was
    collected or is being fetched."""
    if allowed is not None and sender not in allowed:
        return "not allowed: worker not on the allow-list"
    if sender not in expected:
        return "not selected: worker not asked for this round"
    if sender in taken:
        return "replay: second update from this worker for this round"
    if sender in refused:
        return "refused: this worker's update for this round was already refused"
    if update.head is None or update.base is None:
        return "unbound: the update names no chain head or base weights"
    if not same_cid(update.head, round_msg.head) or not same_cid(update.base, round_msg.weights):
        return f"stale: the update extends head {update.head} from {update.base}, not this round's head"
    return inflated(job, update, sender)


def inflated(job: JobRun, update: messages.Update, sender: str) -> str | None:
    """FedAvg weighs an update by its `num_examples`: a worker cannot raise it past what it claimed when
    it joined, nor past the owner's `max_examples` (which also refused larger joins)."""
    joined = job.workers.get(sender)
    if joined is not None and update.num_examples > joined.num_examples:
        return f"inflated: num_examples {update.num_examples} is more than the {joined.num_examples} claimed at join"
    ceiling = job.spec.max_examples
    if ceiling is not None and update.num_examples > ceiling:
        return f"inflated: num_examples {update.num_examples} is over the job's max_examples {ceiling}"
    return None


def update_like(job: JobRun) -> list:
    """What an update of this job parses as: the global weights' shapes, or their masked form."""
    return job.accepted.weights if job.strategy.readable_updates else masked_like(job.accepted.weights)


def fetch_update(ipfs, job: JobRun, update: messages.Update, sender: str) -> list:
    """An update's weights by CID, parsed like the global model's (or its masked form); a compressed one
    is decoded against the round's base weights, which its worker signed it against."""
    readable = job.strategy.readable_updates
    return fetch_weights(ipfs, update.weights, like=update_like(job),
                         source=f"update {update.weights} from {sender[:12]}",
                         base=job.accepted.weights if readable else None, timeout=FETCH_TIMEOUT)


def store_message(ipfs, data: bytes):
    """Store a signed message as published, as a raw block (so a block can link it); its CID."""
    cid = ipfs.block_put(data, codec="raw")
    if not same_cid(cid, message_cid(data)):
        raise JobFailed(f"the daemon stored a message as {cid_str(cid)}, not {cid_str(message_cid(data))}")
    return cid


def prefetch(ipfs, update: messages.Update, message: bytes) -> bool:
    """On a fetch thread, while the round waits for others: have the owner's daemon fetch the update's
    weights from the network (read through and dropped chunk by chunk: a thread holds a chunk, never an
    update), and store the update's message for the block to link. Whether the message was stored: a
    failed store is the owner's daemon's, not the worker's, and is tried again at the close.

    The weights are then read again, from the daemon's own store, by `fetch_update` when the update is
    settled, one update at a time: the daemon holds the updates on their way, the owner holds one."""
    ipfs.cat(update.weights, max_size=MAX_WEIGHTS_BYTES, timeout=FETCH_TIMEOUT, sink=_drop)
    try:
        store_message(ipfs, message)
    except IPFSError:
        return False
    return True


def start_prefetch(pool: ThreadPoolExecutor, inbox: Inbox, ipfs, update: messages.Update, message: bytes) -> Future:
    """`prefetch` on one of `pool`'s threads; when it ends, the inbox's drain is woken to settle it."""
    future = pool.submit(prefetch, ipfs, update, message)
    future.add_done_callback(inbox.wake)
    return future


def _drop(chunk: bytes) -> None:
    """A `cat` sink that keeps nothing."""


def collect(ipfs, inbox: Inbox, round_msg: messages.Round, expected: set[str], collected: dict[str, Collected],
            refused: dict[str, str], first_attempt: int, *, allowed: set[str] | None = None,
            on_update=lambda worker, received, expected: None, stream: Stream | None = None) -> None:
    """Take updates for this attempt until every expected worker answered or the deadline passed.

    The daemon fetches updates from the network in a small thread pool as they arrive (`prefetch`): a
    remote fetch is mostly waiting, so fetching one after another made the round's length grow with the
    number of workers. Each is then settled here, in this thread: read from the daemon and parsed, and
    with a `stream` added to it and dropped (the block records that order), so the owner holds one
    update at a time; without a stream, weights are kept for an aggregate over all of them (sorted by
    worker id).
    """
    job = inbox.job
    screened = bool(job.spec.max_norm_ratio) and job.strategy.readable_updates
    pending: dict[Future, tuple[messages.Update, str, bytes]] = {}

    def settle(future: Future) -> None:
        update, sender, data = pending.pop(future)
        try:
            stored = future.result()
            weights = fetch_update(ipfs, job, update, sender)  # from our daemon, which has it now
            norm = update_norm(weights, job.accepted.weights) if screened else None
            if stream is not None:
                stream.add(sender, weights, update.num_examples)
                weights = None
        except (IPFSError, PayloadError, StrategyError) as exc:
            refused.setdefault(sender, f"bad weights: {exc}")
            inbox.reject(round_msg.round, sender, refused[sender])
            return
        collected[sender] = Collected(sender, update, weights, data, norm, message_stored=stored)
        on_update(sender, len(collected), len(expected))

    with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch") as pool:
        while time.time() < round_msg.deadline:
            if not pending and expected <= (set(collected) | set(refused)):
                break
            for update, sender, data in inbox.drain(0.2, round_=round_msg, first_attempt=first_attempt):
                in_flight = {s for _, s, _ in pending.values()}
                reason = refusal(job, update, sender, round_msg, expected, set(collected) | in_flight, refused, allowed)
                if reason is not None:
                    if sender in expected and sender not in collected and sender not in in_flight:
                        refused.setdefault(sender, reason)
                    inbox.reject(round_msg.round, sender, reason)
                    continue
                pending[start_prefetch(pool, inbox, ipfs, update, data)] = (update, sender, data)
            for future in [f for f in pending if f.done()]:
                settle(future)
        wait(list(pending))  # arrived before the deadline: each fetch finishes within its own timeout
        for future in list(pending):
            settle(future)


def screen_outliers(inbox: Inbox, collected: dict[str, Collected], refused: dict[str, str]) -> None:
    """Refuse updates that moved the model `max_norm_ratio` times further than the median update: a
    scaled or random update would otherwise dominate FedAvg. Needs at least three updates; masked
    updates have no meaningful norm, so secure aggregation trades this screen away."""
    job = inbox.job
    if len(collected) < 3 or not job.spec.max_norm_ratio or not job.strategy.readable_updates:
        return
    norms = {w: c.norm for w, c in collected.items()}  # measured as each update arrived (`collect`)
    typical = sorted(norms.values())[len(norms) // 2]
    for worker, norm in norms.items():
        if typical > 0 and norm > job.spec.max_norm_ratio * typical:
            refused[worker] = f"outlier norm: {norm:.3g} vs median {typical:.3g}"
            del collected[worker]
            inbox.reject(None, worker, refused[worker])


def selection(job: JobRun, r: int, first: bool, selected: list[str] | None, collected: dict,
               refused: dict) -> tuple[list[str] | None, dict, dict]:
    """Who an attempt asks (None: every joined worker), and the updates it keeps from earlier attempts.

    The first attempt samples `fraction` of the joined workers reproducibly; later ones ask only those
    who have not answered (and any worker that joined since). Under secure aggregation the masks only
    cancel among one attempt's workers: a retry starts over with a fixed set."""
    spec, secure = job.spec, not job.strategy.readable_updates
    if first:
        selected = sample(sorted(job.workers), spec.fraction, spec.min_workers, random.Random(spec.seed * 100_003 + r))
    elif secure:
        selected = sorted(collected) if len(collected) >= spec.min_workers else sorted(job.workers)
        collected, refused = {}, {}
    else:
        asked = set(selected) if selected is not None else set(job.workers)
        selected = sorted((asked | set(job.workers)) - set(collected) - set(refused))
    if secure and selected is None:
        selected = sorted(job.workers)  # a fixed set: every one masks against all the others
    return selected, collected, refused


def sample(workers: list[str], fraction: float, minimum: int, rng: random.Random) -> list[str] | None:
    """None means "every joined worker"; otherwise a reproducible sample of at least `minimum`."""
    if fraction >= 1.0:
        return None
    k = min(len(workers), max(minimum, round(fraction * len(workers))))
    return sorted(rng.sample(workers, k))
