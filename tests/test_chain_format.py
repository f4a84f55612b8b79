"""The chain: block format, append/walk, verification of every kind of tampering, concurrent appends.

Uses an in-memory block store (and a directory-backed one for the multi-process test) that computes
real CIDs, so no daemon is needed.
"""

from __future__ import annotations

import multiprocessing
import struct
from pathlib import Path

import dag_cbor
import numpy as np
import pytest
from multiformats import CID, multihash

from grid_ipfs.aggregate import fedavg
from grid_ipfs.chain import (
    ChainError,
    ChainLog,
    check_signature,
    decode_block,
    encode_block,
    read_head,
    sign_block,
    verify_chain,
    walk,
)
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str, parse_cid
from grid_ipfs.ipfs.errors import NotFound, TooLarge
from grid_ipfs.payloads import weights_to_bytes

OWNER = Identity.generate()
WORKERS = [Identity.generate() for _ in range(3)]


class MemoryStore:
    """A fake IPFS node: objects keyed by multihash, so a CIDv0 and a CIDv1 of the same bytes agree."""

    def __init__(self):
        self.objects: dict[bytes, bytes] = {}

    def _put(self, data: bytes, codec: str) -> CID:
        digest = multihash.digest(data, "sha2-256")
        self.objects[bytes(digest)] = bytes(data)
        return CID("base32", 1, codec, digest)

    def _get(self, cid) -> bytes:
        try:
            return self.objects[bytes(parse_cid(cid).digest)]
        except KeyError:
            raise NotFound(f"{cid_str(cid)} not found") from None

    def block_put(self, data: bytes, *, codec: str = "dag-cbor") -> CID:
        return self._put(data, codec)

    def block_get(self, cid) -> bytes:
        return self._get(cid)

    def cat(self, cid, *, max_size=None, timeout=None) -> bytes:
        data = self._get(cid)
        if max_size is not None and len(data) > max_size:
            raise TooLarge(f"cat {cid}", max_size)
        return data

    def add(self, data: bytes) -> CID:
        return self._put(data, "raw")


class DirObjects:
    """The `objects` mapping of MemoryStore kept in a directory, so several processes share it."""

    def __init__(self, root: Path):
        self.root = root

    def __getitem__(self, key: bytes) -> bytes:
        try:
            return (self.root / key.hex()).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def __setitem__(self, key: bytes, data: bytes) -> None:
        tmp = self.root / f".{key.hex()}.{multiprocessing.current_process().pid}"
        tmp.write_bytes(data)
        tmp.replace(self.root / key.hex())


class DirStore(MemoryStore):
    def __init__(self, root: Path):
        self.objects = DirObjects(root)  # type: ignore[assignment]


def _weights(rng) -> list[np.ndarray]:
    return [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)]


def genesis_fields(store, rng, job="job-1") -> dict:
    return {"job": job, "round": 0, "model": store.add(b"a .keras file"),
            "weights": store.add(weights_to_bytes(_weights(rng))),
            "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": {}}


def round_fields(store, rng, genesis: dict, round_: int) -> dict:
    """A real FedAvg round: three workers' updates and their exact aggregate."""
    updates = []
    for worker in WORKERS:
        weights = _weights(rng)
        updates.append((worker.id, weights, int(rng.integers(10, 100))))
    updates.sort()
    aggregate = fedavg([(w, n) for _, w, n in updates])
    return {"job": genesis["job"], "round": round_, "model": genesis["model"],
            "weights": store.add(weights_to_bytes(aggregate)),
            "aggregation": {"name": "fedavg", "params": {}},
            "updates": [{"worker": wid, "weights": store.add(weights_to_bytes(w)), "num_examples": n,
                         "metrics": {"loss": float(rng.random())}} for wid, w, n in updates],
            "metrics": {"loss": 0.5, "accuracy": np.float32(0.75)}}


def build_chain(store, rounds=3, head_file=None) -> tuple[ChainLog, list[CID]]:
    rng = np.random.default_rng(0)
    log = ChainLog(store, head_file)
    genesis = genesis_fields(store, rng)
    cids = [log.append(genesis, OWNER)]
    for r in range(1, rounds + 1):
        cids.append(log.append(round_fields(store, rng, genesis, r), OWNER))
    return log, cids


