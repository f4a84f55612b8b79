"""What the long-running roles share: one daemon, one identity, the jobs topic, an inbox loop.

`Peer.run()` subscribes to the jobs topic and hands every pubsub message to `handle` on one thread
(subscriptions read in the background and only queue), until `stop()` (SIGINT/SIGTERM in the CLIs).
`decode` turns raw pubsub data into a verified envelope or drops it with one log line. Workers and
miners are Peers with their own `handle`. Nothing a peer sends ends the loop: an exception while
decoding (`dropped`) or handling (`failed`) one message costs one log line and a count; only
KeyboardInterrupt, SystemExit and their kind pass.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import messages
from .identity import Identity
from .ipfs.pubsub import PubsubMessage, Subscription
from .ipfs.rpc import IPFSClient
from .text import printable

if TYPE_CHECKING:
    from .data import Shard
    from .sources import LocalData
    from .vetting import Policy


def connect(api: str, key: str | None, default_key: str, trust_clients: str | None
            ) -> tuple[IPFSClient, Identity, set[str] | None]:
    """What a role's CLI needs before it starts: its daemon (answering within 10 s), its identity (the
    `key` file, else `default_key` under ~/.grid_ipfs, created on first run) and its trusted clients."""
    from .identity import default_key_path, read_id_list

    identity = Identity.load_or_create(key or default_key_path(default_key))
    client = IPFSClient(api)
    client.wait_ready(timeout=10)
    return client, identity, read_id_list(trust_clients) if trust_clients else None


class Peer:
    """A role process on `client`'s daemon signing with `identity`; subclasses implement `handle`."""

    log = logging.getLogger("grid_ipfs.peer")
    takes_part = "follow"
    """The verb for this role's part in a job, for log lines ("cannot join job J: ...")."""

    def __init__(self, client: IPFSClient, identity: Identity, *, jobs_topic: str = messages.JOBS_TOPIC,
                 trusted_clients: set[str] | None = None, policy: Policy | None = None):
        self.client = client
        self.identity = identity
        self.jobs_topic = jobs_topic
        self.trusted_clients = trusted_clients
        # (owner, job id) of jobs this peer will not take part in (untrusted, unfit data, ...): by owner too,
        # or a stranger announcing a bad job under an honest owner's job id would block that job for good
        self.refused: set[tuple[str, str]] = set()
        # keywords for payloads.model_from_bytes (see load_model); `policy` vets every job's model
        self.model_options: dict = {"policy": policy}
        self.inbox: queue.Queue[PubsubMessage] = queue.Queue()
        self.dropped = 0
        """Messages refused at decode (malformed, oversize, too deep, bad signature, ...) or by a rule."""
        self.failed = 0
        """Messages whose handling raised something the role did not expect (logged, then dropped)."""
        self._stop = threading.Event()
        self._subscriptions: dict[str, Subscription] = {}

    def run(self) -> None:
        self.subscribe(self.jobs_topic)
        self.started()
        try:
            while not self._stop.is_set():
                try:
                    raw = self.inbox.get_nowait()
                except queue.Empty:
                    if self.idle_safely():  # all caught up: deferred work, then wait for the next message
                        continue
                    try:
                        raw = self.inbox.get(timeout=0.2)
                    except queue.Empty:
                        continue
                self.handle_safely(raw)
        finally:
            self.close()

    def serve(self) -> None:
        """`run()` until SIGINT or SIGTERM (the CLIs' main loop)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.run()

    def started(self) -> None:
        """Called once the jobs subscription is live (a place to log what this peer is)."""

    def handle(self, raw: PubsubMessage) -> None:
        raise NotImplementedError

    def handle_safely(self, raw: PubsubMessage) -> None:
        """`handle`, with whatever it raises (but KeyboardInterrupt, SystemExit) logged and counted in
        `failed`: a peer may cost a log line, never the loop."""
        try:
            self.handle(raw)
        except Exception as exc:  # noqa: BLE001 - the one place a role loop survives its own bugs too
            self.failed += 1
            self.log.error("dropped a message on %s from peer %s: handling it failed: %s: %s",
                           printable(raw.topic, 80), printable(raw.sender[-8:]), type(exc).__name__,
                           printable(" ".join(str(exc).split()), 300))

    def idle(self) -> bool:
        """Called whenever every queued message has been handled; True if it did some work. Roles defer
        work here that only the newest of several messages should get (an async job's worker trains on
        the newest head, not on each one announced while it was busy)."""
        return False

    def idle_safely(self) -> bool:
        """`idle`, with what it raises logged and counted in `failed`, as `handle_safely` does."""
        try:
            return self.idle()
        except Exception as exc:  # noqa: BLE001 - as in handle_safely
            self.failed += 1
            self.log.error("deferred work failed: %s: %s", type(exc).__name__,
                           printable(" ".join(str(exc).split()), 300))
            return True

    def stop(self, *_: object) -> None:
        self._stop.set()

    def close(self) -> None:
        for subscription in self._subscriptions.values():
            subscription.close()
        self._subscriptions.clear()

    def subscribe(self, topic: str) -> None:
        """Feed `topic` into the inbox (once per topic); returns when the subscription is live."""
        if topic not in self._subscriptions:
            subscription = self.client.pubsub_subscribe(topic, on_message=self.inbox.put)
            subscription.wait_ready()
            self._subscriptions[topic] = subscription

    def unsubscribe(self, topic: str) -> None:
        subscription = self._subscriptions.pop(topic, None)
        if subscription is not None:
            subscription.close()

    def job_model(self, job: messages.Job, sender: str, data: LocalData, *,
                  check: Callable[[], object] | None = None) -> tuple[object, Shard] | None:
        """The job's model (Keras safe mode) and this peer's examples fitted to its input, if this peer
        can take part in `job`; else None after one log line. The announcer must be its owner, on
        `trusted_clients` if set; `check()` (e.g. the job config) must not raise ValueError; and `data`
        must fit the model's input (read from the vetted config, before Keras loads the model: a folder of
        images is loaded at that size). A job refused for any reason but the first is remembered in
        `refused` (by owner and job id) and never fetched again."""
        if job.owner != sender:
            self.log.warning("ignored job %s: announced by %s but owned by %s", job.job, sender[:12], job.owner[:12])
            return None
        reason = None
        if self.trusted_clients is not None and sender not in self.trusted_clients:
            reason = f"untrusted client {sender[:12]}"
        else:
            try:
                if check is not None:
                    check()
            except ValueError as exc:
                reason = str(exc)
        if reason is None:
            from .data import DataError, check_shard_for_model
            from .payloads import MAX_MODEL_BYTES
            from .vetting import ModelRefused, vet_model

            source = f"model {job.model} of job {job.job}"
            try:  # a refused model (vocabulary, size) is refused for good: its CID names the same bytes
                model_bytes = self.client.cat(job.model, max_size=MAX_MODEL_BYTES)
                # vetted here too (milliseconds, no Keras), so an isolated load never spawns a child for it
                report = vet_model(model_bytes, source=source, policy=self.model_options.get("policy"))
                if report.input_shape is None:
                    raise DataError("models with several inputs are not supported")
                shard = self.fit_data(data, report.input_shape)
                model = self.load_model(model_bytes, source=source, shard=shard)
                check_shard_for_model(*shard, tuple(model.input_shape))
                return model, shard
            except (DataError, ModelRefused) as exc:
                reason = str(exc)
        self.log.warning("cannot %s job %s: %s", self.takes_part, job.job, reason)
        self.refused.add((job.owner, job.job))
        return None

    def fit_data(self, data: LocalData, input_shape: tuple) -> Shard:
        """This peer's examples fitted to a job's model input (DataError when they cannot be). Roles that
        hold examples per job override this to bound what all their jobs hold together."""
        return data.fit_to(input_shape)

    def load_model(self, data: bytes, source: str, shard: Shard):
        """A job's model from its fetched bytes, with `model_options` as keywords of
        `payloads.model_from_bytes`. Roles running jobs isolated override this to load in a child with
        `shard`, this peer's examples fitted to the model."""
        from .payloads import model_from_bytes

        return model_from_bytes(data, source=source, **self.model_options)

    def decode(self, raw: PubsubMessage) -> messages.Envelope | None:
        """The verified message, or None after logging why it was dropped."""
        try:
            return messages.decode(raw.data)
        except messages.MessageError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - decode should say MessageError; whatever it says, drop
            reason = f"{type(exc).__name__}: {exc}"
        self.dropped += 1
        self.log.warning("dropped a message on %s from peer %s: %s", printable(raw.topic, 80),
                         printable(raw.sender[-8:]), printable(reason, 300))
        return None

    def publish(self, message: messages.Message) -> None:
        topic = messages.topic_of(message)
        if not self.client.pubsub_publish(topic, messages.encode(message, self.identity)):
            self.log.warning("nobody subscribed to %s yet; %s not delivered", topic, type(message).__name__)
