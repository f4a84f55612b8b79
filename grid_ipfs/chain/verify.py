"""Audit a chain from its head: anyone holding a head CID can check a whole training run.

Checks, per block: its bytes hash to its CID and decode to a valid block; the signature is the
signer's; `seq` drops by exactly one per step down to a genesis at seq 0 without `prev`; job and model
never change; every linked object is retrievable (`check_objects`); and the global weights equal, bit
for bit, the aggregation rule applied to the recorded updates in worker order (`recompute`). Rules that
need the previous global weights (dp-fedavg) get those of the newest *accepted* block before, and the
block's round and seq (which seed dp-fedavg's noise). Strategies with server state (FedAdam's moments,
FedAvgM's momentum; `grid_ipfs.strategies`) get the state replayed from genesis: each accepted block's
recomputed aggregate advances it, a rejected one leaves it, so no state is ever read from the owner.

Acceptance rules: a block whose aggregation params hold `accept` (e.g. `"val_accuracy>=0.6"`) records
`accepted` (1.0 or 0.0) in its metrics; the rule is applied again to the block's recorded metrics (and,
for `improves:M`, to the newest accepted block's before it), and the verdicts must agree. A rejected
block is followed by another try of the same round. The recorded metrics themselves come from the
client's evaluation data, which the chain does not hold: pass `evaluate` (weights -> metrics, e.g. from
`python -m grid_ipfs.client verify --eval-data FILE`) to re-evaluate every block's global weights,
compare with the recorded values (`eval_tolerance`), and decide the rules on the verifier's numbers.

Signed contributions (block version 2, `contributions`): every update entry links the worker's own
signed `update` message; it must be validly signed by the entry's worker and say the same job, round,
weights, `num_examples` and metrics, name the block's `prev` as its head and the previous accepted
global weights as its base. A version 1 block (written before this existed) verifies without that
check, and the report counts it in `unproven`; a version 1 block after a version 2 one fails (a
writer must not drop the proof by writing the old format).

Asynchronous jobs (genesis `config.async`, docs/async.md): every update entry names its `base` block
and `staleness`. The base must be an earlier block of this chain, at most `max_staleness` accepted
versions before (the recorded staleness is that distance); the worker's signed message must name it
as its head, with that block's round and global weights; no message may count in two blocks. The
aggregate is recomputed from each update decoded against its own base, rebased onto the newest
accepted weights with its staleness weight, then the rule in the recorded order, then `server_lr`.

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

Bounded for a stranger's chain: the walk from the head checks that seq falls by exactly one per step
while it walks (the first break is named, nothing below it is fetched), and refuses a head whose seq
says the chain is longer than `max_blocks`; a block records at most `MAX_UPDATES` updates; each linked
object is fetched once per run (its parsed arrays are shared by every update that links it, and kept
for later blocks within `OBJECT_CACHE_BYTES`); aggregation params are range-checked before any
recomputation; and whatever a block holds, the verdict is a named block and a one-line reason, never
an exception.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from multiformats import CID

from .. import messages
from ..ipfs.cids import cid_str, parse_cid, same_cid, same_data
from ..ipfs.errors import IPFSError
from ..text import printable
from .blocks import ROUND_FIELDS, ChainError, check_signature, decode_block, summation_order
from .log import MAX_BLOCKS, BlockStore

__all__ = ["BlockCheck", "ExtCheck", "OBJECT_CACHE_BYTES", "VerifyReport", "is_accepted", "verify_chain"]

OBJECT_CACHE_BYTES = 512 * 1024 * 1024
"""How many bytes of parsed weights one verify run keeps for objects that later blocks link again."""

REASON_CHARS = 2000
"""Longest reason a verdict prints (escapes included): a reason quotes what a block holds."""

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
    first_bad_seq: int | None = None
    """The seq of `first_bad` (what its successor says it should be, if it could not be read)."""
    detail: str = ""
    """`reason` without its leading block label: `FAILED at block <seq> (<cid>): <detail>`."""
    unproven: int = 0
    """Blocks after genesis whose updates carry no signed messages (block version 1): what they credit
    to which worker rests on their signer's word alone."""
    server_state: object = None
    """With `recompute`, the strategy's server state after the newest accepted block, as replayed from
    genesis (None for stateless rules): what `client resume` continues from."""


