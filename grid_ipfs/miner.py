"""The miner role: `python -m grid_ipfs.miner --api MULTIADDR --eval-data VAL.npz [--aggregation RULE]`.

A miner is a competing aggregator (proof of federated learning, see `grid_ipfs.contest`). It follows
the jobs announced on the jobs topic whose model its validation data fits, and for every `propose`
from a job's owner: fetches the owner's candidate block and the updates it records, aggregates them
with the miner's own rule (`--aggregation`, default: the job's), evaluates the result on its own
validation data and, if that clears the job's acceptance rule there, stages a signed rival block and
answers `proposal`. When the owner appends the round's block, the miner checks it the same way (the
aggregate recomputes from the updates, the weights clear the rule on the miner's data) and publishes
`endorse` with its verdict. A miner never trains; it holds no training data.

Everything fetched is data: the model is vetted before Keras loads it (`grid_ipfs.vetting`), weights are
safetensors that must match the model. A message that does not parse, verify or check out is dropped with
one log line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import messages
from .aggregate import AcceptRule, held_out, parse_accept
from .chain.blocks import ChainError, decode_block
from .chain.contributions import check_block
from .chain.log import store_block
from .contest import ContestError, check_rival, rival_block
from .data import DataError, load_shard
from .identity import Identity, IdentityError
from .ipfs import IPFSError
from .ipfs.cids import cid_str
from .ipfs.pubsub import PubsubMessage
from .ipfs.rpc import IPFSClient
from .payloads import PayloadError
from .peer import Peer, connect
from .runtime import prepare_owner_process
from .sandbox import IsolatedModel, Limits, TrainerDied, limits_from_args
from .sandbox import add_arguments as add_isolation_arguments
from .sources import Arrays
from .strategies import STRATEGIES, StrategyError, aggregate
from .text import printable
from .vetting import Policy, policy_from_args
from .vetting import add_arguments as add_vetting_arguments

log = logging.getLogger("grid_ipfs.miner")

MAX_BLOCK_BYTES = 1 << 20
"""A candidate block lists each update once: far below this."""


@dataclass
class _Round:
    """What a miner keeps of a round it was asked about, to check the block the owner appends."""

    candidate_cid: str
    candidate: dict
    results: list  # [(weights, num_examples)] in the candidate's update order
    reference: list
    proposed: str | None = None  # our rival's CID, if we proposed


@dataclass
class _Followed:
    job: messages.Job
    model: object  # keras.Model, or sandbox.IsolatedModel with --isolate
    x_val: object  # the validation examples, fitted to this job's model input
    y_val: object
    rounds: dict[int, _Round] = field(default_factory=dict)


class Miner(Peer):
    """One miner process: a validation set, an identity, a daemon, optionally its own rule."""

    log = log
    takes_part = "mine"

    def __init__(self, client: IPFSClient, identity: Identity, x_val, y_val, *, name: str = "miner",
                 aggregation: str | None = None, params: dict | None = None,
                 jobs_topic: str = messages.JOBS_TOPIC, trusted_clients: set[str] | None = None,
                 isolate: Limits | None = None, isolated_jobs: int = 4, policy: Policy | None = None):
        super().__init__(client, identity, jobs_topic=jobs_topic, trusted_clients=trusted_clients, policy=policy)
        self.isolate, self.isolated_jobs = isolate, isolated_jobs  # as in Worker
        self.name = name
        self.x_val, self.y_val = x_val, y_val
        self.aggregation, self.params = aggregation, dict(params or {})
        self.jobs: dict[str, _Followed] = {}
        self.proposed = 0
        self.endorsed: dict[str, int] = {}  # verdict kind ("accepted", "disputed") -> count

    def started(self) -> None:
        import keras  # noqa: F401  (TensorFlow takes seconds to import: pay it now, not while a round waits)

        rule = self.aggregation or "the job's rule"
        log.info("%s (%s) mining on %s with %s and %d validation examples", self.name, self.identity.id[:12],
                 self.jobs_topic, rule, len(self.x_val))

    # -- messages ------------------------------------------------------------------------------------

    def handle(self, raw: PubsubMessage) -> None:
        envelope = self.decode(raw)
        if envelope is None:
            return
        message, sender = envelope.message, envelope.sender
        followed = self.jobs.get(getattr(message, "job", ""))
        try:
            if isinstance(message, messages.Job):
                self.follow(message, sender)
            elif followed is None or isinstance(message, (messages.Join, messages.Update, messages.Round,
                                                          messages.Proposal, messages.Endorse)):
                return  # not ours to act on
            elif sender != followed.job.owner:
                self.dropped += 1
                log.warning("dropped %s for job %s: signed by %s, not the job's owner", message.TYPE,
                            message.job, sender[:12])
            elif isinstance(message, messages.Propose):
                self.propose(followed, message)
            elif isinstance(message, messages.Head):
                self.endorse(followed, message)
            elif isinstance(message, messages.Done):
                log.info("job %s done (%s); head %s", message.job, message.reason, message.head)
                _close_model(self.jobs.pop(message.job).model)
                self.unsubscribe(messages.job_topic(message.job))
        except TrainerDied as exc:  # the job's isolated child is gone: stop following the job
            log.error("job %s: the isolated evaluator died: %s; refusing the job", message.job, exc)
            if message.job in self.jobs:
                self.refused.add((self.jobs[message.job].job.owner, message.job))
                _close_model(self.jobs.pop(message.job).model)
                self.unsubscribe(messages.job_topic(message.job))
        except (IPFSError, PayloadError, ChainError, ContestError) as exc:
            log.warning("job %s: %s: %s", message.job, message.TYPE, exc)
        except Exception as exc:  # e.g. a rule refusing this round's updates: this round, not the miner
            log.error("job %s: %s failed: %s: %s", message.job, message.TYPE, type(exc).__name__,
                      printable(" ".join(str(exc).split()), 300))

    def follow(self, job: messages.Job, sender: str) -> None:
        if job.job in self.jobs or (job.owner, job.job) in self.refused:
            return
        found = self.job_model(job, sender, Arrays(self.x_val, self.y_val, where="--eval-data"), check=self._room)
        if found is None:
            return
        model, (x_val, y_val) = found
        self.subscribe(messages.job_topic(job.job))
        self.jobs[job.job] = _Followed(job, model, x_val, y_val)
        log.info("following job %s (model %s)", job.job, job.model)

    def propose(self, followed: _Followed, propose: messages.Propose) -> None:
        """Aggregate the candidate's updates our way; propose the result if it clears the job's rule here."""
        seen = followed.rounds.get(propose.round)
        if seen is not None and seen.candidate_cid == propose.candidate:
            return  # the owner repeats `propose` until its miners answer; we answered (or passed) already
        if time.time() > propose.deadline:
            log.info("skipped round %d of %s: its proposal deadline has passed", propose.round, propose.job)
            return
        started = time.monotonic()
        candidate = self._owner_block(followed, propose.candidate)
        if candidate["round"] != propose.round:
            raise ContestError(f"candidate {propose.candidate} is for round {candidate['round']}, "
                               f"not {propose.round}")
        unproven = check_block(self.client, candidate, propose.reference)
        if unproven is not None:  # our signature must not vouch for updates their workers never sent
            raise ContestError(f"candidate {propose.candidate}: {unproven}")
        like = followed.model.get_weights()
        reference = self._weights(propose.reference, like)
        results = [(self._weights(cid_str(u["weights"]), like, base=reference), u["num_examples"])
                   for u in candidate["updates"]]
        state = _Round(propose.candidate, candidate, results, reference)
        followed.rounds[propose.round] = state

        name = self.aggregation or candidate["aggregation"]["name"]
        # a copy either way: the job's rule goes into this round's params, never into the miner's own
        params = dict(self.params if self.aggregation else candidate["aggregation"]["params"])
        rule = _rule(candidate)
        if rule is not None:
            params["accept"] = str(rule)
        weights = aggregate(name, results, reference=reference, round=candidate["round"], seq=candidate["seq"],
                            **params)
        ours = self._evaluate(followed, weights)
        if rule is not None:
            ok, why = rule.check(ours, self._evaluate(followed, reference))
            if not ok:
                log.info("job %s round %d: no proposal, our %s aggregate fails the rule here (%s)",
                         propose.job, propose.round, name, why)
                return
            ours["accepted"] = 1.0
        from .payloads import weights_to_bytes

        weights_cid = cid_str(self.client.add(weights_to_bytes(weights)))
        metrics = {k: v for k, v in candidate["metrics"].items() if not k.startswith("val_")}
        metrics.update(ours)
        fields = rival_block(candidate, weights=weights_cid, aggregation=name, params=params, metrics=metrics,
                             time=time.time())
        block = cid_str(store_block(self.client, fields, self.identity))
        state.proposed = block
        self.proposed += 1
        self.publish(messages.Proposal(job=propose.job, round=propose.round, candidate=propose.candidate,
                                       block=block))
        log.info("job %s round %d: proposed %s (%s, %s) in %.1fs", propose.job, propose.round, block, name,
                 _show(ours), time.monotonic() - started)

    def endorse(self, followed: _Followed, head: messages.Head) -> None:
        """Check the block the owner appended for a round we were asked about, on our own data."""
        state = followed.rounds.pop(head.round, None)
        if state is None:
            return
        like = followed.model.get_weights()
        try:
            block, weights = check_rival(self.client.block_get(head.head), head.head, state.candidate,
                                         state.results, state.reference, lambda cid: self._weights(cid, like))
            if block["signer"] != followed.job.owner:
                raise ContestError(f"signed by {block['signer'][:12]}, not the job's owner")
            rule = _rule(block)
            ours = self._evaluate(followed, weights)
            if rule is not None:
                ok, why = rule.check(ours, self._evaluate(followed, state.reference))
                if not ok:
                    raise ContestError(f"on our data: {why}")
            verdict = "accepted"
        except ContestError as exc:
            verdict = printable(f"disputed: {' '.join(str(exc).split())}", 200)  # one plain line: see messages._str
        self.endorsed[verdict.split(":")[0]] = self.endorsed.get(verdict.split(":")[0], 0) + 1
        self.publish(messages.Endorse(job=head.job, round=head.round, head=head.head, verdict=verdict))
        won = verdict == "accepted" and state.proposed is not None and state.proposed == _winning_block(block)
        log.info("job %s round %d: block %s %s%s", head.job, head.round, head.head, verdict,
                 " (our proposal won)" if won else "")

    # -- fetching --------------------------------------------------------------------------------------

    def _owner_block(self, followed: _Followed, cid: str) -> dict:
        block = decode_block(self.client.block_get(cid), cid)
        if block["signer"] != followed.job.owner:
            raise ContestError(f"candidate {cid} is signed by {block['signer'][:12]}, not the job's owner")
        return block

    def _weights(self, cid: str, like: list, base: list | None = None) -> list:
        """Weights by CID; an update compressed against the round's `base` weights is decoded against them."""
        from .payloads import fetch_weights

        return fetch_weights(self.client, cid, like=like, base=base)

    def _evaluate(self, followed: _Followed, weights: list) -> dict:
        from .training import evaluate

        if isinstance(followed.model, IsolatedModel):
            return held_out(followed.model.evaluate(weights))
        return held_out(evaluate(followed.model, weights, followed.x_val, followed.y_val))

    # -- isolation (--isolate, as in the worker) --------------------------------------------------------

    def load_model(self, data: bytes, source: str, shard):
        if self.isolate is None:
            return super().load_model(data, source, shard)
        return IsolatedModel(data, source=source, x_val=shard[0], y_val=shard[1], limits=self.isolate,
                             load_kwargs=self.model_options)

    def _room(self) -> None:
        running = sum(isinstance(followed.model, IsolatedModel) for followed in self.jobs.values())
        if self.isolate is not None and running >= self.isolated_jobs:
            raise ValueError(f"{running} isolated jobs are running already (--isolated-jobs {self.isolated_jobs})")

    def close(self) -> None:
        super().close()
        for followed in self.jobs.values():
            _close_model(followed.model)


