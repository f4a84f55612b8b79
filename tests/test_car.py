"""CAR files: the reader a stranger's archive meets (grid_ipfs.ipfs.car), the store verify runs on with no
daemon, and `chain export --car` / `chain import` / `chain verify --car` on real daemons, checked against
@ipld/car (tests/car_roots.mjs) and the daemon's own `dag/import`.

Unit tests build CARs by hand, byte by byte, so each attack is exactly the bytes it names.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import dag_cbor
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiformats import CID, multihash

from grid_ipfs.chain import decode_block, verify_chain
from grid_ipfs.chain.__main__ import main as chain_main
from grid_ipfs.ipfs.car import CarError, CarReader, CarStore, read_car, unixfs_cat
from grid_ipfs.ipfs.cids import cid_str, parse_cid
from grid_ipfs.ipfs.errors import NotFound, TooLarge

from .cli import run_cli
from .test_chain_format import MemoryStore, build_chain

NODE_SCRIPT = Path(__file__).with_name("car_roots.mjs")

# -- building CARs and UnixFS files by hand -------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def cid_of(data: bytes, codec: str = "raw") -> CID:
    return CID("base32", 1, codec, multihash.digest(data, "sha2-256"))


def header(roots: list, version: object = 1) -> bytes:
    raw = dag_cbor.encode({"version": version, "roots": roots})
    return varint(len(raw)) + raw


def section(cid: CID | bytes, data: bytes) -> bytes:
    raw = bytes(cid)
    return varint(len(raw) + len(data)) + raw + data


def car(roots: list, blocks: list[tuple[CID, bytes]]) -> bytes:
    return header(roots) + b"".join(section(cid, data) for cid, data in blocks)


def pb(field: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or length-delimited bytes."""
    if isinstance(payload, int):
        return varint(field << 3) + varint(payload)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def unixfs_node(links: list[CID], data: bytes = b"", kind: int = 2) -> bytes:
    """A dag-pb PBNode (links first, as dag-pb's canonical form has them) carrying UnixFS Data."""
    unixfs = pb(1, kind) + (pb(2, data) if data else b"") + pb(3, len(data))
    return b"".join(pb(2, pb(1, bytes(link)) + pb(2, b"") + pb(3, 0)) for link in links) + pb(1, unixfs)


def small_dag() -> tuple[CID, list[tuple[CID, bytes]], dict[str, bytes]]:
    """A dag-cbor root linking a raw block and a two-leaf UnixFS file (one leaf raw, one a dag-pb leaf
    with a CIDv0, as `ipfs add` writes them)."""
    leaf_a = b"first half, "
    leaf_b_node = unixfs_node([], b"second half", kind=0)
    a, b = cid_of(leaf_a), CID("base58btc", 0, "dag-pb", multihash.digest(leaf_b_node, "sha2-256"))
    file_node = unixfs_node([a, b])
    file_cid = cid_of(file_node, "dag-pb")
    raw = b"an update message"
    raw_cid = cid_of(raw)
    root_data = dag_cbor.encode({"file": file_cid, "msg": raw_cid, "n": 1})
    root = cid_of(root_data, "dag-cbor")
    blocks = [(root, root_data), (file_cid, file_node), (a, leaf_a), (b, leaf_b_node), (raw_cid, raw)]
    return root, blocks, {"file": file_cid, "raw": raw_cid}


def write(tmp_path: Path, data: bytes, name: str = "x.car") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


class CodecStore(MemoryStore):
    """MemoryStore that remembers each object's CID, so a CAR of it names every block's codec."""

    def __init__(self):
        super().__init__()
        self.cids: dict[bytes, CID] = {}

    def _put(self, data: bytes, codec: str) -> CID:
        cid = super()._put(data, codec)
        self.cids[bytes(cid.digest)] = cid
        return cid

    def car(self, root: CID, skip: CID | None = None) -> bytes:
        return car([root], [(cid, self.objects[key]) for key, cid in self.cids.items()
                            if skip is None or key != bytes(skip.digest)])


# -- the reader: round trip -----------------------------------------------------------------------------


