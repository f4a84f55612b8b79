"""An auditor's tools against a stranger's chain: `verify_chain`, `walk`, `weights_from_bytes`, `plot_chain`.

Whatever a chain holds, the auditor pays bounded time and memory and gets one named block and a
one-line reason, never an exception. Hostile chains are built in an in-memory store (no daemon) that
counts what is fetched; one CLI test runs `python -m grid_ipfs.chain verify` against a real daemon.
"""

from __future__ import annotations

import hashlib
import struct
import time
import tracemalloc

import dag_cbor
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash

from grid_ipfs.chain import ChainError, ChainLog, decode_block, sign_block, verify_chain, walk
from grid_ipfs.chain.blocks import MAX_CBOR_DEPTH, MAX_UPDATES, block_cid, validate_block
from grid_ipfs.chain.plot import MAX_PANELS, plot_chain
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str
from grid_ipfs.limits import MAX_NUM_EXAMPLES
from grid_ipfs.payloads import (
    MAX_TENSORS,
    MAX_WEIGHTS_HEADER_BYTES,
    PayloadError,
    weight_key,
    weights_from_bytes,
    weights_to_bytes,
)
from grid_ipfs.strategies import aggregate

from .cli import run_cli
from .test_chain_format import (
    OWNER,
    MemoryStore,
    build_chain,
    genesis_fields,
    get_block,
    put_raw,
    round_fields,
    signed_update,
)


class CountingStore(MemoryStore):
    """A MemoryStore that counts block_get and cat calls (per CID for cat)."""

    def __init__(self):
        super().__init__()
        self.block_gets = 0
        self.cats: dict[str, int] = {}

    def block_get(self, cid) -> bytes:
        self.block_gets += 1
        return super().block_get(cid)

    def cat(self, cid, *, max_size=None, timeout=None, sink=None) -> bytes:
        key = cid_str(cid)
        self.cats[key] = self.cats.get(key, 0) + 1
        return super().cat(cid, max_size=max_size, timeout=timeout, sink=sink)


# -- long chains: the walk ----------------------------------------------------------------------------


def _long_chain(store: MemoryStore, length: int) -> list[CID]:
    """`length` blocks with a valid layout (dummy signatures: the walk does not check them), built from
    pre-encoded fields because dag_cbor.encode of 20,000 blocks would take seconds."""
    worker = Identity.generate().id
    link = store.add(b"some object")
    genesis = {"v": 1, "job": "long", "seq": 0, "round": 0, "model": link, "weights": link,
               "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": {}, "time": 1.0,
               "signer": worker, "sig": bytes(64)}
    cids = [store.block_put(dag_cbor.encode(genesis))]
    fixed = {key: dag_cbor.encode(value) for key, value in genesis.items() if key not in ("seq", "round")}
    fixed["aggregation"] = dag_cbor.encode({"name": "fedavg", "params": {}})
    fixed["updates"] = dag_cbor.encode([{"worker": worker, "weights": link, "num_examples": 1, "metrics": {}}])
    keys = sorted([*fixed, "seq", "round", "prev"], key=lambda k: (len(k), k))
    encoded_keys = {key: dag_cbor.encode(key) for key in keys}
    for seq in range(1, length):
        values = {**fixed, "seq": dag_cbor.encode(seq), "round": dag_cbor.encode(seq),
                  "prev": b"\xd8\x2a\x58\x25\x00" + bytes(cids[-1])}
        data = bytes([0xA0 + len(keys)]) + b"".join(encoded_keys[k] + values[k] for k in keys)
        cids.append(store.block_put(data))
    decode_block(store.block_get(cids[-1]), cids[-1])  # the template encodes canonically
    return cids


@pytest.fixture(scope="module")
def long_chain():
    store = CountingStore()
    return store, _long_chain(store, 20_000)


def _put_block(store: MemoryStore, block: dict) -> CID:
    """Store a layout-valid block as is (any signature)."""
    validate_block(block)
    return store.block_put(dag_cbor.encode(block))