class _Bad(Exception):
    """A block fails a check; the message is the reason without the block's label."""


def verify_chain(store: BlockStore, head: str | CID, *, check_objects: bool = True, recompute: bool = True,
                 signer: str | None = None, evaluate: Callable[[list], Mapping[str, float]] | None = None,
                 eval_tolerance: float = 1e-4, check_ext: ExtCheck | None = None,
                 max_blocks: int = MAX_BLOCKS, require_proof: bool = False) -> VerifyReport:
    """Walk `head` -> genesis and check every block (see the module docstring).

    `signer`, if given, is the only id allowed to have signed blocks (e.g. the job owner's). Fetch
    failures are verdicts, not exceptions: a chain whose objects cannot be found does not verify.
    `evaluate(weights)`, if given, re-evaluates each block's global weights: every metric it returns
    that the block also records must agree within `eval_tolerance`, and acceptance rules are decided on
    its values. `check_ext(block, weights)`, if given, re-checks each block's custom fields (`ext`,
    absent unless the writer added some): a returned string fails the block, and so does a KeyError,
    IndexError, TypeError or ValueError raised while reading a block it did not expect. A chain longer
    than `max_blocks` fails at its head without being walked. With `require_proof`, a block after
    genesis whose updates carry no signed messages (version 1) fails instead of counting as unproven.
    Nothing a chain holds makes this raise: an unexpected error while checking a block is that block's
    verdict too.
    """
    walked, broken = _walk(store, parse_cid(head), max_blocks)
    chain = walked[::-1]  # oldest first, so the first failure found is the oldest one
    checks = [BlockCheck(cid, None if b is None else b["seq"], None if b is None else b["round"])
              for cid, b in chain]
    failure: tuple[int, str, str, int | None] | None = None
    if broken is not None:  # the walk stopped at a block: nothing older is checked
        position, label, detail, seq = broken
        failure = (len(walked) - 1 - position, label, detail, seq)
    else:
        context = _Context(_Objects(store), check_objects, recompute, signer, evaluate, eval_tolerance, check_ext,
                           require_proof)
        for index, (cid, block) in enumerate(chain):
            parent = chain[index - 1][1] if index else None
            try:
                metrics = _check_block(block, parent, context)
            except _Bad as exc:
                failure = (index, _label(index, block), str(exc), block["seq"])
                break
            except Exception as exc:  # noqa: BLE001 - a block that trips the verifier does not verify
                failure = (index, _label(index, block), f"unexpected {type(exc).__name__}: {_one_line(exc)}",
                           block["seq"])
                break
            context.note_base(cid, block)
            if is_accepted(block):
                context.accepted, context.accepted_metrics = block, metrics
                context.state = context.pending_state
            checks[index].ok = True
    unproven = sum(1 for _, b in chain if b is not None and b["v"] < 2 and b["seq"] > 0)
    if failure is None:
        return VerifyReport(True, len(walked), checks=checks, unproven=unproven,
                            server_state=context.state if recompute else None)
    index, label, detail, seq = failure
    detail = printable(detail, REASON_CHARS)  # reasons quote what blocks hold: a peer's text
    reason = f"{label}: {detail}"
    checks[index].ok, checks[index].reason = False, reason
    return VerifyReport(False, len(walked), checks[index].cid, reason, checks, seq, detail, unproven)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class _Objects:
    """The linked objects of one verify run, each fetched at most once.

    Weights are parsed as soon as they arrive and only the arrays are kept (read-only, shared by every
    update that links the same CID); they stay cached for later blocks while the cache holds at most
    `budget` bytes (oldest dropped first). Objects only checked for retrievability leave just their
    hash behind.
    """

    def __init__(self, store: BlockStore, budget: int = OBJECT_CACHE_BYTES):
        self.store, self.budget = store, budget
        self.seen: set[bytes] = set()
        self.parsed: OrderedDict[bytes, list] = OrderedDict()
        self.size = 0

    def check(self, cid: CID, max_size: int, what: str) -> None:
        """_Bad unless `cid` is retrievable within `max_size` bytes."""
        if _key(cid) not in self.seen:
            self._fetch(cid, max_size, what)

    def weights(self, cid: CID, what: str, source: str | None = None, *, base: list | None = None,
                base_cid: CID | None = None) -> list:
        """The arrays of weights file `cid` (a compressed update decoded against `base`, the weights
        `base_cid` names); _Bad when not retrievable, PayloadError when not weights."""
        from ..payloads import MAX_WEIGHTS_BYTES, is_delta, weights_from_bytes

        plain, keyed = _key(cid), _key(cid) + (_key(base_cid) if base is not None else b"")
        for key in (plain, keyed):  # a full weights file is the same whatever the base; a delta is not
            if key in self.parsed:
                self.parsed.move_to_end(key)
                return self.parsed[key]
        data = self._fetch(cid, MAX_WEIGHTS_BYTES, what)
        key = keyed if is_delta(data) else plain
        arrays = weights_from_bytes(data, source=source or what, base=base)
        for array in arrays:
            array.flags.writeable = False
        self.parsed[key] = arrays
        self.size += sum(array.nbytes for array in arrays)
        while self.size > self.budget and len(self.parsed) > 1:
            _, dropped = self.parsed.popitem(last=False)
            self.size -= sum(array.nbytes for array in dropped)
        return arrays

    def _fetch(self, cid: CID, max_size: int, what: str) -> bytes:
        try:
            data = self.store.cat(cid, max_size=max_size)
        except IPFSError as exc:
            raise _Bad(f"{what} {cid_str(cid)} not retrievable: {exc}") from None
        self.seen.add(_key(cid))
        return data


