"""Compare two heads of a job's chain: the same history, one extending the other, or a fork.

A chain is append-only, so two heads of one job must be on one line of blocks. When they are not,
the first two blocks after their last common block have the same job and seq and different CIDs;
if both are validly signed by the same id, that pair is the proof that the id (the job's owner)
equivocated: it signed two different histories of one job. Anyone can check the proof with the two
blocks alone (their bytes hash to their CIDs, their signatures verify).

One honest exception: in a contest job (`grid_ipfs.contest`) the owner signs a candidate block that
the appended block may replace; the appended block then links it in `ext.pofl.candidates`, and
`compare` says so rather than calling it equivocation.

Bounded: each chain is read with `walk` (at most `max_blocks`, seq checked at every step); the higher
head is stepped down to the other's seq, then both are stepped together until they meet, so no block
below the fork point is fetched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from multiformats import CID

from ..ipfs.cids import cid_str, same_cid
from .blocks import ChainError, check_signature
from .log import MAX_BLOCKS, BlockStore, walk

__all__ = ["ForkBlock", "ForkReport", "compare"]

SAME, A_EXTENDS_B, B_EXTENDS_A, FORK, DIFFERENT_JOBS = "same", "a_extends_b", "b_extends_a", "fork", "different_jobs"


@dataclass(frozen=True)
class ForkBlock:
    """One of the two diverging blocks of a fork, with what an auditor needs to judge it."""

    cid: str
    seq: int
    round: int
    signer: str
    time: float
    signature_valid: bool

    @classmethod
    def of(cls, cid: CID, block: dict) -> ForkBlock:
        return cls(cid_str(cid), block["seq"], block["round"], block["signer"], block["time"],
                   check_signature(block))


@dataclass(frozen=True)
class ForkReport:
    """How head `a` relates to head `b` (`kind`: same, a_extends_b, b_extends_a, fork, different_jobs).

    `ahead`: how many blocks the longer head is ahead, for the extends kinds. For a fork: `common_seq`
    and `common` the last block both chains share (None when they share no genesis), `a` and `b` the
    first diverging blocks (same seq), `same_signer` whether one id signed both, and `candidate` when
    one lists the other as a contest candidate (then it is no equivocation)."""

    kind: str
    head_a: str
    head_b: str
    job_a: str
    job_b: str
    seq_a: int
    seq_b: int
    ahead: int = 0
    common_seq: int | None = None
    common: str | None = None
    a: ForkBlock | None = None
    b: ForkBlock | None = None
    same_signer: bool = False
    candidate: bool = False

    @property
    def equivocation(self) -> bool:
        """A fork whose two diverging blocks are validly signed by the same id, neither a contest candidate
        of the other: that id signed two histories of one job."""
        return (self.kind == FORK and self.same_signer and not self.candidate and self.a is not None
                and self.b is not None and self.a.signature_valid and self.b.signature_valid)

    def as_dict(self) -> dict:
        return {**asdict(self), "equivocation": self.equivocation}


def compare(store: BlockStore, head_a: CID | str, head_b: CID | str, *, max_blocks: int = MAX_BLOCKS) -> ForkReport:
    """Relate two heads (see `ForkReport`). ChainError or IPFSError when a block on the way cannot be
    read or breaks its chain (a bad seq, a job that changes along the chain)."""
    walk_a, walk_b = walk(store, head_a, max_blocks=max_blocks), walk(store, head_b, max_blocks=max_blocks)
    ca, ba = next(walk_a)
    cb, bb = next(walk_b)
    base = {"head_a": cid_str(ca), "head_b": cid_str(cb), "job_a": ba["job"], "job_b": bb["job"],
            "seq_a": ba["seq"], "seq_b": bb["seq"]}
    if ba["job"] != bb["job"]:
        return ForkReport(DIFFERENT_JOBS, **base)
    job = ba["job"]
    while ba["seq"] > bb["seq"]:
        ca, ba = _step(walk_a, job)
    while bb["seq"] > ba["seq"]:
        cb, bb = _step(walk_b, job)
    if same_cid(ca, cb):
        if base["seq_a"] == base["seq_b"]:
            return ForkReport(SAME, **base)
        kind = A_EXTENDS_B if base["seq_a"] > base["seq_b"] else B_EXTENDS_A
        return ForkReport(kind, **base, ahead=abs(base["seq_a"] - base["seq_b"]))
    while True:
        da, db = (ca, ba), (cb, bb)
        if ba["seq"] == 0:
            common_seq, common = None, None
            break
        ca, ba = _step(walk_a, job)
        cb, bb = _step(walk_b, job)
        if same_cid(ca, cb):
            common_seq, common = ba["seq"], cid_str(ca)
            break
    return ForkReport(FORK, **base, common_seq=common_seq, common=common, a=ForkBlock.of(*da), b=ForkBlock.of(*db),
                      same_signer=da[1]["signer"] == db[1]["signer"],
                      # a staged candidate is exempt only as its side's head: once built on, it is a history
                      candidate=(_lists_candidate(da[1], db[0]) and same_cid(db[0], base["head_b"]))
                      or (_lists_candidate(db[1], da[0]) and same_cid(da[0], base["head_a"])))


def _step(blocks, job: str) -> tuple[CID, dict]:
    """The next block down a walk, which must exist (seq > 0 above it) and be of `job`."""
    cid, block = next(blocks)
    if block["job"] != job:
        raise ChainError(f"block {cid_str(cid)} at seq {block['seq']} is of job {block['job']}, its head's is {job}")
    return cid, block


def _lists_candidate(block: dict, cid: CID) -> bool:
    """True when `block` records `cid` among its contest's candidates (`ext.pofl.candidates`)."""
    pofl = block.get("ext", {}).get("pofl")
    candidates = pofl.get("candidates") if isinstance(pofl, dict) else None
    return isinstance(candidates, list) and any(isinstance(c, CID) and same_cid(c, cid) for c in candidates)
