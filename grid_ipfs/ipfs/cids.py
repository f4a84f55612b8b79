"""CID parsing and comparison.

Daemons print the same CID in different bases (js-ipfs may answer base58btc for a CIDv1 that Kubo
prints in base32), so CIDs are compared parsed, by version-independent content address, never as
strings. Every CID that crosses a trust boundary goes through `parse_cid`, which names the bad value.
"""

from __future__ import annotations

from functools import lru_cache

from multiformats import CID

from .errors import InvalidCID

__all__ = ["CID", "parse_cid", "same_cid", "same_data", "cid_str"]

CACHED_CIDS = 4096
"""CIDs whose parse and text form are remembered. multiformats type-checks every call with
typing_validation: ~140 us a parse or a print here, each failed union member building an error message
and leaving a reference cycle; a round handles the same few dozen CIDs over and over. CIDs are
immutable values, so a bounded cache changes nothing but the cost."""


def parse_cid(value: str | bytes | CID) -> CID:
    """Parse a CID given as a string (any multibase, or a bare CIDv0) or as an existing CID."""
    if isinstance(value, CID):
        return value
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidCID(value, "expected a CID string")
    try:
        return _decoded(value.strip())
    except Exception as exc:  # multiformats raises several unrelated types
        raise InvalidCID(value, str(exc) or type(exc).__name__) from None


@lru_cache(maxsize=CACHED_CIDS)
def _decoded(text: str) -> CID:
    return CID.decode(text)  # an error is raised again each time: lru_cache keeps only results


def same_cid(a: str | CID, b: str | CID) -> bool:
    """True when both name the same content with the same codec (CIDv0 == its CIDv1 twin)."""
    ca, cb = parse_cid(a), parse_cid(b)
    return ca.codec == cb.codec and ca.digest == cb.digest


def same_data(a: object, b: object) -> bool:
    """Deep equality of IPLD data in which links compare with `same_cid` (a CIDv0 equals its CIDv1)."""
    if isinstance(a, CID) or isinstance(b, CID):
        try:
            return same_cid(a, b)  # type: ignore[arg-type]
        except Exception:  # one side is not a CID at all
            return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_data(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_data(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def cid_str(cid: str | CID) -> str:
    """The canonical text form: CIDv0 stays `Qm...`, CIDv1 is printed base32 (`b...`) like Kubo."""
    return _canonical(parse_cid(cid))


@lru_cache(maxsize=CACHED_CIDS)
def _canonical(cid: CID) -> str:  # a CID in another base is equal to this one and prints the same here
    return str(cid) if cid.version == 0 else cid.encode("base32")