@dataclass
class _Context:
    objects: _Objects
    check_objects: bool
    recompute: bool
    signer: str | None
    evaluate: Callable[[list], Mapping[str, float]] | None
    eval_tolerance: float
    check_ext: ExtCheck | None = None
    require_proof: bool = False
    accepted: dict | None = None
    """The newest accepted block checked so far (genesis first): its weights are the reference of the
    next block, its metrics the baseline of an `improves:` rule."""
    accepted_metrics: Mapping[str, float] | None = None
    state: object = None
    """The strategy's server state after the newest accepted block (None: initial)."""
    declared: tuple | None = None
    """(name, params) of the job's rule when the genesis config declares a stateful one: every block
    must then use exactly it, or an owner could restart the server state by switching rules."""
    pending_state: object = None
    """The state the block being checked leads to, kept only if it is accepted."""
    async_config: object = None
    """An async job's `strategies.fedbuff.AsyncConfig`, from its genesis config (None: synchronous)."""
    bases: dict = field(default_factory=dict)
    """Async jobs: block key -> (the round updates from it are for, its global weights CID), per block
    checked: what an update entry's `base` may name."""
    used: set = field(default_factory=set)
    """Async jobs: keys of the signed update messages blocks took so far (each counts once)."""

    def note_base(self, cid: CID, block: dict) -> None:
        if self.async_config is None:
            return
        if is_accepted(block):
            self.bases[_key(cid)] = (block["round"] + 1, block["weights"])
        else:  # a rejected try: updates from it retry its round from the weights before it
            self.bases[_key(cid)] = (block["round"], self.accepted["weights"])


def _label(index: int, block: dict) -> str:
    return f"block {index} (seq {block['seq']})"


_Broken = tuple[int, str, str, int | None]