def test_a_seq_break_at_the_head_of_20000_blocks_fails_after_two_fetches(long_chain):
    store, cids = long_chain
    head = decode_block(store.block_get(cids[-1]), cids[-1])
    liar = _put_block(store, {**head, "seq": 1, "round": 1, "prev": cids[-2]})  # "block 1" on 19,999 blocks
    store.block_gets = 0
    started = time.monotonic()
    report = verify_chain(store, liar)
    assert not report.ok and report.first_bad == liar and report.first_bad_seq == 1
    assert report.detail == "seq 1 follows seq 19998", report.reason
    assert store.block_gets == 2 and time.monotonic() - started < 1.0  # on main: all 20,000, then a verdict
    store.block_gets = 0
    with pytest.raises(ChainError, match="has seq 19998, expected 0"):
        list(walk(store, liar))
    assert store.block_gets == 2


def test_a_chain_longer_than_max_blocks_fails_at_its_head(long_chain):
    store, cids = long_chain
    store.block_gets = 0
    report = verify_chain(store, cids[-1], max_blocks=10_000)
    assert not report.ok and report.first_bad == cids[-1] and report.first_bad_seq == 19_999
    assert report.detail == "seq 19999: the chain is longer than the 10000 blocks allowed (max_blocks)"
    assert store.block_gets == 1 and "\n" not in report.reason
    with pytest.raises(ChainError, match="longer than the 10000 blocks allowed"):
        list(walk(store, cids[-1], max_blocks=10_000))
    assert store.block_gets == 2
    assert len(list(walk(store, cids[99], max_blocks=100))) == 100  # exactly at the bound: fine


# -- each object once ---------------------------------------------------------------------------------


def test_sixty_updates_linking_one_file_fetch_and_hold_it_once():
    store = CountingStore()
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((512, 1024)).astype(np.float32)]  # a 2 MiB update
    genesis = genesis_fields(store, rng)
    log = ChainLog(store, None)
    first = log.append(genesis, OWNER)
    shared = store.add(weights_to_bytes(weights))
    workers = sorted((Identity.generate() for _ in range(60)), key=lambda w: w.id)
    total = aggregate("fedavg", [(weights, 10)] * 60)
    head = log.append({**genesis, "round": 1, "weights": store.add(weights_to_bytes(total)),
                       "aggregation": {"name": "fedavg", "params": {}},
                       "updates": [{"worker": w.id, "weights": shared, "num_examples": 10, "metrics": {},
                                    "message": signed_update(store, w, job=genesis["job"], round_=1, head=first,
                                                             base=genesis["weights"], weights=shared,
                                                             num_examples=10, metrics={})}
                                   for w in workers]}, OWNER)
    store.cats.clear()
    tracemalloc.start()
    try:
        report = verify_chain(store, head)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok, report.reason
    assert store.cats[cid_str(shared)] == 1  # on main: 60 fetches, 60 parses (~250 MB here, 1 GB at 8 MiB)
    assert peak < 16 * weights[0].nbytes, peak  # fedavg's float64 sums and the aggregate, not 60 copies


def test_a_block_may_record_at_most_max_updates():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    update = block["updates"][0]
    crowd = sorted(({**update, "worker": Identity.generate().id} for _ in range(MAX_UPDATES + 1)),
                   key=lambda u: u["worker"])
    with pytest.raises(ChainError, match=f"updates: {MAX_UPDATES + 1} updates, more than {MAX_UPDATES}"):
        validate_block({**block, "updates": crowd})


# -- nesting ------------------------------------------------------------------------------------------


def _pofl_round(store: MemoryStore, ext: dict) -> CID:
    """A 2-round chain plus a third, correctly aggregated round that records `ext`."""
    log, cids = build_chain(store, rounds=2)
    genesis = get_block(store, cids[0])
    return log.append({**round_fields(store, np.random.default_rng(0), genesis, 3, log), "ext": ext}, OWNER)


def test_an_endorsement_linking_deeply_nested_json_is_a_one_line_verdict():
    store = MemoryStore()
    nested = store.block_put(b"[" * 60_000, codec="raw")
    head = _pofl_round(store, {"pofl": {"candidates": [], "endorsements": [nested]}})
    report = verify_chain(store, head)  # on main: RecursionError out of verify_chain
    assert not report.ok and report.first_bad == head and report.first_bad_seq == 3
    assert report.detail.startswith(f"ext.pofl: endorsement {cid_str(nested)}: "), report.reason
    assert "\n" not in report.reason


