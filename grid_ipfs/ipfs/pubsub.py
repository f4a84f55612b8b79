"""Pubsub subscriptions that survive their daemon going away.

A `Subscription` reads the daemon's `pubsub/sub` stream (JSON lines with multibase `data`, `seqno`
and `topicIDs`) on a background thread and hands each decoded `PubsubMessage` to a callback and/or a
queue you can iterate. When the stream breaks (daemon restarted, connection reset) it logs the
reason and resubscribes with exponential backoff until `close()`.

Pubsub is at-most-once and unordered; nothing here pretends otherwise. Senders publish CIDs and
small JSON; receivers validate everything they get (see grid_ipfs.messages).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from .errors import IPFSError, daemon_error, map_transport_errors
from .multibase import decode_bytes, decode_text, encode_topic
from .timeouts import Timeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PubsubMessage:
    topic: str
    data: bytes
    sender: str  # the publishing daemon's peer ID: shared by every process on that daemon, not an identity
    seqno: bytes


class Subscription:
    """Background subscription to one topic.

    Use either `on_message` (called on the reader thread; keep it quick) or iterate / `get()`:

        with client.pubsub_subscribe("t") as sub:
            sub.wait_ready()
            for msg in sub: ...
    """

    def __init__(self, api: str, topic: str, *, on_message: Callable[[PubsubMessage], None] | None = None,
                 timeout: Timeout | httpx.Timeout | None = None, backoff: tuple[float, float] = (0.2, 5.0),
                 max_queue: int = 10_000):
        """`timeout`: only its `connect` is used (5 s if None); a quiet topic is never a timeout."""
        from .rpc import api_url

        self.api = api
        self.topic = topic
        self._url = api_url(api) + "/api/v0/pubsub/sub"
        self._on_message = on_message
        connect = timeout.connect if timeout is not None else 5.0
        # No read timeout: a quiet topic is not an error.
        self._timeout = httpx.Timeout(connect=connect, read=None, write=connect, pool=connect)
        self._backoff = backoff
        self._queue: queue.Queue[PubsubMessage] = queue.Queue(maxsize=max_queue)
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._http = httpx.Client(timeout=self._timeout)
        self._socket: socket.socket | None = None  # of the open stream, so close() can interrupt a blocked read
        self.reconnects = 0
        self.received = 0
        self.dropped = 0  # malformed stream lines, or a full queue
        self._thread = threading.Thread(target=self._run, name=f"pubsub:{topic}", daemon=True)
        self._thread.start()

    # -- public --------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the daemon has accepted the subscription (raises TimeoutError otherwise)."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"subscription to {self.topic!r} at {self.api} not ready after {timeout}s")

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def get(self, timeout: float | None = None) -> PubsubMessage | None:
        """Next message, or None if none arrived within `timeout` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[PubsubMessage]:
        while not self._closed.is_set():
            msg = self.get(timeout=0.2)
            if msg is not None:
                yield msg

    def close(self) -> None:
        self._closed.set()
        sock = self._socket
        if sock is not None:  # closing the client from this thread would not wake a blocked recv()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._http.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reader thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._closed.is_set():
            try:
                with map_transport_errors(self.api, f"pubsub/sub {self.topic!r}"):
                    self._read_stream()
                reason = "stream ended"
            except IPFSError as exc:
                reason = str(exc)
            except (OSError, RuntimeError) as exc:  # a socket shut by close(); httpx.StreamError
                reason = f"{type(exc).__name__}: {exc}"
            if self._closed.is_set():
                return
            if self._ready.is_set():
                delay = self._backoff[0]
            self._ready.clear()
            self.reconnects += 1
            log.warning("pubsub %r at %s lost (%s); resubscribing in %.1fs", self.topic, self.api, reason, delay)
            if self._closed.wait(delay):
                return
            delay = min(delay * 2, self._backoff[1])

    def _read_stream(self) -> None:
        params = {"arg": encode_topic(self.topic)}
        with self._http.stream("POST", self._url, params=params) as response:
            if response.status_code >= 400:
                raise daemon_error("pubsub/sub", response.status_code, response.read())
            stream = response.extensions.get("network_stream")
            self._socket = stream.get_extra_info("socket") if stream is not None else None
            if self.reconnects:
                log.info("pubsub %r at %s resubscribed", self.topic, self.api)
            self._ready.set()
            for line in _split_lines(response.iter_raw()):
                if self._closed.is_set():
                    return
                self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            doc = json.loads(line)
            if not doc:  # js-ipfs opens the stream with `{}`
                return
            if "Message" in doc and "data" not in doc:  # an error object in the stream
                raise ValueError(doc["Message"])
            topics = [decode_text(t) for t in doc.get("topicIDs") or []]
            msg = PubsubMessage(
                topic=topics[0] if topics else self.topic,
                data=decode_bytes(doc.get("data", "")),
                sender=str(doc.get("from", "")),
                seqno=decode_bytes(doc.get("seqno", "")),
            )
        except (ValueError, TypeError, KeyError) as exc:
            self.dropped += 1
            log.warning("pubsub %r: dropped an undecodable stream line (%s): %.120r", self.topic, exc, line)
            return
        self.received += 1
        if self._on_message is not None:
            try:
                self._on_message(msg)
            except Exception:  # a bad handler must not kill the subscription
                log.exception("pubsub %r: message handler failed", self.topic)
            return
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.dropped += 1
            log.warning("pubsub %r: queue full, dropped a message", self.topic)


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Newline-delimited records from a byte stream, linear in the line length.

    (httpx's `iter_lines` re-scans its whole buffer per chunk: a 900 KiB message took seconds.)
    """
    buffer = bytearray()
    for chunk in chunks:
        start = len(buffer)
        buffer += chunk
        cut = buffer.rfind(b"\n", start)
        if cut < 0:
            continue
        yield from bytes(buffer[:cut]).split(b"\n")
        del buffer[: cut + 1]
    if buffer.strip():
        yield bytes(buffer)