def _walk(store: BlockStore, head: CID, max_blocks: int) -> tuple[list[tuple[CID, dict | None]], _Broken | None]:
    """Follow `prev` links to genesis, checking on the way that seq falls by exactly one per step.

    Returns the blocks head first and, if the walk broke, (position in that list of the block to blame,
    its label, the reason, its seq). A block that could not be fetched or decoded (so its `prev` cannot
    be trusted) is last, as None; a seq break blames the newer block, whose prev does not fit its seq.
    A head at seq `max_blocks` or more is refused before anything else is fetched.
    """
    walked: list[tuple[CID, dict | None]] = []
    cid: CID | None = head
    expected: int | None = None  # the seq the next block must have
    while cid is not None:
        label = f"block {cid_str(cid)} ({len(walked)} below the head)"
        try:
            data = store.block_get(cid)
        except (IPFSError, ChainError) as exc:
            walked.append((cid, None))
            return walked, (len(walked) - 1, label, f"cannot be fetched: {_one_line(exc)}", expected)
        try:
            block = decode_block(data, cid)
        except Exception as exc:  # noqa: BLE001 - decode_block raises ChainError; anything else is a verdict too
            walked.append((cid, None))
            reason = (_one_line(exc) if isinstance(exc, ChainError)
                      else f"unexpected {type(exc).__name__}: {_one_line(exc)}")
            return walked, (len(walked) - 1, label, reason.removeprefix(f"block {cid_str(cid)}: "), expected)
        walked.append((cid, block))
        if expected is None and block["seq"] >= max_blocks:
            return walked, (0, label, f"seq {block['seq']}: the chain is longer than the {max_blocks} blocks "
                                      "allowed (max_blocks)", block["seq"])
        if expected is not None and block["seq"] != expected:
            newer_cid, newer = walked[-2]
            return walked, (len(walked) - 2, f"block {cid_str(newer_cid)} ({len(walked) - 2} below the head)",
                            f"seq {newer['seq']} follows seq {block['seq']}", newer["seq"])
        expected = block["seq"] - 1
        cid = block.get("prev")
    return walked, None


def _check_block(block: dict, parent: dict | None, context: _Context) -> Mapping[str, float]:
    """Raise _Bad on the first failed check; return the metrics to judge the block by (recorded, or
    re-evaluated with `context.evaluate`)."""
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
        if block["v"] < 2 and context.require_proof:
            raise _Bad(f"block version {block['v']}: its updates carry no signed messages (contributions "
                       "unproven, and proof is required)")
        if block["v"] < parent["v"]:
            raise _Bad(f"block version {block['v']} follows version {parent['v']}: a chain does not drop "
                       "its workers' signed updates")
        if not is_accepted(parent) and block["round"] != parent["round"]:
            raise _Bad(f"round {block['round']} follows a rejected try of round {parent['round']}, "
                       "which must be tried again first")
    from ..payloads import MAX_MODEL_BYTES, MAX_WEIGHTS_BYTES

    objects = context.objects
    wants_arrays = context.evaluate is not None or context.check_ext is not None
    arrays = None
    if parent is None:  # genesis: nothing to recompute; the model is the same along the chain
        context.declared = _declared_stateful_rule(block)
        context.async_config = _declared_async(block)
        if context.check_objects:
            objects.check(block["model"], MAX_MODEL_BYTES, "model")
        if context.recompute or wants_arrays:  # its weights are the reference of the rounds after it
            arrays = _global_arrays(objects, block)
        elif context.check_objects:
            objects.check(block["weights"], MAX_WEIGHTS_BYTES, "weights")
        _check_custom(block, arrays, context)
        return _metrics(block, arrays, context)
    _check_declared_rule(block, context.declared)
    _check_mode(block, context)
    if context.check_objects or context.recompute:  # first: small messages, and the most precise verdict
        if context.async_config is not None:
            _check_async_contributions(objects.store, block, context)
        else:
            _check_contributions(objects.store, block, context.accepted)
    if context.recompute:
        arrays = _recompute(block, context)
    elif context.check_objects:
        objects.check(block["weights"], MAX_WEIGHTS_BYTES, "weights")
        for u in block["updates"]:
            objects.check(u["weights"], MAX_WEIGHTS_BYTES, f"update from {u['worker']}")
    if context.check_objects or context.recompute:
        _check_pofl(objects.store, block, parent)
    if arrays is None and wants_arrays:
        arrays = _global_arrays(objects, block)
    _check_custom(block, arrays, context)
    metrics = _metrics(block, arrays, context)
    _check_acceptance(block, metrics, context.accepted_metrics)
    return metrics


def _declared_stateful_rule(genesis: dict) -> tuple | None:
    """(name, params) of the genesis config's rule if it keeps server state (else None)."""
    from ..strategies import STRATEGIES

    config = genesis.get("config")
    if not isinstance(config, dict):
        return None
    name, params = config.get("aggregation"), config.get("aggregation_params", {})
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None or not cls.stateful or not isinstance(params, dict):
        return None
    return name, params


