"""`chain verify` on asynchronous chains built by hand (a fake node, no daemons): which base each update
decodes and rebases against, staleness bounds, the median rule and server_lr over rebased updates,
int8 updates from an older base, and the chains an owner might forge (mixed sync and async entries,
a bound broken, a malformed async config) each get a verdict naming the block, never an exception."""

from __future__ import annotations

import numpy as np
import pytest

from grid_ipfs.chain import ChainLog, verify_chain
from grid_ipfs.payloads import update_to_bytes, weights_from_bytes, weights_to_bytes
from grid_ipfs.strategies import RoundContext, make, run
from grid_ipfs.strategies.fedbuff import AsyncConfig, Staleness, rebase, server_step

from .test_chain_format import OWNER, WORKERS, MemoryStore, genesis_fields, signed_update

CONFIG = AsyncConfig(2, Staleness(), 0.5, 2)
RULE = "median"


class Chain:
    """An async job's chain, one block at a time, with what the owner would compute for each."""

    def __init__(self, config: dict | None = None):
        self.store, self.rng = MemoryStore(), np.random.default_rng(7)
        self.log = ChainLog(self.store, None)
        fields = genesis_fields(self.store, self.rng)
        fields["config"] = config if config is not None else {"aggregation": RULE, "async": CONFIG.record()}
        self.genesis = fields
        self.heads = [(self.log.append(fields, OWNER), 1, fields["weights"])]  # (head, round for, weights)
        self.weights = {str(fields["weights"]): weights_from_bytes(self.store.cat(fields["weights"]))}

    def update(self, worker, base_index: int, compression: str | None = None):
        head, round_for, base_cid = self.heads[base_index]
        base = self.weights[str(base_cid)]
        trained = [w + self.rng.standard_normal(w.shape).astype(np.float32) * 0.1 for w in base]
        data = update_to_bytes(trained, base, compression) if compression else weights_to_bytes(trained)
        cid = self.store.add(data)
        sent = weights_from_bytes(data, base=base)  # what the owner reads: the quantized update
        n, metrics = 10 + base_index, {"loss": 0.5}
        message = signed_update(self.store, worker, job="job-1", round_=round_for, head=head, base=base_cid,
                                weights=cid, num_examples=n, metrics=metrics)
        return {"worker": worker.id, "weights": cid, "num_examples": n, "metrics": metrics, "message": message,
                "base": head, "staleness": None, "_sent": sent, "_base": base, "_round_for": round_for}

    def block(self, r: int, updates: list, *, weights=None, accepted: bool = True, **changes):
        newest = self._newest()
        for u in updates:
            if "base" in u and u["staleness"] is None:
                u["staleness"] = r - u["_round_for"]
        rebased = [(rebase(u["_sent"], u["_base"], newest, CONFIG.staleness.weight(r - u["_round_for"])),
                    u["num_examples"]) for u in sorted(updates, key=lambda u: u["worker"])]
        result = server_step(newest, run(make(RULE), rebased, RoundContext(newest, r, 0)).weights, CONFIG.server_lr)
        cid = weights if weights is not None else self.store.add(weights_to_bytes(result))
        entries = [{k: v for k, v in u.items() if not k.startswith("_")} for u in updates]
        fields = {"job": "job-1", "round": r, "model": self.genesis["model"], "weights": cid,
                  "aggregation": {"name": RULE, "params": {}}, "updates": entries,
                  "metrics": {} if accepted else {"accepted": 0.0}, **changes}
        if not accepted:
            fields["aggregation"]["params"]["accept"] = "val_accuracy>=2"
            fields["metrics"]["val_accuracy"] = 0.5
        head = self.log.append(fields, OWNER)
        self.weights[str(cid)] = result
        if accepted:
            self.heads.append((head, r + 1, cid))
            self._accepted = cid
        else:
            self.heads.append((head, r, self._newest_cid()))  # retried from the weights before it
        return head

    def _newest_cid(self):
        return getattr(self, "_accepted", self.genesis["weights"])

    def _newest(self):
        return self.weights[str(self._newest_cid())]


def test_an_async_median_chain_with_stale_and_int8_updates_verifies_bit_for_bit():
    chain = Chain()
    chain.block(1, [chain.update(WORKERS[0], 0), chain.update(WORKERS[1], 0, "int8")])
    old = chain.update(WORKERS[2], 0, "int8")  # trained on genesis, lands two blocks later
    chain.block(2, [chain.update(WORKERS[0], 1), old])
    assert old["staleness"] == 1
    head = chain.block(3, [chain.update(WORKERS[1], 2), chain.update(WORKERS[2], 1, "float16")])
    report = verify_chain(chain.store, head)
    assert report.ok, report.reason


def test_an_update_past_the_bound_fails_though_its_staleness_is_recorded_truly():
    chain = Chain()
    late = chain.update(WORKERS[2], 0)
    chain.block(1, [chain.update(WORKERS[0], 0)])
    chain.block(2, [chain.update(WORKERS[0], 1)])
    head = chain.block(3, [chain.update(WORKERS[1], 2), late])  # 3 - 1 = 2 ... the bound
    assert verify_chain(chain.store, head).ok
    later = chain.update(WORKERS[2], 1)  # from block 1 (round 2): at round 5 it is 3 behind
    chain.block(4, [chain.update(WORKERS[0], 3)])
    bad = chain.block(5, [chain.update(WORKERS[1], 4), later])
    report = verify_chain(chain.store, bad)
    assert not report.ok and report.first_bad_seq == 5 and "over the job's max_staleness 2" in report.reason


def test_updates_from_a_rejected_try_count_as_its_round_from_the_weights_before_it():
    chain = Chain()
    chain.block(1, [chain.update(WORKERS[0], 0)])
    chain.block(2, [chain.update(WORKERS[0], 1)], accepted=False)  # a rejected try: round 2 again
    assert chain.heads[-1][1:] == (2, chain.heads[1][2])
    head = chain.block(2, [chain.update(WORKERS[1], 2), chain.update(WORKERS[2], 1)])
    report = verify_chain(chain.store, head)
    assert report.ok, report.reason


def test_sync_entries_in_an_async_job_and_async_entries_in_a_sync_job_fail():
    chain = Chain()
    u = chain.update(WORKERS[0], 0)
    bare = {k: v for k, v in u.items() if k not in ("base", "staleness")}
    head = chain.block(1, [bare])
    report = verify_chain(chain.store, head)
    assert not report.ok and "the updates name no base and staleness" in report.reason
    sync = Chain(config={"aggregation": RULE})
    head = sync.block(1, [sync.update(WORKERS[0], 0)])
    report = verify_chain(sync.store, head)
    assert not report.ok and "but the job is synchronous" in report.reason


@pytest.mark.parametrize("record", [None, {"buffer_size": 2}, {**CONFIG.record(), "server_lr": -1.0},
                                    {**CONFIG.record(), "staleness": {"name": "lru", "params": {}}}])
def test_a_malformed_async_config_is_a_verdict_on_genesis(record):
    chain = Chain(config={"aggregation": RULE, "async": record})
    report = verify_chain(chain.store, chain.heads[0][0])
    assert not report.ok and report.first_bad_seq == 0 and "config.async" in report.reason


def test_weights_not_from_the_rebased_updates_fail():
    chain = Chain()
    u = chain.update(WORKERS[0], 0)
    head = chain.block(1, [u], weights=chain.store.add(weights_to_bytes(u["_sent"])))  # not stepped by server_lr
    report = verify_chain(chain.store, head)
    assert not report.ok and "weights differ from median" in report.reason
