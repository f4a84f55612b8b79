"""The owner's side of proof of federated learning (`grid_ipfs.contest`): stage the round's own
aggregate as a candidate, ask the miners for rivals, check and evaluate each on the owner's data, and
pick the best that clears the job's rule; afterwards, collect the miners' endorsements."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import messages
from ..chain import ChainError, decode_block
from ..contest import ContestError, best, check_rival, check_rival_fields, pofl_record, score_key
from ..ipfs import IPFSError, cid_str, parse_cid
from ..payloads import PayloadError, fetch_weights
from .blocks import evaluate
from .collect import FETCH_TIMEOUT, Collected, store_message
from .inbox import REANNOUNCE_EVERY, Inbox
from .job import JobFailed
from .state import JobRun

log = logging.getLogger("grid_ipfs.client")



@dataclass
class Candidate:
    """One candidate aggregate of a round: whose, which block, its rule, weights and metrics (ours)."""

    signer: str
    block: str
    aggregation: str
    params: dict
    weights: list
    weights_cid: str
    metrics: dict


@dataclass
class Outcome:
    """How a round's contest ended: the chosen candidate (the winner, or ours if none passed)."""

    accepted: bool
    why: str
    chosen: Candidate
    metrics: dict
    pofl: dict
    winner: str
    proposals: list
    refused: int


def run_contest(client, job: JobRun, inbox: Inbox, r: int, fields: dict, ordered: list[Collected],
                own_weights: list) -> Outcome:
    """Stage `fields` (the owner's aggregate) as round `r`'s candidate, gather the miners' rivals until
    `spec.miners` answered or the proposal deadline passed, and judge them all on the owner's data."""
    spec = job.spec
    try:
        candidate_cid = cid_str(job.chain.stage(fields, client.identity, extends=job.extends))
    except ChainError as exc:
        raise JobFailed(f"round {r} of job {job.id}: {exc}: stop the other writer") from None
    candidate = decode_block(client.ipfs.block_get(candidate_cid), candidate_cid)
    propose = messages.Propose(job=job.id, round=r, candidate=candidate_cid, reference=job.accepted.weights_cid,
                               deadline=time.time() + spec.proposal_timeout)
    client.publish(propose)
    recorded = fields["metrics"]
    base = {k: v for k, v in recorded.items() if not k.startswith("val_") and k != "accepted"}
    own = fields["aggregation"]
    entries = [Candidate(client.identity.id, candidate_cid, own["name"], own["params"], own_weights, fields["weights"],
                         {**base, **{k: v for k, v in recorded.items() if k.startswith("val_")}})]
    proposals = [{"signer": client.identity.id, "block": candidate_cid, "verdict": ""}]
    results = [(c.weights, c.update.num_examples) for c in ordered]
    answered: set[str] = set()
    refused = 0
    next_announce = time.monotonic() + REANNOUNCE_EVERY
    while len(answered) < spec.miners and time.time() < propose.deadline:
        if time.monotonic() >= next_announce:  # a miner may subscribe late
            client.publish(propose)
            next_announce = time.monotonic() + REANNOUNCE_EVERY
        inbox.drain(min(0.2, max(0.0, propose.deadline - time.time())))
        taken, job.proposals = job.proposals, []
        for proposal, sender in taken:
            if proposal.candidate != candidate_cid or proposal.round != r:
                inbox.drop("late", f"proposal for another candidate from {sender[:12]}")
            elif client.allowed_miners is not None and sender not in client.allowed_miners:
                inbox.drop("not allowed", f"proposal from {sender[:12]}")
            elif sender in answered:
                inbox.drop("replay", f"second proposal from {sender[:12]} for round {r}")
            else:
                answered.add(sender)
                try:
                    entries.append(_rival(client, job, proposal, sender, candidate, results, base))
                except (ContestError, IPFSError, PayloadError) as exc:
                    refused += 1
                    log.warning("round %d: refused the proposal of miner %s: %s", r, sender[:12], exc)
                    continue
                proposals.append({"signer": sender, "block": proposal.block, "verdict": ""})
    if len(answered) < spec.miners:
        log.info("round %d: %d of %d miners proposed within %.0fs", r, len(answered), spec.miners,
                 spec.proposal_timeout)
    return _judge(client, job, r, entries, proposals, refused)


