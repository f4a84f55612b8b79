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

from grid_ipfs import messages
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
MESSAGE = CID("base32", 1, "raw", multihash.digest(b"msg", "sha2-256"))
"""Where a version 2 update entry's signed message would be, for blocks whose messages are never read."""


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

    def cat(self, cid, *, max_size=None, timeout=None, sink=None) -> bytes:
        data = self._get(cid)
        if max_size is not None and len(data) > max_size:
            raise TooLarge(f"cat {cid}", max_size)
        if sink is None:
            return data
        sink(data)
        return b""

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


def signed_update(store, worker: Identity, *, job: str, round_: int, head, base, weights, num_examples: int,
                  metrics: dict, attempt: int = 1, eval_metrics: dict | None = None) -> CID:
    """A worker's update message, signed and stored as a raw block as the client stores it: what a
    version 2 block's update entry links (its metrics: `contributions.entry_metrics` of the message)."""
    data = messages.encode(messages.Update(job=job, round=round_, weights=cid_str(weights), num_examples=num_examples,
                                           metrics=metrics, eval_metrics=eval_metrics or {}, attempt=attempt,
                                           head=cid_str(head),
                                           base=cid_str(base)), worker)
    return store.block_put(data, codec="raw")


def round_fields(store, rng, genesis: dict, round_: int, log: ChainLog | None = None) -> dict:
    """A real FedAvg round: three workers' updates, signed against `log`'s head and its weights, and their
    exact aggregate. Without `log` the updates name the genesis weights as both head and base: a block
    that will not verify (for tests of other refusals)."""
    head = log.head if log is not None else genesis["weights"]
    base = decode_block(store.block_get(head), head)["weights"] if log is not None else genesis["weights"]
    updates = []
    for worker in WORKERS:
        weights = _weights(rng)
        updates.append((worker.id, weights, int(rng.integers(10, 100)), worker))
    updates.sort(key=lambda u: u[0])
    aggregate = fedavg([(w, n) for _, w, n, _ in updates])
    entries = []
    for wid, w, n, worker in updates:
        cid, metrics = store.add(weights_to_bytes(w)), {"loss": float(rng.random())}
        entries.append({"worker": wid, "weights": cid, "num_examples": n, "metrics": metrics,
                        "message": signed_update(store, worker, job=genesis["job"], round_=round_, head=head,
                                                 base=base, weights=cid, num_examples=n, metrics=metrics)})
    return {"job": genesis["job"], "round": round_, "model": genesis["model"],
            "weights": store.add(weights_to_bytes(aggregate)),
            "aggregation": {"name": "fedavg", "params": {}},
            "updates": entries,
            "metrics": {"loss": 0.5, "accuracy": np.float32(0.75)}}


def build_chain(store, rounds=3, head_file=None) -> tuple[ChainLog, list[CID]]:
    rng = np.random.default_rng(0)
    log = ChainLog(store, head_file)
    genesis = genesis_fields(store, rng)
    cids = [log.append(genesis, OWNER)]
    for r in range(1, rounds + 1):
        cids.append(log.append(round_fields(store, rng, genesis, r, log), OWNER))
    return log, cids


def get_block(store, cid) -> dict:
    return decode_block(store.block_get(cid), cid)


def v1_block(fields: dict, identity: Identity) -> dict:
    """`fields` as a version 1 block (update entries without `message`), signed by `identity` as
    version 1 writers signed: over the dag-cbor encoding of the block without `sig`."""
    unsigned = {k: v for k, v in fields.items() if k != "sig"}
    unsigned.update(v=1, signer=identity.id,
                    updates=[{k: v for k, v in u.items() if k != "message"} for u in unsigned["updates"]])
    return {**unsigned, "sig": identity.sign(dag_cbor.encode(unsigned))}


def resign(block: dict, identity: Identity) -> dict:
    """`block` signed by `identity` in its own version (what a forger who keeps the format does)."""
    return v1_block(block, identity) if block["v"] == 1 else sign_block(block, identity)


def build_v1_chain(store, rounds=3) -> list[CID]:
    """`build_chain`'s chain as version 1 wrote it (no signed messages); its CIDs, genesis first."""
    cids: list[CID] = []
    for cid in build_chain(store, rounds)[1]:
        block = get_block(store, cid)
        if cids:
            block["prev"] = cids[-1]
        cids.append(put_raw(store, v1_block(block, OWNER)))
    return cids


def put_raw(store, block: dict) -> CID:
    """Store a block as is (valid layout, whatever its signature)."""
    data, cid = encode_block(block)
    assert store.block_put(data) == cid
    return cid