@pytest.mark.parametrize("depth", [MAX_CBOR_DEPTH + 1, 100_000])
def test_a_deeply_nested_block_is_refused_before_decoding(depth):
    store = MemoryStore()
    data = b"\x81" * depth + b"\x00"
    cid = store.block_put(data)
    with pytest.raises(ChainError, match=f"nested deeper than {MAX_CBOR_DEPTH} levels"):
        decode_block(data, cid)
    report = verify_chain(store, cid)
    assert not report.ok and report.first_bad == cid and report.first_bad_seq is None
    assert report.detail == f"not canonical dag-cbor: nested deeper than {MAX_CBOR_DEPTH} levels"


def test_nested_tags_are_refused_before_decoding():
    data = b"\xd8\x2a" * 3000 + b"\x00"  # on main: passed the scan, dag_cbor recursed into RecursionError
    with pytest.raises(ChainError, match=f"^not canonical dag-cbor: nested deeper than {MAX_CBOR_DEPTH} levels$"):
        decode_block(data)


def test_a_tag_other_than_42_is_refused_before_decoding():
    with pytest.raises(ChainError, match=r"^not canonical dag-cbor: tag 1 \(only 42, a CID, is allowed\)$"):
        decode_block(b"\xc1\x00")


def test_a_decoder_error_is_its_first_line_without_the_caret_drawing():
    with pytest.raises(ChainError) as caught:
        decode_block(b"\x1c")  # reserved additional info: dag_cbor explains it over several lines
    reason = str(caught.value)
    assert reason.startswith("not canonical dag-cbor: ") and "\n" not in reason and "^" not in reason, reason
    assert "  " not in reason, reason


def test_an_update_claiming_more_than_max_num_examples_is_refused():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=1)
    block = get_block(store, cids[1])
    claim = {**block["updates"][0], "num_examples": MAX_NUM_EXAMPLES + 1}
    with pytest.raises(ChainError, match=r"updates\[0\]\.num_examples: expected an integer from 1 to"):
        validate_block({**block, "updates": [claim]})  # on main: accepted, unlike the same count in a message
    validate_block({**block, "updates": [{**claim, "num_examples": MAX_NUM_EXAMPLES}]})


def test_a_winning_candidate_link_to_nested_cbor_is_a_verdict():
    store = MemoryStore()
    bomb = store.block_put(b"\x81" * 50_000 + b"\x00")
    head = _pofl_round(store, {"pofl": {"candidates": [bomb], "block": bomb, "winner": OWNER.id}})
    report = verify_chain(store, head)
    assert not report.ok and "nested deeper than" in report.detail, report.reason


# -- aggregation params -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2000, (1 << 63) - 1, -1])
def test_an_absurd_scale_bits_is_refused_before_recomputing(bits):
    store = MemoryStore()
    rng = np.random.default_rng(2)
    log = ChainLog(store, None)
    genesis = genesis_fields(store, rng)
    first = log.append(genesis, OWNER)
    masked = store.add(weights_to_bytes([rng.integers(0, 1 << 63, size=(3, 2), dtype=np.uint64)]))
    message = signed_update(store, OWNER, job=genesis["job"], round_=1, head=first, base=genesis["weights"],
                            weights=masked, num_examples=5, metrics={})
    head = log.append({**genesis, "round": 1, "weights": genesis["weights"],
                       "aggregation": {"name": "secure-fedavg", "params": {"scale_bits": bits}},
                       "updates": [{"worker": OWNER.id, "weights": masked, "num_examples": 5, "metrics": {},
                                    "message": message}]}, OWNER)
    started = time.monotonic()
    report = verify_chain(store, head)  # on main: OverflowError (2000), or no end (2**63-1)
    assert time.monotonic() - started < 5
    assert not report.ok and report.first_bad == head and "scale_bits" in report.detail, report.reason


# -- safetensors --------------------------------------------------------------------------------------


