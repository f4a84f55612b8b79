"""Audit a chain from its head: anyone holding a head CID can check a whole training run.

Checks, per block: its bytes hash to its CID and decode to a valid block; the signature is the
signer's; `seq` drops by exactly one per step down to a genesis at seq 0 without `prev`; job and model
never change; every linked object is retrievable (`check_objects`); and the global weights equal, bit
for bit, the aggregation rule applied to the recorded updates in worker order (`recompute`). Rules that
need the previous global weights (dp-fedavg) get those of the newest *accepted* block before, and the
block's round and seq (which seed dp-fedavg's noise).

Acceptance rules: a block whose aggregation params hold `accept` (e.g. `"val_accuracy>=0.6"`) records
`accepted` (1.0 or 0.0) in its metrics; the rule is applied again to the block's recorded metrics (and,
for `improves:M`, to the newest accepted block's before it), and the verdicts must agree. A rejected
block is followed by another try of the same round. The recorded metrics themselves come from the
client's evaluation data, which the chain does not hold: pass `evaluate` (weights -> metrics, e.g. from
`python -m grid_ipfs.client verify --eval-data FILE`) to re-evaluate every block's global weights,
compare with the recorded values (`eval_tolerance`), and decide the rules on the verifier's numbers.

Custom block fields: a block's optional `ext` map (see `blocks`) is checked for layout and covered
by the signature like everything else; what it *means* is the application's. Pass `check_ext(block,
weights) -> reason or None` to re-check it: it is called for every block, genesis first, with the
decoded block and its global weights (a list of numpy arrays), and a returned string fails the block
(e.g. a linear model's recorded coefficients that are not those of its weights).

Contests (proof of federated learning with miners, `grid_ipfs.contest`): a block recording
`ext.pofl` must be its winner's aggregate: the linked winning candidate is among the candidates, is
validly signed by the named winner, is for the same round over the same updates, and has the same
weights and rule; an accepted block must name a winner. (Its aggregate is recomputed like any block's.)
The miners' endorsements it links (`ext.pofl.endorsements`) must each be a validly signed `endorse`
message about the previous block, at most one per miner.

The report names the *oldest* bad block reachable from the head, because everything built on a bad
block inherits the problem: the first failure is the one to investigate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from multiformats import CID

from .. import messages
from ..ipfs.cids import cid_str, parse_cid, same_cid, same_data
from ..ipfs.errors import IPFSError
from .blocks import ROUND_FIELDS, ChainError, check_signature, decode_block
from .log import BlockStore

__all__ = ["BlockCheck", "ExtCheck", "VerifyReport", "is_accepted", "verify_chain"]

ExtCheck = Callable[[dict, list], str | None]
"""`check_ext(block, weights)`: None when the block's custom fields are right, else the reason (weights read-only)."""


def is_accepted(block: dict) -> bool:
    """False only for a block recorded as rejected by its acceptance rule (`metrics.accepted == 0.0`):
    its weights are a candidate that was turned down, not the job's global model."""
    return block["metrics"].get("accepted", 1.0) != 0.0


@dataclass
class BlockCheck:
    """One block's verdict: `ok` is None when it was not checked because an older block failed."""

    cid: CID
    seq: int | None
    round: int | None
    ok: bool | None = None
    reason: str = ""


@dataclass
class VerifyReport:
    """`ok` for the whole chain; otherwise `first_bad` (oldest failure) and its `reason`."""

    ok: bool
    blocks: int
    """How many blocks were read walking from the head."""
    first_bad: CID | None = None
    reason: str = ""
    checks: list[BlockCheck] = field(default_factory=list)
    """Per block, genesis first (or the oldest block reached, if the walk broke)."""


class _Bad(Exception):
    """A block fails a check; the message is the reason without the block's label."""