def get_block(store, cid) -> dict:
    return decode_block(store.block_get(cid), cid)


def put_raw(store, block: dict) -> CID:
    """Store a block as is (valid layout, whatever its signature)."""
    data, cid = encode_block(block)
    assert store.block_put(data) == cid
    return cid


# -- blocks ----------------------------------------------------------------------------------------------


def test_block_round_trip_with_real_links():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    assert isinstance(block["prev"], CID) and cid_str(block["prev"]) == cid_str(cids[0])
    assert all(isinstance(u["weights"], CID) for u in block["updates"])
    data, cid = encode_block(block)
    assert data == store.block_get(cids[1]) and cid == cids[1]
    assert isinstance(block["metrics"]["accuracy"], float)  # the numpy float32 was normalised
    assert [u["worker"] for u in block["updates"]] == sorted(w.id for w in WORKERS)
    assert check_signature(block)
    assert not check_signature({**block, "round": 2})


def test_decode_block_checks_bytes_against_cid():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    with pytest.raises(ChainError, match="do not hash to its CID"):
        decode_block(store.block_get(cids[1]), cids[0])


def test_decode_refuses_non_canonical_cbor():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=0)
    data = store.block_get(cids[0])
    assert data[0] >> 5 == 5  # a CBOR map; re-encode its header in a longer, non-canonical form
    with pytest.raises(ChainError, match="not canonical dag-cbor"):
        decode_block(bytes([0xB8, data[0] & 0x1F]) + data[1:])


@pytest.mark.parametrize("change, reason", [
    ({"seq": True}, "seq: expected an integer >= 0"),
    ({"extra": 1}, "unexpected field 'extra'"),
    ({"metrics": {"loss": 1}}, r"metrics.loss: expected a finite float, got 1"),
    ({"time": 5}, "time: expected a finite float"),
    ({"weights": "bafy"}, "weights: expected an IPLD link"),
    ({"aggregation": "fedavg"}, "aggregation: expected"),
    ({"aggregation": {"name": "init", "params": {}}}, "'init' is for genesis only"),
    ({"round": 0}, "round 0 is genesis only"),
    ({"signer": "me"}, "signer: not a public id"),
    ({"sig": b"short"}, "sig: expected 64 bytes"),
    ({"job": "a b"}, "bad job id"),
    ({"v": 2}, "unsupported block version 2"),
])
def test_layout_violations_are_named(change, reason):
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = {**get_block(store, cids[1]), **change}
    with pytest.raises(ChainError, match=reason):
        encode_block(block)
    with pytest.raises(ChainError, match=reason):  # and the same bytes are refused when read back
        decode_block(dag_cbor.encode(block))


def test_update_list_must_be_sorted_and_unique():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    for updates in (block["updates"][::-1], [block["updates"][0]] * 2):
        with pytest.raises(ChainError, match="sorted by worker id"):
            encode_block({**block, "updates": updates})


def test_prev_is_required_after_genesis_and_absent_in_it():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    with pytest.raises(ChainError, match="missing field prev"):
        encode_block({k: v for k, v in block.items() if k != "prev"})
    genesis = get_block(store, cids[0])
    with pytest.raises(ChainError, match="genesis \\(seq 0\\) has a prev link"):
        encode_block({**genesis, "prev": cids[1]})


def test_sign_block_refuses_to_sign_a_malformed_block():
    with pytest.raises(ChainError, match="missing field"):
        sign_block({"job": "j", "seq": 0}, OWNER)


# -- log -------------------------------------------------------------------------------------------------


def test_walk_goes_back_from_head_to_genesis_in_order(tmp_path):
    store = MemoryStore()
    head_file = tmp_path / "chain" / "head"
    log, cids = build_chain(store, rounds=3, head_file=head_file)
    assert cid_str(read_head(head_file)) == cid_str(cids[-1]) == head_file.read_text().strip()
    walked = list(walk(store, log.head))
    assert [cid_str(c) for c, _ in walked] == [cid_str(c) for c in reversed(cids)]
    assert [b["seq"] for _, b in walked] == [3, 2, 1, 0]
    assert [b["round"] for _, b in walked] == [3, 2, 1, 0]
    assert "prev" not in walked[-1][1]
    assert {b["signer"] for _, b in walked} == {OWNER.id}


