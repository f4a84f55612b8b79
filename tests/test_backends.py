"""Keras backends: workers on TensorFlow, JAX and PyTorch exchange the same `.keras` model and the same
safetensors weights, and their updates say which backend trained them.

Each backend runs in its own process (KERAS_BACKEND is read when Keras loads, and a process forked after
TensorFlow ran hangs): `tests/backend_probe.py` for the weights round trip, worker processes started by
`LocalGrid(worker_env=...)` for the mixed job on real daemons.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from grid_ipfs import data, messages, zoo
from grid_ipfs.chain import verify_chain, walk
from grid_ipfs.chain.contributions import ContributionError, decode_update, message_cid
from grid_ipfs.identity import Identity, b64url_encode
from grid_ipfs.localgrid import LocalGrid
from grid_ipfs.payloads import weights_to_bytes

from .cli import run_cli

BACKENDS = ("tensorflow", "jax", "torch")
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}


# -- the backend named in an update -------------------------------------------------------------------


def _update(**fields):
    base = dict(job="j", round=1, weights="bafkqaaa", num_examples=10, metrics={}, eval_metrics={})
    return messages.Update(**{**base, **fields})


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_update_names_its_backend_and_decodes_with_it(backend):
    me = Identity.generate()
    envelope = messages.decode(messages.encode(_update(backend=backend), me))
    assert envelope.message.backend == backend and envelope.sender == me.id


def test_an_update_without_a_backend_decodes_as_before():
    data = messages.encode(_update(), Identity.generate())
    assert b"backend" not in data  # an unset optional field is not sent: old receivers accept the message
    assert messages.decode(data).message.backend is None


@pytest.mark.parametrize("value", ["numpy", "TensorFlow", "jax ", "", "torch\n", "<b>jax</b>", "x" * 10_000,
                                   1, True, ["jax"], {"jax": 1}, 1.5], ids=lambda value: repr(value)[:24])
def test_an_unknown_or_malformed_backend_is_refused(value):
    with pytest.raises(messages.MessageError, match="backend: expected one of tensorflow, jax, torch"):
        _update(backend=value)


def test_a_forged_backend_in_a_signed_update_is_refused_by_decoding():
    """A peer that signs an update naming a backend outside the list, or rewrites the backend of a
    genuine one: the first is refused by validation, the second by the signature."""
    me = Identity.generate()
    obj = json.loads(messages.encode(_update(backend="jax"), me))
    unknown = messages.canonical_json({**obj, "backend": "tpu-v9"})
    with pytest.raises(messages.MessageError, match="backend: expected one of"):
        messages.decode(unknown)
    with pytest.raises(messages.MessageError, match="bad signature"):
        messages.decode(messages.canonical_json({**obj, "backend": "torch"}))
    del obj["sig"]
    obj["backend"] = "numpy"  # a validly signed message naming an unknown backend
    obj["sig"] = b64url_encode(me.sign(messages.canonical_json(obj)))
    with pytest.raises(messages.MessageError, match="backend: expected one of"):
        messages.decode(messages.canonical_json(obj))


def test_a_chain_link_to_an_update_naming_an_unknown_backend_does_not_verify():
    """What the chain keeps of the backend is the signed message itself: a linked message naming a
    backend outside the list is no update, whoever signed it."""
    me = Identity.generate()
    obj = json.loads(messages.encode(_update(backend="jax"), me))
    del obj["sig"]
    obj["backend"] = "cuda"
    obj["sig"] = b64url_encode(me.sign(messages.canonical_json(obj)))
    data = messages.canonical_json(obj)
    with pytest.raises(ContributionError, match="backend: expected one of"):
        decode_update(data, message_cid(data))
    genuine = messages.encode(_update(backend="torch"), me)
    assert decode_update(genuine, message_cid(genuine)).message.backend == "torch"


# -- the same weights under every backend ---------------------------------------------------------------


def test_the_same_weights_round_trip_byte_for_byte_under_every_backend(tmp_path):
    """The model saved here (TensorFlow) is loaded by a process per backend, which sets the weights from
    safetensors bytes and writes back what Keras then holds: the same bytes. Every backend evaluates them
    alike, trains repeatably from them with a seed, and JAX and PyTorch never import TensorFlow."""
    model = zoo.digits_mlp(seed=0)
    model.save(tmp_path / "digits.keras")
    rng = np.random.default_rng(3)
    weights = [rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in model.get_weights()]
    sent = weights_to_bytes(weights)
    (tmp_path / "in.safetensors").write_bytes(sent)
    probes = {}
    for backend in BACKENDS:  # started together, waited for together: ~10 s in all
        command = [sys.executable, "-m", "tests.backend_probe", str(tmp_path / "digits.keras"),
                   str(tmp_path / "in.safetensors"), str(tmp_path / f"{backend}.safetensors")]
        probes[backend] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env={**os.environ, **QUIET, "KERAS_BACKEND": backend})
    results = {}
    try:
        for backend, proc in probes.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"{backend}: {err[-3000:]}"
            results[backend] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in probes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for backend, result in results.items():
        assert result["backend"] == backend
        assert (tmp_path / f"{backend}.safetensors").read_bytes() == sent, backend
        assert result["repeatable"], f"{backend}: the same seed trained two different updates"
        assert result["tensorflow_loaded"] is (backend == "tensorflow"), backend
        reference = results["tensorflow"]["eval"]
        assert result["eval"]["loss"] == pytest.approx(reference["loss"], rel=1e-4), (backend, result["eval"])
        assert result["eval"]["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6), (backend, result)


# -- one job, three backends, on real daemons --------------------------------------------------------------


ROUNDS = 2
JOB = f"digits-backends-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three workers, one per backend, each on its own node (the PyTorch one with `--isolate`), and a
    2-round digits job run by the client CLI; the workers' ids and the job's `--json` result."""
    root = tmp_path_factory.mktemp("backends")
    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, 3, seed=0))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    topic = f"grid-ipfs/v1/jobs-backends-{secrets.token_hex(4)}"  # apart from jobs of other runs on this host
    local = LocalGrid(root / "grid", shards[:2], nodes=3, worker_args=["--topic", topic],
                      worker_env=[{"KERAS_BACKEND": b} for b in BACKENDS[:2]])
    local.start()
    try:  # the PyTorch worker trains in its --isolate child, which inherits the backend
        local.add_worker(shards[2], ["--isolate"], env={"KERAS_BACKEND": BACKENDS[2]})
        proc = run_cli("grid_ipfs.client", "submit", "--api", local.apis[0], "--model", str(root / "digits.keras"),
                       "--topic", topic,
                       "--rounds", str(ROUNDS), "--min-workers", "3", "--epochs", "2", "--batch-size", "32",
                       "--eval-data", str(root / "test.npz"), "--key", str(root / "client.key"),
                       "--head-dir", str(root / "heads"), "--job", JOB, "--json", timeout=400)
        logs = "\n".join(f"--- worker{i} ({b})\n{local.worker_log(i)[-3000:]}" for i, b in enumerate(BACKENDS))
        assert proc.returncode == 0, f"client failed:\n{proc.stderr[-3000:]}\n{logs}"
        ids = {Identity.load_or_create(root / "grid" / "keys" / f"worker{i}.key").id: b
               for i, b in enumerate(BACKENDS)}
        yield SimpleNamespace(local=local, job=json.loads(proc.stdout), backend_of=ids)
    finally:
        local.stop()


