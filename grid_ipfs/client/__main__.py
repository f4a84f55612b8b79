"""`python -m grid_ipfs.client submit|resume|verify`: the client's command line (see `--help`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .. import messages
from ..aggregate import parse_accept
from ..chain import ChainError
from ..chain.tensorboard import TensorBoardError
from ..identity import Identity, IdentityError, default_key_path, id_options_joined, read_id_list
from ..ipfs import IPFSError
from ..ipfs.rpc import IPFSClient
from ..payloads import PayloadError
from ..runtime import collect_cycles_between_rounds, prepare_owner_process
from ..strategies import canonical_name, check_params
from .core import Client
from .job import SECURE_RULES, ClientCallback, JobFailed, JobSpec


def _progress(json_mode: bool) -> list[ClientCallback]:
    from ..progress import LogProgress, RichProgress

    return [LogProgress()] if json_mode or not sys.stderr.isatty() else [RichProgress()]


def _dashboard(args: argparse.Namespace) -> list[ClientCallback]:
    """The job's live page (`--dashboard PORT`), serving before the job starts; its address on stderr."""
    if args.dashboard is None:
        return []
    from .dashboard import DashboardProgress

    page = DashboardProgress(args.api, args.dashboard)
    print(f"dashboard: {page.url}", file=sys.stderr, flush=True)
    return [page]


def _job_options(p: argparse.ArgumentParser, *, resume: bool) -> None:
    """Options shared by submit and resume; on resume they default to the genesis block's config."""
    default = (lambda value: None) if resume else (lambda value: value)
    p.add_argument("--api", required=True, help="the IPFS daemon's API multiaddr, e.g. /ip4/127.0.0.1/tcp/5001")
    p.add_argument("--min-workers", type=int, default=default(1), help="updates needed to close a round (default 1)")
    p.add_argument("--round-timeout", type=float, default=default(120.0), help="seconds a round waits for updates")
    p.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for --min-workers to join")
    p.add_argument("--max-retries", type=int, default=default(2),
                   help="times a round short of --min-workers updates is announced again (default 2)")
    p.add_argument("--accept-retries", type=int, default=default(2),
                   help="times a round whose aggregate fails --accept is tried again with fresh updates (default 2)")
    p.add_argument("--eval-data", type=Path, help=".npz (x, y) the client evaluates each global model on")
    p.add_argument("--topic", default=messages.JOBS_TOPIC, help=f"jobs topic (default {messages.JOBS_TOPIC})")
    p.add_argument("--key", help="Ed25519 key file (default ~/.grid_ipfs/client.key)")
    p.add_argument("--head-dir", type=Path, help="where chain head files live (default ~/.grid_ipfs/chains)")
    p.add_argument("--allow-workers", help="accept updates only from the worker ids listed in this file")
    p.add_argument("--allow-miners", help="accept proposals and endorsements only from the miner ids in this file")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="write each round's global and per-worker metrics as TensorBoard scalars under DIR "
                        "(view with: tensorboard --logdir DIR; needs pip install 'grid-ipfs[tensorboard]')")
    p.add_argument("--dashboard", type=int, metavar="PORT",
                   help="serve the job's live page on http://127.0.0.1:PORT/ while it runs (0: any free port; "
                        "the address is logged)")


