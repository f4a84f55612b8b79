"""Custom block fields: the signed `ext` map, the client's `block_fields` hook, verify's `check_ext`.

Unit tests of the layout first (no daemon: blocks are encoded, signed and decoded in memory). Then one
module-scoped grid of real loopback daemons and 3 worker processes runs the custom-block example's job
(`examples/diabetes_custom_block.py`: linear regression whose blocks record their coefficients); the
tests read its chain from a node the client never wrote to, audit it with the example's check, forge
copies of it, and run jobs whose callbacks return fields the client must refuse.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import dag_cbor  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from multiformats import CID, multihash  # noqa: E402

from grid_ipfs.chain import (  # noqa: E402
    ChainError,
    block_cid,
    check_signature,
    decode_block,
    encode_block,
    read_head,
    sign_block,
    verify_chain,
    walk,
)
from grid_ipfs.chain.blocks import EXT_MAX_DEPTH, normalise_ext  # noqa: E402
from grid_ipfs.client import ClientCallback, JobFailed  # noqa: E402
from grid_ipfs.identity import Identity  # noqa: E402
from grid_ipfs.ipfs.cids import cid_str, same_cid  # noqa: E402
from grid_ipfs.localgrid import LocalGrid  # noqa: E402
from grid_ipfs.payloads import weights_from_bytes  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OWNER = Identity.generate()
WORKER = Identity.generate()
LINK = block_cid(b"some weights")
MESSAGE = CID("base32", 1, "raw", multihash.digest(b"msg", "sha2-256"))
"""Where a version 2 update entry's signed message would be (a raw block; layout tests never fetch it)."""


