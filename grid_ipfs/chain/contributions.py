"""Signed contributions: each worker's own `update` message, kept on the chain beside the owner's entry.

An update entry in a block (`{worker, weights, num_examples, metrics}`) is written by the owner, so on
its own it proves nothing about the worker. Since block version 2 every entry also links (`message`)
the worker's signed update message exactly as it was published, stored as a raw block. That message
names the job, the round, the chain head the round extended and the base weights it trained from, its
weights CID, `num_examples` and metrics, and it carries the worker's Ed25519 signature. `check_entry`
holds the owner's entry to it: an owner cannot credit a worker with weights it never sent, nor replay a
worker's signature into another job or another history (the head would differ).

What this does not prove: that the worker trained honestly, on real data, or that its `num_examples`
are true. It proves who sent what, for which round of which history.
"""

from __future__ import annotations

from multiformats import CID, multihash

from .. import messages
from ..errors import GridError
from ..ipfs.cids import cid_str, parse_cid, same_cid
from ..ipfs.errors import IPFSError

__all__ = ["ContributionError", "entry_metrics", "update_entry", "decode_update", "check_entry", "check_block",
           "message_cid"]


class ContributionError(GridError, ValueError):
    """A linked update message that is missing, malformed, not signed, or not what the entry says."""


def entry_metrics(update: messages.Update) -> dict[str, float]:
    """The metrics an entry records for an update: its training metrics and, prefixed `eval_`, its
    evaluation of the incoming global model (one function, so the owner and every verifier agree)."""
    return {**update.metrics, **{f"eval_{key}": value for key, value in update.eval_metrics.items()}}


def message_cid(data: bytes) -> CID:
    """The CID of a message stored as a raw block (what `ipfs block put --cid-codec raw` answers)."""
    return CID("base32", 1, "raw", multihash.digest(bytes(data), "sha2-256"))


def update_entry(envelope: messages.Envelope, message: CID) -> dict:
    """The block entry for a verified update `envelope` whose bytes are stored as raw block `message`."""
    update = envelope.message
    if not isinstance(update, messages.Update):
        raise ContributionError(f"expected an update message, got {update.TYPE}")
    return {"worker": envelope.sender, "weights": parse_cid(update.weights), "num_examples": update.num_examples,
            "metrics": entry_metrics(update), "message": message}


def decode_update(data: bytes, link: CID) -> messages.Envelope:
    """The verified update message in `data`, which must hash to `link`; ContributionError otherwise."""
    if not (link.codec.name == "raw" and link.hashfun.name == "sha2-256"
            and multihash.digest(bytes(data), "sha2-256") == link.digest):
        raise ContributionError(f"update message {cid_str(link)}: bytes do not hash to its link")
    try:
        envelope = messages.decode(data)
    except messages.MessageError as exc:
        raise ContributionError(f"update message {cid_str(link)}: {exc.reason}") from None
    except Exception as exc:  # noqa: BLE001 - decode should only raise MessageError; a verdict all the same
        raise ContributionError(f"update message {cid_str(link)}: not a message ({type(exc).__name__})") from None
    if not isinstance(envelope.message, messages.Update):
        raise ContributionError(f"update message {cid_str(link)}: a {envelope.message.TYPE} message, not an update")
    return envelope


def check_entry(entry: dict, envelope: messages.Envelope, *, job: str, round: int, prev: CID,
                base: CID) -> str | None:
    """None when the worker's signed `envelope` says what the owner's `entry` says, for round `round`
    of `job`, extending block `prev` from global weights `base`; else the reason, naming the field."""
    update = envelope.message
    who = f"update of {entry['worker']}"
    if envelope.sender != entry["worker"]:
        return f"{who}: its message is signed by {envelope.sender}"
    if update.job != job or update.round != round:
        return f"{who}: its message is for round {update.round} of job {update.job!r}, not round {round} of {job!r}"
    if update.head is None or not same_cid(update.head, prev):
        return f"{who}: its message extends head {update.head}, not this block's prev {cid_str(prev)}"
    if update.base is None or not same_cid(update.base, base):
        return f"{who}: its message trained from {update.base}, not the previous global weights {cid_str(base)}"
    if not same_cid(update.weights, entry["weights"]):
        return f"{who}: its message sent weights {update.weights}, the block records {cid_str(entry['weights'])}"
    if update.num_examples != entry["num_examples"]:
        return f"{who}: its message claims {update.num_examples} examples, the block records {entry['num_examples']}"
    if entry_metrics(update) != entry["metrics"]:
        return f"{who}: the block's metrics differ from its message's"
    return None


def check_block(store, block: dict, base: str | CID) -> str | None:
    """None when every update entry of a version 2 `block` is what its worker's linked, signed message
    says (fetched from `store`, a `chain.log.BlockStore`), for the block's round of its job, extending its
    `prev` from global weights `base`; else the first reason. Version 1 blocks have nothing to check."""
    if block["v"] < 2 or not block["updates"]:
        return None
    base = parse_cid(base)
    for entry in block["updates"]:
        link = entry["message"]
        try:
            envelope = decode_update(store.block_get(link), link)
        except IPFSError as exc:
            return f"update of {entry['worker']}: message {cid_str(link)} not retrievable: {' '.join(str(exc).split())}"
        except ContributionError as exc:
            return f"update of {entry['worker']}: {exc}"
        reason = check_entry(entry, envelope, job=block["job"], round=block["round"], prev=block["prev"], base=base)
        if reason is not None:
            return reason
    return None