def verify_chain(store: BlockStore, head: str | CID, *, check_objects: bool = True, recompute: bool = True,
                 signer: str | None = None, evaluate: Callable[[list], Mapping[str, float]] | None = None,
                 eval_tolerance: float = 1e-4, check_ext: ExtCheck | None = None) -> VerifyReport:
    """Walk `head` -> genesis and check every block (see the module docstring).

    `signer`, if given, is the only id allowed to have signed blocks (e.g. the job owner's). Fetch
    failures are verdicts, not exceptions: a chain whose objects cannot be found does not verify.
    `evaluate(weights)`, if given, re-evaluates each block's global weights: every metric it returns
    that the block also records must agree within `eval_tolerance`, and acceptance rules are decided on
    its values. `check_ext(block, weights)`, if given, re-checks each block's custom fields (`ext`,
    absent unless the writer added some): a returned string fails the block, and so does a KeyError,
    IndexError, TypeError or ValueError raised while reading a block it did not expect.
    """
    walked, broken = _walk(store, parse_cid(head))
    chain = walked[::-1]  # oldest first, so the first failure found is the oldest one
    checks = [BlockCheck(cid, None if b is None else b["seq"], None if b is None else b["round"])
              for cid, b in chain]
    failure: tuple[int, str] | None = None
    if broken is not None:  # the oldest block reached could not be read: nothing older is checked
        failure = (0, broken)
    else:
        context = _Context(check_objects, recompute, signer, evaluate, eval_tolerance, check_ext)
        for index, (_, block) in enumerate(chain):
            parent = chain[index - 1][1] if index else None
            try:
                weights, metrics = _check_block(store, block, parent, context)
            except _Bad as exc:
                failure = (index, f"{_label(index, block)}: {exc}")
                break
            if is_accepted(block):
                context.accepted, context.accepted_weights, context.accepted_metrics = block, weights, metrics
            checks[index].ok = True
    if failure is None:
        return VerifyReport(True, len(walked), checks=checks)
    index, reason = failure
    checks[index].ok, checks[index].reason = False, reason
    return VerifyReport(False, len(walked), checks[index].cid, reason, checks)


@dataclass
class _Context:
    check_objects: bool
    recompute: bool
    signer: str | None
    evaluate: Callable[[list], Mapping[str, float]] | None
    eval_tolerance: float
    check_ext: ExtCheck | None = None
    accepted: dict | None = None
    """The newest accepted block checked so far (genesis first): its weights are the reference of the
    next block, its metrics the baseline of an `improves:` rule."""
    accepted_weights: bytes | None = None
    accepted_metrics: Mapping[str, float] | None = None


def _label(index: int, block: dict) -> str:
    return f"block {index} (seq {block['seq']})"


def _walk(store: BlockStore, head: CID) -> tuple[list[tuple[CID, dict | None]], str | None]:
    """Follow `prev` links to genesis. Returns the blocks head first and, if a block could not be
    fetched or decoded (so its `prev` cannot be trusted), that block last (as None) and the reason."""
    walked: list[tuple[CID, dict | None]] = []
    cid: CID | None = head
    while cid is not None:
        depth = f"block {cid_str(cid)} ({len(walked)} below the head)"
        try:
            data = store.block_get(cid)
        except (IPFSError, ChainError) as exc:
            walked.append((cid, None))
            return walked, f"{depth}: cannot be fetched: {exc}"
        try:
            block = decode_block(data, cid)
        except ChainError as exc:
            walked.append((cid, None))
            reason = str(exc).removeprefix(f"block {cid_str(cid)}: ")
            return walked, f"{depth}: {reason}"
        walked.append((cid, block))
        cid = block.get("prev")
    return walked, None


