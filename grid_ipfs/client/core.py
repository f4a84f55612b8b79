"""`Client`: one job's rounds, from genesis block to the last head (the orchestration; the arithmetic
lives in `grid_ipfs.aggregate`, the block format in `grid_ipfs.chain`, contests in `grid_ipfs.contest`)."""

from __future__ import annotations

import logging
import math
import queue
import random
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from .. import messages
from ..aggregate import AcceptRule, parse_accept
from ..chain import ChainError, ChainLog, decode_block
from ..chain.contributions import message_cid, update_entry
from ..chain.verify import is_accepted
from ..contest import ContestError, best, check_rival, check_rival_fields, pofl_record, score_key
from ..identity import Identity
from ..ipfs import IPFSError, cid_str, parse_cid, same_cid
from ..ipfs.pubsub import PubsubMessage
from ..ipfs.rpc import IPFSClient
from ..limits import MAX_COUNT, MAX_NUM_EXAMPLES
from ..payloads import MAX_WEIGHTS_BYTES, PayloadError, weights_from_bytes, weights_to_bytes
from ..secagg import mask_key_is_signed, masked_like
from ..strategies import RoundContext, Strategy, StrategyError, run
from ..text import printable
from .job import SECURE_RULES, ClientCallback, JobFailed, JobResult, JobSpec, RoundResult

log = logging.getLogger("grid_ipfs.client")

REANNOUNCE_EVERY = 2.0  # seconds between job re-announcements while waiting for workers to join
JOIN_GRACE = 1.0  # seconds without a new join before round 1 starts, once --min-workers have joined
FETCH_TIMEOUT = 30.0  # seconds to fetch one update's weights before the update is rejected
FETCH_THREADS = 4  # concurrent update downloads per round
PIN_TIMEOUT = 120.0  # seconds for the recursive pin of a new head (local objects only: it is a walk, not a fetch)


@dataclass
class _Collected:
    worker: str
    update: messages.Update
    weights: list
    message: bytes
    """The update message exactly as the worker signed and published it: the block links it."""


@dataclass
class _Entry:
    """A candidate aggregate of one round: whose, which block, its rule, weights and metrics (our numbers)."""

    signer: str
    block: str
    aggregation: str
    params: dict
    weights: list
    weights_cid: str
    metrics: dict


@dataclass
class _Contest:
    """How a round's contest ended: the chosen candidate (the winner, or ours if none passed)."""

    accepted: bool
    why: str
    aggregation: str
    params: dict
    weights: list
    weights_cid: str
    metrics: dict
    pofl: dict
    winner: str
    proposals: list
    refused: int


@dataclass
class _Job:
    """A running job's state on the client side."""

    message: messages.Job
    spec: JobSpec
    chain: ChainLog
    model: object
    weights: list
    result: JobResult
    eval_xy: tuple | None
    strategy: Strategy
    """The job's rule (`JobSpec.strategy`): every aggregate of the job is its `aggregate`."""
    state: object = None
    """The strategy's server state after the newest accepted block (None: initial), replayed from the
    chain on resume and advanced by accepted blocks only, as `chain verify` does."""
    workers: dict[str, messages.Join] = field(default_factory=dict)
    accept: AcceptRule | None = None
    baseline: dict = field(default_factory=dict)
    """Metrics of the newest accepted block (genesis at first): what `improves:` rules compare with."""
    proposals: list = field(default_factory=list)
    """(Proposal, sender) as they arrive; taken by the round that asked for them."""
    endorsements: dict = field(default_factory=dict)
    """round -> {miner id: verdict} as endorsements arrive."""
    endorse_messages: dict = field(default_factory=dict)
    """block CID -> {miner id: its signed endorse message, as published}: what the next block links."""
    extends: str | None = None
    """The head the current round's announcements name: its workers sign against it, its block links it."""
    pinned: str | None = None
    """The head this node pins recursively: every block, model, weights and message the chain links."""


