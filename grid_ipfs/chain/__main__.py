"""`python -m grid_ipfs.chain COMMAND --api A HEAD`: read, audit and use a job's chain from any node.

    show    the log as a table, genesis first (round, workers, examples, loss, accuracy, weights CID);
            full CIDs also when piped (`--json` for machines)
    verify  walk to genesis and check every block: CID recomputed from its bytes, seq/prev
            continuity, signature, every linked object retrievable, and the global weights equal
            bit for bit to the aggregate recomputed from the recorded updates; with --eval-data
            FILE.npz (the client's --eval-data) also re-evaluate every block's global weights and
            check the recorded val_* metrics and acceptance verdicts against the verifier's numbers;
            with --check-ext MODULE:FUNCTION (or PATH.py:FUNCTION) also run the auditor's own check
            of each block's custom fields (`check_ext(block, weights)`, see grid_ipfs.chain.verify)
    plot    draw loss and accuracy per round (training, held-out val_*, workers' eval_* of the
            incoming model; whatever numeric metrics the blocks hold) into an image: -o run.png
    export  write the global model of the head's round (or --round R) as a standalone .keras file
            (-o model.keras), or as ONNX with --onnx -o model.onnx (needs `pip install tf2onnx`)
    privacy the DP-FedAvg privacy budget so far: epsilon at --delta (default 1e-5) after each noisy
            aggregate, user-level w.r.t. one worker (assumptions and caveats: grid_ipfs.privacy)

Every command walks at most --max-blocks blocks (default 100000): a longer chain is refused at its
head. verify prints `OK: ...` or exactly one line `FAILED at block <seq> (<cid>): <reason>`, whatever
the chain holds (text from blocks is printed with control characters escaped).

Exit codes: 0 ok, 1 the chain does not verify (the first bad block is named) or cannot be read (or
export/plot fails; the reason is printed as one `error:` line), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # export loads Keras; keep TensorFlow's start-up noise out
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ..data import DataError  # noqa: E402
from ..identity import IdentityError, parse_public_id  # noqa: E402
from ..ipfs import IPFSError, cid_str, parse_cid  # noqa: E402
from ..ipfs.rpc import IPFSClient  # noqa: E402
from ..payloads import PayloadError  # noqa: E402
from . import ChainError, read_head, verify_chain, walk  # noqa: E402
from .export import ExportError, check_request, export_model, load_genesis_model  # noqa: E402
from .log import MAX_BLOCKS  # noqa: E402


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


def show(client: IPFSClient, head: str, as_json: bool, max_blocks: int = MAX_BLOCKS) -> int:
    blocks = list(walk(client, head, max_blocks=max_blocks))[::-1]
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
        if column in ("weights", "block"):  # a CID is only useful whole: fold it over lines, never cut it
            table.add_column(column, justify="left", overflow="fold", min_width=12)
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for cid, block in blocks:
        metrics = block["metrics"]
        table.add_row(str(block["seq"]), str(block["round"]), str(len(block["updates"])),
                      str(sum(u["num_examples"] for u in block["updates"])), _fmt(metrics.get("loss")),
                      _fmt(metrics.get("accuracy")), _fmt(metrics.get("val_accuracy")),
                      cid_str(block["weights"]), cid_str(cid))
    console = Console()
    if not console.is_terminal:
        # Piped or redirected: rich would assume 80 columns and fold every CID; there is no screen to fit,
        # so give the table the room it needs and keep one row per line (grep, awk, copy and paste).
        console = Console(width=1000)
    console.print(table)
    return 0


def plot(client: IPFSClient, head: str, output: Path, title: str | None, max_blocks: int = MAX_BLOCKS) -> int:
    from .plot import plot_chain

    blocks = list(walk(client, head, max_blocks=max_blocks))[::-1]
    panels = plot_chain(blocks, output, head=head, title=title)
    job, last = blocks[0][1]["job"], blocks[-1][1]["round"]
    drawn = "; ".join(f"{base}: {', '.join(keys)}" for base, keys in panels.items()) or "no metrics recorded"
    print(_line(f"wrote {output}: job {job}, rounds 0..{last} ({drawn})"))
    return 0


def export(client: IPFSClient, head: str, args) -> int:
    done = export_model(client, head, args.output, round=args.round, onnx=args.onnx, signer=args.signer,
                        max_blocks=args.max_blocks)
    if args.json:
        print(json.dumps(done.as_dict()))
    else:
        print(f"wrote {done.path} ({done.format}): job {done.job} round {done.round}, weights {done.weights} "
              f"from block {done.block}")
    return 0


def evaluator(client: IPFSClient, head: str, eval_xy: tuple, max_blocks: int = MAX_BLOCKS):
    """weights -> {"val_<metric>": value}: the job's model (genesis) evaluated on `eval_xy`, named as the
    client records its held-out metrics. None when the chain cannot be walked to its genesis: then
    `verify_chain` names the block that breaks it."""
    from ..data import check_shard_for_model
    from ..training import evaluate

    try:
        *_, (_, genesis) = walk(client, head, max_blocks=max_blocks)
    except (ChainError, IPFSError):
        return None
    model = load_genesis_model(client, genesis)
    check_shard_for_model(*eval_xy, tuple(model.input_shape))
    return lambda weights: {f"val_{k}": v for k, v in evaluate(model, weights, *eval_xy).items()}


def load_ext_check(spec: str):
    """The function `--check-ext MODULE:FUNCTION` or `PATH.py:FUNCTION` names: the auditor's own check of
    custom block fields. This is code the auditor chose, run on the auditor's machine; nothing fetched
    from IPFS is ever run. A file's folder is importable while it loads (as for `python PATH.py`), so
    an example can import its siblings. ValueError, in one line, when it cannot be loaded."""
    target, colon, name = spec.rpartition(":")
    if not colon or not target or not name.isidentifier():
        raise ValueError(f"--check-ext {spec!r}: expected MODULE:FUNCTION or PATH.py:FUNCTION")
    path = Path(target).resolve() if target.endswith(".py") else None
    if path is not None and not path.is_file():
        raise ValueError(f"--check-ext: no file {target}")
    try:
        if path is None:
            module = importlib.import_module(target)
        else:
            sys.path.insert(0, str(path.parent))
            try:
                module_spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.parent))
    except Exception as exc:  # noqa: BLE001 - whatever the auditor's module raised, say it in one line
        raise ValueError(f"--check-ext: cannot load {target}: {type(exc).__name__}: {_one_line(exc)}") from None
    check = getattr(module, name, None)
    if not callable(check):
        raise ValueError(f"--check-ext: {target} has no function {name}")
    return check


def verify(client: IPFSClient, head: str, recompute: bool, as_json: bool, signer: str | None = None,
           eval_data: Path | None = None, eval_xy: tuple | None = None, check_ext=None,
           max_blocks: int = MAX_BLOCKS) -> int:
    evaluate = evaluator(client, head, eval_xy, max_blocks) if eval_xy is not None else None
    report = verify_chain(client, head, recompute=recompute, signer=signer, evaluate=evaluate, check_ext=check_ext,
                          max_blocks=max_blocks)
    if as_json:
        print(json.dumps({"ok": report.ok, "blocks": report.blocks, "reason": report.reason,
                          "first_bad": cid_str(report.first_bad) if report.first_bad else None,
                          "evaluated": evaluate is not None, "ext_checked": check_ext is not None}))
    elif report.ok:
        print(f"OK: {report.blocks} blocks verified from {head} to genesis"
              + ("" if recompute else " (aggregates not recomputed)")
              + (f", metrics re-evaluated on {eval_data}" if evaluate is not None else "")
              + (f", custom fields checked by {check_ext.__name__}" if check_ext is not None else ""))
    else:
        seq = "?" if report.first_bad_seq is None else report.first_bad_seq
        cid = cid_str(report.first_bad) if report.first_bad else "?"
        print(_line(f"FAILED at block {seq} ({cid}): {report.detail or report.reason}"))
    return 0 if report.ok else 1


def privacy(client: IPFSClient, head: str, delta: float, as_json: bool, max_blocks: int = MAX_BLOCKS) -> int:
    from ..privacy import chain_epsilon

    try:
        budget = chain_epsilon(walk(client, head, max_blocks=max_blocks), delta)
    except ValueError as exc:
        raise ChainError(str(exc)) from None
    if as_json:
        print(json.dumps(budget.as_dict()))
        return 0
    num = lambda value: "-" if value is None else f"{value:g}"
    print(f"job {budget.job}: {len(budget.releases)} aggregate(s) after genesis, {budget.rounds} accepted "
          f"round(s); epsilon at delta {delta:g} (user-level, one worker, every round)")
    for r in budget.releases:
        what = (f"clip {num(r.clip)}, noise multiplier {num(r.noise_multiplier)}" if r.aggregation == "dp-fedavg"
                else f"{r.aggregation}, no noise")
        print(f"  round {r.round} (seq {r.seq}{'' if r.accepted else ', rejected try'}): {what}; "
              f"epsilon so far {r.epsilon:.4g}")
    if budget.private:
        print(f"epsilon {budget.epsilon:.4g} at delta {delta:g}")
    else:
        print(f"epsilon inf at delta {delta:g}: {budget.reason}")
    if any(r.aggregation != "secure-dp-fedavg" for r in budget.releases):
        print("note: bounds what the global weights reveal; the chain itself also holds each worker's update and "
              "the noise seed (see grid_ipfs.privacy; secure-dp-fedavg jobs do not)")
    else:
        print("note: the chain holds only masked updates and the workers' noise is secret: the bound covers "
              "chain readers too, if the workers clip and add their noise honestly (see grid_ipfs.privacy)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.chain", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"show": "print the chain as a table", "verify": "audit every block down to genesis",
             "plot": "draw loss and accuracy per round into an image",
             "export": "write a round's global model to a .keras (or .onnx) file",
             "privacy": "the DP-FedAvg privacy budget (epsilon) spent so far"}
    for name in ("show", "verify", "plot", "export", "privacy"):
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--api", required=True, help="any IPFS daemon's API multiaddr")
        p.add_argument("head", nargs="?", help="the chain head CID")
        p.add_argument("--head-file", help="read the head CID from this file instead")
        p.add_argument("--max-blocks", type=int, default=MAX_BLOCKS, metavar="N",
                       help=f"refuse a chain longer than N blocks (default {MAX_BLOCKS})")
        if name != "plot":
            p.add_argument("--json", action="store_true")
        if name == "verify":
            p.add_argument("--no-recompute", action="store_true", help="skip recomputing the aggregates")
            p.add_argument("--eval-data", type=Path, metavar="PATH.npz",
                           help="the .npz the client evaluated on (its --eval-data): re-evaluate every global "
                                "model and check the recorded val_* metrics")
            p.add_argument("--check-ext", metavar="MODULE:FUNCTION",
                           help="also check each block's custom fields with your function check_ext(block, "
                                "weights) -> None or a reason; MODULE may be a PATH.py")
        if name == "privacy":
            p.add_argument("--delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP (default 1e-5)")
        if name == "plot":
            p.add_argument("-o", "--output", required=True, type=Path,
                           help="image file to write (PNG, or any format matplotlib knows from the suffix)")
            p.add_argument("--title", help="figure title (default: job id, head CID prefix, rounds)")
        if name in ("export", "verify"):
            p.add_argument("--signer", metavar="ID", help="refuse a chain with a block not signed by this id "
                                                          "(e.g. the job owner's)")
        if name == "export":
            p.add_argument("-o", "--output", required=True, type=Path,
                           help="model file to write: NAME.keras (or NAME.onnx with --onnx)")
            p.add_argument("--round", type=int, metavar="R", help="export round R's weights (default: the head's)")
            p.add_argument("--onnx", action="store_true", help="write ONNX instead (needs: pip install tf2onnx)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        head = cid_str(parse_cid(args.head)) if args.head else None  # a bad HEAD is named before any connection
        if args.max_blocks < 1:
            parser.error(f"--max-blocks must be >= 1, got {args.max_blocks}")
        if args.command in ("export", "verify") and args.signer is not None:
            parse_public_id(args.signer)
        if args.command == "export":
            if args.round is not None and args.round < 0:
                parser.error(f"--round must be >= 0, got {args.round}")
            check_request(args.output, args.onnx)
        if args.command == "privacy" and not 0 < args.delta < 1:
            parser.error(f"--delta must be in (0, 1), got {args.delta:g}")
        eval_xy = None
        if args.command == "verify" and args.eval_data is not None:
            from ..data import load_shard

            eval_xy = tuple(load_shard(args.eval_data))  # a bad file is named before any connection
        check_ext = None
        if args.command == "verify" and args.check_ext is not None:
            try:
                check_ext = load_ext_check(args.check_ext)
            except ValueError as exc:
                parser.error(str(exc))
        with IPFSClient(args.api) as client:
            client.wait_ready(timeout=5)  # an unreachable daemon is an error, not a failed verification
            head = head or _head(args)
            if args.command == "show":
                return show(client, head, args.json, args.max_blocks)
            if args.command == "plot":
                return plot(client, head, args.output, args.title, args.max_blocks)
            if args.command == "export":
                return export(client, head, args)
            if args.command == "privacy":
                return privacy(client, head, args.delta, args.json, args.max_blocks)
            return verify(client, head, not args.no_recompute, args.json, args.signer, args.eval_data, eval_xy,
                          check_ext, args.max_blocks)
    except (ChainError, IPFSError, ExportError, PayloadError, IdentityError, DataError, OSError) as exc:
        print(f"error: {_line(_one_line(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _line(text: str) -> str:
    """One printable line (see `text.printable`): what is printed may quote text from a peer's blocks."""
    from ..text import printable
    from .verify import REASON_CHARS

    return printable(text, REASON_CHARS)


if __name__ == "__main__":
    sys.exit(main())
