"""What the long-running roles share: one daemon, one identity, the jobs topic, an inbox loop.

`Peer.run()` subscribes to the jobs topic and hands every pubsub message to `handle` on one thread
(subscriptions read in the background and only queue), until `stop()` (SIGINT/SIGTERM in the CLIs).
`decode` turns raw pubsub data into a verified envelope or drops it with one log line. Workers and
miners are Peers with their own `handle`.
"""

from __future__ import annotations

import logging
import queue
import threading

from . import messages
from .identity import Identity
from .ipfs.pubsub import PubsubMessage, Subscription
from .ipfs.rpc import IPFSClient


class Peer:
    """A role process on `client`'s daemon signing with `identity`; subclasses implement `handle`."""

    log = logging.getLogger("grid_ipfs.peer")

    def __init__(self, client: IPFSClient, identity: Identity, *, jobs_topic: str = messages.JOBS_TOPIC):
        self.client = client
        self.identity = identity
        self.jobs_topic = jobs_topic
        self.inbox: queue.Queue[PubsubMessage] = queue.Queue()
        self.dropped = 0
        self._stop = threading.Event()
        self._subscriptions: dict[str, Subscription] = {}

    def run(self) -> None:
        self.subscribe(self.jobs_topic)
        self.started()
        try:
            while not self._stop.is_set():
                try:
                    raw = self.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                self.handle(raw)
        finally:
            self.close()

    def started(self) -> None:
        """Called once the jobs subscription is live (a place to log what this peer is)."""

    def handle(self, raw: PubsubMessage) -> None:
        raise NotImplementedError

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

    def decode(self, raw: PubsubMessage) -> messages.Envelope | None:
        """The verified message, or None after logging why it was dropped."""
        try:
            return messages.decode(raw.data)
        except messages.MessageError as exc:
            self.dropped += 1
            self.log.warning("dropped a message on %s from peer %s: %s", raw.topic, raw.sender[-8:], exc)
            return None

    def publish(self, message: messages.Message) -> None:
        topic = messages.topic_of(message)
        if not self.client.pubsub_publish(topic, messages.encode(message, self.identity)):
            self.log.warning("nobody subscribed to %s yet; %s not delivered", topic, type(message).__name__)
