"""What a peer can send, sent as an attacker would: deep JSON, huge numbers, markup and control characters
in text, and messages whose handling raises. Each is refused with a reason, bounded, or shown as plain
text; no role loop ends. Pure logic: no daemon is involved (the flood on real daemons is in test_faults)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from grid_ipfs import messages
from grid_ipfs.aggregate import RunningFedAvg, fedavg
from grid_ipfs.client import JobResult, JobSpec
from grid_ipfs.client.collect import inflated
from grid_ipfs.client.inbox import Inbox
from grid_ipfs.client.job import CallbackList
from grid_ipfs.client.state import Accepted, JobRun
from grid_ipfs.identity import Identity, b64url_encode
from grid_ipfs.ipfs.pubsub import PubsubMessage
from grid_ipfs.limits import MAX_COUNT, MAX_JSON_DEPTH, MAX_NUM_EXAMPLES, json_depth
from grid_ipfs.messages import MessageError
from grid_ipfs.payloads import PayloadError, json_from_bytes
from grid_ipfs.peer import Peer
from grid_ipfs.progress import LogProgress, RichProgress
from grid_ipfs.strategies import aggregate, check_params
from grid_ipfs.text import printable

from .waiting import wait_for

CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
OWNER, WORKER = Identity.generate(), Identity.generate()


def signed(obj: dict, identity: Identity) -> bytes:
    """Sign like an attacker with a deeper stack than ours: plain json.dumps under a raised recursion limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        obj = {**obj, "v": 1, "from": identity.id}
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        obj["sig"] = b64url_encode(identity.sign(canonical))
        return json.dumps(obj).encode()
    finally:
        sys.setrecursionlimit(limit)


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# -- decoding never raises past its boundary ----------------------------------------------------------


def test_deep_json_within_the_size_limit_is_a_message_error_with_a_reason():
    data = b"[" * 60_000
    assert len(data) <= messages.MAX_MESSAGE_BYTES
    with pytest.raises(MessageError, match=f"nested 60000 levels deep \\(at most {MAX_JSON_DEPTH}\\)"):
        messages.decode(data)
    with pytest.raises(MessageError, match="nested"):
        messages.decode(b'{"a":' * 10_000 + b"1" + b"}" * 10_000)


def test_a_signed_job_whose_config_nests_1000_deep_is_refused_before_parsing():
    data = signed({"type": "job", "job": "deep", "model": CID, "owner": OWNER.id,
                   "config": {"epochs": 1, "batch_size": 8, "rounds": 1, "x": nested(1000)}}, OWNER)
    with pytest.raises(MessageError, match="nested 1002 levels deep"):
        messages.decode(data)


def test_brackets_inside_strings_do_not_count_as_nesting():
    assert json_depth('{"name": "[[[[{{{{\\"[[[[", "a": [[1]]}') == 3
    assert json_depth(b"42") == 0
    job = messages.Job(job="j", model=CID, owner=OWNER.id,
                       config={"epochs": 1, "batch_size": 8, "rounds": 1, "note": "[" * 150})
    assert messages.decode(messages.encode(job, OWNER)).message == job