def test_in_memory_head(tmp_path):
    store = MemoryStore()
    log, cids = build_chain(store, rounds=1)
    assert log.head == cids[-1] and log.head_file is None
    assert not list(tmp_path.iterdir())


def test_read_head_absent_and_garbage(tmp_path):
    assert read_head(tmp_path / "none") is None
    (tmp_path / "bad").write_text("not-a-cid\n")
    with pytest.raises(ChainError, match="bad: not a valid CID"):
        read_head(tmp_path / "bad")


def test_append_refuses_another_job_or_model():
    store = MemoryStore()
    log, _ = build_chain(store, rounds=1)
    fields = round_fields(store, np.random.default_rng(1), get_block(store, log.head), 2)
    with pytest.raises(ChainError, match="model .* differs from the head's"):
        log.append({**fields, "model": store.add(b"another model")}, OWNER)
    with pytest.raises(ChainError, match="job 'other' differs"):
        log.append({**fields, "job": "other"}, OWNER)
    with pytest.raises(ChainError, match="sets seq and prev itself"):
        log.append({**fields, "seq": 9}, OWNER)


def test_append_checks_the_cid_the_store_answers():
    class LyingStore(MemoryStore):
        def block_put(self, data, *, codec="dag-cbor"):
            super().block_put(data, codec=codec)
            return self.add(b"something else")

    store = LyingStore()
    log = ChainLog(store, None)
    with pytest.raises(ChainError, match="the store answered CID"):
        log.append(genesis_fields(store, np.random.default_rng(0)), OWNER)
    assert log.head is None


def _append_many(root: str, head_file: str, barrier, count: int) -> None:
    store, me = DirStore(Path(root)), Identity.generate()
    genesis = get_block(store, read_head(head_file))
    barrier.wait()  # both processes start appending together
    for i in range(count):
        ChainLog(store, head_file).append({
            "job": genesis["job"], "round": i + 1, "model": genesis["model"], "weights": genesis["weights"],
            "aggregation": {"name": "fedavg", "params": {}}, "metrics": {"i": float(i)},
            "updates": [{"worker": me.id, "weights": genesis["weights"], "num_examples": 1, "metrics": {}}],
        }, me)


def test_two_processes_appending_end_with_one_line(tmp_path):
    root, head_file = tmp_path / "blocks", tmp_path / "head"
    root.mkdir()
    store = DirStore(root)
    ChainLog(store, head_file).append(genesis_fields(store, np.random.default_rng(0)), OWNER)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(root), str(head_file), barrier, 20)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    blocks = [b for _, b in walk(store, read_head(head_file))]
    assert [b["seq"] for b in blocks] == list(range(40, -1, -1))
    appended = {(b["signer"], b["metrics"]["i"]) for b in blocks[:-1]}
    assert len(appended) == 40 and len({s for s, _ in appended}) == 2  # every append of both is there
    assert verify_chain(store, read_head(head_file), check_objects=False, recompute=False).ok


# -- verify ----------------------------------------------------------------------------------------------


def test_verify_ok():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=3)
    report = verify_chain(store, cid_str(cids[-1]))
    assert report.ok and report.blocks == 4 and report.first_bad is None and report.reason == ""
    assert [c.seq for c in report.checks] == [0, 1, 2, 3] and all(c.ok for c in report.checks)
    assert verify_chain(store, cids[-1], signer=OWNER.id).ok


def test_verify_with_expected_signer():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    other = Identity.generate().id
    report = verify_chain(store, cids[-1], signer=other)
    assert not report.ok and report.first_bad == cids[0]
    assert report.reason == f"block 0 (seq 0): signed by {OWNER.id}, expected {other}"


def _tampered_update(store, block: dict) -> CID:
    """Store a copy of the block's first update with one exponent bit flipped; return its CID."""
    data = bytearray(store.cat(block["updates"][0]["weights"]))
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 3] ^= 0x01  # first float32: scale it by 4 or 1/4
    return store.add(bytes(data))


def _relink(store, cids: list[CID], index: int, forged: CID, identity: Identity | None) -> CID:
    """Rewrite the blocks after `index` to sit on `forged`, re-signed by `identity` (or not at all)."""
    head = forged
    for cid in cids[index + 1:]:
        block = {**get_block(store, cid), "prev": head}
        head = put_raw(store, sign_block(block, identity) if identity else block)
    return head


