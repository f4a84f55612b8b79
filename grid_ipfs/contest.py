"""Proof of federated learning with competing aggregators ("miners"), after FlexBlock's PoFL.

One job owner, any number of miners; for each round:

1. The owner collects the round's updates as usual, aggregates them with the job's rule and *stages*
   that as its candidate block (stored, signed, not on the chain yet). It publishes `propose` with the
   candidate and the round's starting weights (`reference`).
2. Each miner (`python -m grid_ipfs.miner`) fetches the candidate and every update it records,
   aggregates them with its own rule, evaluates the result on its own validation split and, if that
   clears the job's acceptance rule there, stages a rival block: the candidate's round, seq, prev,
   model and updates with its own weights, aggregation, metrics and signature (`rival_block`). It
   answers `proposal`.
3. The owner checks every rival itself (`check_rival`: signature, the same round, an aggregate that
   recomputes bit for bit from the recorded updates), evaluates it on its own held-out data, and the
   best candidate that clears the rule on the owner's numbers wins (`best`). The appended block takes
   the winner's aggregation and weights and records the contest in `ext.pofl` (`pofl_record`): the
   winner's id, its candidate block and links to every candidate that was checked, so an auditor can
   re-check the rivals.
4. Each miner checks the appended block the same way, on its own data, and publishes `endorse`. The
   owner stores each signed `endorse` message as a raw block and the next round's block links them
   (`ext.pofl.endorsements`), so the chain itself shows who vouched for each block but the last
   (whose endorsements only reach the client's result).

Everything here is pure given the fetched bytes; the roles (client, miner) do the fetching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .aggregate import AcceptRule
from .chain.blocks import ROUND_FIELDS, ChainError, check_signature, decode_block, summation_order
from .errors import GridError
from .ipfs.cids import cid_str, parse_cid, same_data
from .payloads import weights_to_bytes
from .strategies import aggregate, strategy_class

__all__ = ["ContestError", "rival_block", "check_rival", "score_key", "best", "pofl_record"]


class ContestError(GridError):
    """A rival block that does not compete: the message says why in a few words (it is logged)."""


def rival_block(candidate: Mapping, *, weights: str, aggregation: str, params: Mapping,
                metrics: Mapping[str, float], time: float) -> dict:
    """The fields of a rival to `candidate` (sign and store them with `chain.store_block`)."""
    fields = {key: candidate[key] for key in ROUND_FIELDS}
    return {**fields, "weights": weights, "aggregation": {"name": aggregation, "params": dict(params)},
            "metrics": dict(metrics), "time": time}


def check_rival(data: bytes, cid: str, candidate: Mapping, results: Sequence[tuple[list, int]], reference: list,
                fetch_weights: Callable[[str], list]) -> tuple[dict, list]:
    """Decode and check a rival block against `candidate`; return (block, its weights).

    `results` are the round's updates as `(weights, num_examples)` in the candidate's (worker) order and
    `reference` the weights the round started from, as the owner holds them. Raises ContestError.
    """
    try:
        block = decode_block(data, cid)
    except ChainError as exc:
        raise ContestError(f"not a valid block: {exc}") from None
    if not check_signature(block):
        raise ContestError(f"bad signature for signer {block['signer'][:12]}")
    for key in ROUND_FIELDS:
        if not same_data(block.get(key), candidate.get(key)):
            raise ContestError(f"{key} differs from the round's candidate")
    name, params = block["aggregation"]["name"], block["aggregation"]["params"]
    try:
        if strategy_class(name).stateful:  # its state would be the rival's, not the job's
            raise ValueError("it keeps server state across rounds, which a rival cannot share")
        in_order = [results[i] for i in summation_order(block)]
        expected = aggregate(name, in_order, reference=reference, round=block["round"], seq=block["seq"],
                             **params)
    except (ValueError, TypeError) as exc:
        raise ContestError(f"aggregation {name} {dict(params)} cannot be recomputed: {exc}") from None
    weights = fetch_weights(cid_str(block["weights"]))
    if weights_to_bytes(weights) != weights_to_bytes(expected):
        raise ContestError(f"weights {cid_str(block['weights'])} are not {name} of the recorded updates")
    return block, weights


def check_rival_fields(block: Mapping) -> None:
    """ContestError for a rival carrying fields of its own (`ext`, `config`; `rival_block` writes neither):
    the owner's head links every candidate, so a rival's own links would ride along into the owner's pin
    (a large DAG to download, or a CID nobody has to stall on)."""
    extra = sorted({"ext", "config"} & set(block))
    if extra:
        raise ContestError(f"a rival block carries {extra[0]}: it holds only the round, its weights, rule and metrics")


def score_key(rule: AcceptRule | None) -> tuple[str, bool]:
    """(metric, lower_is_better) that ranks candidates: the acceptance rule's metric, else val_loss."""
    if rule is None:
        return "val_loss", True
    return rule.metric, rule.lower_is_better


def best(scored: Sequence[Mapping[str, float]], rule: AcceptRule | None,
         baseline: Mapping[str, float] | None = None) -> tuple[int | None, list[str]]:
    """Index of the best candidate that passes `rule` (None if none does) and, per candidate, why.

    Candidates are ranked by `score_key(rule)`; ties go to the earlier one (the owner's own comes
    first). A candidate whose metrics lack the ranking metric cannot win.
    """
    metric, lower = score_key(rule)
    winner, verdicts = None, []
    for index, metrics in enumerate(scored):
        if metric not in metrics:
            verdicts.append(f"no {metric} to rank by")
            continue
        if rule is not None:
            ok, why = rule.check(metrics, baseline)
            if not ok:
                verdicts.append(why)
                continue
        verdicts.append(f"{metric} {metrics[metric]:.6g}")
        if winner is None or (metrics[metric] < scored[winner][metric] if lower
                              else metrics[metric] > scored[winner][metric]):
            winner = index
    return winner, verdicts


def pofl_record(winner: str | None, block: str | None, candidates: Sequence[str],
                endorsements: Sequence[str] = ()) -> dict:
    """The block's `ext.pofl`: who won, with which candidate block, and every candidate checked (the
    owner's first); without `winner`/`block` when no candidate cleared the rule. `endorsements` link the
    miners' signed `endorse` messages about the previous block (raw blocks; omitted when none). Links
    are CIDs, so an auditor can fetch and re-check each rival and each endorsement."""
    record: dict = {"candidates": [parse_cid(c) for c in candidates]}
    if winner is not None and block is not None:
        record.update(winner=winner, block=parse_cid(block))
    if endorsements:
        record["endorsements"] = [parse_cid(e) for e in endorsements]
    return record