def test_canonical_json_refuses_deep_and_cyclic_values_with_a_reason():
    with pytest.raises(MessageError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        messages.canonical_json(nested(5_000))
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(MessageError, match="nested deeper"):
        messages.canonical_json(cycle)
    with pytest.raises(MessageError, match="config: not JSON-encodable"):
        messages.Job(job="j", model=CID, owner=OWNER.id, config={"epochs": 1, "batch_size": 8, "rounds": 1,
                                                                  "x": nested(100)})


def test_json_from_bytes_refuses_depth_100000_within_its_size_limit():
    with pytest.raises(PayloadError, match="^doc: JSON nested 100000 levels deep"):
        json_from_bytes(b"[" * 100_000 + b"]" * 100_000, source="doc")
    assert json_from_bytes(json.dumps(nested(MAX_JSON_DEPTH - 1)).encode()) == nested(MAX_JSON_DEPTH - 1)


# -- numbers are bounded where they enter ---------------------------------------------------------------


def _update(**changes) -> dict:
    return {"type": "update", "job": "j", "round": 1, "weights": CID, "num_examples": 10, "metrics": {},
            "eval_metrics": {}, **changes}


def test_a_400_digit_num_examples_is_refused_at_decode():
    with pytest.raises(MessageError, match=f"num_examples: 1000000.*is over the limit {MAX_NUM_EXAMPLES}"):
        messages.decode(signed(_update(num_examples=10 ** 400), WORKER))
    with pytest.raises(MessageError, match="num_examples: .* is over the limit"):
        messages.Join(job="j", name="w", num_examples=MAX_NUM_EXAMPLES + 1)
    assert messages.Join(job="j", name="w", num_examples=MAX_NUM_EXAMPLES).num_examples == MAX_NUM_EXAMPLES


@pytest.mark.parametrize("field", ["round", "attempt"])
def test_round_numbers_are_bounded(field):
    with pytest.raises(MessageError, match=f"{field}: .* is over the limit {MAX_COUNT}"):
        messages.decode(signed(_update(**{field: 10 ** 400}), WORKER))


@pytest.mark.parametrize("key", ["epochs", "batch_size", "rounds"])
def test_job_config_sizes_are_bounded(key):
    config = {"epochs": 1, "batch_size": 8, "rounds": 1, key: 10 ** 7}
    with pytest.raises(MessageError, match=f"config.{key}: 10000000 is over the limit {MAX_COUNT}"):
        messages.decode(signed({"type": "job", "job": "j", "model": CID, "owner": OWNER.id, "config": config},
                               OWNER))


def test_aggregation_never_sees_an_overflow_from_a_peer_number():
    w = [np.ones(3, np.float32)]
    for n in (10 ** 400, MAX_NUM_EXAMPLES + 1):
        with pytest.raises(ValueError, match="num_examples is over the limit"):
            fedavg([(w, 1), (w, n)])
        with pytest.raises(ValueError, match="result 1: num_examples is over the limit"):
            aggregate("median", [(w, 1), (w, n)])
        with pytest.raises(ValueError, match="over the limit"):
            RunningFedAvg().add(w, n)
    masked = [np.zeros(3, np.uint64)]
    with pytest.raises(ValueError, match="result 0: num_examples is over the limit"):
        aggregate("secure-fedavg", [(masked, 10 ** 400)])


@pytest.mark.parametrize("name, params, reason", [
    ("secure-fedavg", {"scale_bits": 2000}, "scale_bits must be an integer in 0..63, got 2000"),
    ("secure-fedavg", {"scale_bits": 2 ** 63 - 1}, "scale_bits must be an integer in 0..63"),
    ("secure-dp-fedavg", {"clip": 1.0, "noise_multiplier": 0.0, "scale_bits": -1}, "scale_bits must be"),
    ("trimmed-mean", {"trim": 5.0}, r"trim must be a finite number in \[0, 0.5\), got 5.0"),
    ("trimmed-mean", {"trim": True}, "trim must be a number"),
    ("krum", {"byzantine": -1}, "byzantine must be an integer in 0..1000000, got -1"),
    ("krum", {"byzantine": 10 ** 400}, "byzantine must be an integer in 0..1000000, got a huge integer"),
    ("multi-krum", {"multi": 0}, "multi must be an integer in 1..1000000"),
    ("dp-fedavg", {"clip": float("inf"), "noise_multiplier": 1.0}, r"clip must be a finite number in \(0, 1e\+06\]"),
    ("dp-fedavg", {"clip": 1.0, "noise_multiplier": -1.0}, "noise_multiplier must be a finite number in"),
    ("dp-fedavg", {"clip": 1.0, "noise_multiplier": 1.0, "seed": -5}, "seed must be an integer"),
    ("fedavg", {"trim": 0.1}, "fedavg: unexpected param 'trim'"),
    ("nope", {}, "unknown aggregation 'nope'"),
])
def test_aggregation_params_are_range_checked_in_one_place(name, params, reason):
    with pytest.raises(ValueError, match=reason):
        check_params(name, params)
    with pytest.raises(ValueError, match=reason):  # building the strategy checks first: nothing is computed
        aggregate(name, [([np.zeros(2, np.uint64 if "secure" in name else np.float32)], 1)],
                  reference=[np.zeros(2, np.float32)], **params)


def test_sensible_params_pass():
    for name, params in [("secure-fedavg", {"scale_bits": 24}), ("trimmed-mean", {"trim": 0.2}),
                         ("krum", {"byzantine": 1, "multi": 2}), ("multi-krum", {"byzantine": 1, "multi": None}),
                         ("dp-fedavg", {"clip": 3.0, "noise_multiplier": 1.0, "seed": 5, "accept": "val_loss<1"}),
                         ("fedavg", {})]:
        check_params(name, params)


def _client_job(max_examples=None, workers=None) -> JobRun:
    """A job as the client runs it, without a daemon (no chain, no model): what its inbox checks need."""
    spec = JobSpec(model_path=None, rounds=1, max_examples=max_examples)
    message = messages.Job(job="j", model=CID, owner=OWNER.id, config={"epochs": 1, "batch_size": 8, "rounds": 1})
    return JobRun(message, spec, None, None, None, spec.strategy, Accepted(CID, 0, [], CID, {}),
                  JobResult("j", CID, CID, CID), workers=dict(workers or {}))


def test_an_update_cannot_claim_more_examples_than_its_join():
    job = _client_job(workers={WORKER.id: messages.Join(job="j", name="w", num_examples=100)})
    update = messages.Update(job="j", round=1, weights=CID, num_examples=10 ** 15, metrics={}, eval_metrics={})
    reason = inflated(job, update, WORKER.id)
    assert reason == "inflated: num_examples 1000000000000000 is more than the 100 claimed at join"
    honest = messages.Update(job="j", round=1, weights=CID, num_examples=100, metrics={}, eval_metrics={})
    assert inflated(job, honest, WORKER.id) is None


def test_the_owners_ceiling_refuses_big_joins_and_big_updates(caplog):
    job = _client_job(max_examples=1000)
    with caplog.at_level(logging.INFO, logger="grid_ipfs.client"):
        Inbox(job, OWNER.id)._joined(messages.Join(job="j", name="sybil", num_examples=10 ** 15), WORKER.id, None)
    assert job.workers == {} and job.dropped == {"too many examples": 1}
    assert "claims 1000000000000000 examples, over the job's max_examples 1000" in caplog.text
    job.workers[WORKER.id] = messages.Join(job="j", name="w", num_examples=10 ** 15)  # joined before a resume
    update = messages.Update(job="j", round=1, weights=CID, num_examples=5000, metrics={}, eval_metrics={})
    assert inflated(job, update, WORKER.id) == "inflated: num_examples 5000 is over the job's " \
                                                          "max_examples 1000"
    assert JobSpec(model_path=None, rounds=1, max_examples=1000).config()["max_examples"] == 1000
    assert "max_examples" not in JobSpec(model_path=None, rounds=1).config()


def test_the_worker_refuses_jobs_over_its_ceilings_before_fetching_anything(caplog):
    from grid_ipfs.worker import Worker, build_parser

    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int64)
    worker = Worker(None, Identity.generate(), (x, y), max_epochs=5, max_batch_size=64)  # no daemon
    for config, reason in [({"epochs": 1000, "batch_size": 8, "rounds": 1}, "config.epochs 1000 is over this "
                            "worker's --max-epochs 5"),
                           ({"epochs": 1, "batch_size": 65537, "rounds": 1}, "config.batch_size 65537 is over "
                            "this worker's --max-batch-size 64")]:
        job = messages.Job(job=f"big{config['epochs']}", model=CID, owner=OWNER.id, config=config)
        with caplog.at_level(logging.WARNING, logger="grid_ipfs.worker"):
            worker.join(job, OWNER.id)
        assert (OWNER.id, job.job) in worker.refused and reason in caplog.text
    args = build_parser().parse_args(["--api", "/ip4/127.0.0.1/tcp/1", "--data", "d.npz"])
    assert (args.max_epochs, args.max_batch_size) == (100, 65536)


