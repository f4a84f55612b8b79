"""Typed errors for everything that talks to an IPFS daemon.

Callers catch the narrowest class they can act on: `DaemonUnreachable` (start it, or retry later),
`IPFSTimeout` (the content may not exist anywhere), `NotFound`, `TooLarge` (refused before reading it
whole), `DaemonError` (the daemon answered with an error of its own; its message is kept verbatim).

Two functions decide which class a failure becomes, so the whole layer agrees: `map_transport_errors`
for what httpx raises (one table, `TRANSPORT_ERRORS`) and `daemon_error` for an HTTP error answer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx

from ..errors import GridError

if TYPE_CHECKING:
    from .timeouts import Timeout


class IPFSError(GridError):
    """Base class of every transport error."""


class DaemonUnreachable(IPFSError):
    """Nothing answers at the API address (not started, crashed, wrong port)."""

    def __init__(self, api: str, reason: str = ""):
        self.api = api
        super().__init__(f"IPFS daemon unreachable at {api}" + (f": {reason}" if reason else ""))


class IPFSTimeout(IPFSError):
    """The daemon did not answer in time (for `cat`: often, nobody has the content)."""


class NotFound(IPFSError):
    """The daemon says the object, pin or key does not exist."""


class TooLarge(IPFSError):
    """A payload exceeded its size limit; reading stopped before it was taken whole."""

    def __init__(self, what: str, limit: int):
        self.limit = limit
        super().__init__(f"{what} exceeds the limit of {limit} bytes")


class DaemonError(IPFSError):
    """The daemon answered with an error; `message` is the daemon's own text."""

    def __init__(self, endpoint: str, status: int, message: str, code: int | None = None):
        self.endpoint = endpoint
        self.status = status
        self.message = message
        self.code = code
        super().__init__(f"{endpoint}: HTTP {status}: {message}")


class InvalidCID(IPFSError, ValueError):
    """A string that should be a CID does not parse; the error names the string."""

    def __init__(self, value: object, reason: str = ""):
        self.value = value
        shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
        super().__init__(f"not a valid CID: {shown}" + (f" ({reason})" if reason else ""))


# -- httpx failures -> these classes -----------------------------------------------------------------

#: The one table: every httpx error class -> the one class above it becomes. A raised class is looked
#: up along its MRO, so one httpx adds later lands where its nearest listed base does.
TRANSPORT_ERRORS: dict[type[Exception], type[IPFSError]] = {
    httpx.ConnectTimeout: DaemonUnreachable,  # nothing accepted the connection in time: not there
    httpx.ReadTimeout: IPFSTimeout,  # connected, but the answer did not come in time
    httpx.WriteTimeout: IPFSTimeout,
    httpx.PoolTimeout: IPFSTimeout,  # every pooled connection stayed busy
    httpx.TimeoutException: IPFSTimeout,
    httpx.ConnectError: DaemonUnreachable,  # refused, no route, unknown host
    httpx.ReadError: DaemonUnreachable,  # connection reset: the daemon died or restarted mid-answer
    httpx.WriteError: DaemonUnreachable,
    httpx.CloseError: DaemonUnreachable,
    httpx.NetworkError: DaemonUnreachable,
    httpx.RemoteProtocolError: DaemonUnreachable,  # hung up without an answer, or not HTTP on that port
    httpx.LocalProtocolError: IPFSError,  # our request could not be sent as HTTP: not the daemon's fault
    httpx.ProtocolError: DaemonUnreachable,
    httpx.ProxyError: DaemonUnreachable,
    httpx.UnsupportedProtocol: DaemonUnreachable,  # the API address names no HTTP URL
    httpx.TransportError: DaemonUnreachable,
    httpx.DecodingError: IPFSError,  # an answer whose content-encoding does not decode
    httpx.TooManyRedirects: IPFSError,
    httpx.RequestError: IPFSError,
    httpx.HTTPStatusError: DaemonError,
    httpx.HTTPError: IPFSError,
    httpx.InvalidURL: IPFSError,  # not an HTTPError in httpx, but raised by the same calls
}
# httpx.StreamError (reading a body twice...) and CookieConflict are bugs of ours: they propagate.

_TIMEOUT_PHASES = {httpx.ConnectTimeout: ("connect", "no connection"), httpx.ReadTimeout: ("read", "no answer"),
                   httpx.WriteTimeout: ("write", "request not sent"), httpx.PoolTimeout: ("pool", "no free connection")}


def transport_error_class(exc_type: type[BaseException]) -> type[IPFSError]:
    """The class `TRANSPORT_ERRORS` maps `exc_type` to (KeyError for one that is not httpx's)."""
    for cls in exc_type.__mro__:
        if cls in TRANSPORT_ERRORS:
            return TRANSPORT_ERRORS[cls]
    raise KeyError(exc_type)


def translate(exc: Exception, *, api: str, what: str, timeout: Timeout | None = None) -> IPFSError:
    """The grid error, with a one-line message naming `what` failed, for an httpx failure."""
    target = transport_error_class(type(exc))
    detail = _describe(exc, timeout)
    if target is DaemonUnreachable:
        return DaemonUnreachable(api, f"{what}: {detail}")
    if target is DaemonError and isinstance(exc, httpx.HTTPStatusError):
        return DaemonError(what, exc.response.status_code, _one_line(str(exc)))
    return target(f"{what}: {detail}")


@contextlib.contextmanager
def map_transport_errors(api: str, what: str, timeout: Timeout | None = None) -> Iterator[None]:
    """Raise every httpx failure inside the block as its `TRANSPORT_ERRORS` class (see `translate`)."""
    try:
        yield
    except tuple(TRANSPORT_ERRORS) as exc:
        raise translate(exc, api=api, what=what, timeout=timeout) from None


def _describe(exc: Exception, timeout: Timeout | None) -> str:
    name = type(exc).__name__
    for cls, (phase, wording) in _TIMEOUT_PHASES.items():
        if isinstance(exc, cls):
            seconds = timeout.phase(phase) if timeout is not None else None
            return f"{wording} within {seconds:g}s ({name})" if seconds is not None else f"{wording} ({name})"
    text = _one_line(str(exc))
    return f"{name}: {text}" if text else name


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- an HTTP error answer -> these classes -----------------------------------------------------------

# Substrings of daemon error messages that mean "does not exist" (Kubo and js-ipfs word it differently).
_NOT_FOUND_HINTS = ("not found", "no link named", "not pinned", "does not exist", "could not resolve")
_TIMEOUT_HINTS = ("timeout", "timed out", "deadline exceeded")


def daemon_error(endpoint: str, status: int, body: bytes) -> IPFSError:
    """The error for a daemon's HTTP >= 400 answer: NotFound, IPFSTimeout or DaemonError, by its text."""
    text = body.decode("utf-8", "replace").strip()
    message, code = text, None
    try:
        doc = json.loads(text)
        message, code = str(doc.get("Message", text)), doc.get("Code")
    except (ValueError, AttributeError):
        pass
    if status == 404 and not message:
        message = "endpoint not found (daemon too old, or not an IPFS RPC API?)"
    if any(hint in message.lower() for hint in _NOT_FOUND_HINTS):
        return NotFound(f"{endpoint}: {message}")
    if any(hint in message.lower() for hint in _TIMEOUT_HINTS):
        return IPFSTimeout(f"{endpoint}: {message}")
    return DaemonError(endpoint, status, message, code)