def _rival(client, job: JobRun, proposal: messages.Proposal, sender: str, candidate: dict, results: list,
           base: dict) -> Candidate:
    """A miner's rival checked against our candidate (same round, same updates, recomputable rule, its
    proposer's signature, no fields of its own, the job's rule if the job promises noise) and evaluated."""
    like = job.accepted.weights
    rival, weights = check_rival(
        client.ipfs.block_get(proposal.block, timeout=FETCH_TIMEOUT), proposal.block, candidate, results, like,
        lambda cid: fetch_weights(client.ipfs, cid, like=like, timeout=FETCH_TIMEOUT))
    if rival["signer"] != sender:
        raise ContestError(f"block signed by {rival['signer'][:12]}, not by its proposer")
    check_rival_fields(rival)
    own = candidate["aggregation"]["name"]
    if job.strategy.adds_noise and rival["aggregation"]["name"] != own:
        raise ContestError(f"this job's privacy needs {own}; the rival uses {rival['aggregation']['name']}")
    return Candidate(sender, proposal.block, rival["aggregation"]["name"], rival["aggregation"]["params"], weights,
                     cid_str(rival["weights"]), {**base, **evaluate(job.model, weights, job.eval_xy)})


def _judge(client, job: JobRun, r: int, entries: list[Candidate], proposals: list, refused: int) -> Outcome:
    winner, verdicts = best([e.metrics for e in entries], job.accept, job.accepted.metrics)
    metric, _ = score_key(job.accept)
    for row, entry, verdict in zip(proposals, entries, verdicts):
        row.update(verdict=verdict, score=entry.metrics.get(metric))
    chosen = entries[winner if winner is not None else 0]
    metrics = dict(chosen.metrics)
    if job.accept is not None:
        metrics["accepted"] = 1.0 if winner is not None else 0.0
    why = verdicts[winner] if winner is not None else "; ".join(
        f"{e.signer[:12]}: {v}" for e, v in zip(entries, verdicts))
    if winner is not None:
        log.info("round %d: %s's %s aggregate wins (%s) among %d candidate(s)", r, chosen.signer[:12],
                 chosen.aggregation, verdicts[winner], len(entries))
    won = winner is not None
    pofl = pofl_record(chosen.signer if won else None, chosen.block if won else None, [e.block for e in entries],
                       endorsement_links(client, job))
    return Outcome(won, why, chosen, metrics, pofl, chosen.signer if won else "", proposals, refused)


def endorsement_links(client, job: JobRun) -> list:
    """The miners' signed endorsements of the newest block, each stored as a raw block (the message bytes
    exactly as signed, so anyone can check them): the block about to be appended links them."""
    head = job.chain.head
    signed = job.endorse_messages.get(cid_str(parse_cid(head)), {}) if head is not None else {}
    return [store_message(client.ipfs, signed[miner]) for miner in sorted(signed)]


def await_endorsements(job: JobRun, inbox: Inbox) -> None:
    """After the last round, give the miners that proposed in it time to check the final block."""
    if not job.spec.miners or not job.result.rounds:
        return
    last = job.result.rounds[-1]
    expected = {p["signer"] for p in last.proposals[1:]}
    deadline = time.monotonic() + job.spec.proposal_timeout
    while not expected <= set(job.endorsements.get(last.round, {})) and time.monotonic() < deadline:
        inbox.drain(0.2)
    for outcome in job.result.rounds:
        outcome.endorsements = dict(job.endorsements.get(outcome.round, {}))