def test_a_strangers_refused_job_does_not_block_the_owners_job_of_the_same_id(caplog):
    from grid_ipfs.worker import Worker

    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int64)
    worker = Worker(None, Identity.generate(), (x, y), max_epochs=5)  # no daemon: nothing fetched
    stranger = Identity.generate()
    bad = messages.Job(job="X", model=CID, owner=stranger.id, config={"epochs": 1000, "batch_size": 8, "rounds": 1})
    worker.join(bad, stranger.id)
    assert (stranger.id, "X") in worker.refused
    caplog.clear()
    honest = messages.Job(job="X", model=CID, owner=OWNER.id, config={"epochs": 1000, "batch_size": 8, "rounds": 1})
    with caplog.at_level(logging.WARNING, logger="grid_ipfs.worker"):
        worker.join(honest, OWNER.id)  # on main: skipped silently, "X" was refused already
    assert (OWNER.id, "X") in worker.refused and "config.epochs 1000" in caplog.text


def test_the_vetting_policy_is_a_constructor_keyword_of_worker_and_miner():
    from grid_ipfs.miner import Miner
    from grid_ipfs.vetting import load_policy
    from grid_ipfs.worker import Worker

    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int64)
    policy = load_policy()
    for make in (lambda **kw: Worker(None, Identity.generate(), (x, y), **kw),  # no daemon: nothing fetched
                 lambda **kw: Miner(None, Identity.generate(), x, y, **kw)):
        assert make(policy=policy).model_options["policy"] is policy
        assert make().model_options["policy"] is None


