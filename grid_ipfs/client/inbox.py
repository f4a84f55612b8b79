"""The job topic, drained: every message a peer sends is decoded, checked and sorted here, and none of
them can end the job. Updates for the round being collected are handed back; joins, proposals and
endorsements change the job's state; anything else is a counted drop with one log line."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from .. import messages
from ..ipfs import cid_str, parse_cid, same_cid
from ..secagg import mask_key_is_signed
from ..text import printable
from .job import CallbackList, JobFailed
from .state import JobRun

log = logging.getLogger("grid_ipfs.client")

REANNOUNCE_EVERY = 2.0
"""Seconds between re-announcements of what the job waits for (a `job`, a `propose`): pubsub is lossy."""

MAX_PENDING_PROPOSALS = 64
"""Proposals queued between two looks of a contest, and endorsements kept per block: what strangers
sending many of either can make the job hold."""

Arrived = tuple[messages.Update, str, bytes]
"""An update of the round being collected: the message, its sender, its bytes as published."""

WAKE = object()
"""Queued by `Inbox.wake`: ends a `drain` early, so a fetch that finishes is settled at once, not at the
end of the drain's timeout."""


class Inbox:
    """One job's view of its topic: `drain` handles what arrived within a timeout."""

    def __init__(self, job: JobRun, own_id: str, *, callbacks: CallbackList | None = None,
                 allowed_workers: set[str] | None = None, allowed_miners: set[str] | None = None,
                 publish: Callable[[object], object] | None = None):
        self.job, self.own_id, self.callbacks = job, own_id, callbacks or CallbackList()
        self.allowed_workers, self.allowed_miners = allowed_workers, allowed_miners
        self.publish = publish or (lambda message: None)

    def put(self, raw) -> None:
        """The subscription's callback: queue one raw pubsub message."""
        self.job.inbox.put(raw)

    def wake(self, *_ignored) -> None:
        """End the current (or next) `drain` now; a future's done-callback."""
        self.job.inbox.put(WAKE)

    def drain(self, timeout: float, round_: messages.Round | None = None, first_attempt: int = 1,
              rounds: range | None = None) -> list[Arrived]:
        """Handle what arrives within `timeout`; return the updates for `round_` (from attempt
        `first_attempt` on: earlier attempts belong to a rejected try of the round), or with `rounds`
        (async jobs) those for any of them. Whatever decoding a
        message raises is a `malformed` drop, whatever handling it raises a `failed` drop, each one log
        line (only JobFailed, KeyboardInterrupt and the like pass)."""
        updates: list[Arrived] = []
        end = time.monotonic() + timeout
        while True:
            try:
                raw = self.job.inbox.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return updates
            if raw is WAKE:
                return updates
            try:
                envelope = messages.decode(raw.data)
            except Exception as exc:  # noqa: BLE001 - MessageError, or anything decode failed to foresee
                self.drop("malformed", f"from peer {raw.sender[-8:]}: {exc}")
                continue
            try:
                if self._handle(envelope, raw.data, round_, first_attempt, rounds):
                    updates.append((envelope.message, envelope.sender, bytes(raw.data)))
                    end = time.monotonic()  # hand it over now; anything else already queued comes along
            except JobFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - a peer may cost a log line, never the job
                self.drop("failed", f"{envelope.message.TYPE} from {envelope.sender[:12]}: handling it raised "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())}")

    def drop(self, kind: str, detail: str) -> None:
        self.job.dropped[kind] += 1
        log.info("dropped a message (%s): %s", kind, printable(detail, 300))

    def reject(self, r: int | None, sender: str, reason: str) -> None:
        """An update refused (counted by the reason's kind, the text before its first colon)."""
        self.job.rejected[reason.split(":")[0]] += 1
        log.warning("round %s: rejected update from %s: %s", r if r is not None else "?", sender[:12],
                    printable(reason, 300))

    def _handle(self, envelope: messages.Envelope, data: bytes, round_: messages.Round | None,
                first_attempt: int, rounds: range | None = None) -> bool:
        """Act on one verified message; True for an update of `round_` to collect."""
        msg, sender, job = envelope.message, envelope.sender, self.job
        if getattr(msg, "job", None) != job.id:
            self.drop("other job", f"{type(msg).__name__} for job {getattr(msg, 'job', '?')}")
        elif isinstance(msg, messages.Join):
            self._joined(msg, sender, round_)
        elif isinstance(msg, messages.Update):
            if rounds is not None and msg.round in rounds:
                return True
            if round_ is None or msg.round != round_.round or msg.attempt < first_attempt or rounds is not None:
                self.drop("late", f"update for round {msg.round} (attempt {msg.attempt}) from {sender[:12]}")
            else:
                return True
        elif isinstance(msg, messages.Proposal):
            if not job.spec.miners:
                self.drop("no contest", f"proposal from {sender[:12]}: this job has no miners")
            elif len(job.proposals) >= MAX_PENDING_PROPOSALS:
                self.drop("too many proposals", f"proposal from {sender[:12]}")
            else:
                job.proposals.append((msg, sender))
        elif isinstance(msg, messages.Endorse):
            self._endorsed(msg, sender, data)
        elif sender != self.own_id:
            self.drop("not from a worker", f"{msg.TYPE} message from {sender[:12]}")
        # our own round/head/done messages come back to us: nothing to do
        return False

    def _joined(self, join: messages.Join, sender: str, round_: messages.Round | None) -> None:
        job = self.job
        if self.allowed_workers is not None and sender not in self.allowed_workers:
            self.drop("not allowed", f"join from {sender[:12]} ({join.name})")
            return
        if job.spec.max_examples is not None and join.num_examples > job.spec.max_examples:
            self.drop("too many examples", f"join from {sender[:12]} ({join.name}) claims {join.num_examples} "
                                           f"examples, over the job's max_examples {job.spec.max_examples}")
            return
        if job.spec.secure_aggregation and join.mask_key is None:
            self.drop("no mask key", f"join from {sender[:12]} ({join.name}) without a key for secure aggregation")
            return
        if join.mask_key is not None and not mask_key_is_signed(job.id, sender, join.mask_key, join.mask_sig):
            self.drop("bad mask signature", f"join from {sender[:12]} ({join.name}): mask key not signed by it")
            return
        if sender not in job.workers or job.workers[sender].mask_key != join.mask_key:  # a restarted worker: new key
            job.workers[sender] = join
            job.last_join = time.monotonic()
            self.callbacks.on_worker_joined(sender, join.name, len(job.workers), job.spec.min_workers)
        if round_ is not None:
            # A join during a round comes from a worker that (re)started after the round was announced
            # and so missed it: announce it again (workers ignore a round message they already answered).
            self.publish(round_)

    def _endorsed(self, endorse: messages.Endorse, sender: str, data: bytes) -> None:
        """Record a miner's verdict on one of this job's accepted blocks; keep the signed message when it
        is about the newest block, which the next block links (verify holds each link to that block's CID
        and round). Anything else is a drop, and a block keeps at most MAX_PENDING_PROPOSALS of them."""
        job = self.job
        if self.allowed_miners is not None and sender not in self.allowed_miners:
            self.drop("not allowed", f"endorsement from {sender[:12]}")
            return
        about = next((r for r in reversed(job.result.rounds) if same_cid(endorse.head, r.head)), None)
        if about is None or endorse.round != about.round:
            self.drop("stale endorsement", f"from {sender[:12]} for round {endorse.round}: not of this job's blocks")
            return
        verdicts = job.endorsements.setdefault(endorse.round, {})
        if sender not in verdicts and len(verdicts) >= MAX_PENDING_PROPOSALS:
            self.drop("too many endorsements", f"from {sender[:12]} for round {endorse.round}")
            return
        verdicts[sender] = endorse.verdict
        if same_cid(endorse.head, job.chain.head):
            job.endorse_messages.setdefault(cid_str(parse_cid(endorse.head)), {})[sender] = bytes(data)
        if endorse.verdict != "accepted":
            log.warning("round %d: miner %s disputes block %s: %s", endorse.round, sender[:12], endorse.head,
                        printable(endorse.verdict))
