"""The one root of grid_ipfs's own exceptions, in the manner of httpx's `HTTPError`.

Every error grid_ipfs raises on purpose (a daemon that does not answer, a peer's malformed message or
block, a refused model, bad data, a job that cannot go on) is a `GridError`, so an application can
catch them all in one clause and let anything else, a bug, propagate. Each family keeps its own
class under it (`IPFSError`, `MessageError`, `ChainError`, `PayloadError`, `DataError`, `JobFailed`,
...) and, where it always was one, its builtin base too (`MessageError` is still a `ValueError`), so
existing `except` clauses keep working.
"""

from __future__ import annotations

__all__ = ["GridError"]


class GridError(Exception):
    """Base of every exception grid_ipfs raises on purpose; see the module docstring."""