def _accept_rule(text: str) -> str:
    try:
        return str(parse_accept(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _aggregation_options(args: argparse.Namespace) -> tuple[str, dict]:
    """The rule and its recorded params from --aggregation, --trim, --byzantine, --dp-clip/--dp-noise."""
    dp = args.dp_clip is not None or args.dp_noise is not None
    if args.secure_aggregation or args.aggregation in SECURE_RULES:
        if args.aggregation not in (None, *SECURE_RULES) or args.trim is not None or args.byzantine is not None:
            raise ValueError("--secure-aggregation sums masked updates: it combines with --dp-clip/--dp-noise "
                             "(noise added by the workers), not with other rules")
        if not dp:
            return "secure-fedavg", {}
        plain = argparse.Namespace(**{**vars(args), "aggregation": "dp-fedavg", "secure_aggregation": False})
        params = _aggregation_options(plain)[1]  # the same checks of --dp-clip and --dp-noise
        return "secure-dp-fedavg", {"clip": params["clip"], "noise_multiplier": params["noise_multiplier"]}
    name = canonical_name(args.aggregation) if args.aggregation else ("dp-fedavg" if dp else "fedavg")
    if dp != (name == "dp-fedavg"):
        raise ValueError("--dp-clip/--dp-noise go with --aggregation dp-fedavg (the default when they are given)")
    if dp:
        if args.dp_clip is None or args.dp_noise is None:
            raise ValueError("dp-fedavg needs both --dp-clip C and --dp-noise Z")
        if not (math.isfinite(args.dp_clip) and args.dp_clip > 0 and math.isfinite(args.dp_noise)
                and args.dp_noise >= 0):
            raise ValueError("--dp-clip must be > 0 and --dp-noise >= 0")
        return name, {"clip": args.dp_clip, "noise_multiplier": args.dp_noise, "seed": args.seed}
    params = {k: v for k, v in (("trim", args.trim), ("byzantine", args.byzantine)) if v is not None}
    for text in args.param or ():
        key, value = _param(text)
        if key in params:
            raise ValueError(f"--param {key} is given twice")
        params[key] = value
    check_params(name, params)
    return name, params


def _param(text: str) -> tuple[str, float | int]:
    """`NAME=NUMBER` of `--param`: an int if it reads as one, else a float."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--param {text!r}: expected NAME=NUMBER, e.g. eta=0.05")
    try:
        return key.strip(), int(value)
    except ValueError:
        pass
    try:
        return key.strip(), float(value)
    except ValueError:
        raise ValueError(f"--param {text!r}: {value!r} is not a number") from None


def _async_options(args: argparse.Namespace):
    """The `AsyncConfig` of `--mode async` and its options (None for sync); ValueError in one line."""
    from ..strategies.fedbuff import AsyncConfig, Staleness

    if args.mode != "async":
        return None
    name, _, given = args.staleness.partition(":")
    params = {}
    for item in filter(None, given.split(",")):
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value) if sep else None
        except ValueError:
            raise ValueError(f"--staleness {args.staleness!r}: {value!r} is not a number") from None
        if not sep:
            raise ValueError(f"--staleness {args.staleness!r}: expected NAME:P=V,..., got {item!r}")
    return AsyncConfig(args.buffer_size, Staleness(name.strip(), params), args.server_lr, args.max_staleness)


def main(argv: list[str] | None = None) -> int:
    prepare_owner_process()  # before anything loads TensorFlow; an entry point's choice
    collect_cycles_between_rounds()  # one job per process: see runtime
    from ..strategies import names

    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.client",
                                     description="Submit and follow federated training jobs.",
                                     epilog="Exit codes: 0 done, 1 the job failed (the reason is printed), "
                                            "2 usage, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="run a job: R rounds of federated training of a compiled .keras model")
    _job_options(s, resume=False)
    s.add_argument("--model", required=True, type=Path, help="a compiled .keras model")
    s.add_argument("--rounds", required=True, type=int)
    s.add_argument("--fraction", type=float, default=1.0, help="fraction of joined workers asked per round")
    s.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--aggregation", choices=names(with_aliases=True), default=None, metavar="RULE",
                   help=f"the rule (default fedavg): {', '.join(names())}, or a Flower name (FedAdam, FedMedian, "
                        "...); docs/strategies.md lists each with its params")
    s.add_argument("--param", action="append", metavar="NAME=NUMBER",
                   help="a param of the rule, repeatable, e.g. --aggregation fedadam --param eta=0.05")
    s.add_argument("--trim", type=float, help="trimmed-mean: fraction cut at each end (default 0.1)")
    s.add_argument("--byzantine", type=int, help="krum/multi-krum: number of faulty workers tolerated (default 1)")
    s.add_argument("--dp-clip", type=float, metavar="C",
                   help="DP-FedAvg: bound on the L2 norm of each update's change to the global model (with --dp-noise)")
    s.add_argument("--dp-noise", type=float, metavar="Z",
                   help="DP-FedAvg: noise multiplier; Gaussian noise of std Z*C/n per coordinate, seeded by --seed")
    s.add_argument("--proximal-mu", type=float, default=0.0, metavar="MU",
                   help="FedProx: workers add MU/2 * ||w - w_global||^2 to their loss (default 0: off)")
    s.add_argument("--accept", type=_accept_rule, metavar="RULE",
                   help="keep a round's aggregate only if it passes RULE, e.g. 'val_accuracy>=0.6' or "
                        "'improves:val_loss' (on --eval-data); otherwise record it as rejected and retry the round")
    s.add_argument("--miners", type=int, default=0, metavar="K",
                   help="proof of federated learning: wait each round for K rival aggregates from miners "
                        "(python -m grid_ipfs.miner); the best that clears --accept on --eval-data wins (default 0)")
    s.add_argument("--proposal-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a round waits for the miners' proposals (default 60)")
    s.add_argument("--secure-aggregation", action="store_true",
                   help="pairwise-masked updates: the client and the chain see only each round's weighted sum "
                        "(FedAvg; every selected worker must answer; no norm screen)")
    s.add_argument("--max-norm-ratio", type=float, default=10.0,
                   help="refuse updates moving the model this many times further than the median update (0: off)")
    s.add_argument("--max-examples", type=int, metavar="N",
                   help="refuse workers claiming more than N training examples (FedAvg's weight) at join or in an "
                        "update (default: none; each update is still bounded by its worker's join claim)")
    s.add_argument("--compression", choices=("float16", "int8"), default=None,
                   help="workers send their change from the round's weights as float16, or as int8 with a scale "
                        "per tensor, deflated (int8: about 4x fewer bytes); recorded on the chain (default: off)")
    s.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync: each round waits for its workers; async (FedBuff): workers train on the newest "
                        "global they have and every --buffer-size updates make a block (docs/async.md)")
    s.add_argument("--buffer-size", type=int, default=4, metavar="K",
                   help="async: accepted updates per block (default 4); a block also closes at --round-timeout "
                        "with at least one")
    s.add_argument("--staleness", default="polynomial", metavar="NAME[:P=V,...]",
                   help="async: how a stale update is down-weighted: polynomial (1/(1+tau)^a, a=0.5), hinge "
                        "(a=10, b=4) or constant (default polynomial), e.g. hinge:a=5,b=2")
    s.add_argument("--server-lr", type=float, default=1.0, metavar="LR",
                   help="async: how far each block moves the global weights towards its buffer's aggregate (default 1)")
    s.add_argument("--max-staleness", type=int, default=8, metavar="N",
                   help="async: refuse updates trained from a global more than N blocks old (default 8)")
    s.add_argument("--job", dest="job_id", help="job id (default: MODEL-STEM-RANDOM)")
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("resume", help="continue a job from its chain after the client stopped")
    _job_options(r, resume=True)
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--head", help="the newest chain block's CID")
    which.add_argument("--job", dest="job_id", help="the job id: read the head from its head file")
    v = sub.add_parser("verify", help="verify a job's chain (as `python -m grid_ipfs.chain verify`) and, with "
                                      "--eval-data, re-evaluate every global model to re-check recorded metrics "
                                      "and acceptance rules")
    v.add_argument("--api", required=True, help="any IPFS daemon's API multiaddr")
    v.add_argument("head", help="the chain head CID")
    v.add_argument("--eval-data", type=Path, help="the .npz the client evaluated on (its --eval-data)")
    v.add_argument("--signer", help="the only id allowed to have signed the blocks (the job owner's)")
    v.add_argument("--check-ext", metavar="MODULE:FUNCTION", help="check custom block fields with your function")
    v.add_argument("--json", action="store_true")
    args = parser.parse_args(id_options_joined(sys.argv[1:] if argv is None else list(argv), ("--signer",)))
    if args.command == "verify":  # the same audit as `python -m grid_ipfs.chain verify`: one implementation
        from ..chain.__main__ import main as chain_main

        return chain_main(["verify", "--api", args.api, args.head, *(["--json"] if args.json else []),
                           *(["--eval-data", str(args.eval_data)] if args.eval_data else []),
                           *([f"--signer={args.signer}"] if args.signer else []),
                           *(["--check-ext", args.check_ext] if args.check_ext else [])])
    if args.dashboard is not None and not 0 <= args.dashboard <= 65535:
        parser.error(f"--dashboard must be a port in 0..65535, got {args.dashboard}")
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "submit":
        if args.rounds < 1 or args.min_workers < 1 or not 0 < args.fraction <= 1:
            parser.error("--rounds and --min-workers must be >= 1 and --fraction in (0, 1]")
        if args.max_examples is not None and args.max_examples < 1:
            parser.error("--max-examples must be >= 1")
        try:
            aggregation, params = _aggregation_options(args)
            async_config = _async_options(args)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        if args.command == "submit":  # a spec that describes no job fails before the daemon is touched
            spec = JobSpec(model_path=args.model, rounds=args.rounds, min_workers=args.min_workers,
                           fraction=args.fraction, epochs=args.epochs, batch_size=args.batch_size,
                           round_timeout=args.round_timeout, join_timeout=args.join_timeout,
                           max_retries=args.max_retries, accept_retries=args.accept_retries,
                           max_norm_ratio=args.max_norm_ratio,
                           eval_data=args.eval_data, job_id=args.job_id, aggregation=aggregation,
                           aggregation_params=params, seed=args.seed, proximal_mu=args.proximal_mu,
                           accept=args.accept, miners=args.miners, proposal_timeout=args.proposal_timeout,
                           secure_aggregation=aggregation in SECURE_RULES, max_examples=args.max_examples,
                           compression=args.compression, async_config=async_config)
        ipfs = IPFSClient(args.api)
        ipfs.wait_ready(timeout=5)
        identity = Identity.load_or_create(args.key or default_key_path("client"))
        callbacks = _progress(args.json) + _dashboard(args)
        if args.tensorboard is not None:  # the folder is made now: a bad one fails before the job starts
            from .tensorboard import TensorBoard

            callbacks.append(TensorBoard(args.tensorboard, ipfs))
        client = Client(ipfs, identity, head_dir=args.head_dir, callbacks=callbacks,
                        allowed_workers=read_id_list(args.allow_workers) if args.allow_workers else None,
                        allowed_miners=read_id_list(args.allow_miners) if args.allow_miners else None,
                        jobs_topic=args.topic)
        if args.command == "submit":
            result = client.submit(spec)
        else:
            result = client.resume(head=args.head, job_id=args.job_id, eval_data=args.eval_data,
                                   min_workers=args.min_workers, round_timeout=args.round_timeout,
                                   join_timeout=args.join_timeout, max_retries=args.max_retries,
                                   accept_retries=args.accept_retries)
    except (JobFailed, IPFSError, IdentityError, ChainError, PayloadError, OSError, ValueError, TypeError,
            TensorBoardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