def test_require_proof_fails_the_first_block_without_signed_updates():
    store = MemoryStore()
    cids = build_v1_chain(store, rounds=2)
    assert verify_chain(store, cids[-1]).unproven == 2
    report = verify_chain(store, cids[-1], require_proof=True)
    assert not report.ok and report.first_bad == cids[1]
    assert report.reason == ("block 1 (seq 1): block version 1: its updates carry no signed messages "
                             "(contributions unproven, and proof is required)")
    assert verify_chain(store, build_chain(store, rounds=2)[1][-1], require_proof=True).ok


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
    ({"v": 3}, "unsupported block version 3"),
    ({"v": True}, "unsupported block version True"),
    ({"v": 1}, r"updates\[0\]: expected exactly .* \(block version 1\)"),
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


def test_the_log_reads_the_block_it_appended_last_from_memory():
    """The next append's parent, which is also the head the owner's round extends, is the block this log
    stored last: read (and checked) from the bytes it put, with no block_get; any other from the store."""
    class CountingStore(MemoryStore):
        gets = 0

        def block_get(self, cid) -> bytes:
            self.gets += 1
            return super().block_get(cid)

    store = CountingStore()
    log, cids = build_chain(store, rounds=2)
    fields = round_fields(store, np.random.default_rng(1), get_block(store, cids[0]), 3, log)
    store.gets = 0
    assert log.read(log.head) == get_block(store, log.head) and store.gets == 1  # get_block's own read
    head = log.append(fields, OWNER)
    assert store.gets == 1 and log.read(head)["seq"] == 3 and store.gets == 1
    assert log.read(cids[0])["seq"] == 0 and store.gets == 2


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
            "updates": [{"worker": me.id, "weights": genesis["weights"], "num_examples": 1, "metrics": {},
                         "message": MESSAGE}],
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
        head = put_raw(store, resign(block, identity) if identity else block)
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
    """On a version 1 chain (no signed messages) only the recomputation can tell."""
    store, mallory = MemoryStore(), Identity.generate()
    cids = build_v1_chain(store, rounds=3)
    block = get_block(store, cids[2])
    block["updates"][0] = {**block["updates"][0], "weights": _tampered_update(store, block)}
    forged = put_raw(store, v1_block(block, mallory))
    head = _relink(store, cids, 2, forged, mallory)
    report = verify_chain(store, head)
    assert not report.ok and report.first_bad == forged
    assert report.reason == "block 2 (seq 2): weights differ from fedavg of its 3 updates"
    assert verify_chain(store, head, recompute=False).ok  # only the recomputation can tell
    assert verify_chain(store, head, signer=OWNER.id).reason == \
        f"block 2 (seq 2): signed by {mallory.id}, expected {OWNER.id}"


def test_tampered_update_resigned_by_another_key_contradicts_the_workers_message():
    """On a version 2 chain the worker's own signed message tells too, without recomputing anything."""
    store, mallory = MemoryStore(), Identity.generate()
    _, cids = build_chain(store, rounds=3)
    block = get_block(store, cids[2])
    entry = block["updates"][0]
    tampered = _tampered_update(store, block)
    block["updates"][0] = {**entry, "weights": tampered}
    forged = put_raw(store, sign_block(block, mallory))
    head = _relink(store, cids, 2, forged, mallory)
    named = (f"block 2 (seq 2): update of {entry['worker']}: its message sent weights "
             f"{cid_str(entry['weights'])}, the block records {cid_str(tampered)}")
    for recompute in (True, False):  # the messages are checked before any weights are fetched
        report = verify_chain(store, head, recompute=recompute)
        assert not report.ok and report.first_bad == forged and report.reason == named
    assert verify_chain(store, head, check_objects=False, recompute=False).ok  # the messages are objects too


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


# -- signed contributions (block version 2) ----------------------------------------------------------------


def _reaggregated(store, block: dict, updates: list[dict]) -> dict:
    """`block` with `updates` and their exact fedavg as its weights: a forgery the recomputation passes."""
    from grid_ipfs.payloads import weights_from_bytes

    aggregate = fedavg([(weights_from_bytes(store.cat(u["weights"])), u["num_examples"]) for u in updates])
    return {**block, "updates": updates, "weights": store.add(weights_to_bytes(aggregate))}


