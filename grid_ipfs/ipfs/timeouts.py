"""One timeout value for every IPFSClient call, in the manner of `httpx.Timeout`.

Why a value object and a sentinel: `timeout=None` used to mean "the client's default" in some calls
and "no deadline" in others. Now every `timeout` parameter takes the same four forms:

- `DEFAULT` (the sentinel): the client's own timeout, as given to `IPFSClient(timeout=...)`;
- `None`: no limit at all, on any phase of the call;
- a number `s`: the whole call may take `s` seconds (the daemon is told too, so it stops searching);
  no single phase (connect, send, wait for a pooled connection) may take longer;
- a `Timeout`: exactly as given.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields, replace

import httpx

__all__ = ["DEFAULT", "Timeout", "TimeoutTypes", "resolve"]


class _Default(enum.Enum):
    """Type of the `DEFAULT` sentinel: "not given", as opposed to `None`, "no limit"."""

    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.DEFAULT


@dataclass(frozen=True)
class Timeout:
    """Seconds each part of one call may take; `None` in a field means no limit on that part.

    `total` bounds the whole call: it is sent to the daemon as its `timeout` option, checked between
    chunks of a streamed answer, and caps every other field. `connect`, `read`, `write` and `pool` are
    httpx's: `read` is the longest wait for the next bytes of the answer, not for all of them.
    """

    total: float | None = None
    connect: float | None = 5.0
    read: float | None = 60.0
    write: float | None = 60.0
    pool: float | None = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_seconds(getattr(self, f.name), f"Timeout.{f.name}")

    @classmethod
    def unlimited(cls) -> Timeout:
        """No limit on anything (what `timeout=None` means)."""
        return cls(total=None, connect=None, read=None, write=None, pool=None)

    def limited_to(self, seconds: float) -> Timeout:
        """This timeout with the whole call bounded by `seconds` (what `timeout=seconds` means)."""
        return replace(self, total=seconds, read=seconds)

    def phase(self, name: str) -> float | None:
        """The effective limit on one httpx phase: its own, capped by `total`."""
        return _min(getattr(self, name), self.total)

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.phase("connect"), read=self.phase("read"),
                             write=self.phase("write"), pool=self.phase("pool"))

    def daemon_option(self) -> str | None:
        """`total` as the daemon's `timeout` option (`"1500ms"`), or None when there is no total."""
        if self.total is None:
            return None
        return f"{max(1, round(self.total * 1000))}ms"


#: What every `timeout` parameter accepts; see the module docstring.
TimeoutTypes = float | int | None | Timeout | httpx.Timeout | _Default


def resolve(timeout: TimeoutTypes, default: Timeout) -> Timeout:
    """The `Timeout` a call runs under, given its `timeout` argument and the client's `default`."""
    if timeout is DEFAULT:
        return default
    if timeout is None:
        return Timeout.unlimited()
    if isinstance(timeout, Timeout):
        return timeout
    if isinstance(timeout, httpx.Timeout):  # accepted for callers that built one before Timeout existed
        return Timeout(total=None, connect=timeout.connect, read=timeout.read, write=timeout.write,
                       pool=timeout.pool)
    _check_seconds(timeout, "timeout")
    return default.limited_to(float(timeout))


def _check_seconds(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be seconds (a number), None for no limit, a Timeout or DEFAULT; "
                        f"got {value!r}")
    if not 0 < value < math.inf:  # also refuses NaN
        raise ValueError(f"{name} must be a finite number of seconds above 0 (None means no limit); "
                         f"got {value!r}")


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