def _check_block(store: BlockStore, block: dict, parent: dict | None,
                 context: _Context) -> tuple[bytes | None, Mapping[str, float]]:
    """Raise _Bad on the first failed check; return the block's weights bytes (when fetched) and the
    metrics to judge it by (recorded, or re-evaluated with `context.evaluate`)."""
    signer = context.signer
    if signer is not None and block["signer"] != signer:
        raise _Bad(f"signed by {block['signer']}, expected {signer}")
    if not check_signature(block):
        raise _Bad(f"bad signature from {block['signer']}")
    if parent is None:
        if block["seq"] != 0:  # the layout ties "no prev" to seq 0, so this is belt and braces
            raise _Bad(f"the oldest block has seq {block['seq']}, expected genesis at seq 0")
    else:
        if block["seq"] != parent["seq"] + 1:
            raise _Bad(f"seq {block['seq']} follows seq {parent['seq']}")
        if block["job"] != parent["job"]:
            raise _Bad(f"job {block['job']!r} differs from the previous block's {parent['job']!r}")
        if not same_cid(block["model"], parent["model"]):
            raise _Bad("model differs from the previous block's")
        if not is_accepted(parent) and block["round"] != parent["round"]:
            raise _Bad(f"round {block['round']} follows a rejected try of round {parent['round']}, "
                       "which must be tried again first")
    from ..payloads import MAX_MODEL_BYTES, MAX_WEIGHTS_BYTES

    weights = None
    if parent is None:  # genesis: nothing to recompute; the model is the same along the chain
        if context.check_objects:
            _fetch(store, block["model"], MAX_MODEL_BYTES, "model")
        if (context.check_objects or context.recompute or context.evaluate is not None
                or context.check_ext is not None):
            weights = _fetch(store, block["weights"], MAX_WEIGHTS_BYTES, "weights")
        arrays = _global_arrays(weights, context)
        _check_custom(block, arrays, context)
        return weights, _metrics(block, arrays, context)
    arrays = None
    if context.check_objects or context.recompute:
        weights = _fetch(store, block["weights"], MAX_WEIGHTS_BYTES, "weights")
        updates = [_fetch(store, u["weights"], MAX_WEIGHTS_BYTES, f"update from {u['worker']}")
                   for u in block["updates"]]
        if context.recompute:
            arrays = _recompute(block, weights, updates, context.accepted_weights)
        _check_pofl(store, block, parent)
    elif context.evaluate is not None or context.check_ext is not None:
        weights = _fetch(store, block["weights"], MAX_WEIGHTS_BYTES, "weights")
    if arrays is None:
        arrays = _global_arrays(weights, context)
    _check_custom(block, arrays, context)
    metrics = _metrics(block, arrays, context)
    _check_acceptance(block, metrics, context.accepted_metrics)
    return weights, metrics


def _global_arrays(weights: bytes | None, context: _Context) -> list | None:
    """The block's global weights as arrays, parsed once for the checks that read them (None if none does)."""
    if weights is None or (context.check_ext is None and context.evaluate is None):
        return None
    from ..payloads import weights_from_bytes

    try:
        return weights_from_bytes(weights, source="global weights")
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _check_pofl(store: BlockStore, block: dict, parent: dict | None) -> None:
    """A block that records a contest (`ext.pofl`) is what its winning candidate proposed, and the
    endorsements it links are genuine signed `endorse` messages about the previous block."""
    pofl = (block.get("ext") or {}).get("pofl")
    if pofl is None:
        return
    if not isinstance(pofl, dict) or not isinstance(pofl.get("candidates"), list):
        raise _Bad("ext.pofl: expected {candidates: [links], winner?, block?, endorsements?}")
    _check_endorsements(store, block, parent, pofl.get("endorsements", []))
    winning = pofl.get("block")
    if winning is None:
        if is_accepted(block):
            raise _Bad("ext.pofl names no winner, yet the block is accepted")
        return
    if not isinstance(winning, CID) or not any(same_data(winning, c) for c in pofl["candidates"]):
        raise _Bad("ext.pofl: the winning block is not a link among the candidates")
    try:
        rival = decode_block(store.block_get(winning), winning)
    except (IPFSError, ChainError) as exc:
        raise _Bad(f"ext.pofl: winning candidate {cid_str(winning)}: {exc}") from None
    if rival["signer"] != pofl.get("winner") or not check_signature(rival):
        raise _Bad(f"ext.pofl: winning candidate {cid_str(winning)} is not validly signed by the named winner")
    for key in (*ROUND_FIELDS, "weights", "aggregation"):
        if not same_data(rival.get(key), block.get(key)):
            raise _Bad(f"ext.pofl: {key} differs from the winning candidate {cid_str(winning)}")


def _check_endorsements(store: BlockStore, block: dict, parent: dict | None, links: object) -> None:
    """Each link is a miner's signed `endorse` of the previous block (this job, its round, its CID), one
    per miner. A "disputed" verdict is evidence, not a failure: the chain records what miners said."""
    if not isinstance(links, list) or not all(isinstance(link, CID) for link in links):
        raise _Bad("ext.pofl.endorsements: expected a list of links")
    signers = set()
    for link in links:
        try:
            envelope = messages.decode(store.block_get(link))
        except IPFSError as exc:
            raise _Bad(f"ext.pofl: endorsement {cid_str(link)} not retrievable: {exc}") from None
        except messages.MessageError as exc:
            raise _Bad(f"ext.pofl: endorsement {cid_str(link)}: {exc.reason}") from None
        endorse = envelope.message
        if (not isinstance(endorse, messages.Endorse) or parent is None or endorse.job != block["job"]
                or endorse.round != parent["round"] or not same_data(parse_cid(endorse.head), block["prev"])):
            raise _Bad(f"ext.pofl: endorsement {cid_str(link)} is not an endorsement of the previous block")
        if envelope.sender in signers:
            raise _Bad(f"ext.pofl: two endorsements from {envelope.sender[:12]}")
        signers.add(envelope.sender)


