"""Asynchronous rounds (`--mode async`, FedBuff): one block per buffer of updates, whatever they started from.

A synchronous round asks its workers for updates on one global version and waits for them. Here the
owner announces the newest head and takes updates as they arrive from any recent version: each names
the head it trained from (its *base*), and its *staleness* is how many accepted versions the global
moved on since (this block's round minus the round the update was trained for). An update more than
`max_staleness` behind, from a head this job never had, or sent twice is refused with a reason; the
others are fetched (a compressed one decoded against its own base), rebased onto the newest global
weights with their staleness weight (`strategies.fedbuff.rebase`) and folded into the job's rule as
they come. The buffer closes at `buffer_size` updates, or at the announcement's deadline with at least
one, so a job never waits on its slowest worker, nor stalls when workers leave. The block records
each update's base and staleness; `chain verify` recomputes it from exactly those.

What a worker does in an async job: train on the newest head it has, announce, and take the newest
head announced meanwhile (`Worker`), so a slow worker skips the versions it was too slow for.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from .. import messages
from ..aggregate import update_norm
from ..ipfs import IPFSError, cid_str, parse_cid, same_cid
from ..payloads import PayloadError, fetch_weights
from ..strategies import Aggregate, RoundContext, StrategyError, streams
from ..strategies.fedbuff import AsyncConfig, rebase, server_step, too_stale
from .collect import FETCH_THREADS, FETCH_TIMEOUT, Collected, Stream, inflated, screen_outliers, start_prefetch
from .inbox import Inbox
from .job import JobFailed
from .state import JobRun

log = logging.getLogger("grid_ipfs.client")

BASE_CACHE = 4
"""Older global versions whose weights the owner keeps parsed (the newest is the job's own): an update
from one of them is decoded and rebased against it."""


@dataclass(frozen=True)
class Base:
    """A head an update may name: the round updates trained from it are for, and its global weights
    (the newest accepted ones at that head: a rejected block's are its predecessor's)."""

    round: int
    weights: str


def head_key(cid) -> str:
    """One spelling per CID (a CIDv1 may be printed base32 or base58btc)."""
    return cid_str(parse_cid(cid))


def note_head(job: JobRun, head: str, block_round: int, accepted: bool, weights_cid: str) -> None:
    """Remember `head` (a block just appended, or read on resume) as a base updates may name, and forget
    the heads no update may name any more (more than `max_staleness` versions old)."""
    config = job.spec.async_config
    if config is None:
        return
    base = Base(block_round + 1, weights_cid) if accepted else Base(block_round, weights_cid)
    job.bases[head_key(head)] = base
    oldest = base.round - config.max_staleness
    for key in [k for k, b in job.bases.items() if b.round < oldest]:
        del job.bases[key]
    for key in [k for k, r in job.used.items() if r < oldest]:
        del job.used[key]


def refusal(job: JobRun, update: messages.Update, sender: str, r: int, taken: set[str],
            allowed: set[str] | None) -> tuple[str | None, Base | None]:
    """(why `update` does not go into round `r`'s buffer, None) or (None, its base). A refused worker
    may still send a good one: it trains on, from the newest head it hears of."""
    config: AsyncConfig = job.spec.async_config
    if allowed is not None and sender not in allowed:
        return "not allowed: worker not on the allow-list", None
    if sender not in job.workers:
        return "not joined: the worker has not joined this job", None
    if sender in taken:
        return "replay: second update from this worker for this block", None
    if update.head is None or update.base is None:
        return "unbound: the update names no chain head or base weights", None
    base = job.bases.get(head_key(update.head))
    if base is None:
        return (f"unknown base: head {update.head} is not one of this job's last {config.max_staleness + 1} "
                "versions"), None
    if update.round != base.round or not same_cid(update.base, base.weights):
        return (f"mismatch: the update says round {update.round} from {update.base}; its head {update.head} "
                f"was announced as round {base.round} from {base.weights}"), None
    reason = too_stale(r - base.round, config.max_staleness)
    if reason is not None:
        return f"stale: {reason}", None
    if (sender, head_key(update.weights)) in job.used:
        return "replay: this update is in an earlier block already", None
    reason = inflated(job, update, sender)
    return (reason, None) if reason is not None else (None, base)


class _Bases:
    """Parsed global weights of recent versions by CID: the newest from the job, older ones read from
    the owner's own daemon (the chain's pin holds them) and kept for a few versions."""

    def __init__(self, ipfs, job: JobRun):
        self.ipfs, self.job = ipfs, job
        self.kept: OrderedDict[str, list] = OrderedDict()

    def weights(self, cid: str) -> list:
        if same_cid(cid, self.job.accepted.weights_cid):
            return self.job.accepted.weights
        key = head_key(cid)
        if key not in self.kept:
            self.kept[key] = fetch_weights(self.ipfs, cid, like=self.job.accepted.weights,
                                           source=f"global weights {cid}", timeout=FETCH_TIMEOUT)
            while len(self.kept) > BASE_CACHE:
                self.kept.popitem(last=False)
        self.kept.move_to_end(key)
        return self.kept[key]


def fetch_rebased(ipfs, job: JobRun, bases: _Bases, update: messages.Update, sender: str, staleness: int) -> list:
    """An update's weights, decoded against its own base and rebased onto the newest global weights."""
    base = bases.weights(update.base)
    weights = fetch_weights(ipfs, update.weights, like=job.accepted.weights,
                            source=f"update {update.weights} from {sender[:12]}", base=base, timeout=FETCH_TIMEOUT)
    return rebase(weights, base, job.accepted.weights, job.spec.async_config.weight(staleness))


def gather(client, inbox: Inbox, r: int, after_attempt: int) -> tuple[dict, dict, int, Stream | None]:
    """Announce round `r` (the newest head) and fill its buffer; an announcement whose deadline passes
    with no update at all is made again, at most `max_retries` times. Returns what
    `Client._gather_updates` does: (collected, refused, last attempt, the stream or None)."""
    job, spec = inbox.job, inbox.job.spec
    job.extends = cid_str(job.chain.head)
    stream = None
    if streams(job.strategy):
        context = RoundContext(job.accepted.weights, r, job.next_seq, job.accepted.state)
        stream = Stream(job.strategy, context, lambda c: reload(client.ipfs, job, c))
    collected: dict[str, Collected] = {}
    refused: dict[str, str] = {}
    first = after_attempt + 1
    for attempt in range(first, first + spec.max_retries + 1):
        client.announce(job)
        round_msg = messages.Round(job=job.id, round=r, weights=job.accepted.weights_cid,
                                   deadline=time.time() + spec.round_timeout, selected=None, attempt=attempt,
                                   head=job.extends)
        client.publish(round_msg)
        client.callbacks.on_round_start(r, spec.async_config.buffer_size, round_msg.deadline)
        _fill(client, inbox, round_msg, collected, refused, stream)
        screen_outliers(inbox, collected, refused)
        if collected:
            return collected, refused, attempt, stream
        client.callbacks.on_round_retry(r, attempt - after_attempt, 0, 1)
        log.warning("round %d of job %s: no update by the deadline; announcing it again (attempt %d of %d)",
                    r, job.id, attempt - after_attempt + 1, spec.max_retries + 1)
    raise JobFailed(f"round {r} of job {job.id}: no update within {spec.round_timeout:.0f}s, "
                    f"{spec.max_retries + 1} attempt(s)")


def reload(ipfs, job: JobRun, c: Collected) -> list:
    """A kept update's rebased weights again (the stream starts over after a refusal), from our daemon."""
    return fetch_rebased(ipfs, job, _Bases(ipfs, job), c.update, c.worker, c.staleness)


def _fill(client, inbox: Inbox, round_msg: messages.Round, collected: dict[str, Collected],
          refused: dict[str, str], stream: Stream | None) -> None:
    """Take updates until the buffer holds `buffer_size`, or the deadline passed with at least one."""
    job, r = inbox.job, round_msg.round
    config: AsyncConfig = job.spec.async_config
    screened = bool(job.spec.max_norm_ratio)
    recent = range(max(1, r - config.max_staleness), r + 1)
    bases = _Bases(client.ipfs, job)
    pending: dict[Future, tuple[messages.Update, str, bytes, Base]] = {}

    def settle(future: Future) -> None:
        update, sender, data, base = pending.pop(future)
        try:
            stored = future.result()
            weights = fetch_rebased(client.ipfs, job, bases, update, sender, r - base.round)  # from our daemon
            norm = update_norm(weights, job.accepted.weights) if screened else None
            if stream is not None:
                stream.add(sender, weights, update.num_examples)
                weights = None
        except (IPFSError, PayloadError, StrategyError) as exc:
            refused.setdefault(sender, f"bad weights: {exc}")
            inbox.reject(r, sender, refused[sender])
            return
        collected[sender] = Collected(sender, update, weights, data, norm, base=_base_head(update),
                                      staleness=r - base.round, message_stored=stored)
        client.callbacks.on_update(r, sender, len(collected), config.buffer_size)

    arrivals, job.carried = job.carried, []  # updates that came after the last buffer filled
    with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch") as pool:
        while len(collected) < config.buffer_size and not (collected and time.time() >= round_msg.deadline):
            if time.time() >= round_msg.deadline and not pending:
                break
            if len(collected) + len(pending) >= config.buffer_size:  # full once these land: wait for them
                wait(list(pending), timeout=0.05)
            else:
                arrivals += inbox.drain(0.2, round_=round_msg, rounds=recent)
            while arrivals and len(collected) + len(pending) < config.buffer_size:
                update, sender, data = arrivals.pop(0)
                in_flight = {s for _, s, _, _ in pending.values()}
                reason, base = refusal(job, update, sender, r, set(collected) | in_flight, client.allowed_workers)
                if reason is not None:
                    refused.setdefault(sender, reason)
                    inbox.reject(r, sender, reason)
                    continue
                pending[start_prefetch(pool, inbox, client.ipfs, update, data)] = (update, sender, data, base)
            for future in [f for f in pending if f.done()]:
                settle(future)
        wait(list(pending))
        for future in list(pending):
            settle(future)
    job.carried = arrivals  # for the next buffer, where they are checked again (one may be too stale then)


def _base_head(update: messages.Update) -> str:
    return head_key(update.head)


def entry_fields(c: Collected) -> dict:
    """What an async block's entry adds for update `c`: its base block and staleness ({} when sync)."""
    if c.base is None:
        return {}
    return {"base": c.base, "staleness": c.staleness}


def stepped(job: JobRun, r: int, result: Aggregate) -> Aggregate:
    """The block's weights: the rule's aggregate of the rebased buffer, `server_lr` of the way from the
    newest global weights (`strategies.fedbuff.server_step`)."""
    try:
        return Aggregate(server_step(job.accepted.weights, result.weights, job.spec.async_config.server_lr),
                         result.state)
    except StrategyError as exc:
        raise JobFailed(f"round {r} of job {job.id}: {exc}") from None


def staleness_metrics(ordered: list[Collected]) -> dict:
    """A block's `staleness_mean` and `staleness_max` over its updates ({} in synchronous rounds)."""
    values = [c.staleness for c in ordered if c.staleness is not None]
    if not values:
        return {}
    return {"staleness_mean": sum(values) / len(values), "staleness_max": float(max(values))}


def remember_used(job: JobRun, collected: dict[str, Collected]) -> None:
    """The updates a block took cannot go into a later one (their signatures would count twice)."""
    for c in collected.values():
        if c.base is not None:
            job.used[(c.worker, head_key(c.update.weights))] = c.update.round