def _declared_async(genesis: dict):
    """The genesis config's async settings (`AsyncConfig`), or None for a synchronous job."""
    from ..strategies import StrategyError
    from ..strategies.fedbuff import AsyncConfig

    config = genesis.get("config")
    if not isinstance(config, dict) or "async" not in config:
        return None
    try:
        return AsyncConfig.from_record(config["async"])
    except StrategyError as exc:
        raise _Bad(f"config.async: {exc}") from None


def _check_mode(block: dict, context: _Context) -> None:
    """An async job's entries each name their base and staleness; a synchronous job's never do."""
    has_bases = "base" in block["updates"][0]  # the layout holds every entry to the first's keys
    if context.async_config is not None and not has_bases:
        raise _Bad("the job is asynchronous (genesis config.async), but the updates name no base and staleness")
    if context.async_config is None and has_bases:
        raise _Bad("the updates name a base and staleness, but the job is synchronous (no genesis config.async)")


def _check_async_contributions(store: BlockStore, block: dict, context: _Context) -> None:
    """Each entry of an async block: its base is a block of this chain, at most `max_staleness` versions
    before this one, as recorded; its worker's signed message extends that base for that round from its
    global weights and says what the entry says; and no message counts in two blocks."""
    from .contributions import ContributionError, check_entry, decode_update

    config = context.async_config
    for entry in block["updates"]:
        who = f"update of {entry['worker']}"
        base = context.bases.get(_key(entry["base"]))
        if base is None:
            raise _Bad(f"{who}: its base {cid_str(entry['base'])} is not an earlier block of this chain")
        round_for, weights = base
        staleness = block["round"] - round_for
        if entry["staleness"] != staleness:
            raise _Bad(f"{who}: staleness {entry['staleness']} recorded, but its base is {staleness} versions old")
        if staleness < 0 or staleness > config.max_staleness:
            raise _Bad(f"{who}: {staleness} versions behind, over the job's max_staleness {config.max_staleness}")
        link = entry["message"]
        try:
            envelope = decode_update(store.block_get(link), link)
        except IPFSError as exc:
            raise _Bad(f"{who}: message {cid_str(link)} not retrievable: {_one_line(exc)}") from None
        except ContributionError as exc:
            raise _Bad(f"{who}: {exc}") from None
        reason = check_entry(entry, envelope, job=block["job"], round=round_for, prev=entry["base"], base=weights)
        if reason is not None:
            raise _Bad(reason)
        if _key(link) in context.used:
            raise _Bad(f"{who}: its message {cid_str(link)} is in an earlier block already")
    context.used.update(_key(entry["message"]) for entry in block["updates"])


def _check_declared_rule(block: dict, declared: tuple | None) -> None:
    if declared is None:
        return
    name = block["aggregation"]["name"]
    params = {k: v for k, v in block["aggregation"]["params"].items() if k != "accept"}
    if name != declared[0] or params != declared[1]:
        raise _Bad(f"aggregation {name} {params} is not the job's {declared[0]} {declared[1]} (genesis config): "
                   "a rule with server state is kept for the whole job")


def _global_arrays(objects: _Objects, block: dict) -> list:
    """The block's global weights as (read-only, cached) arrays."""
    try:
        return objects.weights(block["weights"], "weights", source="global weights")
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _check_contributions(store: BlockStore, block: dict, accepted: dict | None) -> None:
    """Each update entry says what its worker's signed message says (`contributions.check_block`),
    with the newest accepted block's weights before this one as the base."""
    from .contributions import check_block

    if accepted is None:  # genesis is always accepted and checked first: belt and braces
        raise _Bad("no previous accepted block to take the base weights from")
    reason = check_block(store, block, accepted["weights"])
    if reason is not None:
        raise _Bad(reason)


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
    if "ext" in rival or "config" in rival:
        raise _Bad(f"ext.pofl: winning candidate {cid_str(winning)} carries fields of its own (ext or config)")
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
        envelope = _endorsement(store, link)
        endorse = envelope.message
        if (not isinstance(endorse, messages.Endorse) or parent is None or endorse.job != block["job"]
                or endorse.round != parent["round"] or not same_data(_head_link(endorse.head), block["prev"])):
            raise _Bad(f"ext.pofl: endorsement {cid_str(link)} is not an endorsement of the previous block")
        if envelope.sender in signers:
            raise _Bad(f"ext.pofl: two endorsements from {envelope.sender[:12]}")
        signers.add(envelope.sender)


