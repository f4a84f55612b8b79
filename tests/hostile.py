"""A hostile peer: `python -m tests.hostile --api A --job JOB --count N` floods a job's topic.

It publishes what anyone on an open pubsub network can: garbage, messages of the wrong version or
type or with wrong field types, oversized messages, forged signatures, JSON nested 60000 deep, a signed
job whose config nests 1000 deep, a 400-digit num_examples, control characters in a name and in a metric
key, a chain head that is not a CID, and validly signed messages from keys the job never saw (joins, one
with a rich-markup name and a 10^15 claim, updates pointing at CIDs nobody has, one of them signed
against a head and base weights nobody has, rounds and heads pretending to be the owner's, one naming a
chain head nobody has). Prints
one JSON line with how many of each kind it published. `DROPPED_AS` says how the client counts each kind.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from contextlib import contextmanager

from multiformats import CID, multihash

from grid_ipfs import messages
from grid_ipfs.identity import Identity, b64url_encode
from grid_ipfs.ipfs.errors import IPFSError
from grid_ipfs.ipfs.rpc import IPFSClient


def _nobody_has(i: int) -> str:
    return str(CID("base32", 1, "raw", multihash.digest(f"nobody has this {i}".encode(), "sha2-256")))


DROPPED_AS = {
    **dict.fromkeys(["not json", "not an object", "wrong version", "unknown type", "wrong field types",
                     "oversized", "forged signature", "deep nesting", "deep signed config", "huge num_examples",
                     "control characters in a name", "control characters in a metric key", "head not a CID"],
                    "malformed"),
    **dict.fromkeys(["stranger's join", "stranger's markup join"], "not allowed"),
    **dict.fromkeys(["stranger's round", "stranger's head", "stranger's round naming a head"], "not from a worker"),
    **dict.fromkeys(["stranger's update", "stranger's bound update"], "late or rejected update"),
}
"""How a client with an allow-list counts each kind it receives (in `JobResult.dropped`)."""


@contextmanager
def _deep_stack():
    """Sign as an attacker with a deeper stack than ours would: json.dumps recurses per level."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _signed(obj: dict, identity: Identity) -> bytes:
    obj = {**obj, "from": obj.get("from", identity.id)}
    with _deep_stack():
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        obj["sig"] = b64url_encode(identity.sign(canonical))
        return json.dumps(obj).encode()


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def hostile_messages(job: str, victim: str | None):
    """Endless cycle of (kind, bytes)."""
    stranger = Identity.generate()
    impostor = victim or Identity.generate().id
    base = {"v": 1, "job": job}
    kinds = [
        ("not json", lambda i: b"{not json " + str(i).encode()),
        ("not an object", lambda i: b"[1, 2, 3]"),
        ("wrong version", lambda i: _signed({**base, "v": 2, "type": "update"}, stranger)),
        ("unknown type", lambda i: _signed({**base, "type": "gimme"}, stranger)),
        ("wrong field types", lambda i: _signed({**base, "type": "update", "round": "three", "weights": 5,
                                                 "num_examples": -1, "metrics": [], "eval_metrics": {}},
                                                stranger)),
        ("oversized", lambda i: b'{"pad": "' + b"x" * (100 * 1024) + b'"}'),
        ("forged signature", lambda i: _signed({**base, "type": "update", "round": 1, "weights": _nobody_has(i),
                                                "num_examples": 10**6, "metrics": {}, "eval_metrics": {},
                                                "from": impostor}, stranger)),
        ("stranger's update", lambda i: messages.encode(messages.Update(
            job=job, round=1 + i % 5, weights=_nobody_has(i), num_examples=10**6, metrics={"loss": 0.0},
            eval_metrics={}), stranger)),
        ("stranger's join", lambda i: messages.encode(messages.Join(job=job, name=f"sybil{i}", num_examples=10**6),
                                                      stranger)),
        ("stranger's round", lambda i: messages.encode(messages.Round(
            job=job, round=1 + i % 5, weights=_nobody_has(i), deadline=time.time() + 60, selected=None), stranger)),
        ("stranger's head", lambda i: messages.encode(messages.Head(job=job, round=1, head=_nobody_has(i),
                                                                    weights=_nobody_has(i)), stranger)),
        ("deep nesting", lambda i: b"[" * 60_000),
        ("deep signed config", lambda i: _signed({**base, "type": "job", "model": _nobody_has(i), "owner": stranger.id,
                                                  "config": {"epochs": 1, "batch_size": 8, "rounds": 1,
                                                             "x": _nested(1000)}}, stranger)),
        ("huge num_examples", lambda i: _signed({**base, "type": "update", "round": 1, "weights": _nobody_has(i),
                                                 "num_examples": 10 ** 400, "metrics": {}, "eval_metrics": {}},
                                                stranger)),
        ("control characters in a name", lambda i: _signed({**base, "type": "join", "num_examples": 10,
                                                            "name": "[bold]done: head bafyforged\n\x1b[2J"},
                                                           stranger)),
        ("control characters in a metric key", lambda i: _signed({**base, "type": "update", "round": 1,
                                                                  "weights": _nobody_has(i), "num_examples": 10,
                                                                  "metrics": {"loss\n\x1b[31m": 0.0},
                                                                  "eval_metrics": {}}, stranger)),
        ("stranger's markup join", lambda i: messages.encode(messages.Join(job=job, name=f"[/x][bold]sybil{i}",
                                                                           num_examples=10 ** 15), stranger)),
        ("stranger's bound update", lambda i: messages.encode(messages.Update(
            job=job, round=1 + i % 5, weights=_nobody_has(i), num_examples=10, metrics={"loss": 0.0},
            eval_metrics={}, head=_nobody_has(i + 1), base=_nobody_has(i + 2)), stranger)),
        ("stranger's round naming a head", lambda i: messages.encode(messages.Round(
            job=job, round=1 + i % 5, weights=_nobody_has(i), deadline=time.time() + 60, selected=None,
            head=_nobody_has(i + 1)), stranger)),
        ("head not a CID", lambda i: _signed({**base, "type": "update", "round": 1, "weights": _nobody_has(i),
                                              "num_examples": 10, "metrics": {}, "eval_metrics": {},
                                              "head": "bafy-not-a-cid\n", "base": _nobody_has(i)}, stranger)),
    ]
    for i, (kind, make) in zip(itertools.count(), itertools.cycle(kinds)):
        yield kind, make(i)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--api", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--victim", help="a worker id to impersonate in forged-signature messages")
    args = parser.parse_args(argv)
    topic = messages.job_topic(args.job)
    sent: dict[str, int] = {}
    failed: list[str] = []
    with IPFSClient(args.api) as ipfs:
        for kind, data in itertools.islice(hostile_messages(args.job, args.victim), args.count):
            if _publish(ipfs, topic, data, failed):
                sent[kind] = sent.get(kind, 0) + 1
    print(json.dumps({"sent": sum(sent.values()), "by_kind": sent, "failed": failed[:5]}))
    return 0


def _publish(ipfs: IPFSClient, topic: str, data: bytes, failed: list[str], tries: int = 5) -> bool:
    """Publish once, trying again a few times when the daemon errs under the flood (a busy js-ipfs can
    answer one of a thousand quick publishes with an error): the sender reports, it never dies silently."""
    for attempt in range(tries):
        try:
            return ipfs.pubsub_publish(topic, data)
        except IPFSError as exc:
            if attempt == tries - 1:
                failed.append(f"{type(exc).__name__}: {exc}")
                return False
            time.sleep(0.2 * (attempt + 1))  # a back-off before the next try, not a synchronisation
    return False


if __name__ == "__main__":
    sys.exit(main())