def _check_custom(block: dict, arrays: list | None, context: _Context) -> None:
    """The application's own check of the block's custom fields (`ext`), on its global weights."""
    if context.check_ext is None or arrays is None:
        return
    views = [a.view() for a in arrays]  # read-only: the evaluator gets the same arrays next
    for view in views:
        view.flags.writeable = False
    try:
        reason = context.check_ext(block, views)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise _Bad(f"ext check failed: {type(exc).__name__}: {exc}") from None
    if reason is not None:
        raise _Bad(f"ext: {reason}" if isinstance(reason, str)
                   else f"check_ext returned {reason!r}, expected None (fine) or a reason string")


def _metrics(block: dict, arrays: list | None, context: _Context) -> Mapping[str, float]:
    """The block's recorded metrics, or with an evaluator the verifier's own numbers, after checking
    that they agree with the recorded ones."""
    recorded = block["metrics"]
    if context.evaluate is None or arrays is None:
        return recorded
    try:
        found = dict(context.evaluate(arrays))
    except ValueError as exc:
        raise _Bad(f"cannot evaluate the global weights: {exc}") from None
    for name in sorted(set(found) & set(recorded)):
        if not abs(float(found[name]) - recorded[name]) <= context.eval_tolerance:
            raise _Bad(f"recorded {name} {recorded[name]:.6g}, but the verifier's evaluation gives "
                       f"{float(found[name]):.6g} (is it the client's eval data?)")
    return {**recorded, **found}


def _check_acceptance(block: dict, metrics: Mapping[str, float], baseline: Mapping[str, float] | None) -> None:
    """The acceptance rule in the aggregation params, applied again, must give the recorded verdict."""
    from ..aggregate import parse_accept

    rule_text = block["aggregation"]["params"].get("accept")
    recorded = block["metrics"].get("accepted")
    if rule_text is None:
        if recorded is not None and recorded != 1.0:
            raise _Bad(f"accepted {recorded} recorded without an acceptance rule")
        return
    try:
        rule = parse_accept(rule_text)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    if recorded not in (0.0, 1.0):
        raise _Bad(f"acceptance rule {rule} but the metric accepted is {recorded!r}, expected 1.0 or 0.0")
    try:
        ok, why = rule.check(metrics, baseline)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    if ok != (recorded == 1.0):
        raise _Bad(f"recorded as {'accepted' if recorded == 1.0 else 'rejected'}, but {why}")


def _fetch(store: BlockStore, cid: CID, max_size: int, what: str) -> bytes:
    try:
        return store.cat(cid, max_size=max_size)
    except IPFSError as exc:
        raise _Bad(f"{what} {cid_str(cid)} not retrievable: {exc}") from None


def _recompute(block: dict, stored: bytes, updates: list[bytes], reference: bytes | None) -> list:
    """Raise _Bad unless the block's weights are exactly the aggregate of its updates; return them parsed.

    Arrays are compared as raw bytes (dtype, shape and every bit), not with a tolerance: aggregation is
    deterministic, so any difference means the recorded updates are not what produced these weights.
    `reference` is the newest accepted block's weights, for the rules that need them.
    """
    from ..aggregate import aggregate, needs_reference
    from ..payloads import weights_from_bytes

    name, params = block["aggregation"]["name"], block["aggregation"]["params"]
    try:
        results = [(weights_from_bytes(data, source=f"update from {u['worker']}"), u["num_examples"])
                   for u, data in zip(block["updates"], updates, strict=True)]
        previous = None
        if needs_reference(name):
            if reference is None:
                raise ValueError("the previous global weights could not be read")
            previous = weights_from_bytes(reference, source="previous global weights")
        expected = aggregate(name, results, reference=previous, round=block["round"], seq=block["seq"], **params)
    except (ValueError, TypeError) as exc:  # PayloadError is a ValueError; so are the rules' own errors
        raise _Bad(f"cannot recompute {name}: {exc}") from None
    try:
        actual = weights_from_bytes(stored, source="global weights")
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    if not (len(actual) == len(expected) and all(_identical(a, e) for a, e in zip(actual, expected))):
        raise _Bad(f"weights differ from {name} of its {len(updates)} updates")
    return actual


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
