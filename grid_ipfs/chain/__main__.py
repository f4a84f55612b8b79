"""`python -m grid_ipfs.chain COMMAND --api A HEAD`: read, audit and use a job's chain from any node.

    show    the log as a table, genesis first (round, workers, examples, loss, accuracy, weights CID);
            full CIDs also when piped (`--json` for machines)
    verify  walk to genesis and check every block: CID recomputed from its bytes, seq/prev
            continuity, signature, every linked object retrievable, every update entry equal to its
            worker's linked, signed update message (for this job, round, prev and base weights), and
            the global weights equal bit for bit to the aggregate recomputed from the recorded
            updates; blocks written before signed updates (version 1) pass as "contributions
            unproven", or fail with --require-proof; with --eval-data
            FILE.npz (the client's --eval-data) also re-evaluate every block's global weights and
            check the recorded val_* metrics and acceptance verdicts against the verifier's numbers;
            with --check-ext MODULE:FUNCTION (or PATH.py:FUNCTION) also run the auditor's own check
            of each block's custom fields (`check_ext(block, weights)`, see grid_ipfs.chain.verify);
            with --witness FILE (repeatable: a worker's record of the heads it signed against, see
            grid_ipfs.chain.witness) also check that every witnessed head is the chain's block at its
            seq and that the chain credits the worker only with weights it announced
    plot    draw loss and accuracy per round (training, held-out val_*, workers' eval_* of the
            incoming model; whatever numeric metrics the blocks hold) into an image: -o run.png
    tensorboard  write every round's metrics as TensorBoard scalars into DIR (HEAD DIR; step = round):
            run `global` the block's metrics and round/updates, round/examples, round/seconds; run
            `workers/<id>` each worker's own; a rejected try's under `rejected/` (see
            grid_ipfs.chain.tensorboard); the same events as `client submit --tensorboard DIR`
    export  write the global model of the head's round (or --round R) as a standalone .keras file
            (-o model.keras), or as ONNX with --onnx -o model.onnx (needs `pip install tf2onnx`);
            or, with --car FILE instead of -o, the head's whole DAG (every block, model, weights and
            linked message) as a CARv1 archive with HEAD as its root, read back and its chain walked to
            genesis before it is kept: `wrote FILE: N blocks, M bytes`
    import  load a CAR file (FILE, not a HEAD) into the daemon at --api and pin its roots; every block's
            hash is checked here first; prints the roots, one per line after a summary
    privacy the DP-FedAvg privacy budget so far: epsilon at --delta (default 1e-5) after each noisy
            aggregate, user-level w.r.t. one worker (assumptions and caveats: grid_ipfs.privacy)
    compare HEAD_A HEAD_B: one line when they are the same head or one extends the other; for a fork,
            the proof: the last common block and the first two diverging blocks (cid, seq, round,
            signer, time, signature valid), ending `owner X signed two different blocks at seq S of
            job J: equivocation` when one id validly signed both (see grid_ipfs.chain.fork)
    serve   a live, read-only web page of the chain at HEAD on 127.0.0.1 (--port, --host): rounds,
            workers, metric curves, every block's verification; it follows the job's topic and takes
            the heads its owner announces that extend the chain (see grid_ipfs.chain.serve)

show, verify, plot, tensorboard and privacy read from a daemon (--api A) or, with no daemon at all, from a CAR
file (--car FILE; HEAD defaults to the archive's single root): `verify --car job.car` checks the same
things in process, every block's bytes hashed against its CID as it is read.

Every command walks at most --max-blocks blocks (default 100000): a longer chain is refused at its
head. verify prints `OK: ...` or exactly one line `FAILED at block <seq> (<cid>): <reason>`, whatever
the chain holds (text from blocks is printed with control characters escaped).

Exit codes: 0 ok, 1 the chain does not verify (the first bad block is named) or cannot be read (or
export/plot fails; the reason is printed as one `error:` line), 2 usage, 130 interrupted. compare:
0 when one head equals or extends the other, 1 a fork (the proof is printed), 1 with one `error:` line
when a chain cannot be read or the heads are of different jobs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..data import DataError
from ..identity import IdentityError, id_options_joined, parse_public_id
from ..ipfs import IPFSError, cid_str, parse_cid, same_cid
from ..ipfs.car import MAX_CAR_BYTES, CarReader, CarStore
from ..ipfs.rpc import IPFSClient
from ..payloads import PayloadError
from ..runtime import quiet_tensorflow
from . import ChainError, read_head, verify_chain, walk
from .export import ExportError, check_request, export_model, load_genesis_model
from .log import MAX_BLOCKS
from .tensorboard import TensorBoardError


def _head(args, store=None) -> str:
    if args.head:
        return cid_str(parse_cid(args.head))
    if args.head_file:
        head = read_head(Path(args.head_file))
        if head is None:
            raise ChainError(f"{args.head_file} holds no head yet")
        return cid_str(head)
    if isinstance(store, CarStore):
        if len(store.roots) != 1:
            raise ChainError(f"CAR {store.path} has {len(store.roots)} roots: give the HEAD CID")
        return cid_str(store.roots[0])
    raise ChainError("give a HEAD CID or --head-file")


def _open_store(args):
    """What a command reads: the CAR file of --car (no daemon at all), else the daemon at --api, which
    must answer (an unreachable daemon is an error, not a failed verification)."""
    if getattr(args, "car", None) is not None:
        return CarStore(args.car)
    client = IPFSClient(args.api)
    try:
        client.wait_ready(timeout=5)
    except BaseException:
        client.close()
        raise
    return client


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


def tensorboard(client: IPFSClient, head: str, logdir: Path, max_blocks: int = MAX_BLOCKS) -> int:
    from .tensorboard import write_chain

    done = write_chain(reversed(list(walk(client, head, max_blocks=max_blocks))), logdir)
    rounds = f"rounds {done.rounds[0]}..{done.rounds[1]}" if done.rounds else "no rounds"
    print(_line(f"wrote {logdir}: {done.blocks} blocks, {rounds}, {done.scalars} scalars in {len(done.runs)} runs "
                f"(view with: tensorboard --logdir {logdir})"))
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


EXPORT_TIMEOUT = 3600.0
"""Seconds a CAR export may take in all (a chain whose blocks nobody serves would otherwise stall)."""


def export_car(client: IPFSClient, head: str, path: Path, as_json: bool, max_blocks: int = MAX_BLOCKS) -> int:
    """The head's whole DAG as a CARv1 file (the daemon's `dag/export`), then read back here: a file whose
    root is not HEAD, that a block fails its hash in, or that lacks a block of the chain from HEAD to
    genesis is removed and the export fails."""
    client.dag_export(head, path, max_size=MAX_CAR_BYTES, timeout=EXPORT_TIMEOUT)  # what the reader takes back
    try:
        with CarStore(path) as store:
            if len(store.roots) != 1 or not same_cid(store.roots[0], head):
                raise ChainError(f"{path}: the daemon wrote roots {[cid_str(r) for r in store.roots]}, not {head}")
            chain = sum(1 for _ in walk(store, head, max_blocks=max_blocks))
            blocks, size = len(store), store.size
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if as_json:
        print(json.dumps({"path": str(path), "root": head, "blocks": blocks, "bytes": size, "chain_blocks": chain}))
    else:
        print(f"wrote {path}: {blocks} blocks, {size} bytes (root {head}, {chain} chain blocks to genesis)")
    return 0


def import_car(api: str, path: Path, as_json: bool) -> int:
    """Check every section of the CAR file here (hashes, limits), then load it into the daemon."""
    with open(path, "rb") as f:
        reader = CarReader(f, name=str(path))
        blocks = sum(1 for _ in reader)
        size = reader.offset
    with IPFSClient(api) as client:
        client.wait_ready(timeout=5)
        roots = [cid_str(root) for root in client.dag_import(path)]
    if as_json:
        print(json.dumps({"path": str(path), "roots": roots, "blocks": blocks, "bytes": size}))
    else:
        print(f"imported {path}: {blocks} blocks, {size} bytes; roots pinned on {api}:")
        print("\n".join(roots))
    return 0


def evaluator(client: IPFSClient, head: str, eval_xy: tuple, max_blocks: int = MAX_BLOCKS):
    """weights -> {"val_<metric>": value}: the job's model (genesis) evaluated on `eval_xy`, named as the
    client records its held-out metrics. None when the chain cannot be walked to its genesis: then
    `verify_chain` names the block that breaks it."""
    from ..aggregate import held_out
    from ..data import check_shard_for_model
    from ..training import evaluate

    try:
        *_, (_, genesis) = walk(client, head, max_blocks=max_blocks)
    except (ChainError, IPFSError):
        return None
    model = load_genesis_model(client, genesis)
    check_shard_for_model(*eval_xy, tuple(model.input_shape))
    return lambda weights: held_out(evaluate(model, weights, *eval_xy))


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
           max_blocks: int = MAX_BLOCKS, witnesses: list | None = None, require_proof: bool = False) -> int:
    evaluate = evaluator(client, head, eval_xy, max_blocks) if eval_xy is not None else None
    report = verify_chain(client, head, recompute=recompute, signer=signer, evaluate=evaluate, check_ext=check_ext,
                          max_blocks=max_blocks, require_proof=require_proof)
    if report.ok and witnesses:
        report = check_witnesses(client, head, report, witnesses, max_blocks)
    if as_json:
        print(json.dumps({"ok": report.ok, "blocks": report.blocks, "reason": report.reason,
                          "first_bad": cid_str(report.first_bad) if report.first_bad else None,
                          "evaluated": evaluate is not None, "ext_checked": check_ext is not None,
                          "witness_records": sum(len(r) for _, r in witnesses or ()),
                          "contributions_unproven": report.unproven}))
    elif report.ok:
        print(f"OK: {report.blocks} blocks verified from {head} to genesis"
              + ("" if recompute else " (aggregates not recomputed)")
              + (f", metrics re-evaluated on {eval_data}" if evaluate is not None else "")
              + (f", custom fields checked by {check_ext.__name__}" if check_ext is not None else "")
              + (f", {sum(len(r) for _, r in witnesses)} witness records of {len(witnesses)} file(s) agree"
                 if witnesses else "")
              + (f"; contributions unproven in {report.unproven} block(s) (block version 1: updates without "
                 "their workers' signed messages)" if report.unproven else ""))
    else:
        seq = "?" if report.first_bad_seq is None else report.first_bad_seq
        cid = cid_str(report.first_bad) if report.first_bad else "?"
        print(_line(f"FAILED at block {seq} ({cid}): {report.detail or report.reason}"))
    return 0 if report.ok else 1


def load_witnesses(paths: list[Path] | None) -> list[tuple[Path, list]]:
    """(path, records) of each `--witness FILE`, read before any connection (a bad line is an error)."""
    from .witness import Witness, WitnessError

    loaded = []
    for path in paths or ():
        if not path.is_file():
            raise WitnessError(f"witness {path}: no such file")
        loaded.append((path, Witness(path).records()))
    return loaded


def check_witnesses(store, head: str, report, witnesses: list[tuple[Path, list]], max_blocks: int = MAX_BLOCKS):
    """`report` (of a chain that verified), or a failed copy naming the first block a witness disagrees
    with (`witness.check_chain_against`). Keeps only the blocks the records name (and genesis and head).
    WitnessError for a witness of another job or owner: the wrong file, not a verdict."""
    import dataclasses

    from .witness import WitnessError, check_chain_against

    wanted = {0} | {r.seq + d for _, records in witnesses for r in records for d in (0, 1)}
    blocks: dict = {}
    for cid, block in walk(store, head, max_blocks=max_blocks):
        if not blocks or block["seq"] in wanted:
            blocks[block["seq"]] = (cid, block)
    for path, records in witnesses:
        try:
            found = check_chain_against(records, blocks)
        except WitnessError as exc:
            raise WitnessError(f"witness {path}: {exc}") from None
        if found is not None:
            seq, reason = found
            detail = f"witness {path}: {reason}"
            return dataclasses.replace(report, ok=False, first_bad=blocks[seq][0], first_bad_seq=seq,
                                       reason=f"block {seq}: {detail}", detail=detail)
    return report


def compare_heads(store, head_a: str, head_b: str, as_json: bool, max_blocks: int = MAX_BLOCKS) -> int:
    """Print how two heads relate (see grid_ipfs.chain.fork): 0 one extends the other, 1 a fork."""
    from .fork import compare

    report = compare(store, head_a, head_b, max_blocks=max_blocks)
    if report.kind == "different_jobs":
        raise ChainError(f"{report.head_a} is of job {report.job_a}, {report.head_b} of job {report.job_b}: "
                         "heads of different jobs are not one history")
    if as_json:
        print(json.dumps(report.as_dict()))
    elif report.kind == "same":
        print(_line(f"{report.head_a} is {report.head_b}: the same head (job {report.job_a}, seq {report.seq_a})"))
    elif report.kind in ("a_extends_b", "b_extends_a"):
        longer, shorter = ((report.head_a, report.head_b) if report.kind == "a_extends_b"
                           else (report.head_b, report.head_a))
        print(_line(f"{longer} extends {shorter} by {report.ahead} blocks (job {report.job_a})"))
    else:
        for line in _fork_proof(report):
            print(_line(line))
    return 0 if report.kind != "fork" else 1


def _fork_proof(report) -> list[str]:
    where = (f"fork after seq {report.common_seq} ({report.common})" if report.common is not None
             else "fork with no common block (two genesis blocks)")
    lines = [f"{where}: job {report.job_a}, heads {report.head_a} (seq {report.seq_a}) and {report.head_b} "
             f"(seq {report.seq_b})"]
    for name, b in (("a", report.a), ("b", report.b)):
        lines.append(f"  {name}: block {b.cid} seq {b.seq} round {b.round} signer {b.signer} time {_when(b.time)} "
                     f"signature {'valid' if b.signature_valid else 'INVALID'}")
    a, b = report.a, report.b
    if report.equivocation:
        lines.append(f"owner {a.signer} signed two different blocks at seq {a.seq} of job {report.job_a}: "
                     "equivocation")
    elif report.candidate:
        lines.append("one block lists the other as a contest candidate (ext.pofl.candidates): a staged candidate, "
                     "not equivocation")
    elif not report.same_signer:
        lines.append(f"signed by two different ids ({a.signer}, {b.signer}): not proof that one party equivocated")
    else:
        lines.append("a signature is not valid: not proof of equivocation")
    return lines


def _when(t: float) -> str:
    """A block's time as Unix seconds and, when it is a plausible date, UTC ISO 8601."""
    import datetime

    try:
        iso = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"{t:.3f}"
    return f"{t:.3f} ({iso})"


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
    quiet_tensorflow()  # before anything loads TensorFlow; an entry point's choice
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.chain", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"show": "print the chain as a table", "verify": "audit every block down to genesis",
             "plot": "draw loss and accuracy per round into an image",
             "export": "write a round's global model to a .keras (or .onnx) file",
             "privacy": "the DP-FedAvg privacy budget (epsilon) spent so far",
             "tensorboard": "write every round's metrics, global and per worker, as TensorBoard scalars"}
    helps["export"] += ", or the head's whole DAG to a CAR file"
    for name in ("show", "verify", "plot", "export", "privacy", "tensorboard"):
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--api", required=name == "export", help="any IPFS daemon's API multiaddr")
        if name != "export":
            p.add_argument("--car", type=Path, metavar="FILE", help="read the chain from this CAR file instead "
                                                                    "(no daemon; HEAD defaults to its root)")
        p.add_argument("head", nargs="?", help="the chain head CID")
        p.add_argument("--head-file", help="read the head CID from this file instead")
        p.add_argument("--max-blocks", type=int, default=MAX_BLOCKS, metavar="N",
                       help=f"refuse a chain longer than N blocks (default {MAX_BLOCKS})")
        if name not in ("plot", "tensorboard"):
            p.add_argument("--json", action="store_true")
        if name == "tensorboard":
            p.add_argument("logdir", type=Path, metavar="DIR", help="the log directory to write (created if "
                           "need be; view with: tensorboard --logdir DIR)")
        if name == "verify":
            p.add_argument("--no-recompute", action="store_true", help="skip recomputing the aggregates")
            p.add_argument("--require-proof", action="store_true",
                           help="fail a block whose updates carry no workers' signed messages (block version 1) "
                                "instead of reporting its contributions as unproven")
            p.add_argument("--eval-data", type=Path, metavar="PATH.npz",
                           help="the .npz the client evaluated on (its --eval-data): re-evaluate every global "
                                "model and check the recorded val_* metrics")
            p.add_argument("--check-ext", metavar="MODULE:FUNCTION",
                           help="also check each block's custom fields with your function check_ext(block, "
                                "weights) -> None or a reason; MODULE may be a PATH.py")
            p.add_argument("--witness", action="append", type=Path, metavar="FILE",
                           help="also check the chain against a worker's witness file (the heads it signed "
                                "updates against); repeatable")
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
            out = p.add_mutually_exclusive_group(required=True)
            out.add_argument("-o", "--output", type=Path, help="model file to write: NAME.keras (or NAME.onnx "
                                                               "with --onnx)")
            out.add_argument("--car", dest="car_out", type=Path, metavar="FILE",
                             help="write the head's whole DAG as a CARv1 file instead")
            p.add_argument("--round", type=int, metavar="R", help="export round R's weights (default: the head's)")
            p.add_argument("--onnx", action="store_true", help="write ONNX instead (needs: pip install tf2onnx)")
    p = sub.add_parser("import", help="load a CAR file into a daemon", description="load a CAR file into a "
                       "daemon (dag/import) and pin its roots")
    p.add_argument("--api", required=True, help="the IPFS daemon's API multiaddr")
    p.add_argument("file", type=Path, help="the CAR file (e.g. from `export --car`)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("compare", help="find the fork point of two heads of a job",
                       description="relate two heads of a job: the same, one extends the other, or a fork (with "
                                   "the proof of equivocation)")
    p.add_argument("--api", help="any IPFS daemon's API multiaddr")
    p.add_argument("--car", type=Path, metavar="FILE", help="read both chains from this CAR file instead")
    p.add_argument("head_a", help="a head CID")
    p.add_argument("head_b", help="another head CID of the same job")
    p.add_argument("--max-blocks", type=int, default=MAX_BLOCKS, metavar="N",
                   help=f"refuse a chain longer than N blocks (default {MAX_BLOCKS})")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("serve", help="a live, read-only web page of the job's chain",
                       description="serve a live, read-only page of the chain at HEAD (rounds, workers, metric "
                                   "curves, every block's verification) and follow the job's topic: heads the "
                                   "owner announces that extend the chain appear as they come (see "
                                   "grid_ipfs.chain.serve)")
    p.add_argument("--api", required=True, help="an IPFS daemon's API multiaddr (it must reach the job's topic)")
    p.add_argument("head", help="a head CID of the job (genesis will do)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--max-blocks", type=int, default=MAX_BLOCKS, metavar="N",
                   help=f"refuse a chain longer than N blocks (default {MAX_BLOCKS})")
    args = parser.parse_args(id_options_joined(sys.argv[1:] if argv is None else list(argv), ("--signer",)))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command not in ("export", "import", "serve") and (args.api is None) == (args.car is None):
        parser.error("give --api ADDRESS (a daemon) or --car FILE (an archive), exactly one")
    if args.command == "export" and args.car_out is not None and (args.round is not None or args.onnx):
        parser.error("--round and --onnx are for a model file (-o), not --car")
    try:
        if args.command == "import":
            return import_car(args.api, args.file, args.json)
        if args.command == "serve":
            return serve_page(args)
        if args.command == "compare":
            heads = [cid_str(parse_cid(h)) for h in (args.head_a, args.head_b)]  # named before any connection
            if args.max_blocks < 1:
                parser.error(f"--max-blocks must be >= 1, got {args.max_blocks}")
            with _open_store(args) as store:
                return compare_heads(store, *heads, args.json, args.max_blocks)
        head = cid_str(parse_cid(args.head)) if args.head else None  # a bad HEAD is named before any connection
        if args.max_blocks < 1:
            parser.error(f"--max-blocks must be >= 1, got {args.max_blocks}")
        if args.command in ("export", "verify") and args.signer is not None:
            parse_public_id(args.signer)
        if args.command == "export":
            if args.round is not None and args.round < 0:
                parser.error(f"--round must be >= 0, got {args.round}")
            if args.output is not None:
                check_request(args.output, args.onnx)
        if args.command == "privacy" and not 0 < args.delta < 1:
            parser.error(f"--delta must be in (0, 1), got {args.delta:g}")
        eval_xy = None
        if args.command == "verify" and args.eval_data is not None:
            from ..data import load_shard

            eval_xy = tuple(load_shard(args.eval_data))  # a bad file is named before any connection
        witnesses = load_witnesses(args.witness) if args.command == "verify" else None
        check_ext = None
        if args.command == "verify" and args.check_ext is not None:
            try:
                check_ext = load_ext_check(args.check_ext)
            except ValueError as exc:
                parser.error(str(exc))
        with _open_store(args) as client:
            head = head or _head(args, client)
            if args.command == "show":
                return show(client, head, args.json, args.max_blocks)
            if args.command == "plot":
                return plot(client, head, args.output, args.title, args.max_blocks)
            if args.command == "export":
                if args.car_out is not None:
                    return export_car(client, head, args.car_out, args.json, args.max_blocks)
                return export(client, head, args)
            if args.command == "tensorboard":
                return tensorboard(client, head, args.logdir, args.max_blocks)
            if args.command == "privacy":
                return privacy(client, head, args.delta, args.json, args.max_blocks)
            return verify(client, head, not args.no_recompute, args.json, args.signer, args.eval_data, eval_xy,
                          check_ext, args.max_blocks, witnesses, args.require_proof)
    except (ChainError, IPFSError, ExportError, PayloadError, IdentityError, DataError, OSError,
            TensorBoardError) as exc:
        print(f"error: {_line(_one_line(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def serve_page(args) -> int:
    """`serve`: until interrupted (Ctrl-C ends it with 0); the address is printed once it serves."""
    from .serve import serve

    head = cid_str(parse_cid(args.head))
    if not 0 <= args.port <= 65535 or args.max_blocks < 1:
        raise ChainError(f"--port must be in 0..65535 and --max-blocks >= 1, got {args.port} and {args.max_blocks}")
    announce = lambda url, view: print(f"serving job {view.job} at {url} (head seq {view.head_seq}; following "
                                       f"its topic; Ctrl-C stops)", flush=True)
    try:
        serve(args.api, head, host=args.host, port=args.port, max_blocks=args.max_blocks, ready=announce)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _line(text: str) -> str:
    """One printable line (see `text.printable`): what is printed may quote text from a peer's blocks."""
    from ..text import printable
    from .verify import REASON_CHARS

    return printable(text, REASON_CHARS)


if __name__ == "__main__":
    sys.exit(main())
