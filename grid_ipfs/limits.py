"""Bounds on what a peer can make us parse or count: JSON nesting, example counts, job sizes.

Lowest layer (no grid_ipfs imports): messages, payloads, aggregation and the roles all take their
limits from here, so a number has one ceiling wherever it flows.

Why nesting is checked before parsing: `json.loads` and `json.dumps` recurse once per level, so ~60 KB
of `[[[[...` raises `RecursionError` (not a `ValueError`) from inside the parser. `json_depth` measures
the nesting of JSON text with a regular expression and a cumulative sum, without recursion, so a decoder
can refuse the text with a reason before `json.loads` sees it; `object_depth_over` does the same for
Python objects about to be serialised.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in JSON from a peer (our messages are 2-3 deep)."""

MAX_NUM_EXAMPLES = 2 ** 53
"""Largest `num_examples` a peer may state: every count up to it is exact as a float64, and a sum of a
round's counts times any finite weight stays finite (no OverflowError in FedAvg)."""

MAX_STALENESS = 1 << 20
"""Largest staleness (blocks between an update's base and the block it lands in) a peer or a block may
state; a job's own bound (`--max-staleness`) is far below."""

MAX_COUNT = 10 ** 6
"""Ceiling on a job's rounds, epochs and batch size and on a round's number and attempt in messages:
far above any real job, far below anything that overflows a seed, a loop or a float."""

# A JSON string: quote, then runs of plain characters and escapes; an unterminated one runs to the end.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def json_depth(text: str | bytes) -> int:
    """How deeply arrays and objects nest in JSON `text` (0 for a scalar), brackets inside strings
    ignored; linear time, no recursion. Malformed text gets a number too: the parser refuses it later."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    skeleton = np.frombuffer(_STRING.sub("", text).encode("utf-8"), np.uint8)
    steps = np.isin(skeleton, _OPEN).astype(np.int64) - np.isin(skeleton, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def json_too_deep(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> int | None:
    """`json_depth(text)` when it is over `limit`, else None; text with at most `limit` opening brackets
    cannot be too deep, so ordinary messages skip the scan (a count is ~1 us, the scan ~100 us)."""
    opening = text.count(b"[") + text.count(b"{") if isinstance(text, bytes) else text.count("[") + text.count("{")
    if opening <= limit:
        return None
    depth = json_depth(text)
    return depth if depth > limit else None


def object_depth_over(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether dicts, lists and tuples in `obj` nest deeper than `limit` (the top level is 1). Iterative,
    and it stops at the first container past the limit, so a cycle or a 10^5-deep list costs nothing."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return False


def number_problem(value: object, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
                   high_open: bool = False) -> str | None:
    """The one check of a number from a peer, a config or a user: None if `value` is a finite real
    number (a bool is not one) within [low, high] (either end open on request), else why, as
    "must be a finite number >= 0" or "must be a finite number in (0, 1]"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return "must be a number"
    try:
        v = float(value)
    except OverflowError:  # an int beyond any float
        v = math.inf
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if ok:
        return None
    if high == math.inf:
        return f"must be a finite number {'>' if low_open else '>='} {low:g}"
    return f"must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(value: object, name: str, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a float, or ValueError "NAME must be a finite number ..., got VALUE" (see `number_problem`)."""
    problem = number_problem(value, low, high, low_open=low_open, high_open=high_open)
    if problem is not None:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else "a huge integer"
        raise ValueError(f"{name} {problem}, got {shown[:40]}")
    return float(value)


__all__ = ["MAX_COUNT", "MAX_JSON_DEPTH", "MAX_NUM_EXAMPLES", "check_number", "json_depth", "json_too_deep",
           "number_problem", "object_depth_over"]