def test_a_small_dag_round_trips_and_the_store_answers_like_a_daemon(tmp_path):
    root, blocks, named = small_dag()
    roots, read = read_car(car([root], blocks))
    assert roots == [root]
    assert [(b.cid, b.data) for b in read] == blocks
    with CarStore(write(tmp_path, car([root], blocks))) as store:
        assert store.roots == [root] and len(store) == 5
        assert store.block_get(root) == blocks[0][1]
        assert store.block_get(str(named["raw"])) == b"an update message"
        assert store.cat(named["file"]) == b"first half, second half"
        assert store.cat(named["raw"]) == b"an update message"
        assert named["file"] in store and cid_of(b"elsewhere") not in store
        with pytest.raises(NotFound, match=r"block bafk\w+ is not in CAR .*x\.car"):
            store.block_get(cid_of(b"elsewhere"))
        with pytest.raises(CarError, match="read-only"):
            store.block_put(b"x")
        with pytest.raises(CarError, match=r"cat bafy\w+ from CAR .*: node bafy\w+: a dag-cbor block is not a "
                                           r"UnixFS file$"):
            store.cat(root)


def test_a_chain_verifies_from_a_car_with_no_daemon(tmp_path, capsys):
    store = CodecStore()
    _, cids = build_chain(store, rounds=2)
    path = write(tmp_path, store.car(cids[-1]))
    with CarStore(path) as car_store:
        report = verify_chain(car_store, cids[-1])
    assert report.ok, report.reason
    assert chain_main(["verify", "--car", str(path)]) == 0  # HEAD: the archive's single root
    assert capsys.readouterr().out == f"OK: 3 blocks verified from {cid_str(cids[-1])} to genesis\n"
    assert chain_main(["show", "--car", str(path), "--json"]) == 0
    assert [row["seq"] for row in json.loads(capsys.readouterr().out)] == [0, 1, 2]


