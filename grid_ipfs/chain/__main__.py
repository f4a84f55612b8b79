"""`python -m grid_ipfs.chain show|verify --api A HEAD`: read and audit a job's chain from any node.

    show    the log as a table, genesis first (round, workers, examples, loss, accuracy, weights CID)
    verify  walk to genesis and check every block: CID recomputed from its bytes, seq/prev
            continuity, signature, every linked object retrievable, and the global weights equal
            bit for bit to the aggregate recomputed from the recorded updates

Exit codes: 0 ok, 1 the chain does not verify (the first bad block is named) or cannot be read, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..ipfs import IPFSError, cid_str, parse_cid
from ..ipfs.rpc import IPFSClient
from . import ChainError, read_head, verify_chain, walk


def _head(args) -> str:
    if args.head:
        return cid_str(parse_cid(args.head))
    if args.head_file:
        head = read_head(Path(args.head_file))
        if head is None:
            raise ChainError(f"{args.head_file} holds no head yet")
        return cid_str(head)
    raise ChainError("give a HEAD CID or --head-file")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def show(client: IPFSClient, head: str, as_json: bool) -> int:
    blocks = list(walk(client, head))[::-1]
    if as_json:
        rows = [{"cid": cid_str(cid), "seq": b["seq"], "round": b["round"], "weights": cid_str(b["weights"]),
                 "workers": [u["worker"] for u in b["updates"]],
                 "num_examples": sum(u["num_examples"] for u in b["updates"]), "metrics": b["metrics"]}
                for cid, b in blocks]
        print(json.dumps(rows))
        return 0
    first = blocks[0][1]
    table = Table(title=f"job {first['job']} · model {cid_str(first['model'])}")
    for column in ("seq", "round", "workers", "examples", "loss", "accuracy", "val_accuracy", "weights", "block"):
        table.add_column(column, justify="right" if column not in ("weights", "block") else "left")
    for cid, block in blocks:
        metrics = block["metrics"]
        table.add_row(str(block["seq"]), str(block["round"]), str(len(block["updates"])),
                      str(sum(u["num_examples"] for u in block["updates"])), _fmt(metrics.get("loss")),
                      _fmt(metrics.get("accuracy")), _fmt(metrics.get("val_accuracy")),
                      cid_str(block["weights"]), cid_str(cid))
    Console().print(table)
    return 0


def verify(client: IPFSClient, head: str, recompute: bool, as_json: bool) -> int:
    report = verify_chain(client, head, recompute=recompute)
    if as_json:
        print(json.dumps({"ok": report.ok, "blocks": report.blocks, "reason": report.reason,
                          "first_bad": cid_str(report.first_bad) if report.first_bad else None}))
    elif report.ok:
        print(f"OK: {report.blocks} blocks verified from {head} to genesis"
              + ("" if recompute else " (aggregates not recomputed)"))
    else:
        print(f"FAILED at block {cid_str(report.first_bad) if report.first_bad else '?'}: {report.reason}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.chain", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("show", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--api", required=True, help="any IPFS daemon's API multiaddr")
        p.add_argument("head", nargs="?", help="the chain head CID")
        p.add_argument("--head-file", help="read the head CID from this file instead")
        p.add_argument("--json", action="store_true")
        if name == "verify":
            p.add_argument("--no-recompute", action="store_true", help="skip recomputing the aggregates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with IPFSClient(args.api) as client:
            client.wait_ready(timeout=5)  # an unreachable daemon is an error, not a failed verification
            head = _head(args)
            if args.command == "show":
                return show(client, head, args.json)
            return verify(client, head, not args.no_recompute, args.json)
    except (ChainError, IPFSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