# -- text from peers is data ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["evil\nINFO forged line", "\x1b[31mred", "right\u202eleft", "a\u2028b", "nul\x00"])
def test_control_characters_in_names_are_refused_at_decode(name):
    with pytest.raises(MessageError, match="name: control character"):
        messages.decode(signed({"type": "join", "job": "j", "name": name, "num_examples": 5}, WORKER))


def test_control_characters_in_metric_keys_and_verdicts_are_refused():
    with pytest.raises(MessageError, match="metrics key: control character \\\\n"):
        messages.decode(signed(_update(metrics={"loss\nforged": 1.0}), WORKER))
    with pytest.raises(MessageError, match="verdict: control character"):
        messages.Endorse(job="j", round=1, head=CID, verdict="disputed: \x1b[2J")
    assert messages.Join(job="j", name="[/x] [bold]w", num_examples=1).name == "[/x] [bold]w"  # markup is text


def test_printable_escapes_and_bounds():
    assert printable("a\nb\x1b[31mc\u202e") == "a\\nb\\x1b[31mc\\u202e"
    assert printable("x" * 500, 20) == "x" * 17 + "..."
    assert printable("\x00" * 100, 50) == "\\x00" * 11 + "..."  # on main: cut inside the 13th escape ("\\x0")
    assert printable("ab\x1bc", 6) == "ab..."  # on main: "ab\\x..."
    assert printable("no\u00a0break\u3000wide\u2028line") == "no\\xa0break\\u3000wide\\u2028line"


def test_printable_shows_an_integer_too_long_for_str():
    huge = 10 ** 5000  # str() refuses ints over 4300 digits: on main, ValueError from the log line
    assert printable(huge) == f"<an integer of {huge.bit_length()} bits>"
    assert printable(-huge).startswith("<an integer of ")