class Client:
    """Runs jobs on one daemon with one identity: `submit` a new one or `resume` one from its chain."""

    def __init__(self, ipfs: IPFSClient, identity: Identity, *, head_dir: Path | None = None,
                 callbacks: list[ClientCallback] | None = None, allowed_workers: set[str] | None = None,
                 jobs_topic: str = messages.JOBS_TOPIC, allowed_miners: set[str] | None = None):
        self.ipfs = ipfs
        self.identity = identity
        self.jobs_topic = jobs_topic
        self.head_dir = Path(head_dir) if head_dir else Path.home() / ".grid_ipfs" / "chains"
        self.callbacks = callbacks or []
        self.allowed_workers = allowed_workers
        self.allowed_miners = allowed_miners
        self.inbox: queue.Queue[PubsubMessage] = queue.Queue()
        self.dropped: dict[str, int] = {}
        self._last_join = 0.0

    def head_file(self, job_id: str) -> Path:
        return self.head_dir / f"{job_id}.head"

    # -- starting a job --------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobResult:
        """Add the model and initial weights, write the genesis block, announce the job, run every round."""
        from ..payloads import model_from_bytes

        model_bytes = spec.model_path.read_bytes()
        model = model_from_bytes(model_bytes, source=str(spec.model_path))
        weights = [w.copy() for w in model.get_weights()]
        eval_xy = _load_eval(spec.eval_data, model) if spec.eval_data else None
        accept = _check_spec(spec, weights, eval_xy)

        job_id = spec.job_id or f"{spec.model_path.stem}-{secrets.token_hex(4)}"
        chain = ChainLog(self.ipfs, self.head_file(job_id))
        if chain.head is not None:
            raise JobFailed(f"job {job_id} already has a chain (head file {chain.head_file}); "
                            f"continue it with `client resume --job {job_id}` or pick another --job")
        model_cid = cid_str(self.ipfs.add(model_bytes))
        weights_cid = cid_str(self.ipfs.add(weights_to_bytes(weights)))
        genesis_metrics = self._evaluate(model, weights, eval_xy)
        genesis = chain.append({**self._block(job_id, 0, model_cid, weights_cid, "init", [], genesis_metrics),
                                "config": spec.config()}, self.identity)
        result = JobResult(job_id, model_cid, cid_str(genesis), weights_cid)
        job = _Job(self._job_message(job_id, model_cid, spec), spec, chain, model, weights, result, eval_xy,
                   spec.strategy, accept=accept, baseline=genesis_metrics)
        self._pin(job, cid_str(genesis))
        return self._run(job, first_round=1)

    def resume(self, *, head: str | None = None, job_id: str | None = None, eval_data: Path | None = None,
               **overrides) -> JobResult:
        """Continue a job from its chain: the round after the newest block, with the genesis config.

        The head comes from `head` or from the job's head file. Only the job's owner can resume it
        (workers follow rounds signed by the owner only), and no round is run twice: the chain says
        which rounds are done. Training continues from the newest *accepted* block; a newest block
        rejected by the acceptance rule means its round is tried again.
        """
        from ..chain import walk
        from ..chain.export import load_global_model

        if head is None:
            if job_id is None:
                raise JobFailed("resume needs a chain head CID or a job id")
            found = ChainLog(self.ipfs, self.head_file(job_id)).head
            if found is None:
                raise JobFailed(f"no head file for job {job_id} in {self.head_dir}; pass --head CID")
            head = cid_str(found)
        blocks = [block for _, block in walk(self.ipfs, head)]
        genesis = blocks[-1]
        kept = next(block for block in blocks if is_accepted(block))  # genesis is always accepted
        if genesis["signer"] != self.identity.id:
            raise JobFailed(f"job {genesis['job']} is owned by {genesis['signer']}; resume it with that key")
        job_id = genesis["job"]
        chain = ChainLog(self.ipfs, self.head_file(job_id))
        on_file = chain.head
        if on_file is not None and cid_str(on_file) != cid_str(parse_cid(head)):
            raise JobFailed(f"head file {chain.head_file} names {cid_str(on_file)}, not {head}: "
                            "resume from the head file (omit --head) or remove it")
        if on_file is None:
            from ..chain import write_head

            chain.head_file.parent.mkdir(parents=True, exist_ok=True)
            write_head(chain.head_file, head)
        spec = JobSpec.from_config(genesis.get("config", {}), job_id=job_id, eval_data=eval_data, **overrides)
        model_cid = cid_str(genesis["model"])
        model, weights = load_global_model(self.ipfs, genesis, kept)
        eval_xy = _load_eval(eval_data, model) if eval_data else None
        accept = _check_spec(spec, weights, eval_xy)
        result = JobResult(job_id, model_cid, cid_str(parse_cid(head)), cid_str(kept["weights"]))
        log.info("resuming job %s after round %d of %d (head %s)", job_id, kept["round"], spec.rounds, head)
        job = _Job(self._job_message(job_id, model_cid, spec), spec, chain, model, weights, result, eval_xy,
                   spec.strategy, state=self._replay_state(spec, head), accept=accept,
                   baseline=dict(kept["metrics"]))
        self._pin(job, result.head)
        return self._run(job, first_round=kept["round"] + 1)

    def _replay_state(self, spec: JobSpec, head: str):
        """The server state of a stateful strategy after the newest accepted block: replayed by verifying
        the chain from genesis (never read from a file or a block), exactly as an auditor derives it."""
        if not spec.strategy.stateful:
            return None
        from ..chain.verify import verify_chain

        report = verify_chain(self.ipfs, head, signer=self.identity.id)
        if not report.ok:
            raise JobFailed(f"cannot replay the {spec.aggregation} server state: the chain does not verify "
                            f"({report.reason})")
        return report.server_state

    def _job_message(self, job_id: str, model_cid: str, spec: JobSpec) -> messages.Job:
        config = {"epochs": spec.epochs, "batch_size": spec.batch_size, "rounds": spec.rounds}
        if spec.proximal_mu:
            config["proximal_mu"] = float(spec.proximal_mu)
        config.update(spec.strategy.fit_config())  # what the workers need for the rule (Flower's configure_fit)
        return messages.Job(job=job_id, model=model_cid, owner=self.identity.id, config=config)

    def _run(self, job: _Job, first_round: int) -> JobResult:
        for cb in self.callbacks:
            cb.on_job_start(job.message, job.result.head)
        subscription = self.ipfs.pubsub_subscribe(messages.job_topic(job.message.job), on_message=self.inbox.put)
        try:
            subscription.wait_ready()
            if first_round <= job.spec.rounds:
                self._gather_workers(job)
            for r in range(first_round, job.spec.rounds + 1):
                outcome = self._run_round(job, r)
                job.result.rounds.append(outcome)
                job.result.head, job.result.weights = outcome.head, outcome.weights
            self._await_endorsements(job)
            self._publish(messages.Done(job=job.message.job, head=job.result.head, reason="completed"))
        except BaseException as exc:
            for cb in self.callbacks:
                cb.on_job_failed(job.message, exc)
            try:  # tell the workers, so they stop following the job (best effort: we are failing anyway)
                reason = printable(f"failed: {' '.join(str(exc).split()) or type(exc).__name__}", 200)
                self._publish(messages.Done(job=job.message.job, head=job.result.head, reason=reason))
            except Exception:  # noqa: BLE001 - the original error is what the caller needs
                log.debug("could not announce the failure of job %s", job.message.job, exc_info=True)
            raise
        finally:
            subscription.close()
        job.result.dropped = dict(self.dropped)
        for cb in self.callbacks:
            cb.on_job_end(job.result)
        return job.result

    # -- rounds ----------------------------------------------------------------------------------------

    def _gather_workers(self, job: _Job) -> None:
        """Announce the job (again every few seconds: pubsub is lossy) until enough workers joined."""
        spec = job.spec
        deadline = time.monotonic() + spec.join_timeout
        next_announce = 0.0
        self._last_join = time.monotonic()
        # Enough workers, and none joined for a moment: workers that answer the same announcement take
        # part from round 1 instead of waiting for round 2.
        while len(job.workers) < spec.min_workers or time.monotonic() - self._last_join < JOIN_GRACE:
            now = time.monotonic()
            if now > deadline:
                if len(job.workers) >= spec.min_workers:
                    break
                raise JobFailed(f"only {len(job.workers)} of {spec.min_workers} workers joined job "
                                f"{job.message.job} within {spec.join_timeout:.0f}s "
                                "(are workers running on connected daemons?)")
            if now >= next_announce:
                self._publish(job.message)
                next_announce = now + REANNOUNCE_EVERY
            self._drain(job, min(0.2, max(0.0, deadline - now)))

    def _run_round(self, job: _Job, r: int) -> RoundResult:
        """One round: gather updates, aggregate, append a block. With an acceptance rule, an aggregate
        that fails it is appended as a rejected block and the round is tried again (fresh updates from
        a new announcement), at most `max_retries` times; then the job fails."""
        spec, started = job.spec, time.monotonic()
        dropped_before = sum(self.dropped.values())
        tries = spec.max_retries + 1 if job.accept is not None else 1
        attempt, why = 0, ""
        for try_ in range(1, tries + 1):
            collected, refused, attempt = self._gather_updates(job, r, attempt)
            outcome, why = self._close_round(job, r, collected, refused, attempt, started, dropped_before, try_)
            if outcome.accepted:
                return outcome
            job.result.head = outcome.head
            job.result.turned_down.append(outcome)
            for cb in self.callbacks:
                cb.on_round_rejected(outcome, why)
            log.warning("round %d of job %s: aggregate rejected (%s)%s", r, job.message.job, why,
                        f"; trying the round again ({try_ + 1} of {tries})" if try_ < tries else "")
        raise JobFailed(f"round {r} of job {job.message.job}: every aggregate failed the acceptance rule "
                        f"{job.accept} ({tries} tries; last: {why}); the rejected tries are in the chain, "
                        f"head {job.result.head}")

    def _gather_updates(self, job: _Job, r: int, after_attempt: int) -> tuple[dict, dict, int]:
        """Announce round `r` and collect updates until `min_workers` good ones arrived. A deadline
        passing with fewer is announced again (a new attempt, same global weights), at most `max_retries`
        times; updates from earlier attempts of this call still count, updates for attempts up to
        `after_attempt` (an earlier, rejected try of the round) do not. Returns (collected, refused,
        last attempt number)."""
        spec = job.spec
        collected: dict[str, _Collected] = {}
        refused: dict[str, str] = {}  # worker -> reason its update was refused this round
        first = after_attempt + 1
        secure = spec.secure_aggregation
        job.extends = cid_str(job.chain.head)
        for attempt in range(first, first + spec.max_retries + 1):
            self._publish(job.message)  # late joiners and restarted workers learn about the job
            if attempt == first:
                selected = _select(sorted(job.workers), spec.fraction, spec.min_workers,
                                   random.Random(spec.seed * 100_003 + r))
            elif secure:  # masks only cancel among one attempt's workers: start over with those who answered
                selected = sorted(collected) if len(collected) >= spec.min_workers else sorted(job.workers)
                collected, refused = {}, {}
            else:  # ask again only those who have not answered (and any worker that joined since)
                asked = set(selected) if selected is not None else set(job.workers)
                selected = sorted((asked | set(job.workers)) - set(collected) - set(refused))
            if secure and selected is None:
                selected = sorted(job.workers)  # a fixed set: every one masks against all the others
            round_msg = messages.Round(job=job.message.job, round=r, weights=job.result.weights,
                                       deadline=time.time() + spec.round_timeout, selected=selected,
                                       attempt=attempt, head=job.extends,
                                       mask_keys={w: job.workers[w].mask_key for w in selected} if secure else None,
                                       mask_sigs={w: job.workers[w].mask_sig for w in selected} if secure else None)
            self._publish(round_msg)
            expected = set(selected) if selected is not None else set(job.workers)
            for cb in self.callbacks:
                cb.on_round_start(r, len(expected), round_msg.deadline)
            self._collect(job, round_msg, expected, collected, refused, attempt if secure else first)
            if secure and set(collected) != expected:  # a missing update leaves its masks in the sum
                log.warning("round %d of job %s: secure aggregation needs every selected worker; %d of %d "
                            "answered", r, job.message.job, len(collected), len(expected))
            else:
                self._screen_outliers(job, collected, refused)
                if len(collected) >= spec.min_workers:
                    return collected, refused, attempt
            for cb in self.callbacks:
                cb.on_round_retry(r, attempt - after_attempt, len(collected), spec.min_workers)
            if attempt < first + spec.max_retries:
                log.warning("round %d of job %s: %d of %d required updates by the deadline; announcing it again "
                            "(attempt %d of %d)", r, job.message.job, len(collected), spec.min_workers,
                            attempt - after_attempt + 1, spec.max_retries + 1)
        raise JobFailed(f"round {r} of job {job.message.job}: {len(collected)} of {spec.min_workers} required "
                        f"updates by the deadline ({spec.round_timeout:.0f}s), "
                        f"{spec.max_retries + 1} attempt(s)")

    def _collect(self, job: _Job, round_msg: messages.Round, expected: set[str],
                 collected: dict[str, _Collected], refused: dict[str, str], first_attempt: int = 1) -> None:
        """Take updates for this round until every expected worker answered or the deadline passed.

        Weights are fetched in a small thread pool as updates arrive: a remote fetch is mostly waiting
        (js-ipfs pays ~0.27 s per block-tree layer), so fetching one after another made the round's
        length grow with the number of workers. Results are handled here, in this thread, in arrival
        order of completion; the aggregation order is fixed later (sorted by worker id).
        """
        pending: dict[Future, tuple[messages.Update, str, bytes]] = {}

        like = masked_like(job.weights) if job.spec.secure_aggregation else job.weights

        def fetch(update: messages.Update, sender: str) -> list:
            data = self.ipfs.cat(update.weights, max_size=MAX_WEIGHTS_BYTES, timeout=FETCH_TIMEOUT)
            return weights_from_bytes(data, source=f"update {update.weights} from {sender[:12]}", like=like)

        def settle(future: Future) -> None:
            update, sender, data = pending.pop(future)
            try:
                fetched, reason = future.result(), None
            except (IPFSError, PayloadError) as exc:
                fetched, reason = None, f"bad weights: {exc}"
            if reason is not None:
                refused.setdefault(sender, reason)
                self._reject(round_msg.round, sender, reason)
                return
            collected[sender] = _Collected(sender, update, fetched, data)
            for cb in self.callbacks:
                cb.on_update(round_msg.round, sender, len(collected), len(expected))

        with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch") as pool:
            while time.time() < round_msg.deadline:
                if not pending and expected <= (set(collected) | set(refused)):
                    break
                for update, sender, data in self._drain(job, 0.05 if pending else 0.2, round_=round_msg,
                                                        first_attempt=first_attempt):
                    in_flight = {s for _, s, _ in pending.values()}
                    reason = self._check_update(update, sender, expected, collected, refused)
                    if reason is None:
                        reason = _check_history(update, round_msg)
                    if reason is None:
                        reason = self._check_claim(job, update, sender)
                    if reason is None and sender in in_flight:
                        reason = "replay: second update from this worker for this round"
                    if reason is not None:
                        if sender in expected and sender not in collected and sender not in in_flight:
                            refused.setdefault(sender, reason)
                        self._reject(round_msg.round, sender, reason)
                        continue
                    pending[pool.submit(fetch, update, sender)] = (update, sender, data)
                for future in [f for f in pending if f.done()]:
                    settle(future)
            wait(list(pending))  # arrived before the deadline: each fetch finishes within its own timeout
            for future in list(pending):
                settle(future)

    def _screen_outliers(self, job: _Job, collected: dict[str, _Collected], refused: dict[str, str]) -> None:
        """Refuse updates that moved the model `max_norm_ratio` times further than the median update:
        a scaled or random update would otherwise dominate FedAvg. Needs at least three updates."""
        if len(collected) < 3 or not job.spec.max_norm_ratio or job.spec.secure_aggregation:
            return  # masked updates have no meaningful norm: secure aggregation trades this screen away
        from ..aggregate import update_norm

        norms = {w: update_norm(c.weights, job.weights) for w, c in collected.items()}
        typical = sorted(norms.values())[len(norms) // 2]
        for worker, norm in norms.items():
            if typical > 0 and norm > job.spec.max_norm_ratio * typical:
                reason = f"outlier norm: {norm:.3g} vs median {typical:.3g}"
                refused[worker] = reason
                del collected[worker]
                self._reject(None, worker, reason)

    def _close_round(self, job: _Job, r: int, collected: dict[str, _Collected], refused: dict[str, str],
                     attempts: int, started: float, dropped_before: int, try_: int = 1) -> tuple[RoundResult, str]:
        """Aggregate, evaluate, judge by the acceptance rule, append the block; (result, the rule's why)."""
        spec = job.spec
        ordered = [collected[w] for w in sorted(collected)]  # deterministic order: verify recomputes this
        extends = job.extends  # what every collected update names as its head (_check_history)
        # append(extends=) refuses if the head moved, so the block lands at exactly this seq
        seq = self._seq_of(extends) + 1
        # the context chain verify supplies from the chain: the newest accepted weights, the block's
        # position (dp-fedavg's noise seed) and the strategy's server state
        try:
            result = run(job.strategy, [(c.weights, c.update.num_examples) for c in ordered],
                         RoundContext(job.weights, r, seq, job.state))
        except StrategyError as exc:
            raise JobFailed(f"round {r} of job {job.message.job}: {exc}") from None
        new_weights = result.weights
        new_cid = cid_str(self.ipfs.add(weights_to_bytes(new_weights)))
        rejected: dict[str, int] = {}
        for reason in refused.values():
            kind = reason.split(":")[0]
            rejected[kind] = rejected.get(kind, 0) + 1
        metrics = _weighted_metrics(ordered)
        metrics.update(self._evaluate(job.model, new_weights, job.eval_xy))
        metrics.update(rejected_updates=float(len(refused)), attempts=float(attempts),
                       dropped_messages=float(sum(self.dropped.values()) - dropped_before))
        params = dict(spec.aggregation_params)
        accepted, why = True, ""
        if job.accept is not None:
            try:
                accepted, why = job.accept.check(metrics, job.baseline)
            except ValueError as exc:
                raise JobFailed(f"round {r} of job {job.message.job}: {exc}") from None
            metrics["accepted"] = 1.0 if accepted else 0.0
            params["accept"] = str(job.accept)
        updates = [update_entry(messages.Envelope(c.update, c.worker), self._put_message(c.message))
                   for c in ordered]
        name, contest = spec.aggregation, None
        if spec.miners:  # our aggregate becomes a candidate that the miners' rivals may beat
            candidate = self._block(job.message.job, r, job.message.model, new_cid, name, updates, metrics, params)
            contest = self._contest(job, r, candidate, ordered, new_weights)
            if contest.accepted or job.accept is None:
                name, params, new_weights, new_cid, metrics = (contest.aggregation, contest.params, contest.weights,
                                                               contest.weights_cid, contest.metrics)
            accepted, why = contest.accepted, contest.why
            metrics.update(proposals=float(len(contest.proposals) - 1), refused_proposals=float(contest.refused))
        block = self._block(job.message.job, r, job.message.model, new_cid, name, updates, metrics,
                            params, weights=new_weights)
        if contest is not None:
            if "pofl" in block.get("ext", {}):
                raise JobFailed(f"round {r}: block field ext.pofl is the contest's record; a callback set it too")
            block["ext"] = {**block.get("ext", {}), "pofl": contest.pofl}
        try:
            head = cid_str(job.chain.append(block, self.identity, extends=extends))
        except ChainError as exc:
            raise JobFailed(f"round {r} of job {job.message.job}: {exc}; its workers signed their updates against "
                            f"{cid_str(extends)}: stop the other writer") from None
        self._pin(job, head)
        outcome = RoundResult(r, new_cid, head, len(ordered), metrics, time.monotonic() - started, attempts,
                              rejected, accepted, try_)
        if contest is not None:
            outcome.winner, outcome.proposals = contest.winner, contest.proposals
        if not accepted:  # the global model stays; the rejected candidate is in the chain for the record
            return outcome, why
        self._publish(messages.Head(job=job.message.job, round=r, head=head, weights=new_cid))
        job.weights, job.baseline, job.state = new_weights, metrics, result.state
        for cb in self.callbacks:
            cb.on_round_end(outcome)
        return outcome, why

    def _contest(self, job: _Job, r: int, fields: dict, ordered: list[_Collected], own_weights: list) -> _Contest:
        """Proof of federated learning (`grid_ipfs.contest`): stage `fields` as the round's candidate, ask
        the miners for rivals, check and evaluate each on our data; the best that clears the rule wins."""
        spec = job.spec
        try:
            candidate_cid = cid_str(job.chain.stage(fields, self.identity, extends=job.extends))
        except ChainError as exc:
            raise JobFailed(f"round {r} of job {job.message.job}: {exc}: stop the other writer") from None
        candidate = decode_block(self.ipfs.block_get(candidate_cid), candidate_cid)
        propose = messages.Propose(job=job.message.job, round=r, candidate=candidate_cid,
                                   reference=job.result.weights, deadline=time.time() + spec.proposal_timeout)
        self._publish(propose)
        base = {k: v for k, v in fields["metrics"].items() if not k.startswith("val_") and k != "accepted"}
        own = fields["aggregation"]
        entries = [_Entry(self.identity.id, candidate_cid, own["name"], own["params"], own_weights, fields["weights"],
                          {**base, **{k: v for k, v in fields["metrics"].items() if k.startswith("val_")}})]
        proposals = [{"signer": self.identity.id, "block": candidate_cid, "verdict": ""}]
        results = [(c.weights, c.update.num_examples) for c in ordered]
        like = job.weights
        answered: set[str] = set()
        refused = 0
        next_announce = time.monotonic() + REANNOUNCE_EVERY
        while len(answered) < spec.miners and time.time() < propose.deadline:
            if time.monotonic() >= next_announce:  # pubsub is lossy, and a miner may subscribe late
                self._publish(propose)
                next_announce = time.monotonic() + REANNOUNCE_EVERY
            self._drain(job, min(0.2, max(0.0, propose.deadline - time.time())))
            taken, job.proposals = job.proposals, []
            for proposal, sender in taken:
                if proposal.candidate != candidate_cid or proposal.round != r:
                    self._drop("late", f"proposal for another candidate from {sender[:12]}")
                elif self.allowed_miners is not None and sender not in self.allowed_miners:
                    self._drop("not allowed", f"proposal from {sender[:12]}")
                elif sender in answered:
                    self._drop("replay", f"second proposal from {sender[:12]} for round {r}")
                else:
                    answered.add(sender)
                    try:
                        rival, weights = check_rival(
                            self.ipfs.block_get(proposal.block, timeout=FETCH_TIMEOUT), proposal.block, candidate,
                            results, job.weights, lambda cid: weights_from_bytes(
                                self.ipfs.cat(cid, max_size=MAX_WEIGHTS_BYTES, timeout=FETCH_TIMEOUT),
                                source=f"weights {cid}", like=like))
                        if rival["signer"] != sender:
                            raise ContestError(f"block signed by {rival['signer'][:12]}, not by its proposer")
                        check_rival_fields(rival)
                        if job.strategy.adds_noise and rival["aggregation"]["name"] != own["name"]:
                            raise ContestError(f"this job's privacy needs {own['name']}; the rival uses "
                                               f"{rival['aggregation']['name']}")
                    except (ContestError, IPFSError, PayloadError) as exc:
                        refused += 1
                        log.warning("round %d: refused the proposal of miner %s: %s", r, sender[:12], exc)
                        continue
                    entries.append(_Entry(sender, proposal.block, rival["aggregation"]["name"],
                                          rival["aggregation"]["params"], weights, cid_str(rival["weights"]),
                                          {**base, **self._evaluate(job.model, weights, job.eval_xy)}))
                    proposals.append({"signer": sender, "block": proposal.block, "verdict": ""})
        winner, verdicts = best([e.metrics for e in entries], job.accept, job.baseline)
        metric, _ = score_key(job.accept)
        for row, entry, verdict in zip(proposals, entries, verdicts):
            row.update(verdict=verdict, score=entry.metrics.get(metric))
        if len(answered) < spec.miners:
            log.info("round %d: %d of %d miners proposed within %.0fs", r, len(answered), spec.miners,
                     spec.proposal_timeout)
        chosen = entries[winner if winner is not None else 0]
        metrics = dict(chosen.metrics)
        if job.accept is not None:
            metrics["accepted"] = 1.0 if winner is not None else 0.0
        why = verdicts[winner] if winner is not None else "; ".join(
            f"{e.signer[:12]}: {v}" for e, v in zip(entries, verdicts))
        if winner is not None:
            log.info("round %d: %s's %s aggregate wins (%s) among %d candidate(s)", r, chosen.signer[:12],
                     chosen.aggregation, verdicts[winner], len(entries))
        pofl = pofl_record(chosen.signer if winner is not None else None,
                           chosen.block if winner is not None else None, [e.block for e in entries],
                           self._endorsement_links(job))
        return _Contest(winner is not None, why, chosen.aggregation, dict(chosen.params), chosen.weights,
                        chosen.weights_cid, metrics, pofl, chosen.signer if winner is not None else "", proposals,
                        refused)

    def _await_endorsements(self, job: _Job) -> None:
        """After the last round, give the miners that proposed in it time to check the final block."""
        if not job.spec.miners or not job.result.rounds:
            return
        last = job.result.rounds[-1]
        expected = {p["signer"] for p in last.proposals[1:]}
        deadline = time.monotonic() + job.spec.proposal_timeout
        while not expected <= set(job.endorsements.get(last.round, {})) and time.monotonic() < deadline:
            self._drain(job, 0.2)
        for outcome in job.result.rounds:
            outcome.endorsements = dict(job.endorsements.get(outcome.round, {}))

    def _endorsement_links(self, job: _Job) -> list:
        """The miners' signed endorsements of the newest block, each stored as a raw block (the message
        bytes exactly as signed, so anyone can check them): the block about to be appended links them."""
        head = job.chain.head
        signed = job.endorse_messages.get(cid_str(parse_cid(head)), {}) if head is not None else {}
        return [self._put_message(signed[miner]) for miner in sorted(signed)]

    def _put_message(self, data: bytes):
        """Store a signed message as published, as a raw block (so a block can link it); its CID."""
        cid = self.ipfs.block_put(data, codec="raw")
        if not same_cid(cid, message_cid(data)):
            raise JobFailed(f"the daemon stored a message as {cid_str(cid)}, not {cid_str(message_cid(data))}")
        return cid

    def _endorsed(self, job: _Job, endorse: messages.Endorse, sender: str, data: bytes) -> None:
        if self.allowed_miners is not None and sender not in self.allowed_miners:
            self._drop("not allowed", f"endorsement from {sender[:12]}")
            return
        job.endorsements.setdefault(endorse.round, {})[sender] = endorse.verdict
        job.endorse_messages.setdefault(cid_str(parse_cid(endorse.head)), {})[sender] = bytes(data)
        if endorse.verdict != "accepted":
            log.warning("round %d: miner %s disputes block %s: %s", endorse.round, sender[:12], endorse.head,
                        printable(endorse.verdict))

    def _pin(self, job: _Job, head: str) -> None:
        """Hold a recursive pin on `head` instead of the previous one: the owner's node then keeps the whole
        history (every block and what it links, the workers' updates included) through garbage
        collection, whoever else goes offline. A failed pin costs a warning; the next head tries again."""
        try:
            self.ipfs.pin_update(job.pinned, head, timeout=PIN_TIMEOUT)
        except IPFSError as exc:
            # e.g. the old pin is gone (unpinned by hand, or a timed-out update that the daemon finished):
            # pin the new head on its own, or every later move would fail the same way
            log.warning("job %s: could not move the pin to head %s (%s); pinning it afresh", job.message.job, head, exc)
            try:
                self.ipfs.pin_add(head, timeout=PIN_TIMEOUT)
            except IPFSError as again:
                log.warning("job %s: could not pin head %s (the previous pin stays): %s", job.message.job, head, again)
                return
        job.pinned = head

    def _seq_of(self, cid) -> int:
        return decode_block(self.ipfs.block_get(cid), cid)["seq"]

    # -- messages --------------------------------------------------------------------------------------

    def _check_update(self, update: messages.Update, sender: str, expected: set[str],
                      collected: dict, refused: dict) -> str | None:
        if self.allowed_workers is not None and sender not in self.allowed_workers:
            return "not allowed: worker not on the allow-list"
        if sender not in expected:
            return "not selected: worker not asked for this round"
        if sender in collected:
            return "replay: second update from this worker for this round"
        if sender in refused:
            return "refused: this worker's update for this round was already refused"
        return None

    @staticmethod
    def _check_claim(job: _Job, update: messages.Update, sender: str) -> str | None:
        """FedAvg weighs an update by its `num_examples`: a worker cannot raise it past what it claimed
        when it joined, nor past the owner's `max_examples` (which also refused larger joins)."""
        joined = job.workers.get(sender)
        if joined is not None and update.num_examples > joined.num_examples:
            return (f"inflated: num_examples {update.num_examples} is more than the {joined.num_examples} "
                    "claimed at join")
        ceiling = job.spec.max_examples
        if ceiling is not None and update.num_examples > ceiling:
            return f"inflated: num_examples {update.num_examples} is over the job's max_examples {ceiling}"
        return None

    def _reject(self, r: int | None, sender: str, reason: str) -> None:
        self.dropped["rejected update"] = self.dropped.get("rejected update", 0) + 1
        log.warning("round %s: rejected update from %s: %s", r if r is not None else "?", sender[:12],
                    printable(reason, 300))

    def _drain(self, job: _Job, timeout: float, round_: messages.Round | None = None,
               first_attempt: int = 1) -> list[tuple[messages.Update, str, bytes]]:
        """Handle what arrived on the job topic within `timeout`; return the updates for `round_` (from
        attempt `first_attempt` on: earlier attempts belong to a rejected try of the round) with their
        sender and bytes as published. No message
        ends the job: whatever decoding one raises is a `malformed` drop, whatever handling it raises a
        `failed` drop, each one log line (only JobFailed, KeyboardInterrupt and the like pass)."""
        updates = []
        end = time.monotonic() + timeout
        while True:
            try:
                raw = self.inbox.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return updates
            try:
                envelope = messages.decode(raw.data)
            except Exception as exc:  # noqa: BLE001 - MessageError, or anything decode failed to foresee
                self._drop("malformed", f"from peer {raw.sender[-8:]}: {exc}")
                continue
            try:
                if self._handle(job, envelope, raw.data, round_, first_attempt):
                    updates.append((envelope.message, envelope.sender, bytes(raw.data)))
                    end = time.monotonic()  # hand it over now; anything else already queued comes along
            except JobFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - a peer may cost a log line, never the job
                self._drop("failed", f"{envelope.message.TYPE} from {envelope.sender[:12]}: handling it raised "
                                     f"{type(exc).__name__}: {' '.join(str(exc).split())}")

    def _handle(self, job: _Job, envelope: messages.Envelope, data: bytes, round_: messages.Round | None,
                first_attempt: int) -> bool:
        """Act on one verified message of the job topic; True for an update of `round_` to collect."""
        msg, sender = envelope.message, envelope.sender
        if getattr(msg, "job", None) != job.message.job:
            self._drop("other job", f"{type(msg).__name__} for job {getattr(msg, 'job', '?')}")
        elif isinstance(msg, messages.Join):
            self._joined(job, msg, sender, round_)
        elif isinstance(msg, messages.Update):
            if round_ is None or msg.round != round_.round or msg.attempt < first_attempt:
                self._drop("late", f"update for round {msg.round} (attempt {msg.attempt}) from {sender[:12]}")
            else:
                return True
        elif isinstance(msg, messages.Proposal):
            job.proposals.append((msg, sender))
        elif isinstance(msg, messages.Endorse):
            self._endorsed(job, msg, sender, data)
        elif sender != self.identity.id:
            self._drop("not from a worker", f"{msg.TYPE} message from {sender[:12]}")
        # our own round/head/done messages come back to us: nothing to do
        return False

    def _joined(self, job: _Job, join: messages.Join, sender: str, round_: messages.Round | None) -> None:
        if self.allowed_workers is not None and sender not in self.allowed_workers:
            self._drop("not allowed", f"join from {sender[:12]} ({join.name})")
            return
        if job.spec.max_examples is not None and join.num_examples > job.spec.max_examples:
            self._drop("too many examples", f"join from {sender[:12]} ({join.name}) claims {join.num_examples} "
                                            f"examples, over the job's max_examples {job.spec.max_examples}")
            return
        if job.spec.secure_aggregation and join.mask_key is None:
            self._drop("no mask key", f"join from {sender[:12]} ({join.name}) without a key for secure aggregation")
            return
        if join.mask_key is not None and not mask_key_is_signed(job.message.job, sender, join.mask_key, join.mask_sig):
            self._drop("bad mask signature", f"join from {sender[:12]} ({join.name}): mask key not signed by it")
            return
        if sender not in job.workers or job.workers[sender].mask_key != join.mask_key:  # a restarted worker: new key
            job.workers[sender] = join
            self._last_join = time.monotonic()
            for cb in self.callbacks:
                cb.on_worker_joined(sender, join.name, len(job.workers), job.spec.min_workers)
        if round_ is not None:
            # A join during a round comes from a worker that (re)started after the round was announced
            # and so missed it: announce it again (workers ignore a round message they already answered).
            self._publish(round_)

    def _drop(self, kind: str, detail: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        log.info("dropped a message (%s): %s", kind, printable(detail, 300))

    def _publish(self, message) -> bool:
        topic = self.jobs_topic if isinstance(message, messages.Job) else messages.topic_of(message)
        return self.ipfs.pubsub_publish(topic, messages.encode(message, self.identity))

    def _block(self, job_id, r, model_cid, weights_cid, aggregation, updates, metrics, params=None, *,
               weights: list | None = None) -> dict:
        """A block's fields; with the block's global `weights`, plus the callbacks' `block_fields` as `ext`."""
        block = {"job": job_id, "round": r, "model": model_cid, "weights": weights_cid,
                 "aggregation": {"name": aggregation, "params": dict(params or {})}, "updates": updates,
                 "metrics": metrics,
                 "time": time.time()}
        if weights is None:
            return block
        from ..chain.blocks import normalise_ext

        ext: dict = {}
        owner: dict[str, str] = {}  # ext key -> the callback that set it
        for cb in self.callbacks:
            name = type(cb).__name__
            fields = cb.block_fields(r, [w.copy() for w in weights],
                                     [{**u, "metrics": dict(u["metrics"])} for u in updates], dict(metrics))
            if fields is not None and not isinstance(fields, dict):
                raise JobFailed(f"round {r}: {name}.block_fields returned {type(fields).__name__}, "
                                "expected a dict or None")
            try:
                fields = normalise_ext(fields)  # numpy values made plain, then checked; {} -> None
            except ChainError as exc:
                raise JobFailed(f"round {r}: {name}.block_fields: {exc}") from None
            if fields is None:
                continue
            for key in fields:
                if key in ext:
                    raise JobFailed(f"round {r}: block field ext.{key} is set by both {owner[key]} and {name}")
                owner[key] = name
            ext.update(fields)
        if ext:
            block["ext"] = ext
        return block

    @staticmethod
    def _evaluate(model, weights, eval_xy) -> dict:
        if eval_xy is None:
            return {}
        from ..training import evaluate

        return {f"val_{k}": v for k, v in evaluate(model, weights, *eval_xy).items()}


def _check_spec(spec: JobSpec, weights: list, eval_xy) -> AcceptRule | None:
    """Fail before anything is published: the rule and its params must work (tried on the initial
    weights), and an acceptance rule on the client's evaluation needs the eval data. Returns the parsed
    acceptance rule."""
    for name in ("rounds", "epochs", "batch_size"):  # what the job message carries: the same bounds as decode
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
            raise JobFailed(f"{name} must be an integer in 1..{MAX_COUNT}, got {value!r}")
    if spec.max_examples is not None and (isinstance(spec.max_examples, bool) or not isinstance(spec.max_examples, int)
                                          or not 1 <= spec.max_examples <= MAX_NUM_EXAMPLES):
        raise JobFailed(f"max_examples must be an integer in 1..{MAX_NUM_EXAMPLES} or None, got {spec.max_examples!r}")
    strategy = spec.strategy  # the range check chain verify applies too
    trial = weights if strategy.readable_updates else masked_like(weights)
    try:
        run(strategy, [(trial, 1)] * max(1, spec.min_workers), RoundContext(weights, 1, 1))
    except (ValueError, TypeError) as exc:
        raise JobFailed(f"aggregation {spec.aggregation} with {spec.aggregation_params}: {exc}") from None
    if not (math.isfinite(spec.proximal_mu) and spec.proximal_mu >= 0):
        raise JobFailed(f"proximal_mu must be a finite number >= 0, got {spec.proximal_mu}")
    if spec.secure_aggregation != (not strategy.readable_updates):
        raise JobFailed(f"secure aggregation and the {' / '.join(SECURE_RULES)} rules go together "
                        "(--secure-aggregation)")
    if spec.secure_aggregation and spec.miners:
        raise JobFailed("secure aggregation hides single updates, so miners cannot aggregate them their way")
    if spec.miners and eval_xy is None:
        raise JobFailed("with miners the client evaluates every rival aggregate itself: pass --eval-data")
    if spec.miners < 0 or not spec.proposal_timeout > 0:
        raise JobFailed("miners must be >= 0 and the proposal timeout > 0")
    if spec.accept is None:
        return None
    try:
        rule = parse_accept(spec.accept)
    except ValueError as exc:
        raise JobFailed(str(exc)) from None
    if rule.metric.startswith("val_") and eval_xy is None:
        raise JobFailed(f"acceptance rule {rule} is about the client's evaluation: pass --eval-data")
    return rule


def _check_history(update: messages.Update, round_msg: messages.Round) -> str | None:
    """An update counts only if it is signed against the round's head and base weights: the block will
    link the message, and `chain verify` holds the block to what it says."""
    if update.head is None or update.base is None:
        return "unbound: the update names no chain head or base weights"
    if not same_cid(update.head, round_msg.head) or not same_cid(update.base, round_msg.weights):
        return f"stale: the update extends head {update.head} from {update.base}, not this round's head"
    return None


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
    from ..data import check_shard_for_model, load_shard

    x, y = load_shard(path)
    check_shard_for_model(x, y, tuple(model.input_shape))
    return x, y

