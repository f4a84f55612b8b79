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


def _hidden(char: str) -> bool:
    """What `printable` escapes: every other (C*) and separator (Z*) character but the space, so also
    unassigned and private-use code points and look-alike spaces (no-break, em, ideographic)."""
    return char != " " and unicodedata.category(char)[0] in "CZ"


def control_character(text: str) -> str | None:
    """The first control or format character of `text` as an escape (e.g. `\\x1b`), or None."""
    for char in text:
        if _bad(char):
            return _escape(char)
    return None


def printable(value: object, limit: int = 200) -> str:
    """`value` as one line of plain text of at most `limit` characters (escapes included): control,
    format and separator characters but the space escaped, the rest cut with "..." (a name or reason,
    never a paragraph). The cut falls between characters, never inside an escape."""
    text = value if isinstance(value, str) else _str(value)
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = _escape(char) if _hidden(char) else char
        if size + len(piece) > limit:
            while pieces and size + 3 > limit:
                size -= len(pieces.pop())
            return "".join(pieces) + "..."
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _str(value: object) -> str:
    """str(value); for an int too long for str() (over 4300 digits: ValueError) its size instead."""
    try:
        return str(value)
    except ValueError:
        if isinstance(value, int):
            return f"<an integer of {value.bit_length()} bits>"
        raise


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


__all__ = ["control_character", "printable"]