def _close_model(model: object) -> None:
    if isinstance(model, IsolatedModel):
        model.close()


def _rule(block: dict) -> AcceptRule | None:
    text = block["aggregation"]["params"].get("accept")
    return parse_accept(text) if isinstance(text, str) else None


def _winning_block(block: dict) -> str | None:
    """The CID of the candidate that won the round, from the block's `ext.pofl` (None if absent)."""
    link = ((block.get("ext") or {}).get("pofl") or {}).get("block")
    return cid_str(link) if link is not None else None


def _check_rule(name: str, params: dict) -> None:
    """Fail at start, not mid-round, on params the rule refuses (tried on 5 tiny updates)."""
    import numpy as np

    try:
        aggregate(name, [([np.full(2, float(i), np.float32)], 1) for i in range(7)],
                  reference=[np.zeros(2, np.float32)], **params)
    except (TypeError, StrategyError) as exc:
        raise ValueError(f"aggregation {name} with {params}: {exc}") from None


def _show(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val_"))


def build_parser(prog: str = "python -m grid_ipfs.miner") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     epilog="Exit codes: 0 stopped by SIGINT/SIGTERM, 1 could not start (the "
                                            "reason is printed), 2 usage.")
    parser.add_argument("--api", required=True, help="the IPFS daemon's API multiaddr, e.g. /ip4/127.0.0.1/tcp/5001")
    parser.add_argument("--eval-data", required=True, type=Path,
                        help="this miner's validation data: .npz with arrays x and y")
    parser.add_argument("--aggregation", choices=sorted(STRATEGIES), default=None,
                        help="the rule this miner proposes with (default: the job's own); the private, secure "
                        "and stateful rules are the owner's alone")
    parser.add_argument("--trim", type=float, help="trimmed-mean: fraction cut at each end")
    parser.add_argument("--byzantine", type=int, help="krum/multi-krum: number of faulty workers tolerated")
    parser.add_argument("--topic", default=messages.JOBS_TOPIC, help=f"jobs topic (default {messages.JOBS_TOPIC})")
    parser.add_argument("--name", default=None, help="a name for logs and the key file (default: miner)")
    parser.add_argument("--key", default=None, help="Ed25519 key file (default ~/.grid_ipfs/miner-NAME.key)")
    parser.add_argument("--trust-clients", default=None, help="follow only jobs signed by the keys in this file")
    add_isolation_arguments(parser, "load or evaluation")
    add_vetting_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    prepare_owner_process()  # before anything loads TensorFlow; an entry point's choice
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.aggregation is None and (args.trim is not None or args.byzantine is not None):
        parser.error("--trim/--byzantine go with --aggregation")
    if args.aggregation is not None and not STRATEGIES[args.aggregation].minable():
        parser.error(f"{args.aggregation} is the owner's choice (privacy, masked updates or server state are the "
                     "job's own): mine with the job's rule instead")
    params = {k: v for k, v in (("trim", args.trim), ("byzantine", args.byzantine)) if v is not None}
    name = args.name or "miner"
    try:
        if args.aggregation is not None:
            _check_rule(args.aggregation, params)
        x, y = load_shard(args.eval_data)
        policy = policy_from_args(args)
        client, identity, trusted = connect(args.api, args.key, f"miner-{name}", args.trust_clients)
        miner = Miner(client, identity, x, y, name=name, aggregation=args.aggregation, params=params,
                      jobs_topic=args.topic, trusted_clients=trusted, isolate=limits_from_args(args),
                      isolated_jobs=args.isolated_jobs, policy=policy)
    except (DataError, IPFSError, IdentityError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    miner.serve()
    log.info("%s stopped (%d proposals, endorsements %s, %d messages dropped)", name, miner.proposed,
             miner.endorsed or "none", miner.dropped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
