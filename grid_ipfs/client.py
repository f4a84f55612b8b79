"""The client role: `python -m grid_ipfs.client submit --api A --model M.keras --rounds R`.

The client owns a job. It adds the model and its initial weights to IPFS, writes the genesis block
of the job's chain, announces the job, waits for workers to join, and then for each round: announces
the global weights CID with a deadline, collects signed updates, checks each one (shapes, dtypes,
finite values), aggregates with FedAvg weighted by `num_examples` (updates sorted by worker id, float64
sums: anyone can recompute it bit for bit), adds the new global weights and appends a chain block.

Round orchestration lives here; the arithmetic lives in `grid_ipfs.aggregate`, the block format in
`grid_ipfs.chain`. Progress goes to `ClientCallback` hooks (Keras style): the CLI plugs in a rich
display, tests and notebooks plug in their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from . import messages  # noqa: E402
from .aggregate import aggregate  # noqa: E402
from .chain import ChainLog  # noqa: E402
from .identity import Identity, IdentityError, default_key_path, read_id_list  # noqa: E402
from .ipfs import IPFSError, cid_str  # noqa: E402
from .ipfs.pubsub import PubsubMessage  # noqa: E402
from .ipfs.rpc import IPFSClient  # noqa: E402
from .payloads import MAX_WEIGHTS_BYTES, PayloadError, weights_from_bytes, weights_to_bytes  # noqa: E402

log = logging.getLogger("grid_ipfs.client")

REANNOUNCE_EVERY = 2.0  # seconds between job re-announcements while waiting for workers to join


class JobFailed(RuntimeError):
    """The job cannot go on (too few workers, ...); the message says why in one line."""


@dataclass
class JobSpec:
    model_path: Path
    rounds: int
    min_workers: int = 1
    fraction: float = 1.0
    epochs: int = 1
    batch_size: int = 32
    round_timeout: float = 120.0
    join_timeout: float = 120.0
    eval_data: Path | None = None
    job_id: str | None = None
    aggregation: str = "fedavg"
    seed: int = 0


@dataclass
class RoundResult:
    round: int
    weights: str
    head: str
    updates: int
    metrics: dict
    seconds: float
    rejected: dict = field(default_factory=dict)


@dataclass
class JobResult:
    job: str
    model: str
    head: str
    weights: str
    rounds: list[RoundResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"job": self.job, "head": self.head, "model": self.model, "weights": self.weights,
                "rounds": [{"round": r.round, "weights": r.weights, "head": r.head, "updates": r.updates,
                            "metrics": r.metrics, "seconds": round(r.seconds, 3), "rejected": r.rejected}
                           for r in self.rounds]}


class ClientCallback:
    """Hooks called as a job runs. Override what you need (like `keras.callbacks.Callback`)."""

    def on_job_start(self, job: messages.Job, genesis: str) -> None: ...
    def on_worker_joined(self, worker: str, name: str, joined: int, needed: int) -> None: ...
    def on_round_start(self, round: int, expected: int, deadline: float) -> None: ...
    def on_update(self, round: int, worker: str, received: int, expected: int) -> None: ...
    def on_round_end(self, result: RoundResult) -> None: ...
    def on_job_end(self, result: JobResult) -> None: ...
    def on_job_failed(self, job: messages.Job, error: BaseException) -> None: ...


@dataclass
class _Collected:
    worker: str
    update: messages.Update
    weights: list


class Client:
    """Runs jobs on one daemon with one identity."""

    def __init__(self, ipfs: IPFSClient, identity: Identity, *, head_dir: Path | None = None,
                 callbacks: list[ClientCallback] | None = None, allowed_workers: set[str] | None = None,
                 jobs_topic: str = messages.JOBS_TOPIC):
        self.ipfs = ipfs
        self.jobs_topic = jobs_topic
        self.identity = identity
        self.head_dir = Path(head_dir) if head_dir else Path.home() / ".grid_ipfs" / "chains"
        self.callbacks = callbacks or []
        self.allowed_workers = allowed_workers
        self.inbox: queue.Queue[PubsubMessage] = queue.Queue()
        self.dropped: dict[str, int] = {}

    # -- the job ---------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobResult:
        from .payloads import model_from_bytes

        model_bytes = spec.model_path.read_bytes()
        model = model_from_bytes(model_bytes, source=str(spec.model_path))
        weights = [w.copy() for w in model.get_weights()]
        eval_xy = _load_eval(spec.eval_data, model) if spec.eval_data else None

        job_id = spec.job_id or f"{spec.model_path.stem}-{secrets.token_hex(4)}"
        model_cid = cid_str(self.ipfs.add(model_bytes))
        weights_cid = cid_str(self.ipfs.add(weights_to_bytes(weights)))
        chain = ChainLog(self.ipfs, self.head_dir / f"{job_id}.head")
        genesis = chain.append(self._block(job_id, 0, model_cid, weights_cid, "init", [],
                                           self._evaluate(model, weights, eval_xy)), self.identity)
        job = messages.Job(job=job_id, model=model_cid, owner=self.identity.id,
                           config={"epochs": spec.epochs, "batch_size": spec.batch_size, "rounds": spec.rounds})
        result = JobResult(job_id, model_cid, cid_str(genesis), weights_cid)
        for cb in self.callbacks:
            cb.on_job_start(job, result.head)

        subscription = self.ipfs.pubsub_subscribe(messages.job_topic(job_id), on_message=self.inbox.put)
        try:
            subscription.wait_ready()
            workers = self._gather_workers(job, spec)
            for r in range(1, spec.rounds + 1):
                round_result, weights = self._run_round(job, spec, r, workers, weights, result, chain,
                                                        model, eval_xy)
                result.rounds.append(round_result)
                result.head, result.weights = round_result.head, round_result.weights
            self._publish(messages.Done(job=job_id, head=result.head, reason="completed"))
        except BaseException as exc:
            for cb in self.callbacks:
                cb.on_job_failed(job, exc)
            raise
        finally:
            subscription.close()
        for cb in self.callbacks:
            cb.on_job_end(result)
        return result

    def _gather_workers(self, job: messages.Job, spec: JobSpec) -> dict[str, messages.Join]:
        """Announce the job (again every few seconds: pubsub is lossy) until enough workers joined."""
        workers: dict[str, messages.Join] = {}
        deadline = time.monotonic() + spec.join_timeout
        next_announce = 0.0
        while len(workers) < spec.min_workers:
            now = time.monotonic()
            if now > deadline:
                raise JobFailed(f"only {len(workers)} of {spec.min_workers} workers joined job {job.job} "
                                f"within {spec.join_timeout:.0f}s (are workers running on connected daemons?)")
            if now >= next_announce:
                self._publish(job)
                next_announce = now + REANNOUNCE_EVERY
            self._drain(job.job, min(0.2, max(0.0, deadline - now)), workers=workers, needed=spec.min_workers)
        return workers

    def _run_round(self, job, spec, r, workers, weights, result, chain, model, eval_xy):
        started = time.monotonic()
        self._publish(job)  # late joiners learn about the job and take part from the next round
        selected = _select(sorted(workers), spec.fraction, spec.min_workers, random.Random(spec.seed + r))
        expected = set(selected) if selected is not None else set(workers)
        deadline = time.time() + spec.round_timeout
        round_msg = messages.Round(job=job.job, round=r, weights=result.weights, deadline=deadline,
                                   selected=selected)
        self._publish(round_msg)
        for cb in self.callbacks:
            cb.on_round_start(r, len(expected), deadline)

        collected: dict[str, _Collected] = {}
        rejected: dict[str, int] = {}
        while True:
            answered = set(collected) & expected
            if len(collected) >= spec.min_workers and (answered >= expected or time.time() > deadline):
                break
            if time.time() > deadline:
                raise JobFailed(f"round {r} of job {job.job}: {len(collected)} of {spec.min_workers} required "
                                f"updates by the deadline ({spec.round_timeout:.0f}s)")
            for update, sender in self._drain(job.job, 0.2, workers=workers, round_=round_msg):
                reason = self._check_update(update, sender, selected, collected)
                if reason is None:
                    try:
                        fetched = weights_from_bytes(
                            self.ipfs.cat(update.weights, max_size=MAX_WEIGHTS_BYTES, timeout=30),
                            source=f"update {update.weights} from {sender[:12]}", like=weights)
                    except (IPFSError, PayloadError) as exc:
                        reason = f"weights rejected: {exc}"
                if reason is not None:
                    rejected[reason.split(":")[0]] = rejected.get(reason.split(":")[0], 0) + 1
                    log.warning("round %d: dropped update from %s: %s", r, sender[:12], reason)
                    continue
                collected[sender] = _Collected(sender, update, fetched)
                for cb in self.callbacks:
                    cb.on_update(r, sender, len(collected), len(expected))

        ordered = [collected[w] for w in sorted(collected)]  # deterministic order: verify recomputes this
        new_weights = aggregate(spec.aggregation, [(c.weights, c.update.num_examples) for c in ordered])
        new_cid = cid_str(self.ipfs.add(weights_to_bytes(new_weights)))
        metrics = _weighted_metrics(ordered)
        metrics.update(self._evaluate(model, new_weights, eval_xy))
        updates = [{"worker": c.worker, "weights": c.update.weights, "num_examples": c.update.num_examples,
                    "metrics": {**c.update.metrics, **{f"eval_{k}": v for k, v in c.update.eval_metrics.items()}}}
                   for c in ordered]
        head = cid_str(chain.append(self._block(job.job, r, job.model, new_cid, spec.aggregation, updates, metrics),
                                    self.identity))
        self._publish(messages.Head(job=job.job, round=r, head=head, weights=new_cid))
        outcome = RoundResult(r, new_cid, head, len(ordered), metrics, time.monotonic() - started, rejected)
        for cb in self.callbacks:
            cb.on_round_end(outcome)
        return outcome, new_weights

    # -- helpers ---------------------------------------------------------------------------------------

    def _check_update(self, update: messages.Update, sender: str, selected, collected) -> str | None:
        if self.allowed_workers is not None and sender not in self.allowed_workers:
            return "not allowed: worker not on the allow-list"
        if selected is not None and sender not in selected:
            return "not selected: worker not selected for this round"
        if sender in collected:
            return "replay: second update from this worker for this round"
        return None

    def _drain(self, job_id: str, timeout: float, *, workers: dict, needed: int = 0,
               round_: messages.Round | None = None) -> list[tuple[messages.Update, str]]:
        """Handle what arrived on the job topic within `timeout`; return the updates for `round_`."""
        updates = []
        end = time.monotonic() + timeout
        while True:
            try:
                raw = self.inbox.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return updates
            try:
                envelope = messages.decode(raw.data)
            except messages.MessageError as exc:
                self._drop("malformed", f"from peer {raw.sender[-8:]}: {exc}")
                continue
            msg, sender = envelope.message, envelope.sender
            if getattr(msg, "job", None) != job_id:
                self._drop("other job", f"{type(msg).__name__} for job {getattr(msg, 'job', '?')}")
            elif isinstance(msg, messages.Join):
                if sender not in workers and (self.allowed_workers is None or sender in self.allowed_workers):
                    workers[sender] = msg
                    for cb in self.callbacks:
                        cb.on_worker_joined(sender, msg.name, len(workers), needed)
            elif isinstance(msg, messages.Update):
                if round_ is None or msg.round != round_.round:
                    self._drop("late", f"update for round {msg.round} from {sender[:12]}")
                else:
                    updates.append((msg, sender))
            # our own round/head/done messages come back to us: nothing to do

    def _drop(self, kind: str, detail: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        log.info("dropped a message (%s): %s", kind, detail)

    def _publish(self, message) -> bool:
        topic = self.jobs_topic if isinstance(message, messages.Job) else messages.topic_of(message)
        return self.ipfs.pubsub_publish(topic, messages.encode(message, self.identity))

    def _block(self, job_id, r, model_cid, weights_cid, aggregation, updates, metrics) -> dict:
        return {"job": job_id, "round": r, "model": model_cid, "weights": weights_cid,
                "aggregation": {"name": aggregation, "params": {}}, "updates": updates, "metrics": metrics,
                "time": time.time()}

    @staticmethod
    def _evaluate(model, weights, eval_xy) -> dict:
        if eval_xy is None:
            return {}
        from .training import evaluate

        return {f"val_{k}": v for k, v in evaluate(model, weights, *eval_xy).items()}


def _select(workers: list[str], fraction: float, minimum: int, rng: random.Random) -> list[str] | None:
    """None means "every joined worker"; otherwise a reproducible sample of at least `minimum`."""
    if fraction >= 1.0:
        return None
    k = min(len(workers), max(minimum, round(fraction * len(workers))))
    return sorted(rng.sample(workers, k))


def _weighted_metrics(collected: list[_Collected]) -> dict:
    """Example-weighted means of the workers' training metrics and of their evaluations of the incoming model."""
    total = sum(c.update.num_examples for c in collected)
    out: dict[str, float] = {}
    for prefix, attr in (("", "metrics"), ("eval_", "eval_metrics")):
        keys = set.intersection(*(set(getattr(c.update, attr)) for c in collected)) if collected else set()
        for key in sorted(keys):
            out[prefix + key] = sum(getattr(c.update, attr)[key] * c.update.num_examples for c in collected) / total
    return out


