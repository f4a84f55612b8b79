"""Typed errors for everything that talks to an IPFS daemon.

Callers catch the narrowest class they can act on: `DaemonUnreachable` (start it, or retry later),
`IPFSTimeout` (the content may not exist anywhere), `NotFound`, `TooLarge` (refused before reading it
whole), `DaemonError` (the daemon answered with an error of its own; its message is kept verbatim).
"""

from __future__ import annotations

from ..errors import GridError


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
