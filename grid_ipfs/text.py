"""Text from peers is data: what a role logs or shows of a peer's string cannot move the cursor, colour
the terminal, start a forged line or reverse the text around it.

`printable` is for log lines (names, reasons, verdicts, metric names, exception text that may quote a
peer): control and format characters become visible escapes (`\\n`, `\\x1b`, `\\u202e`) and the text is
cut to a length. `control_character` finds the first such character, for decoders that refuse them.
Rich markup is escaped separately where rich prints (`grid_ipfs.progress`): `[` is printable text.
"""

from __future__ import annotations

import unicodedata

_UNPRINTABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
"""Control characters (C0, DEL, C1: newlines, ANSI escapes), format characters (bidi overrides,
zero-width joiners), lone surrogates, and the Unicode line and paragraph separators."""


def _bad(char: str) -> bool:
    return unicodedata.category(char) in _UNPRINTABLE


def control_character(text: str) -> str | None:
    """The first control or format character of `text` as an escape (e.g. `\\x1b`), or None."""
    for char in text:
        if _bad(char):
            return _escape(char)
    return None


def printable(value: object, limit: int = 200) -> str:
    """`value` as one line of plain text of at most `limit` characters (escapes included): control and
    format characters escaped, the rest cut with "..." (a name or reason, never a paragraph)."""
    text = value if isinstance(value, str) else str(value)
    out = "".join(_escape(c) if _bad(c) else c for c in text[:limit + 1])
    return out if len(out) <= limit else out[:max(0, limit - 3)] + "..."


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


__all__ = ["control_character", "printable"]