def test_the_chain_verifier_uses_the_one_escaper():
    from grid_ipfs.chain import verify

    assert not hasattr(verify, "printable") or verify.printable is printable


def render(events) -> str:
    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=200, force_terminal=False, color_system=None))
    progress.on_job_start(SimpleNamespace(job="job-1", model="bafymodel", config={}), "bafygenesis")
    for event in events:
        event(progress)
    progress.live.stop()
    return out.getvalue()


def test_markup_in_a_worker_name_is_printed_as_text_not_parsed():
    text = render([lambda p: p.on_worker_joined(WORKER.id, "[/x]", 1, 2),
                   lambda p: p.on_worker_joined(WORKER.id, "[bold]done: head bafyforged\n  final weights x", 2, 2),
                   lambda p: p.on_job_failed(SimpleNamespace(job="job-1"), ValueError("bad [/] name [red]x"))])
    assert "worker [/x] (" in text
    assert "[bold]done: head bafyforged\\n  final weights x" in text
    assert not any(line.lstrip().startswith(("done:", "final weights")) for line in text.splitlines()), text
    assert "failed: bad [/] name [red]x" in text


def test_rejection_reasons_in_the_caption_are_text():
    from grid_ipfs.client import RoundResult

    result = RoundResult(round=1, weights="w", head="h", updates=1, metrics={}, seconds=1.0, accepted=False)
    text = render([lambda p: p.on_round_rejected(result, "miner: [/oops] disputed\nforged")])
    assert "[/oops] disputed\\nforged" in text


def test_logs_carry_no_control_characters_from_peers(caplog):
    peer = Peer(None, Identity.generate())
    raw = PubsubMessage(topic="t\x1b[2J", data=b"\x1b[31m\nnot json", sender="Qm\x1b]0;title\x07\nFORGED", seqno=b"")
    with caplog.at_level(logging.INFO):
        assert peer.decode(raw) is None
        LogProgress().on_worker_joined(WORKER.id, "w\n12:00:00 grid_ipfs.client INFO forged", 1, 1)
        Inbox(_client_job(), OWNER.id).drop("malformed", "detail \x1b[31m with\nnewline")
    assert peer.dropped == 1 and len(caplog.records) == 3
    for record in caplog.records:
        message = record.getMessage()
        assert "\x1b" not in message and "\n" not in message and "\x07" not in message, message
    assert "\\n12:00:00 grid_ipfs.client INFO forged" in caplog.records[1].getMessage()


# -- the loops survive ----------------------------------------------------------------------------------


class _Looping(Peer):
    """A Peer whose loop runs without a daemon: nothing is subscribed (no IPFS call is involved)."""

    def __init__(self):
        super().__init__(None, Identity.generate())
        self.handled: list[bytes] = []

    def subscribe(self, topic):  # the jobs subscription is the one IPFS call of run(); not needed here
        pass

    def handle(self, raw):
        envelope = self.decode(raw)
        if envelope is not None and envelope.message.name == "boom":
            raise KeyError("a bug in handling")
        self.handled.append(raw.data)


def _raw(data: bytes) -> PubsubMessage:
    return PubsubMessage(topic="grid-ipfs/v1/job/j", data=data, sender="12D3KooWpeer", seqno=b"")


def test_peer_run_survives_a_message_whose_handling_raises(caplog):
    peer = _Looping()
    good = messages.encode(messages.Join(job="j", name="fine", num_examples=3), WORKER)
    for data in (b"[" * 60_000, messages.encode(messages.Join(job="j", name="boom", num_examples=3), WORKER), good):
        peer.inbox.put(_raw(data))
    thread = threading.Thread(target=peer.run, daemon=True)
    with caplog.at_level(logging.WARNING, logger="grid_ipfs.peer"):
        thread.start()
        try:
            wait_for(lambda: good in peer.handled, timeout=10, what="the good message after the bad ones")
        finally:
            peer.stop()
            thread.join(10)
    assert not thread.is_alive()
    assert (peer.dropped, peer.failed) == (1, 1)
    assert "handling it failed: KeyError: 'a bug in handling'" in caplog.text