def load_example():
    """examples/diabetes_custom_block.py as a module (it imports its sibling examples/diabetes.py)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("diabetes_custom_block", EXAMPLES / "diabetes_custom_block.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


example = load_example()


def round_fields(**extra) -> dict:
    """The fields of a valid round-1 block (links need not resolve: only the layout is checked)."""
    return {"job": "job-1", "seq": 1, "round": 1, "prev": block_cid(b"genesis"), "model": block_cid(b"model"),
            "weights": LINK, "aggregation": {"name": "fedavg", "params": {}},
            "updates": [{"worker": WORKER.id, "weights": LINK, "num_examples": 3, "metrics": {"loss": 0.5},
                         "message": MESSAGE}],
            "metrics": {"loss": 0.5}, "time": 1.0, **extra}


# -- the ext layout --------------------------------------------------------------------------------------


def test_ext_round_trips_every_kind_of_plain_value_and_is_signed():
    ext = {"kind": "linreg", "coef": [0.5, -1.25, 0.0], "n": 3, "top": 2**63 - 1, "bottom": -(2**63),
           "flag": True, "raw": b"\x00\xff", "link": LINK, "nested": {"a": [1, [2.0, {"b": "c"}]], "empty": []}}
    block = sign_block(round_fields(ext=ext), OWNER)
    data, cid = encode_block(block)
    decoded = decode_block(data, cid)
    assert decoded["ext"] == ext
    assert decoded["ext"]["flag"] is True and type(decoded["ext"]["n"]) is int
    assert type(decoded["ext"]["coef"][2]) is float and isinstance(decoded["ext"]["link"], type(LINK))
    assert check_signature(decoded)
    # ext is part of what the CID names: other fields, another block
    assert encode_block(sign_block(round_fields(ext={**ext, "n": 4}), OWNER))[1] != cid


def test_genesis_may_carry_ext_too():
    genesis = {**round_fields(seq=0, round=0, aggregation={"name": "init", "params": {}}, updates=[]),
               "ext": {"note": "initial model"}}
    del genesis["prev"]
    data, cid = encode_block(sign_block(genesis, OWNER))
    assert decode_block(data, cid)["ext"] == {"note": "initial model"}


def test_numpy_values_and_tuples_are_made_plain_when_signing():
    ext = {"coef": np.array([[0.5], [1.5]], np.float32).ravel(), "x": np.float32(0.25), "n": np.int64(7),
           "pair": (1, 2), "flag": np.bool_(False), "deep": {"m": np.zeros((2, 2), np.int32)}}
    block = sign_block(round_fields(ext=ext), OWNER)
    assert block["ext"] == {"coef": [0.5, 1.5], "x": 0.25, "n": 7, "pair": [1, 2], "flag": False,
                            "deep": {"m": [[0, 0], [0, 0]]}}
    assert type(block["ext"]["x"]) is float and type(block["ext"]["n"]) is int and block["ext"]["flag"] is False
    assert decode_block(*encode_block(block))["ext"] == block["ext"]


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("ext, reason", [
    ([1, 2], "ext: expected a map with non-empty string keys, got list"),
    ("linreg", "ext: expected a map with non-empty string keys, got str"),
    ({}, r"ext: an empty map \(omit the field instead\)"),
    ({"": 1}, "ext: keys must be non-empty strings, got ''"),
    ({"a": {"": 1}}, "ext.a: keys must be non-empty strings, got ''"),
    ({"a": [{"b": {3: 1}}]}, r"ext.a\[0\].b: keys must be non-empty strings, got 3"),
    ({"coef": [0.1, float("nan")]}, r"ext.coef\[1\]: expected a finite float, got nan"),
    ({"x": float("-inf")}, "ext.x: expected a finite float, got -inf"),
    ({"x": None}, r"ext.x: null is not allowed \(omit the key\)"),
    ({"x": 2**63}, "ext.x: integer out of the signed 64-bit range"),
    ({"x": -(2**63) - 1}, "ext.x: integer out of the signed 64-bit range"),
    ({"x": {1, 2}}, "ext.x: set is not plain dag-cbor data"),
    ({"x": (1, 2)}, "ext.x: tuple is not plain dag-cbor data"),
    ({"x": nested(EXT_MAX_DEPTH)}, rf"ext.x(\[0\])*: nested deeper than {EXT_MAX_DEPTH} levels"),
])
def test_bad_ext_is_refused_naming_the_key(ext, reason):
    block = {**sign_block(round_fields(), OWNER), "ext": ext}
    with pytest.raises(ChainError, match=f"^{reason}"):
        encode_block(block)
    try:
        data = dag_cbor.encode(block)
    except Exception:  # noqa: BLE001 - NaN, sets, tuples, huge ints: dag-cbor cannot even write them
        data = None
    if data is not None:  # bytes a forger could put on IPFS are refused when read back
        with pytest.raises(ChainError, match=f"^{reason}"):
            decode_block(data)
    if ext not in ({}, {"x": (1, 2)}):  # signing drops an empty ext and makes tuples lists
        with pytest.raises(ChainError, match=f"^{reason}"):  # otherwise a bad ext is never signed
            sign_block(round_fields(ext=ext), OWNER)


def test_nesting_up_to_the_limit_is_fine():
    ext = {"x": nested(EXT_MAX_DEPTH - 1)}  # ext itself is level 1
    assert decode_block(*encode_block(sign_block(round_fields(ext=ext), OWNER)))["ext"] == ext


def test_no_ext_has_one_spelling_absent():
    for empty in ({}, None):
        assert "ext" not in sign_block(round_fields(ext=empty), OWNER)
    assert normalise_ext({}) is None and normalise_ext(None) is None
    assert normalise_ext({"a": np.float64(1.0)}) == {"a": 1.0}
    with pytest.raises(ChainError, match="ext: expected a map"):
        normalise_ext(np.array([1.0]))


def test_a_tampered_ext_fails_the_signature():
    block = sign_block(round_fields(ext={"kind": "linreg", "coef": [0.5, 1.5]}), OWNER)
    assert check_signature(block)
    for forged in ({**block["ext"], "coef": [0.5, 1.25]}, {**block["ext"], "extra": 1},
                   {"coef": [0.5, 1.5]}):
        assert not check_signature({**block, "ext": forged})
        encode_block({**block, "ext": forged})  # a valid layout: only the signature tells
    without = {k: v for k, v in block.items() if k != "ext"}
    assert not check_signature(without)


# -- the example's job on real daemons -------------------------------------------------------------------


class Recorder(ClientCallback):
    """Records what `block_fields` is given, and adds nothing."""

    def __init__(self):
        self.calls = []

    def block_fields(self, round, weights, updates, metrics):
        self.calls.append(SimpleNamespace(round=round, weights=weights, updates=updates, metrics=metrics))
        weights[0][0, 0] = 1e6  # a copy: the block's weights must not change
        metrics["val_loss"] = -1.0
        return None


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("linreg")
    shards, _ = example.prepare(root, 3)
    local = LocalGrid(root / "grid", shards, nodes=3)
    local.start()
    try:
        yield SimpleNamespace(local=local, root=root, owner=Identity.generate())
    finally:
        local.stop()


@pytest.fixture(scope="module")
def job(grid):
    recorder = Recorder()
    with grid.local.client(0) as ipfs:
        result = example.train(ipfs, grid.root, grid.owner, rounds=2, workers=3, epochs=2, callbacks=[recorder])
    return SimpleNamespace(result=result, calls=recorder.calls)


@pytest.fixture
def reader(grid):
    """An RPC client on node 2, which the client (node 0) never wrote to."""
    with grid.local.client(2) as client:
        yield client


def logs(grid) -> str:
    return "\n".join(f"--- worker{i}\n{grid.local.worker_log(i)[-3000:]}" for i in range(3))


@pytest.mark.integration
def test_every_round_block_carries_the_linreg_fields_of_its_own_weights(grid, job, reader):
    blocks = [block for _, block in walk(reader, job.result.head)][::-1]
    assert [b["round"] for b in blocks] == [0, 1, 2], logs(grid)
    assert "ext" not in blocks[0]  # block_fields is a round hook
    for block in blocks[1:]:
        ext = block["ext"]
        assert set(ext) == {"kind", "coef", "intercept", "val_mse"} and ext["kind"] == "linreg"
        kernel, bias = weights_from_bytes(reader.cat(block["weights"]))
        assert ext["coef"] == [float(c) for c in kernel.ravel()] and len(ext["coef"]) == 10
        assert ext["intercept"] == float(bias[0])
        assert ext["val_mse"] == block["metrics"]["val_loss"] < 1.0
        assert block["metrics"]["accepted"] == 1.0 and block["aggregation"]["params"] == {"accept": "val_loss<=1.0"}
    assert blocks[1]["ext"]["coef"] != blocks[2]["ext"]["coef"]  # training moved the line
    # plain IPFS tools read the custom fields through the chain's links
    assert reader.dag_get(f"{cid_str(job.result.head)}/ext/kind") == "linreg"
    assert reader.dag_get(f"{cid_str(job.result.head)}/prev/ext/intercept") == blocks[1]["ext"]["intercept"]


@pytest.mark.integration
def test_the_hook_gets_copies_of_the_round_s_weights_updates_and_metrics(job, reader):
    blocks = {b["round"]: b for _, b in walk(reader, job.result.head)}
    assert [c.round for c in job.calls] == [1, 2]
    for call in job.calls:
        block = blocks[call.round]
        stored = weights_from_bytes(reader.cat(block["weights"]))
        assert call.weights[0][0, 0] == 1e6 and stored[0][0, 0] != 1e6  # the recorder scribbled on its copy
        assert np.array_equal(call.weights[1], stored[1]) and np.array_equal(call.weights[0][1:], stored[0][1:])
        assert call.metrics["val_loss"] == -1.0 != block["metrics"]["val_loss"]
        assert {k: v for k, v in call.metrics.items() if k != "val_loss"} == \
            {k: v for k, v in block["metrics"].items() if k != "val_loss"}
        assert [(u["worker"], u["num_examples"], u["metrics"]) for u in call.updates] == \
            [(u["worker"], u["num_examples"], u["metrics"]) for u in block["updates"]]
        assert all(same_cid(u["weights"], b["weights"]) for u, b in zip(call.updates, block["updates"]))


@pytest.mark.integration
def test_verify_with_the_check_passes_and_checks_every_block(grid, job, reader):
    seen = []

    def check(block, weights):
        seen.append((block["round"], [w.shape for w in weights]))
        return example.check_linreg(block, weights)

    report = verify_chain(reader, job.result.head, check_ext=check, signer=grid.owner.id)
    assert report.ok and report.blocks == 3, report.reason
    assert seen == [(r, [(10, 1), (1,)]) for r in (0, 1, 2)]
    # without fetching objects or recomputing, the check still gets each block's weights
    seen.clear()
    assert verify_chain(reader, job.result.head, check_objects=False, recompute=False, check_ext=check).ok
    assert [r for r, _ in seen] == [0, 1, 2]


@pytest.mark.integration
def test_a_forged_ext_re_signed_by_the_owner_is_caught_only_by_the_check(grid, job, reader):
    head = job.result.head
    intercept = [b for _, b in walk(reader, head)][0]["ext"]["intercept"]
    forged = example.forge_head(reader, head, grid.owner, intercept=intercept + 0.5)
    assert verify_chain(reader, forged, signer=grid.owner.id).ok  # signature, links, aggregate: all fine
    report = verify_chain(reader, forged, check_ext=example.check_linreg)
    assert not report.ok and same_cid(report.first_bad, forged)
    assert report.reason == (f"block 2 (seq 2): ext: intercept is {intercept + 0.5!r}, "
                             f"but the block's weights give {intercept!r}")
    assert [c.ok for c in report.checks] == [True, True, False]
    # a coefficient is named by its index
    zeroed = example.forge_head(reader, head, grid.owner, coef=[0.0] * 10)
    assert "ext: coef[0] is 0.0, but the block's weights give" in \
        verify_chain(reader, zeroed, check_ext=example.check_linreg).reason


@pytest.mark.integration
def test_a_tampered_ext_stored_without_re_signing_fails_the_signature(grid, job, reader):
    block = decode_block(reader.block_get(job.result.head), job.result.head)
    data, cid = encode_block({**block, "ext": {**block["ext"], "val_mse": 0.01}})  # same sig, other fields
    assert same_cid(reader.block_put(data), cid)
    report = verify_chain(reader, cid)
    assert not report.ok and same_cid(report.first_bad, cid)
    assert report.reason == f"block 2 (seq 2): bad signature from {grid.owner.id}"


@pytest.mark.integration
def test_a_check_that_raises_on_an_unexpected_block_is_a_verdict(job, reader):
    report = verify_chain(reader, job.result.head, check_ext=lambda block, weights: block["ext"]["kind"])
    assert not report.ok and report.checks[0].ok is False  # genesis has no ext
    assert report.reason == "block 0 (seq 0): ext check failed: KeyError: 'ext'"
    strict = verify_chain(reader, job.result.head,
                          check_ext=lambda block, weights: None if block["round"] < 2 else "round 2 is not wanted")
    assert strict.reason == "block 2 (seq 2): ext: round 2 is not wanted"
    boolean = verify_chain(reader, job.result.head, check_ext=lambda block, weights: False)
    assert boolean.reason == "block 0 (seq 0): check_ext returned False, expected None (fine) or a reason string"


@pytest.mark.integration
def test_the_chain_cli_runs_the_auditor_s_check_named_on_the_command_line(grid, job, reader):
    from .cli import run_cli

    check = f"{EXAMPLES / 'diabetes_custom_block.py'}:check_linreg"
    api = grid.local.apis[2]
    ok = run_cli("grid_ipfs.chain", "verify", "--api", api, "--check-ext", check, cid_str(job.result.head))
    assert ok.returncode == 0 and "3 blocks verified" in ok.stdout, ok.stdout + ok.stderr
    assert "custom fields checked by check_linreg" in ok.stdout
    intercept = [b for _, b in walk(reader, job.result.head)][0]["ext"]["intercept"]
    forged = cid_str(example.forge_head(reader, job.result.head, grid.owner, intercept=intercept + 0.5))
    plain = run_cli("grid_ipfs.chain", "verify", "--api", api, forged)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # re-signed by the owner: only the check sees it
    caught = run_cli("grid_ipfs.client", "verify", "--api", api, "--check-ext", check, forged)
    assert caught.returncode == 1 and f"ext: intercept is {intercept + 0.5!r}" in caught.stdout, caught.stdout
    for spec, reason in (("check_linreg", "expected MODULE:FUNCTION or PATH.py:FUNCTION"),
                         ("no_such_module_here:check", "cannot load no_such_module_here: ModuleNotFoundError"),
                         (f"{EXAMPLES / 'missing.py'}:check", "no file"),
                         ("grid_ipfs.chain.verify:nothing", "grid_ipfs.chain.verify has no function nothing")):
        bad = run_cli("grid_ipfs.chain", "verify", "--api", api, "--check-ext", spec, forged)
        assert bad.returncode == 2 and reason in bad.stderr and "Traceback" not in bad.stderr, (spec, bad.stderr)


class BadFields(ClientCallback):
    """Remembers its job's genesis, to show that a refused field left the chain at genesis."""

    def on_job_start(self, job, genesis):
        self.job, self.genesis = job.job, genesis


class Clash(BadFields):
    def block_fields(self, round, weights, updates, metrics):
        return {"own": 1, "kind": "mine"}


class NotFinite(BadFields):
    def block_fields(self, round, weights, updates, metrics):
        return {"score": [1.0, float("nan")]}


class NotAMap(BadFields):
    def block_fields(self, round, weights, updates, metrics):
        return [("kind", "list")]


@pytest.mark.integration
@pytest.mark.parametrize("callback, error", [
    (Clash, "round 1: block field ext.kind is set by both Clash and LinRegBlock"),
    (NotFinite, r"round 1: NotFinite.block_fields: ext.score\[1\]: expected a finite float, got nan"),
    (NotAMap, "round 1: NotAMap.block_fields returned list, expected a dict or None"),
])
def test_bad_block_fields_fail_the_job_before_anything_is_signed(grid, callback, error):
    callback = callback()
    with grid.local.client(0) as ipfs, pytest.raises(JobFailed, match=f"^{error}$"):
        example.train(ipfs, grid.root, grid.owner, rounds=1, workers=3, epochs=1, callbacks=[callback])
    head = read_head(grid.root / "heads" / f"{callback.job}.head")
    assert cid_str(head) == callback.genesis  # round 1's block was never appended