def test_verify_car_names_a_flipped_byte_and_a_missing_block(tmp_path, capsys):
    store = CodecStore()
    _, cids = build_chain(store, rounds=2)
    data = bytearray(store.car(cids[-1]))
    data[-1] ^= 1  # the last block's last byte
    flipped = write(tmp_path, bytes(data), "flipped.car")
    assert chain_main(["verify", "--car", str(flipped)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: CAR {flipped}: offset {len(data) - len(store.objects[list(store.cids)[-1]])}: "
                          "block ") and err.rstrip().endswith("does not hash to its CID")
    weights = decode_block(store.block_get(cids[1]), cids[1])["weights"]
    missing = write(tmp_path, store.car(cids[-1], skip=weights), "missing.car")
    assert chain_main(["verify", "--car", str(missing)]) == 1
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and out.startswith("FAILED at block 1 (")
    assert f"{cid_str(weights)} not retrievable: block {cid_str(weights)} is not in CAR" in out


def test_verify_needs_exactly_one_of_api_and_car(tmp_path, capsys):
    for args in (["verify", "bafyreiaaa"], ["verify", "--api", "/ip4/127.0.0.1/tcp/1", "--car", "x.car"]):
        with pytest.raises(SystemExit) as exited:
            chain_main(args)
        assert exited.value.code == 2
        assert "give --api ADDRESS (a daemon) or --car FILE (an archive), exactly one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        chain_main(["export", "--api", "/ip4/127.0.0.1/tcp/1", "--car", "x.car", "-o", "m.keras"])
    assert exited.value.code == 2


# -- the reader: a stranger's file ----------------------------------------------------------------------

ROOT, BLOCKS, NAMED = small_dag()
GOOD = car([ROOT], BLOCKS)


def refused(data: bytes, **limits) -> str:
    with pytest.raises(CarError) as caught:
        read_car(data, **limits)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("CAR <stream>: offset ")
    return message


def test_a_truncated_file_is_named_wherever_it_is_cut():
    for cut in (0, 1, 5, len(header([ROOT])) + 1, len(header([ROOT])) + 10, len(GOOD) - 1):
        message = refused(GOOD[:cut])
        assert ("truncated" in message) or ("empty file" in message), (cut, message)
    last = len(section(*BLOCKS[-1]))  # 1 length byte, 36 of CID, 17 of block
    assert refused(GOOD[:-1]) == f"CAR <stream>: offset {len(GOOD) - last + 1}: truncated section: 52 of 53 bytes"


def test_a_section_over_the_cap_is_refused_before_it_is_read():
    class Counting(io.BytesIO):
        asked = 0

        def read(self, size=-1):
            Counting.asked = max(Counting.asked, size)
            return super().read(size)

    data = header([ROOT]) + varint(1 << 40)  # a 1 TiB section, and no bytes of it
    with pytest.raises(CarError, match=rf"offset {len(header([ROOT]))}: section of 1099511627776 bytes: a block "
                                       r"is at most 4194304$"):
        list(CarReader(Counting(data)))
    assert Counting.asked < 1 << 20
    assert refused(car([ROOT], BLOCKS), max_block_bytes=20).endswith("a block is at most 20")


@pytest.mark.parametrize("length, reason", [
    (b"\xff" * 10, "header length: varint longer than 9 bytes"),
    (b"\x81\x00", "header length: non-minimal varint"),
])
def test_bad_varints_are_refused(length, reason):
    assert refused(length) == f"CAR <stream>: offset 0: {reason}"
    assert refused(header([ROOT]) + length).endswith(f"offset {len(header([ROOT]))}: section {reason[7:]}")


def test_a_block_that_does_not_hash_to_its_cid_is_refused():
    cid, data = BLOCKS[2]
    bad = header([ROOT]) + section(cid, data[:-1] + b"!")
    assert refused(bad) == (f"CAR <stream>: offset {len(bad) - len(data)}: block {cid_str(cid)} does not hash "
                            "to its CID")


@pytest.mark.parametrize("cid_bytes, reason", [
    (b"\x01\x55\x13\x40" + b"\0" * 64, "hash function 0x13 of 64 bytes (only sha2-256 is accepted)"),
    (b"\x01\x55\xa0\xe4\x02\x20" + b"\0" * 32, "hash function 0xb220 of 32 bytes"),  # blake2b-256
    (b"\x01\x55\x00\x05hello", "hash function 0x0 of 5 bytes"),  # identity: no hash at all
    (b"\x02\x55\x12\x20" + b"\0" * 32, "CID version 2 (only 0 and 1 exist)"),
    (b"\x12\x10" + b"\0" * 16, "CIDv0 with a digest that is not 32 bytes"),
    (b"\x01\xff\xff\x03\x12\x20" + b"\0" * 32, "CID not understood"),
])
def test_cids_other_than_v0_v1_sha2_256_are_refused(cid_bytes, reason):
    assert reason in refused(header([ROOT]) + section(cid_bytes, b"data"))


@pytest.mark.parametrize("head, reason", [
    (varint(3) + dag_cbor.encode([1, 2]), "offset 1: header is a list, not a map"),
    (header([ROOT], version=2), "offset 1: CAR version 2 (only CARv1 is read)"),
    (header([ROOT], version=True), "CAR version True"),
    (varint(60_000) + b"\x81" * 59_999 + b"\x01", "offset 3: header is not dag-cbor"),
    (varint(10) + b"\xff" * 10, "header is not dag-cbor"),
    (varint(1 << 20), "offset 0: header of 1048576 bytes (at most 65536)"),
    (varint(0), "offset 0: header of 0 bytes"),
    (varint(len(dag_cbor.encode({"version": 1, "roots": ["x"]}))) + dag_cbor.encode({"version": 1, "roots": ["x"]}),
     "header roots are not a list of CIDs"),
    (header([ROOT] * 257), "257 roots (at most 256)"),
    (b"", "offset 0: empty file: no CAR header"),
])
def test_a_header_that_is_not_carv1_is_refused(head, reason):
    assert reason in refused(head)


def test_empty_sections_too_many_blocks_and_too_many_bytes_are_refused(tmp_path):
    assert refused(header([ROOT]) + b"\x00").endswith(f"offset {len(header([ROOT]))}: empty section")
    at_third = len(header([ROOT])) + len(section(*BLOCKS[0])) + len(section(*BLOCKS[1]))
    assert refused(GOOD, max_blocks=2) == f"CAR <stream>: offset {at_third}: more than 2 blocks"
    assert "ends past the limit of 100 bytes" in refused(GOOD, max_bytes=100)
    with pytest.raises(CarError, match=rf"^CAR {tmp_path}/x\.car: offset 0: {len(GOOD)} bytes, over the limit of "
                                       r"100$"):
        CarStore(write(tmp_path, GOOD), max_bytes=100)  # a file's size is checked before reading it


def test_unixfs_links_that_loop_or_go_too_deep_are_refused(tmp_path):
    looping = unixfs_node([cid_of(b"placeholder", "dag-pb")])
    cid = cid_of(looping, "dag-pb")
    with pytest.raises(CarError, match=r"UnixFS tree deeper than 32 levels"):
        unixfs_cat(lambda _: looping, cid)  # a getter whose node links to itself (no hash can do that)
    blocks, child = [], cid_of(b"bottom")
    blocks.append((child, b"bottom"))
    for _ in range(40):
        node = unixfs_node([child])
        child = cid_of(node, "dag-pb")
        blocks.append((child, node))
    with CarStore(write(tmp_path, car([child], blocks))) as store:
        with pytest.raises(CarError, match=rf"^cat {cid_str(child)} from CAR .*: UnixFS tree deeper than 32 levels"):
            store.cat(child)
        assert unixfs_cat(store.block_get, child, max_depth=41) == b"bottom"


def test_a_fan_out_of_empty_nodes_costs_bounded_work(tmp_path):
    empty = unixfs_node([])
    level = cid_of(empty, "dag-pb")
    blocks = [(level, empty)]
    for _ in range(3):  # 100 links to the same node, three times over: 10^6 paths, 4 distinct blocks
        node = unixfs_node([level] * 100)
        level = cid_of(node, "dag-pb")
        blocks.append((level, node))
    with CarStore(write(tmp_path, car([level], blocks))) as store:
        with pytest.raises(CarError, match=r"more than 5000 UnixFS nodes"):
            unixfs_cat(store.block_get, level, max_nodes=5000)


def test_nodes_that_add_no_bytes_still_cost_their_size_against_max_size():
    """A root linking one big node that contributes nothing, again and again: what is read is bounded by
    the file's max_size, not only by the node count."""
    padding = pb(1, pb(1, 2) + pb(3, 0) + pb(9, b"\0" * 100_000))  # an unknown UnixFS field: ignored, but read
    padding_cid = cid_of(padding, "dag-pb")
    root = unixfs_node([padding_cid] * 1000)
    blocks = {padding_cid.digest: padding, cid_of(root, "dag-pb").digest: root}
    read = []

    def get(cid):
        read.append(len(blocks[cid.digest]))
        return blocks[cid.digest]

    with pytest.raises(CarError, match=r"read \d+ bytes of UnixFS nodes for a file of at most 1000"):
        unixfs_cat(get, cid_of(root, "dag-pb"), max_size=1000)
    assert sum(read) <= 2 * 1000 + (1 << 20) + 100_100  # stopped at the budget, not after 1000 visits


def test_a_file_over_max_size_stops_early():
    leaves = [bytes([i]) * 1000 for i in range(5)]
    node = unixfs_node([cid_of(leaf) for leaf in leaves])
    blocks = {cid_of(leaf).digest: leaf for leaf in leaves} | {cid_of(node, "dag-pb").digest: node}
    fetched = []

    def get(cid):
        fetched.append(cid)
        return blocks[cid.digest]

    with pytest.raises(TooLarge, match=r"exceeds the limit of 1500 bytes"):
        unixfs_cat(get, cid_of(node, "dag-pb"), max_size=1500)
    assert len(fetched) == 3  # the node and two leaves; three leaves never read
    assert unixfs_cat(get, cid_of(node, "dag-pb"), max_size=5000) == b"".join(leaves)


@pytest.mark.parametrize("node, reason", [
    (unixfs_node([], b"x", kind=1), "UnixFS node is not a file (type 1)"),
    (pb(2, pb(2, b"name")), "dag-pb link without a hash"),
    (pb(3, 7), "dag-pb field 3 (wire type 0) is not part of a PBNode"),
    (pb(2, b"") + b"", "dag-pb link without a hash"),
    (b"", "dag-pb node without UnixFS data"),
    (b"\x0a\x05ab", "protobuf field 1 runs past the end"),
    (b"\x0b", "protobuf wire type 3"),
])
def test_dag_pb_nodes_that_are_not_unixfs_files_are_refused(node, reason):
    cid = cid_of(node, "dag-pb")
    with pytest.raises(CarError, match=rf"node {cid_str(cid)}: {re.escape(reason)}$"):
        unixfs_cat(lambda _: node, cid)


# -- fuzz: whatever the bytes, CarError or an answer ----------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_raise_only_car_error(data):
    for candidate in (data, header([ROOT]) + data, GOOD[:len(GOOD) // 2] + data):
        try:
            read_car(candidate, max_block_bytes=1 << 16)
        except CarError:
            pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255), st.integers(0, len(GOOD)))
def test_fuzz_mutated_cars_raise_only_car_error(position, xor, cut):
    data = bytearray(GOOD)
    data[position] ^= xor
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            roots, blocks = read_car(candidate)
        except CarError:
            continue
        assert all(multihash.digest(b.data, "sha2-256") == b.cid.digest for b in blocks)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_dag_pb_bytes_raise_only_car_error(node):
    try:
        unixfs_cat(lambda _: node, cid_of(node, "dag-pb"), max_size=1 << 16, max_nodes=50)
    except (CarError, TooLarge):
        pass


# -- real daemons ---------------------------------------------------------------------------------------


def node_view(path: Path) -> dict:
    """What @ipld/car sees in the file: roots, blocks, and blocks whose bytes do not match their CID."""
    proc = subprocess.run(["node", str(NODE_SCRIPT), str(path)], capture_output=True, text=True, timeout=60,
                          cwd=NODE_SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def keys(cids) -> set[tuple[str, bytes]]:
    return {(parse_cid(c).codec.name, bytes(parse_cid(c).digest)) for c in cids}


@pytest.mark.integration
def test_export_import_and_verify_car_across_devnets_that_never_met(make_devnet, tmp_path):
    assert shutil.which("node"), "node is needed to read the CAR with @ipld/car"
    first = make_devnet(1)
    with first.nodes[0].client() as client:
        _, cids = build_chain(client, rounds=3)
        head = cid_str(cids[-1])
        big = bytes(range(256)) * 12000  # 3 MB: a UnixFS file of 1 MiB raw leaves, read back through the CAR
        big_cid = client.add(big)
        client.dag_export(big_cid, tmp_path / "big.car")
    with CarStore(tmp_path / "big.car") as store:
        assert store.cat(big_cid) == big and len(store) > 1

    path = tmp_path / "job.car"
    started = time.monotonic()
    proc = run_cli("grid_ipfs.chain", "export", "--api", first.apis[0], "--car", str(path), head, timeout=120)
    exported = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    with CarStore(path) as store:
        ours = {"roots": [cid_str(r) for r in store.roots], "blocks": list(store.index)}
        assert proc.stdout == (f"wrote {path}: {len(store)} blocks, {path.stat().st_size} bytes (root {head}, "
                               "4 chain blocks to genesis)\n")
        # 4 blocks, the model, 4 global weights, 9 updates' weights and their 9 signed messages at least
        assert len(store) >= 27
    theirs = node_view(path)
    assert theirs["bad"] == []
    assert keys(theirs["roots"]) == keys(ours["roots"]) == keys([head])
    assert {bytes(parse_cid(c).digest) for c in theirs["blocks"]} == set(ours["blocks"])
    first.stop()  # the second devnet can get the chain from the file only

    second = make_devnet(1)
    proc = run_cli("grid_ipfs.chain", "import", "--api", second.apis[0], str(path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == [head]
    with second.nodes[0].client() as client:
        assert client.swarm_peers() == []
        report = verify_chain(client, head)
        assert report.ok, report.reason
        assert keys([head]) <= keys(client.pin_ls(type="recursive"))  # js-ipfs prints it base58btc
    second.stop()  # no daemon at all from here on

    started = time.monotonic()
    proc = run_cli("grid_ipfs.chain", "verify", "--car", str(path), timeout=120)
    verified = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"OK: 4 blocks verified from {head} to genesis\n"
    print(f"\nexport {exported:.2f}s, verify --car {verified:.2f}s, {path.stat().st_size} bytes")

    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "flipped.car").write_bytes(bytes(data))
    proc = run_cli("grid_ipfs.chain", "verify", "--car", str(tmp_path / "flipped.car"), timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.endswith("does not hash to its CID\n"), proc.stderr


def test_import_checks_the_file_before_it_connects(tmp_path, capsys):
    cid, data = BLOCKS[2]
    bad = write(tmp_path, header([ROOT]) + section(cid, data[:-1] + b"!"))
    assert chain_main(["import", "--api", "/ip4/127.0.0.1/tcp/1", str(bad)]) == 1  # nothing listens there
    err = capsys.readouterr().err
    assert err == f"error: CAR {bad}: offset {len(bad.read_bytes()) - len(data)}: block {cid_str(cid)} does not hash " \
                  "to its CID\n"