def _load_eval(path: Path, model):
    from .data import check_shard_for_model, load_shard

    x, y = load_shard(path)
    check_shard_for_model(x, y, tuple(model.input_shape))
    return x, y


# -- command line ------------------------------------------------------------------------------------------

def _progress(json_mode: bool) -> list[ClientCallback]:
    from .progress import LogProgress, RichProgress

    return [LogProgress()] if json_mode or not sys.stderr.isatty() else [RichProgress()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_ipfs.client",
                                     description="Submit and follow federated training jobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="run a job: R rounds of federated training of a compiled .keras model")
    s.add_argument("--api", required=True, help="the IPFS daemon's API multiaddr, e.g. /ip4/127.0.0.1/tcp/5001")
    s.add_argument("--model", required=True, type=Path, help="a compiled .keras model")
    s.add_argument("--rounds", required=True, type=int)
    s.add_argument("--min-workers", type=int, default=1, help="updates needed to close a round (default 1)")
    s.add_argument("--fraction", type=float, default=1.0, help="fraction of joined workers asked per round")
    s.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--round-timeout", type=float, default=120.0, help="seconds a round waits for updates")
    s.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for --min-workers to join")
    s.add_argument("--eval-data", type=Path, help=".npz (x, y) the client evaluates each global model on")
    s.add_argument("--topic", default=messages.JOBS_TOPIC, help=f"jobs topic (default {messages.JOBS_TOPIC})")
    s.add_argument("--job", dest="job_id", help="job id (default: MODEL-STEM-RANDOM)")
    s.add_argument("--key", help="Ed25519 key file (default ~/.grid_ipfs/client.key)")
    s.add_argument("--head-dir", type=Path, help="where chain head files live (default ~/.grid_ipfs/chains)")
    s.add_argument("--allow-workers", help="accept updates only from the worker ids listed in this file")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.json else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.rounds < 1 or args.min_workers < 1 or not 0 < args.fraction <= 1:
        parser.error("--rounds and --min-workers must be >= 1 and --fraction in (0, 1]")

    spec = JobSpec(model_path=args.model, rounds=args.rounds, min_workers=args.min_workers,
                   fraction=args.fraction, epochs=args.epochs, batch_size=args.batch_size,
                   round_timeout=args.round_timeout, join_timeout=args.join_timeout, eval_data=args.eval_data,
                   job_id=args.job_id, seed=args.seed)
    try:
        ipfs = IPFSClient(args.api)
        ipfs.wait_ready(timeout=10)
        identity = Identity.load_or_create(args.key or default_key_path("client"))
        client = Client(ipfs, identity, head_dir=args.head_dir, callbacks=_progress(args.json),
                        allowed_workers=read_id_list(args.allow_workers) if args.allow_workers else None,
                        jobs_topic=args.topic)
        result = client.submit(spec)
    except (JobFailed, IPFSError, IdentityError, PayloadError, OSError, ValueError) as exc:
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