def test_peer_decode_drops_whatever_decode_raises(monkeypatch):
    peer = _Looping()

    def broken(data):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(messages, "decode", broken)
    assert peer.decode(_raw(b"{}")) is None and peer.dropped == 1


def test_the_clients_drain_survives_a_message_whose_handling_raises():
    class Raising:
        def on_worker_joined(self, worker, name, joined, needed):
            if name == "boom":
                raise RuntimeError("callback bug")

    job = _client_job()
    inbox = Inbox(job, OWNER.id, callbacks=CallbackList([Raising()]))
    round_ = messages.Round(job="j", round=1, weights=CID, deadline=time.time() + 60, selected=None)
    update = messages.Update(job="j", round=1, weights=CID, num_examples=3, metrics={}, eval_metrics={})
    signed = messages.encode(update, WORKER)
    for data in (b"[" * 60_000, messages.encode(messages.Join(job="j", name="boom", num_examples=3), WORKER), signed):
        inbox.put(_raw(data))
    updates = inbox.drain(5.0, round_=round_)
    assert updates == [(update, WORKER.id, signed)]  # with its bytes as published: the block links them
    assert job.dropped == {"malformed": 1, "failed": 1}


def test_strangers_proposals_and_endorsements_cost_a_drop_not_memory_or_a_bad_block():
    """Proposals to a job without miners, and endorsements that are not of the newest block (which the next
    block would link, and verify would refuse), are dropped; a job with miners queues a bounded number."""
    from grid_ipfs.client.inbox import MAX_PENDING_PROPOSALS

    job = _client_job()
    inbox = Inbox(job, OWNER.id)
    stranger = Identity.generate()
    for i in range(3):
        inbox.put(_raw(messages.encode(messages.Proposal(job="j", round=1, candidate=CID, block=CID), stranger)))
        inbox.put(_raw(messages.encode(messages.Endorse(job="j", round=i + 1, head=CID, verdict="accepted"), stranger)))
    assert inbox.drain(0.2) == []
    assert job.dropped == {"no contest": 3, "stale endorsement": 3}
    assert job.proposals == [] and job.endorsements == {} and job.endorse_messages == {}
    contest = _client_job()
    contest.spec.miners = 1
    inbox = Inbox(contest, OWNER.id)
    for _ in range(MAX_PENDING_PROPOSALS + 5):
        inbox.put(_raw(messages.encode(messages.Proposal(job="j", round=1, candidate=CID, block=CID), stranger)))
    inbox.drain(0.2)
    assert len(contest.proposals) == MAX_PENDING_PROPOSALS and contest.dropped == {"too many proposals": 5}


def test_a_worker_s_reported_compute_time_only_shapes_the_time_split_it_claims():
    """`compute_s` is a peer's number: a missing, negative or non-float one records no split at all, and a
    huge one moves only the reporting figures (the block's `critical_path_s`, `coordination_s`)."""
    from grid_ipfs.client.collect import Collected
    from grid_ipfs.client.core import _time_split

    def collected(*computes):
        return [Collected(f"w{i}", messages.Update(job="j", round=1, weights=CID, num_examples=1,
                                                   metrics={} if c is None else {"compute_s": c}, eval_metrics={}),
                          [], b"") for i, c in enumerate(computes)]

    assert _time_split(collected(1.5, 2.0), wall=3.0) == {"critical_path_s": 2.0, "coordination_s": 1.0}
    for hostile in ((1.5, None), (1.5, -1.0)):  # a bool never gets this far: messages refuse it
        assert _time_split(collected(*hostile), wall=3.0) == {}, hostile
    assert _time_split(collected(1e300), wall=3.0) == {"critical_path_s": 1e300, "coordination_s": 3.0 - 1e300}
    assert _time_split([], wall=3.0) == {}