def test_a_64_mib_safetensors_header_is_refused_before_it_is_parsed():
    size = 64 * 1024 * 1024
    data = struct.pack("<Q", size) + b"[" * size
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match=f"header of {size} bytes, more than {MAX_WEIGHTS_HEADER_BYTES}"):
            weights_from_bytes(data, source="bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak  # on main: 64 MiB copied, then parsed (~1.2 GB)


def test_a_header_declaring_too_many_tensors_is_refused():
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(MAX_TENSORS + 1))
    header = ('{"__metadata__":{"format":"grid_ipfs.weights.v1"},' + entries + "}").encode()
    with pytest.raises(PayloadError, match=f"declares {MAX_TENSORS + 1} tensors, more than {MAX_TENSORS}"):
        weights_from_bytes(struct.pack("<Q", len(header)) + header, source="many")
    bare = ("{" + entries + "}").encode()  # no __metadata__: on main the count said one tensor fewer
    with pytest.raises(PayloadError, match=f"declares {MAX_TENSORS + 1} tensors, more than {MAX_TENSORS}"):
        weights_from_bytes(struct.pack("<Q", len(bare)) + bare, source="many")
    with pytest.raises(ValueError, match=f"more than the {MAX_TENSORS}"):
        weights_to_bytes([np.zeros(1, np.float32)] * (MAX_TENSORS + 1))


def test_weights_with_more_than_10000_tensors_round_trip_in_order():
    weights = [np.full((2,), i, np.float32) for i in range(10_001)]
    back = weights_from_bytes(weights_to_bytes(weights))  # on main: refused, w10000 sorts before w1001
    assert len(back) == 10_001 and [int(w[0]) for w in back] == list(range(10_001))
    assert [weight_key(i) for i in (0, 9999, 10_000, 123_456)] == ["w0000", "w9999", "w10000", "w123456"]


def test_files_under_10000_tensors_keep_their_bytes():
    weights = ([np.arange(6, dtype=np.float32).reshape(3, 2), np.array(1.5), np.arange(4, dtype=np.int64)]
               + [np.full((2,), i, np.float32) for i in range(20)])
    digest = hashlib.sha256(weights_to_bytes(weights)).hexdigest()
    assert digest == "8caa4ed7d03073f4ce24bfa71fb655ec3613bdac48984f737863e40d74962a09"  # as written by main


# -- plot ---------------------------------------------------------------------------------------------


def test_plot_draws_mathtext_and_control_characters_as_plain_text(tmp_path):
    names = ["$\\frac{$", "val_$\\frac{$", "loss$", "$x^$", "eval_a\nb\x1b[2J", "x" * 500]
    blocks = [{"job": "j", "seq": r, "round": r, "metrics": {n: 0.1 * r + 0.01 for n in names}} for r in range(3)]
    out = tmp_path / "run.png"
    panels = plot_chain(blocks, out)  # on main: ValueError from the mathtext parser
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(panels) == {"$\\frac{$", "loss$", "$x^$", "a\nb\x1b[2J", "x" * 500}


def test_plot_draws_at_most_max_panels(tmp_path):
    blocks = [{"job": "j", "seq": r, "round": r, "metrics": {f"m{i}": float(r) for i in range(1000)}}
              for r in range(2)]
    out = tmp_path / "many.png"
    started = time.monotonic()
    assert len(plot_chain(blocks, out)) == MAX_PANELS
    assert out.stat().st_size > 1000 and time.monotonic() - started < 60


# -- whatever a block holds: a verdict ----------------------------------------------------------------

_GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20), st.sampled_from(["$\\frac{", "a\nFAILED at block 0", "[/x]"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
_RULES = ["fedavg", "median", "trimmed-mean", "krum", "multi-krum", "dp-fedavg", "secure-fedavg",
          "secure-dp-fedavg", "nope"]
_PARAMS = ["scale_bits", "trim", "f", "multi", "clip", "noise_multiplier", "seed", "accept", "other"]


@pytest.fixture(scope="module")
def fuzz_chain():
    store = MemoryStore()
    _, cids = build_chain(store, rounds=2)
    junk = {"garbage": store.add(b"not weights"), "nested": store.block_put(b"\x81" * 5000 + b"\x00"),
            "json": store.block_put(b"[" * 50_000, codec="raw"), "missing": CID(
                "base32", 1, "raw", multihash.digest(b"nowhere", "sha2-256")), "block": cids[0]}
    return store, cids, junk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_gives_a_one_line_verdict_whatever_a_resigned_block_holds(fuzz_chain, data):
    store, cids, junk = fuzz_chain
    block = dict(get_block(store, cids[2]))
    links = st.sampled_from(sorted(junk)).map(junk.get)
    what = data.draw(st.sampled_from(["params", "update", "weights", "ext", "field", "metrics"]))
    if what == "params":
        params = data.draw(st.dictionaries(st.sampled_from(_PARAMS), _GARBAGE | st.integers(), max_size=3))
        block["aggregation"] = {"name": data.draw(st.sampled_from(_RULES)), "params": params}
    elif what == "update":
        block["updates"] = [{**u, "weights": data.draw(links)} for u in block["updates"]]
    elif what == "weights":
        block["weights"] = data.draw(links)
    elif what == "ext":
        pofl = data.draw(st.fixed_dictionaries({}, optional={
            "candidates": st.lists(links | _GARBAGE, max_size=2), "block": links | _GARBAGE,
            "winner": _GARBAGE, "endorsements": st.lists(links, max_size=2) | _GARBAGE}))
        block["ext"] = {"pofl": pofl} if pofl else {"pofl": data.draw(_GARBAGE | st.just(0))}
    elif what == "field":
        block[data.draw(st.sampled_from(sorted(block)))] = data.draw(_GARBAGE | links)
    else:
        block["metrics"] = data.draw(st.dictionaries(st.text(max_size=8), _GARBAGE, max_size=3))
    try:
        signed = sign_block(block, OWNER)
    except ChainError:
        return  # not a block anyone can sign: refused at the door
    head = put_raw(store, signed)
    report = verify_chain(store, head)
    assert report.ok or (report.first_bad is not None and report.detail and "\n" not in report.reason
                         and len(report.reason) < 2000), report.reason


# -- the CLI, on a real daemon ------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_verify_prints_one_failed_line_for_malformed_chains(make_devnet):
    node = make_devnet(1).nodes[0]
    with node.client() as client:
        _, cids = build_chain(client, rounds=1)
        nested = client.block_put(b"[" * 60_000, codec="raw")
        rng = np.random.default_rng(0)
        genesis = get_block(client, cids[0])
        log = ChainLog(client, None)
        log._head = cids[-1]
        endorsed = log.append({**round_fields(client, rng, genesis, 2, log),
                               "ext": {"pofl": {"candidates": [], "endorsements": [nested]}}}, OWNER)
        block = get_block(client, cids[1])
        liar = client.block_put(dag_cbor.encode(sign_block({**block, "seq": 5, "round": 5}, OWNER)))
        deep = client.block_put(b"\x81" * (MAX_CBOR_DEPTH + 1) + b"\x00")  # the daemon refuses far deeper ones
    cases = [(endorsed, 2, f"ext.pofl: endorsement {cid_str(nested)}: "),
             (liar, 5, "seq 5 follows seq 0"),
             (deep, "?", "not canonical dag-cbor: nested deeper than")]
    for head, seq, reason in cases:
        proc = run_cli("grid_ipfs.chain", "verify", "--api", node.api, cid_str(head), timeout=120)
        lines = (proc.stdout + proc.stderr).splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
        assert lines[0].startswith(f"FAILED at block {seq} ({cid_str(head)}): {reason}"), lines[0]
    proc = run_cli("grid_ipfs.chain", "verify", "--api", node.api, cid_str(endorsed), "--max-blocks", "2")
    assert proc.returncode == 1 and proc.stdout == (
        f"FAILED at block 2 ({cid_str(endorsed)}): seq 2: the chain is longer than the 2 blocks allowed "
        "(max_blocks)\n"), proc.stdout + proc.stderr


def test_block_cid_of_the_long_chain_template_matches_the_store():
    store = MemoryStore()
    cids = _long_chain(store, 3)
    assert all(block_cid(store.block_get(c)) == c for c in cids)
    assert [b["seq"] for _, b in walk(store, cids[-1])] == [2, 1, 0]
