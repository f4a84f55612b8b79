"""What an async job's owner takes into a buffer (`grid_ipfs.client.buffered`): the updates an attacker
would send (from a head the job never had, claiming another round or base, too stale, sent twice,
replayed into a later block, inflated) are refused with a reason; the bases it remembers stay bounded.
Pure logic: the end-to-end behaviour on real daemons is tests/test_async.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from grid_ipfs import messages
from grid_ipfs.chain.contributions import message_cid
from grid_ipfs.client import JobSpec
from grid_ipfs.client.buffered import Base, head_key, note_head, refusal, staleness_metrics
from grid_ipfs.client.collect import Collected
from grid_ipfs.client.job import InvalidJobSpec
from grid_ipfs.identity import Identity
from grid_ipfs.strategies.fedbuff import AsyncConfig, Staleness

CIDS = [str(message_cid(bytes([i]))) for i in range(10)]
WORKER = Identity.generate().id


def job(max_staleness: int = 2):
    spec = SimpleNamespace(async_config=AsyncConfig(2, Staleness(), 1.0, max_staleness), max_examples=None)
    run = SimpleNamespace(spec=spec, workers={WORKER: SimpleNamespace(num_examples=100)}, bases={}, used={})
    note_head(run, CIDS[0], 0, True, CIDS[5])  # genesis: updates from it are for round 1
    note_head(run, CIDS[1], 1, True, CIDS[6])
    note_head(run, CIDS[2], 2, False, CIDS[6])  # round 2 rejected: retried from round 1's weights
    return run


def update(head: str, round: int, base: str, weights: str = CIDS[9], n: int = 100) -> messages.Update:
    return messages.Update(job="j", round=round, weights=weights, num_examples=n, metrics={}, eval_metrics={},
                           head=head, base=base)


def test_fresh_and_stale_updates_within_the_bound_are_taken_with_their_base():
    assert refusal(job(), update(CIDS[2], 2, CIDS[6]), WORKER, 2, set(), None) == (None, Base(2, CIDS[6]))
    assert refusal(job(), update(CIDS[0], 1, CIDS[5]), WORKER, 2, set(), None) == (None, Base(1, CIDS[5]))


@pytest.mark.parametrize("sent, r, reason", [
    (update(CIDS[3], 2, CIDS[6]), 2, "unknown base:"),  # a head this job never had
    (update(CIDS[1], 3, CIDS[6]), 2, "mismatch:"),  # claims another round than its head's
    (update(CIDS[1], 2, CIDS[5]), 2, "mismatch:"),  # claims other base weights than its head's
    (update(CIDS[1], 2, CIDS[6], n=101), 2, "inflated:"),  # more examples than it joined with
])
def test_updates_that_do_not_fit_the_job_s_history_are_refused_with_a_reason(sent, r, reason):
    got, base = refusal(job(), sent, WORKER, r, set(), None)
    assert got.startswith(reason) and base is None, got


def test_too_stale_a_second_update_a_replay_a_stranger_and_the_allow_list_are_refused():
    run = job(max_staleness=2)
    assert refusal(run, update(CIDS[0], 1, CIDS[5]), WORKER, 4, set(), None)[0].startswith("stale: stale beyond")
    assert refusal(run, update(CIDS[1], 2, CIDS[6]), WORKER, 2, {WORKER}, None)[0].startswith("replay: second")
    run.used[(WORKER, head_key(CIDS[9]))] = 2  # the same update went into an earlier block
    assert refusal(run, update(CIDS[1], 2, CIDS[6]), WORKER, 3, set(), None)[0].startswith("replay: this update")
    stranger = Identity.generate().id
    assert refusal(run, update(CIDS[1], 2, CIDS[6]), stranger, 2, set(), None)[0].startswith("not joined")
    assert refusal(run, update(CIDS[1], 2, CIDS[6]), WORKER, 2, set(), {stranger})[0].startswith("not allowed")
    assert refusal(run, messages.Update(job="j", round=2, weights=CIDS[9], num_examples=1, metrics={},
                                        eval_metrics={}), WORKER, 2, set(), None)[0].startswith("unbound")


def test_the_bases_and_used_updates_kept_are_only_those_within_the_bound():
    run = job(max_staleness=2)
    run.used[(WORKER, "old")] = 1
    for r in range(3, 50):
        note_head(run, CIDS[r % 5], r, True, CIDS[5 + r % 5])
    assert len(run.bases) <= 3 and min(b.round for b in run.bases.values()) >= 48
    assert run.used == {}


def test_a_block_s_staleness_metrics_and_none_for_a_synchronous_round():
    def c(staleness):
        return Collected("w", update(CIDS[1], 2, CIDS[6]), None, b"", staleness=staleness, base=CIDS[1])
    assert staleness_metrics([c(0), c(3), c(1)]) == {"staleness_mean": 4 / 3, "staleness_max": 3.0}
    assert staleness_metrics([Collected("w", update(CIDS[1], 2, CIDS[6]), None, b"")]) == {}


def test_an_async_spec_records_its_settings_and_refuses_rules_it_cannot_rebase(tmp_path):
    config = AsyncConfig(3, Staleness("hinge", {"a": 5.0}), 0.5, 4)
    spec = JobSpec(None, rounds=5, async_config=config)
    assert spec.config()["async"] == config.record()
    assert JobSpec.from_config(spec.config()).async_config == config
    assert "async" not in JobSpec(None, rounds=5).config()
    for kwargs, match in (({"aggregation": "fedadam"}, "keeps server state"),
                          ({"aggregation": "secure-fedavg", "secure_aggregation": True}, "masks updates"),
                          ({"aggregation": "dp-fedavg", "aggregation_params": {"clip": 1.0, "noise_multiplier": 1.0}},
                           "adds noise"),
                          ({"miners": 1}, "without miners"), ({"async_config": {"buffer_size": 2}}, "AsyncConfig")):
        with pytest.raises(InvalidJobSpec, match=match):
            JobSpec(None, rounds=5, **{"async_config": config, **kwargs})
    with pytest.raises(InvalidJobSpec, match="job config: async settings"):
        JobSpec.from_config({**spec.config(), "async": {"buffer_size": 2}})