def _endorsement(store: BlockStore, link: CID) -> messages.Envelope:
    """The signed message a link points at; any failure to fetch or decode it is _Bad, whatever it raised."""
    try:
        data = store.block_get(link)
    except (IPFSError, ChainError) as exc:
        raise _Bad(f"ext.pofl: endorsement {cid_str(link)} not retrievable: {_one_line(exc)}") from None
    try:
        return messages.decode(data)
    except messages.MessageError as exc:
        raise _Bad(f"ext.pofl: endorsement {cid_str(link)}: {exc.reason}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError on deeply nested JSON: still one verdict
        raise _Bad(f"ext.pofl: endorsement {cid_str(link)}: not a message ({type(exc).__name__})") from None


def _head_link(head: object) -> CID | None:
    try:
        return parse_cid(head)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a malformed head is simply not the previous block
        return None


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


def _check_params(name: str, params: dict) -> None:
    """The aggregation params range-checked (`aggregate.check_params`) before any arithmetic: a recorded
    `scale_bits` of 2000 overflows a float, one of 2**63-1 would never finish."""
    from ..strategies import check_params

    try:
        check_params(name, params)
    except (ValueError, TypeError) as exc:
        raise _Bad(f"aggregation params: {_one_line(exc)}") from None


def _recompute(block: dict, context: _Context) -> list:
    """Raise _Bad unless the block's weights are exactly the aggregate of its updates; return them parsed.

    Arrays are compared as raw bytes (dtype, shape and every bit), not with a tolerance: aggregation is
    deterministic, so any difference means the recorded updates are not what produced these weights.
    The rules that need a reference get the newest accepted block's weights.
    """
    from ..strategies import RoundContext, make, run

    name, params = block["aggregation"]["name"], block["aggregation"]["params"]
    objects = context.objects
    actual = _global_arrays(objects, block)
    _check_params(name, params)
    try:
        strategy = make(name, params)
        previous = None  # what the round's workers trained from: a compressed update decodes against it
        if context.accepted is not None:
            previous = objects.weights(context.accepted["weights"], "previous global weights")
        elif strategy.needs_reference:
            raise ValueError("the previous global weights could not be read")
        updates = [block["updates"][i] for i in summation_order(block)]  # the order the owner added them in
        if context.async_config is not None:
            results = [(_rebased(u, previous, context), u["num_examples"]) for u in updates]
        else:
            results = [(objects.weights(u["weights"], f"update from {u['worker']}", base=previous,
                                        base_cid=context.accepted["weights"] if previous is not None else None),
                        u["num_examples"]) for u in updates]
        out = run(strategy, results, RoundContext(previous, block["round"], block["seq"], context.state))
        expected, context.pending_state = out.weights, out.state
        if context.async_config is not None:
            from ..strategies.fedbuff import server_step

            expected = server_step(previous, expected, context.async_config.server_lr)
    except (ValueError, TypeError) as exc:  # PayloadError is a ValueError; so are the rules' own errors
        raise _Bad(f"cannot recompute {name}: {exc}") from None
    if not (len(actual) == len(expected) and all(_identical(a, e) for a, e in zip(actual, expected))):
        raise _Bad(f"weights differ from {name} of its {len(results)} updates")
    return actual


def _rebased(entry: dict, newest: list, context: _Context) -> list:
    """An async block's update as the owner folded it: decoded against its own base's weights, then
    rebased onto the newest accepted weights with its staleness weight (`strategies.fedbuff`)."""
    from ..strategies.fedbuff import rebase

    _, base_cid = context.bases[_key(entry["base"])]  # checked by _check_async_contributions
    base = context.objects.weights(base_cid, "base weights")
    weights = context.objects.weights(entry["weights"], f"update from {entry['worker']}", base=base, base_cid=base_cid)
    return rebase(weights, base, newest, context.async_config.weight(entry["staleness"]))


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _key(cid: CID) -> bytes:
    """What names an object in `_Objects`: its codec and multihash (a CIDv0 and its CIDv1 twin agree; a
    raw block and a dag-pb node with the same bytes do not, since `cat` reads them differently)."""
    return cid.codec.code.to_bytes(4, "big") + bytes(cid.digest)
