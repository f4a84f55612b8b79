"""One in-process `Miner` on a real daemon, asked for rivals in two jobs one after the other.

The candidates are made by hand (as in tests/test_contest.py), so no worker or client process runs: the
test is about what the miner carries from one job into the next.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from grid_ipfs import messages  # noqa: E402
from grid_ipfs.chain import ChainLog, decode_block, verify_chain  # noqa: E402
from grid_ipfs.contest import pofl_record  # noqa: E402
from grid_ipfs.identity import Identity  # noqa: E402
from grid_ipfs.ipfs.cids import cid_str  # noqa: E402
from grid_ipfs.miner import Miner, _Followed  # noqa: E402
from grid_ipfs.payloads import weights_to_bytes  # noqa: E402
from grid_ipfs.strategies import aggregate  # noqa: E402

from .test_chain_format import signed_update  # noqa: E402

pytestmark = pytest.mark.integration

OWNER, MINER = Identity.generate(), Identity.generate()
WORKERS = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.id)


def _model():
    """A 3-input, 2-class softmax layer: weights of shapes (3, 2) and (2,)."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _job(store, job_id: str, params: dict, rng):
    """Genesis and the owner's staged fedavg candidate for round 1 of `job_id` with aggregation
    `params`; (chain, model CID, the candidate's CID, the reference weights' CID)."""
    reference = [rng.normal(size=(3, 2)).astype(np.float32), np.zeros(2, np.float32)]
    chain = ChainLog(store, None)
    model = store.add(f"the .keras file of {job_id}".encode())
    base = store.add(weights_to_bytes(reference))
    genesis = chain.append({"job": job_id, "round": 0, "model": model, "weights": base,
                            "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": {}}, OWNER)
    results = [([w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in reference], 10 + i)
               for i in range(len(WORKERS))]
    entries = []
    for worker, (weights, n) in zip(WORKERS, results):
        cid = store.add(weights_to_bytes(weights))
        entries.append({"worker": worker.id, "weights": cid, "num_examples": n, "metrics": {},
                        "message": signed_update(store, worker, job=job_id, round_=1, head=genesis, base=base,
                                                 weights=cid, num_examples=n, metrics={})})
    fields = {"job": job_id, "round": 1, "model": model,
              "weights": store.add(weights_to_bytes(aggregate("fedavg", results))),
              "aggregation": {"name": "fedavg", "params": params}, "updates": entries, "metrics": {"loss": 0.5}}
    return chain, model, cid_str(chain.stage(fields, OWNER)), cid_str(base)


def _ask(miner, store, job_id: str, params: dict, rng):
    """Have `miner` answer the owner's `propose` for round 1 of a new job; (the owner's chain, the rival)."""
    chain, model, candidate, reference = _job(store, job_id, params, rng)
    job = messages.Job(job=job_id, model=cid_str(model), owner=OWNER.id,
                       config={"epochs": 1, "batch_size": 8, "rounds": 1})
    followed = _Followed(job, _model(), miner.x_val, miner.y_val)
    miner.propose(followed, messages.Propose(job=job_id, round=1, candidate=candidate, reference=reference,
                                             deadline=time.time() + 60))
    rival_cid = followed.rounds[1].proposed
    assert rival_cid is not None, "the miner proposed no rival"
    return chain, decode_block(store.block_get(rival_cid), rival_cid), rival_cid


def _owner_appends(store, chain, rival, rival_cid):
    """The owner's round 1 block when the rival won, as the client writes it (rival's weights and rule)."""
    assert cid_str(chain.head) == cid_str(rival["prev"])  # the rival extends the owner's head (genesis)
    fields = {"job": rival["job"], "round": 1, "model": rival["model"], "updates": rival["updates"],
              "weights": rival["weights"], "aggregation": rival["aggregation"], "metrics": dict(rival["metrics"]),
              "ext": {"pofl": pofl_record(MINER.id, rival_cid, [rival_cid])}}
    return chain.append(fields, OWNER)


def test_one_miner_carries_no_acceptance_rule_from_one_job_into_the_next(clients):
    """A long-running miner with its own rule answers a job with an acceptance rule, then one without:
    the second rival must not carry the first job's `accept`, or the owner's chain, which takes the
    winner's rule, records a rule it never applied and fails verify."""
    store, rng = clients[0], np.random.default_rng(7)
    x_val = rng.normal(size=(40, 3)).astype(np.float32)
    y_val = (x_val[:, 0] > 0).astype(np.int64)
    miner = Miner(store, MINER, x_val, y_val, aggregation="median", params={})
    try:
        _, first, _ = _ask(miner, store, f"ruled-{os.getpid()}", {"accept": "val_accuracy>=0.0"}, rng)
        assert first["aggregation"] == {"name": "median", "params": {"accept": "val_accuracy>=0.0"}}
        assert first["metrics"]["accepted"] == 1.0
        chain, second, second_cid = _ask(miner, store, f"unruled-{os.getpid()}", {}, rng)
        assert second["aggregation"] == {"name": "median", "params": {}}, second["aggregation"]
        assert "accepted" not in second["metrics"]
        assert miner.params == {} and miner.proposed == 2
        report = verify_chain(store, _owner_appends(store, chain, second, second_cid), signer=OWNER.id)
        assert report.ok and report.blocks == 2, report.reason
    finally:
        miner.close()