def test_tampered_update_without_resigning_fails_the_signature():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=3)
    block = get_block(store, cids[2])
    block["updates"][0] = {**block["updates"][0], "weights": _tampered_update(store, block)}
    forged = put_raw(store, block)
    head = _relink(store, cids, 2, forged, None)
    report = verify_chain(store, head)
    assert not report.ok and report.first_bad == forged  # the oldest failure, not the head
    assert report.reason == f"block 2 (seq 2): bad signature from {OWNER.id}"
    assert [c.ok for c in report.checks] == [True, True, False, None]


def test_tampered_update_resigned_by_another_key_fails_the_recomputation():
    store, mallory = MemoryStore(), Identity.generate()
    _, cids = build_chain(store, rounds=3)
    block = get_block(store, cids[2])
    block["updates"][0] = {**block["updates"][0], "weights": _tampered_update(store, block)}
    forged = put_raw(store, sign_block(block, mallory))
    head = _relink(store, cids, 2, forged, mallory)
    report = verify_chain(store, head)
    assert not report.ok and report.first_bad == forged
    assert report.reason == "block 2 (seq 2): weights differ from fedavg of its 3 updates"
    assert verify_chain(store, head, recompute=False).ok  # only the recomputation can tell
    assert verify_chain(store, head, signer=OWNER.id).reason == \
        f"block 2 (seq 2): signed by {mallory.id}, expected {OWNER.id}"


def test_altered_block_bytes_fail_the_hash_check_naming_the_block():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=3)
    block = get_block(store, cids[1])
    store.objects[bytes(cids[1].digest)] = dag_cbor.encode({**block, "metrics": {"loss": 0.01}})
    report = verify_chain(store, cids[-1])
    assert not report.ok and report.first_bad == cids[1] and report.blocks == 3
    assert report.reason == f"block {cid_str(cids[1])} (2 below the head): bytes do not hash to its CID"
    with pytest.raises(ChainError, match="do not hash to its CID"):
        list(walk(store, cids[-1]))


def test_broken_seq_continuity():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=2)
    block = get_block(store, cids[2])
    skipped = put_raw(store, sign_block({**block, "seq": 3, "prev": cids[1]}, OWNER))
    report = verify_chain(store, skipped)
    assert not report.ok and report.first_bad == skipped
    assert report.reason == f"block {cid_str(skipped)} (0 below the head): seq 3 follows seq 1"
    assert report.first_bad_seq == 3 and report.detail == "seq 3 follows seq 1"
    assert report.blocks == 2  # found while walking: nothing below the break is fetched
    with pytest.raises(ChainError, match="has seq 1, expected 2"):
        list(walk(store, skipped))


def test_model_change_along_the_chain():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=2)
    block = get_block(store, cids[2])
    swapped = put_raw(store, sign_block({**block, "model": store.add(b"another model")}, OWNER))
    report = verify_chain(store, swapped)
    assert report.reason == "block 2 (seq 2): model differs from the previous block's"


def test_missing_update_object():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=2)
    missing = get_block(store, cids[1])["updates"][1]
    del store.objects[bytes(missing["weights"].digest)]
    report = verify_chain(store, cids[-1])
    assert report.first_bad == cids[1]
    assert report.reason.startswith(f"block 1 (seq 1): update from {missing['worker']} "
                                    f"{cid_str(missing['weights'])} not retrievable")
    assert verify_chain(store, cids[-1], check_objects=False, recompute=False).ok


def test_missing_block():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=2)
    del store.objects[bytes(cids[0].digest)]
    report = verify_chain(store, cids[-1])
    assert report.first_bad == cids[0] and "cannot be fetched" in report.reason


def test_genesis_may_carry_the_job_config_and_only_genesis():
    store, rng = MemoryStore(), np.random.default_rng(0)
    log = ChainLog(store, None)
    config = {"epochs": 2, "batch_size": 32, "rounds": 3, "val_split": 0.1}
    genesis = genesis_fields(store, rng)
    first = log.append({**genesis, "config": config}, OWNER)
    assert get_block(store, first)["config"] == config
    with pytest.raises(ChainError, match="config at seq 1: the job's config lives in genesis only"):
        log.append({**round_fields(store, rng, genesis, 1), "config": config}, OWNER)