def test_an_owner_crediting_a_worker_with_weights_it_never_sent_is_named():
    """The owner re-signs round 2 crediting a genuine worker's id with made-up weights, aggregated
    correctly: the recomputation passes, the worker's own signed message does not."""
    store, rng = MemoryStore(), np.random.default_rng(7)
    _, cids = build_chain(store, rounds=3)
    block = get_block(store, cids[2])
    entry = block["updates"][1]
    made_up = store.add(weights_to_bytes(_weights(rng)))
    updates = [dict(u) for u in block["updates"]]
    updates[1]["weights"] = made_up
    forged = put_raw(store, sign_block(_reaggregated(store, block, updates), OWNER))
    report = verify_chain(store, forged, signer=OWNER.id)
    assert not report.ok and report.first_bad == forged
    assert report.reason == (f"block 2 (seq 2): update of {entry['worker']}: its message sent weights "
                             f"{cid_str(entry['weights'])}, the block records {cid_str(made_up)}")
    # the same forgery on a version 1 chain is undetectable: verify passes, its rounds counted unproven
    v1 = build_v1_chain(store, rounds=2)
    old = get_block(store, v1[2])
    updates = [dict(u) for u in old["updates"]]
    updates[1]["weights"] = made_up
    unproven = put_raw(store, v1_block(_reaggregated(store, old, updates), OWNER))
    report = verify_chain(store, unproven, signer=OWNER.id)
    assert report.ok and report.unproven == 2, report.reason


def test_a_workers_message_replayed_into_another_job_is_refused():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    original = get_block(store, cids[1])
    other = ChainLog(store, None)
    genesis = genesis_fields(store, np.random.default_rng(0), job="job-2")  # the same weights, another job
    other.append(genesis, OWNER)
    replayed = other.append({key: original[key] for key in ("round", "model", "weights", "aggregation",
                                                             "updates", "metrics")} | {"job": "job-2"}, OWNER)
    report = verify_chain(store, replayed)
    worker = original["updates"][0]["worker"]
    assert not report.ok and report.first_bad == replayed
    assert report.reason == (f"block 1 (seq 1): update of {worker}: its message is for round 1 of job 'job-1', "
                             "not round 1 of 'job-2'")


def test_a_workers_message_replayed_under_another_head_is_refused():
    """The owner forks the job: a second genesis and a round 1 that reuses the updates signed against the
    first. And a round-2 block whose messages were signed against an older head (genesis), or from other
    base weights than the previous accepted block's."""
    store = MemoryStore()
    log, cids = build_chain(store, rounds=1)
    original = get_block(store, cids[1])
    fork = ChainLog(store, None)
    forked = fork.append({**genesis_fields(store, np.random.default_rng(0)), "time": 2.0}, OWNER)  # a 2nd genesis
    replayed = fork.append({key: original[key] for key in ("job", "round", "model", "weights", "aggregation",
                                                           "updates", "metrics")}, OWNER)
    worker = original["updates"][0]["worker"]
    report = verify_chain(store, replayed)
    assert not report.ok and report.first_bad == replayed
    assert report.reason == (f"block 1 (seq 1): update of {worker}: its message extends head {cid_str(cids[0])}, "
                             f"not this block's prev {cid_str(forked)}")
    genesis = get_block(store, cids[0])
    stale = ChainLog(store, None)
    stale._head = cids[0]  # the workers signed round 2 against genesis, an older head
    later = log.append(round_fields(store, np.random.default_rng(1), genesis, 2, stale), OWNER)
    report = verify_chain(store, later)
    assert not report.ok and report.first_bad == later
    worker = get_block(store, later)["updates"][0]["worker"]
    assert report.reason == (f"block 2 (seq 2): update of {worker}: its message extends head {cid_str(cids[0])}, "
                             f"not this block's prev {cid_str(cids[1])}")
    log._head = cids[1]
    unbased = round_fields(store, np.random.default_rng(1), genesis, 2)  # head right below, base genesis'
    for entry in unbased["updates"]:
        worker = next(w for w in WORKERS if w.id == entry["worker"])
        entry["message"] = signed_update(store, worker, job="job-1", round_=2, head=cids[1], base=genesis["weights"],
                                         weights=entry["weights"], num_examples=entry["num_examples"],
                                         metrics=entry["metrics"])
    wrong_base = log.append(unbased, OWNER)
    report = verify_chain(store, wrong_base)
    assert not report.ok and report.first_bad == wrong_base
    assert report.reason == (f"block 2 (seq 2): update of {unbased['updates'][0]['worker']}: its message trained "
                             f"from {cid_str(genesis['weights'])}, not the previous global weights "
                             f"{cid_str(original['weights'])}")


