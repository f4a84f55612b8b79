"""Multibase for the pubsub wire format of Kubo >= 0.11.

Topics go out as `u` + unpadded base64url; `data`, `seqno` and `topicIDs` come back multibase-encoded
(any base the daemon likes, so decoding goes through the multibase prefix, not an assumption).

The common bases are decoded with the standard library: `multiformats.multibase` is generic and
quadratic (13 s for a 200 KB base64url message, measured), which would stall every subscription.
"""

from __future__ import annotations

import base64
import binascii

from multiformats import multibase


def encode_topic(topic: str) -> str:
    return "u" + base64.urlsafe_b64encode(topic.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_bytes(value: str) -> bytes:
    """Decode a multibase string; raises ValueError when it is not one."""
    if not value:
        return b""
    prefix, body = value[0], value[1:]
    try:
        if prefix in "uU":
            return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        if prefix in "mM":
            return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        if prefix in "bB":
            return base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        if prefix == "f":
            return bytes.fromhex(body)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"bad multibase {prefix!r} value: {exc}") from None
    return multibase.decode(value)  # rarer bases (base58btc for seqno, ...) are short


def decode_text(value: str) -> str:
    return decode_bytes(value).decode("utf-8", "replace")