@pytest.mark.integration
def test_a_job_trained_on_three_backends_completes_with_sane_accuracy(mixed):
    rounds = mixed.job["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["updates"] == 3 for r in rounds), json.dumps(mixed.job, indent=1)
    assert rounds[-1]["metrics"]["val_accuracy"] >= 0.85, rounds[-1]["metrics"]
    for i, backend in enumerate(BACKENDS):
        log = mixed.local.worker_log(i)
        assert f"job {JOB} round {ROUNDS}: " in log, (backend, log[-2000:])
        assert "Traceback" not in log and "libtpu" not in log, (backend, log[-3000:])  # JAX's chatter quieted


@pytest.mark.integration
def test_each_update_on_the_chain_records_its_worker_s_backend_and_verifies_from_another_node(mixed):
    with mixed.local.client(2) as reader:  # a node neither the client nor worker0 talked to
        report = verify_chain(reader, mixed.job["head"])
        assert report.ok, report.reason
        recorded = []
        for _, block in walk(reader, mixed.job["head"]):
            for entry in block["updates"]:
                update = decode_update(reader.block_get(entry["message"]), entry["message"])
                recorded.append((block["round"], update.message.backend, mixed.backend_of[update.sender]))
    assert sorted(recorded) == sorted((r, b, b) for r in range(1, ROUNDS + 1) for b in BACKENDS)