def test_a_message_not_signed_by_the_entrys_worker_is_refused():
    store, mallory = MemoryStore(), Identity.generate()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    genesis = get_block(store, cids[0])
    entry = block["updates"][0]
    updates = [dict(u) for u in block["updates"]]
    updates[0]["message"] = signed_update(store, mallory, job="job-1", round_=1, head=cids[0],
                                          base=genesis["weights"], weights=entry["weights"],
                                          num_examples=entry["num_examples"], metrics=entry["metrics"])
    forged = put_raw(store, sign_block({**block, "updates": updates}, OWNER))
    report = verify_chain(store, forged)
    assert not report.ok and report.first_bad == forged
    assert report.reason == f"block 1 (seq 1): update of {entry['worker']}: its message is signed by {mallory.id}"
    # another worker's genuine message, credited to this one: the same
    updates[0]["message"] = block["updates"][1]["message"]
    forged = put_raw(store, sign_block({**block, "updates": updates}, OWNER))
    assert verify_chain(store, forged).reason == (f"block 1 (seq 1): update of {entry['worker']}: its message is "
                                                  f"signed by {block['updates'][1]['worker']}")
    # the genuine message with one byte changed: its signature breaks
    data = store.block_get(entry["message"]).replace(b'"round":1', b'"round":2')
    updates[0]["message"] = store.block_put(data, codec="raw")
    forged = put_raw(store, sign_block({**block, "updates": updates}, OWNER))
    assert verify_chain(store, forged).reason == (f"block 1 (seq 1): update of {entry['worker']}: update message "
                                                  f"{cid_str(updates[0]['message'])}: bad signature from "
                                                  f"{entry['worker']}")
    # and a message nobody can fetch
    updates[0]["message"] = MESSAGE
    forged = put_raw(store, sign_block({**block, "updates": updates}, OWNER))
    report = verify_chain(store, forged)
    assert report.reason.startswith(f"block 1 (seq 1): update of {entry['worker']}: message {cid_str(MESSAGE)} "
                                    "not retrievable"), report.reason
    assert verify_chain(store, forged, check_objects=False, recompute=False).ok


@pytest.mark.parametrize("change, reason", [
    ({"num_examples": 7}, "its message claims {n} examples, the block records 7"),
    ({"metrics": {"loss": 0.0}}, "the block's metrics differ from its message's"),
    ({"metrics": {}}, "the block's metrics differ from its message's"),
])
def test_an_entry_differing_from_its_message_in_examples_or_metrics_is_refused(change, reason):
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    entry = block["updates"][2]
    updates = [dict(u) for u in block["updates"]]
    updates[2].update(change)
    forged = put_raw(store, sign_block(_reaggregated(store, block, updates), OWNER))  # recomputes fine
    report = verify_chain(store, forged, signer=OWNER.id)
    assert not report.ok and report.first_bad == forged
    assert report.reason == f"block 1 (seq 1): update of {entry['worker']}: " + reason.format(n=entry["num_examples"])


def test_a_version_1_block_after_a_version_2_block_is_refused():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=2)
    downgraded = put_raw(store, v1_block(get_block(store, cids[2]), OWNER))
    report = verify_chain(store, downgraded, signer=OWNER.id)
    assert not report.ok and report.first_bad == downgraded
    assert report.reason == ("block 2 (seq 2): block version 1 follows version 2: a chain does not drop its "
                             "workers' signed updates")


def test_version_1_chains_verify_with_their_rounds_unproven():
    store = MemoryStore()
    cids = build_v1_chain(store, rounds=3)
    assert [get_block(store, c)["v"] for c in cids] == [1, 1, 1, 1]
    report = verify_chain(store, cids[-1], signer=OWNER.id)
    assert report.ok and report.blocks == 4 and report.unproven == 3, report.reason
    assert verify_chain(store, build_chain(store, rounds=3)[1][-1]).unproven == 0
    # an old chain resumed by a new writer: its version 2 rounds are checked, the old ones still unproven
    log = ChainLog(store, None)
    log._head = cids[-1]
    genesis = get_block(store, cids[0])
    upgraded = log.append(round_fields(store, np.random.default_rng(5), genesis, 4, log), OWNER)
    report = verify_chain(store, upgraded, signer=OWNER.id)
    assert report.ok and report.unproven == 3 and get_block(store, upgraded)["v"] == 2, report.reason


@pytest.mark.parametrize("on_disk", [False, True])
def test_append_and_stage_extending_a_head_that_moved_are_refused(tmp_path, on_disk):
    store = MemoryStore()
    log, cids = build_chain(store, rounds=1, head_file=tmp_path / "head" if on_disk else None)
    genesis = get_block(store, cids[0])
    fields = round_fields(store, np.random.default_rng(1), genesis, 2, log)
    assert log.append(fields, OWNER, extends=cids[1]) == log.head  # still the head: fine
    moved = log.head
    for write in (log.append, log.stage):
        with pytest.raises(ChainError, match=f"the chain moved: the block was to extend {cid_str(cids[1])}, but "
                                             f".* names {cid_str(moved)}"):
            write(round_fields(store, np.random.default_rng(2), genesis, 3, log), OWNER, extends=cids[1])
    assert log.head == moved
    with pytest.raises(ChainError, match="names no head"):
        ChainLog(store, None).append(genesis_fields(store, np.random.default_rng(0)), OWNER, extends=cids[0])
