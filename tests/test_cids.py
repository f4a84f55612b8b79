"""CID parsing and printing (`grid_ipfs.ipfs.cids`): pure logic, no daemon."""

from __future__ import annotations

import pytest
from multiformats import CID, multihash

from grid_ipfs.ipfs import InvalidCID, cid_str, cids, parse_cid, same_cid

DIGEST = multihash.digest(b"grid_ipfs", "sha2-256")
V1 = CID("base32", 1, "dag-pb", DIGEST)


def test_a_cid_in_any_base_or_version_prints_and_compares_as_one():
    v0 = str(CID("base58btc", 0, "dag-pb", DIGEST))
    base58 = V1.encode("base58btc")
    assert cid_str(v0) == v0 and cid_str(base58) == cid_str(V1) == str(V1)
    assert same_cid(v0, base58) and same_cid(V1, v0)
    assert not same_cid(V1, CID("base32", 1, "raw", DIGEST))


def test_remembered_parses_change_nothing_but_the_cost():
    """Parses and text forms are cached (multiformats type-checks each call at ~140 us): the cache is
    bounded, hands back the same value, and a bad string is refused every time, not remembered."""
    assert cids._decoded.cache_info().maxsize == cids.CACHED_CIDS
    text = V1.encode("base58btc")
    assert parse_cid(text) is parse_cid(text) and parse_cid(text) == V1
    for _ in range(2):
        with pytest.raises(InvalidCID, match="not a valid CID: 'bafyNOT'"):
            parse_cid("bafyNOT")
    for i in range(cids.CACHED_CIDS + 10):  # a flood of distinct CIDs evicts, never grows the cache
        parse_cid(CID("base32", 1, "raw", multihash.digest(str(i).encode(), "sha2-256")).encode("base32"))
    assert cids._decoded.cache_info().currsize <= cids.CACHED_CIDS
