"""`Client`: one job's rounds, from the genesis block to the last head, as an event loop.

A round announces the global weights, drains the job topic for updates (`inbox`, `collect`), asks the
job's strategy for the aggregate, lets the miners compete when the job has any (`pofl`), judges the
result by the acceptance rule and appends one block. What a rule computes lives in
`grid_ipfs.strategies`, the block format in `grid_ipfs.chain`; nothing a peer sends can end the loop.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from .. import messages
from ..chain import ChainError, ChainLog, walk
from ..chain.contributions import message_cid, update_entry
from ..chain.verify import is_accepted
from ..identity import Identity
from ..ipfs import IPFSError, cid_str, parse_cid
from ..ipfs.rpc import IPFSClient
from ..payloads import PayloadError, weights_to_bytes
from ..runtime import between_rounds
from ..strategies import Aggregate, RoundContext, StrategyError, run, streams
from ..text import printable
from . import buffered
from .blocks import callback_fields, evaluate, round_block, weighted_metrics
from .collect import Collected, Stream, collect, fetch_update, screen_outliers, selection, store_message
from .inbox import REANNOUNCE_EVERY, Inbox
from .job import CallbackList, ClientCallback, JobFailed, JobResult, JobSpec, RoundResult, load_eval
from .pofl import await_endorsements, run_contest
from .state import Accepted, JobRun

log = logging.getLogger("grid_ipfs.client")

JOIN_GRACE = 1.0  # seconds without a new join before round 1 starts, once --min-workers have joined
PIN_TIMEOUT = 120.0  # seconds for the recursive pin of a new head (local objects only: it is a walk, not a fetch)
PIN_SHARE = 0.1
"""The most of its time the pin thread spends moving a job's pin. On js-ipfs each move walks the whole
chain (Kubo diffs the two heads), so on a long job moves every round would keep the owner's daemon busy
and slow every round; instead each move is followed by a rest nine times its length. The newest head is
always pinned before the job returns."""


class Client:
    """Runs jobs on one daemon with one identity: `submit` a new one or `resume` one from its chain."""

    def __init__(self, ipfs: IPFSClient, identity: Identity, *, head_dir: Path | None = None,
                 callbacks: list[ClientCallback] | None = None, allowed_workers: set[str] | None = None,
                 jobs_topic: str = messages.JOBS_TOPIC, allowed_miners: set[str] | None = None):
        self.ipfs = ipfs
        self.identity = identity
        self.jobs_topic = jobs_topic
        self.head_dir = Path(head_dir) if head_dir else Path.home() / ".grid_ipfs" / "chains"
        self.callbacks = CallbackList(callbacks)
        self.allowed_workers = allowed_workers
        self.allowed_miners = allowed_miners
        self._pins = ThreadPoolExecutor(1, thread_name_prefix="pin")
        """Moves each job's pin to its newest head while the next round runs: a recursive pin walks the
        whole chain, so it would otherwise lengthen every round as the chain grows."""

    def head_file(self, job_id: str) -> Path:
        return self.head_dir / f"{job_id}.head"

    # -- starting a job --------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobResult:
        """Add the model and initial weights, write the genesis block, announce the job, run every round."""
        from ..payloads import model_from_bytes

        model_bytes = spec.model_path.read_bytes()
        model = model_from_bytes(model_bytes, source=str(spec.model_path))
        weights = [w.copy() for w in model.get_weights()]
        eval_xy = load_eval(spec.eval_data, model) if spec.eval_data else None
        accept = spec.preflight(weights, eval_xy is not None)
        job_id = spec.job_id or f"{spec.model_path.stem}-{secrets.token_hex(4)}"
        chain = ChainLog(self.ipfs, self.head_file(job_id))
        if chain.head is not None:
            raise JobFailed(f"job {job_id} already has a chain (head file {chain.head_file}); "
                            f"continue it with `client resume --job {job_id}` or pick another --job")
        model_cid = cid_str(self.ipfs.add(model_bytes))
        weights_cid = cid_str(self.ipfs.add(weights_to_bytes(weights)))
        metrics = evaluate(model, weights, eval_xy)
        genesis = cid_str(chain.append({**round_block(job_id, 0, model_cid, weights_cid, "init", {}, [], metrics),
                                        "config": spec.config()}, self.identity))
        job = JobRun(self._job_message(job_id, model_cid, spec), spec, chain, model, eval_xy, spec.strategy,
                     Accepted(genesis, 0, weights, weights_cid, metrics), JobResult(job_id, model_cid, genesis,
                                                                                    weights_cid), accept)
        buffered.note_head(job, genesis, 0, True, weights_cid)
        self._pin(job, genesis)
        return self._run(job, first_round=1)

    def resume(self, *, head: str | None = None, job_id: str | None = None, eval_data: Path | None = None,
               **overrides) -> JobResult:
        """Continue a job from its chain: the round after the newest block, with the genesis config.

        The head comes from `head` or from the job's head file. Only the job's owner can resume it
        (workers follow rounds signed by the owner only), and no round is run twice: the chain says
        which rounds are done. Training continues from the newest *accepted* block (a newest block
        rejected by the acceptance rule means its round is tried again), with the strategy's server
        state replayed from genesis.
        """
        from ..chain import write_head
        from ..chain.export import load_global_model

        head = cid_str(parse_cid(head)) if head is not None else self._head_on_file(job_id)
        blocks = list(walk(self.ipfs, head))
        genesis = blocks[-1][1]
        kept_cid, kept = next((cid, block) for cid, block in blocks if is_accepted(block))  # genesis always is
        if genesis["signer"] != self.identity.id:
            raise JobFailed(f"job {genesis['job']} is owned by {genesis['signer']}; resume it with that key")
        job_id = genesis["job"]
        chain = ChainLog(self.ipfs, self.head_file(job_id))
        if chain.head is not None and cid_str(chain.head) != head:
            raise JobFailed(f"head file {chain.head_file} names {cid_str(chain.head)}, not {head}: "
                            "resume from the head file (omit --head) or remove it")
        if chain.head is None:
            chain.head_file.parent.mkdir(parents=True, exist_ok=True)
            write_head(chain.head_file, head)
        spec = JobSpec.from_config(genesis.get("config", {}), job_id=job_id, eval_data=eval_data, **overrides)
        model, weights = load_global_model(self.ipfs, genesis, kept)
        eval_xy = load_eval(eval_data, model) if eval_data else None
        accept = spec.preflight(weights, eval_xy is not None)
        accepted = Accepted(cid_str(kept_cid), kept["seq"], weights, cid_str(kept["weights"]), dict(kept["metrics"]),
                            self._replay_state(spec, head))
        model_cid = cid_str(genesis["model"])
        log.info("resuming job %s after round %d of %d (head %s)", job_id, kept["round"], spec.rounds, head)
        job = JobRun(self._job_message(job_id, model_cid, spec), spec, chain, model, eval_xy, spec.strategy,
                     accepted, JobResult(job_id, model_cid, head, accepted.weights_cid), accept)
        _note_heads(job, blocks)
        self._pin(job, head)
        return self._run(job, first_round=kept["round"] + 1)

    def _head_on_file(self, job_id: str | None) -> str:
        if job_id is None:
            raise JobFailed("resume needs a chain head CID or a job id")
        found = ChainLog(self.ipfs, self.head_file(job_id)).head
        if found is None:
            raise JobFailed(f"no head file for job {job_id} in {self.head_dir}; pass --head CID")
        return cid_str(found)

    def _replay_state(self, spec: JobSpec, head: str):
        """A stateful strategy's server state after the newest accepted block, replayed by verifying the
        chain from genesis (never read from a file or a block), exactly as an auditor derives it."""
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
        if spec.compression:
            config["compression"] = spec.compression
        config.update(spec.strategy.fit_config())  # what the workers need for the rule (Flower's configure_fit)
        if spec.async_config is not None:
            config["mode"] = "async"  # workers take the newest head announced while they trained
        return messages.Job(job=job_id, model=model_cid, owner=self.identity.id, config=config)

    # -- the loop --------------------------------------------------------------------------------------

    def _run(self, job: JobRun, first_round: int) -> JobResult:
        inbox = Inbox(job, self.identity.id, callbacks=self.callbacks, allowed_workers=self.allowed_workers,
                      allowed_miners=self.allowed_miners, publish=self.publish)
        self.callbacks.on_job_start(job.message, job.result.head)
        subscription = self.ipfs.pubsub_subscribe(messages.job_topic(job.id), on_message=inbox.put)
        try:
            subscription.wait_ready()
            if first_round <= job.spec.rounds:
                self._gather_workers(inbox)
            for r in range(first_round, job.spec.rounds + 1):
                between_rounds()  # frees what the last round left in reference cycles (CLI only)
                job.result.rounds.append(self._run_round(inbox, r))
            await_endorsements(job, inbox)
            self.publish(messages.Done(job=job.id, head=job.result.head, reason="completed"))
        except BaseException as exc:
            self.callbacks.on_job_failed(job.message, exc)
            try:  # tell the workers, so they stop following the job (best effort: we are failing anyway)
                reason = printable(f"failed: {' '.join(str(exc).split()) or type(exc).__name__}", 200)
                self.publish(messages.Done(job=job.id, head=job.result.head, reason=reason))
            except Exception:  # noqa: BLE001 - the original error is what the caller needs
                log.debug("could not announce the failure of job %s", job.id, exc_info=True)
            raise
        finally:
            subscription.close()
            if job.pinning is not None:
                job.pin_now.set()  # no more resting: the newest head is pinned before the job returns
                job.pinning.result()
        job.result.dropped, job.result.rejected = dict(job.dropped), dict(job.rejected)
        self.callbacks.on_job_end(job.result)
        return job.result

    def _gather_workers(self, inbox: Inbox) -> None:
        """Announce the job (again every few seconds: pubsub is lossy) until enough workers joined and
        none joined for a moment: workers answering the same announcement all start in round 1."""
        job, spec = inbox.job, inbox.job.spec
        deadline = time.monotonic() + spec.join_timeout
        job.last_join = time.monotonic()
        while len(job.workers) < spec.min_workers or time.monotonic() - job.last_join < JOIN_GRACE:
            now = time.monotonic()
            if now > deadline:
                if len(job.workers) >= spec.min_workers:
                    break
                raise JobFailed(f"only {len(job.workers)} of {spec.min_workers} workers joined job {job.id} "
                                f"within {spec.join_timeout:.0f}s (are workers running on connected daemons?)")
            self.announce(job)
            inbox.drain(min(0.2, max(0.0, deadline - now)))

    def _run_round(self, inbox: Inbox, r: int) -> RoundResult:
        """One round. With an acceptance rule, an aggregate that fails it is appended as a rejected block
        and the round is tried again with fresh updates, at most `accept_retries` times."""
        job, started = inbox.job, time.monotonic()
        dropped_before = job.dropped.total()
        tries = job.spec.accept_retries + 1 if job.accept is not None else 1
        attempt, why = 0, ""
        gather = partial(buffered.gather, self) if job.spec.async_config is not None else self._gather_updates
        for try_ in range(1, tries + 1):
            collected, refused, attempt, stream = gather(inbox, r, attempt)
            outcome, why = self._close_round(inbox, r, collected, refused, attempt, started, dropped_before, try_,
                                             stream)
            if outcome.accepted:
                return outcome
            job.result.turned_down.append(outcome)
            self.callbacks.on_round_rejected(outcome, why)
            log.warning("round %d of job %s: aggregate rejected (%s)%s", r, job.id, why,
                        f"; trying the round again ({try_ + 1} of {tries})" if try_ < tries else "")
        raise JobFailed(f"round {r} of job {job.id}: every aggregate failed the acceptance rule {job.accept} "
                        f"({tries} tries; last: {why}); the rejected tries are in the chain, head {job.result.head}")

    def _gather_updates(self, inbox: Inbox, r: int, after_attempt: int) -> tuple[dict, dict, int, Stream | None]:
        """Announce round `r` and collect until `min_workers` good updates arrived; an attempt short of
        them at its deadline is announced again (same global weights), at most `max_retries` times.
        Updates of earlier attempts of this call still count; those of attempts up to `after_attempt`
        (a rejected try of the round) do not. Returns (collected, refused, last attempt number, and the
        stream their weights went into, or None when the rule needs them all at once)."""
        job, spec = inbox.job, inbox.job.spec
        collected: dict[str, Collected] = {}
        refused: dict[str, str] = {}  # worker -> reason its update was refused this round
        first, secure, selected = after_attempt + 1, not job.strategy.readable_updates, None
        job.extends = cid_str(job.chain.head)
        stream = self._stream(job, r)
        for attempt in range(first, first + spec.max_retries + 1):
            self.announce(job)
            selected, collected, refused = selection(job, r, attempt == first, selected, collected, refused)
            if stream is not None and not collected:
                stream.reset()  # a secure round starts over with a fixed set
            round_msg = messages.Round(job=job.id, round=r, weights=job.accepted.weights_cid,
                                       deadline=time.time() + spec.round_timeout, selected=selected, attempt=attempt,
                                       head=job.extends,
                                       mask_keys={w: job.workers[w].mask_key for w in selected} if secure else None,
                                       mask_sigs={w: job.workers[w].mask_sig for w in selected} if secure else None)
            self.publish(round_msg)
            expected = set(selected) if selected is not None else set(job.workers)
            self.callbacks.on_round_start(r, len(expected), round_msg.deadline)
            collect(self.ipfs, inbox, round_msg, expected, collected, refused, attempt if secure else first,
                    allowed=self.allowed_workers, on_update=partial(self.callbacks.on_update, r), stream=stream)
            if secure and set(collected) != expected:  # a missing update leaves its masks in the sum
                log.warning("round %d of job %s: secure aggregation needs every selected worker; %d of %d "
                            "answered", r, job.id, len(collected), len(expected))
            else:
                screen_outliers(inbox, collected, refused)
                if len(collected) >= spec.min_workers:
                    return collected, refused, attempt, stream
            self.callbacks.on_round_retry(r, attempt - after_attempt, len(collected), spec.min_workers)
            if attempt < first + spec.max_retries:
                log.warning("round %d of job %s: %d of %d required updates by the deadline; announcing it again "
                            "(attempt %d of %d)", r, job.id, len(collected), spec.min_workers,
                            attempt - after_attempt + 1, spec.max_retries + 1)
        raise JobFailed(f"round {r} of job {job.id}: {len(collected)} of {spec.min_workers} required updates by "
                        f"the deadline ({spec.round_timeout:.0f}s), {spec.max_retries + 1} attempt(s)")

    def _close_round(self, inbox: Inbox, r: int, collected: dict[str, Collected], refused: dict[str, str],
                     attempts: int, started: float, dropped_before: int, try_: int = 1,
                     stream: Stream | None = None) -> tuple[RoundResult, str]:
        """Aggregate, evaluate, judge, append the block; (the round's result, the acceptance rule's why)."""
        job, spec = inbox.job, inbox.job.spec
        ordered = [collected[w] for w in sorted(collected)]  # the block lists updates by worker id
        seq = job.next_seq
        fold = None
        if stream is None:
            result = self._aggregate(job, r, seq, ordered)
        else:
            result, fold = self._finish(job, r, stream, collected)
        if spec.async_config is not None:  # the buffer's aggregate, a server_lr of the way from the global
            result = buffered.stepped(job, r, result)
        weights, weights_cid = result.weights, cid_str(self.ipfs.add(weights_to_bytes(result.weights)))
        metrics = {**weighted_metrics(ordered), **evaluate(job.model, weights, job.eval_xy),
                   **buffered.staleness_metrics(ordered),
                   "rejected_updates": float(len(refused)), "attempts": float(attempts),
                   "dropped_messages": float(job.dropped.total() - dropped_before),
                   **_time_split(ordered, time.monotonic() - started)}
        name, params = spec.aggregation, dict(spec.aggregation_params)
        accepted, why = _judge(job, r, metrics)
        if job.accept is not None:
            params["accept"] = str(job.accept)
        updates = [{**update_entry(messages.Envelope(c.update, c.worker),
                                   message_cid(c.message) if c.message_stored else store_message(self.ipfs, c.message)),
                    **buffered.entry_fields(c)} for c in ordered]
        contest = None
        if spec.miners:  # our aggregate becomes a candidate that the miners' rivals may beat
            candidate = round_block(job.id, r, job.message.model, weights_cid, name, params, updates, metrics)
            contest = run_contest(self, job, inbox, r, candidate, ordered, weights)
            if contest.accepted or job.accept is None:
                chosen = contest.chosen
                name, params, weights, weights_cid = chosen.aggregation, dict(chosen.params), chosen.weights, \
                    chosen.weights_cid
                metrics = contest.metrics
            accepted, why = contest.accepted, contest.why
            metrics.update(proposals=float(len(contest.proposals) - 1), refused_proposals=float(contest.refused))
        block = round_block(job.id, r, job.message.model, weights_cid, name, params, updates, metrics)
        ext = callback_fields(self.callbacks.callbacks, r, weights, updates, metrics)
        if contest is not None:
            if "pofl" in ext:
                raise JobFailed(f"round {r}: block field ext.pofl is the contest's record; a callback set it too")
            ext["pofl"] = contest.pofl
        if ext:
            block["ext"] = ext
        if fold is not None and fold != sorted(fold):  # the order the stream added them in, for verify
            position = {worker: i for i, worker in enumerate(sorted(collected))}
            block["fold"] = [position[worker] for worker in fold]
        head = self._append(job, r, block)
        buffered.remember_used(job, collected)
        buffered.note_head(job, head, r, accepted, weights_cid if accepted else job.accepted.weights_cid)
        outcome = RoundResult(r, weights_cid, head, len(ordered), metrics, time.monotonic() - started, attempts,
                              dict(Counter(reason.split(":")[0] for reason in refused.values())), accepted, try_)
        if contest is not None:
            outcome.winner, outcome.proposals = contest.winner, contest.proposals
        job.result.head = head
        if accepted:  # else the global model stays; the rejected candidate is in the chain for the record
            job.accepted = Accepted(head, seq, weights, weights_cid, metrics, result.state)
            job.result.weights = weights_cid
            self.publish(messages.Head(job=job.id, round=r, head=head, weights=weights_cid))
            self.callbacks.on_round_end(outcome)
        return outcome, why

    def _stream(self, job: JobRun, r: int) -> Stream | None:
        """A stream for round `r` when the rule folds and nothing needs every update's weights at the
        close: miners' rival aggregates are recomputed from them (so a job with miners holds them all)."""
        if not streams(job.strategy) or job.spec.miners:
            return None
        context = RoundContext(job.accepted.weights, r, job.next_seq, job.accepted.state)
        return Stream(job.strategy, context, lambda c: fetch_update(self.ipfs, job, c.update, c.worker))

    def _finish(self, job: JobRun, r: int, stream: Stream, collected: dict[str, Collected]
                ) -> tuple[Aggregate, list[str]]:
        try:
            return stream.result(collected)
        except (StrategyError, IPFSError, PayloadError) as exc:
            raise JobFailed(f"round {r} of job {job.id}: {exc}") from None

    def _aggregate(self, job: JobRun, r: int, seq: int, ordered: list[Collected]) -> Aggregate:
        """The strategy's aggregate, with the context chain verify supplies from the chain: the newest
        accepted weights, the block's position (dp-fedavg's noise seed) and the server state."""
        accepted = job.accepted
        try:
            return run(job.strategy, [(c.weights, c.update.num_examples) for c in ordered],
                       RoundContext(accepted.weights, r, seq, accepted.state))
        except StrategyError as exc:
            raise JobFailed(f"round {r} of job {job.id}: {exc}") from None

    def _append(self, job: JobRun, r: int, block: dict) -> str:
        """Append the round's block on the head its workers signed against; pin it in the background."""
        try:
            head = cid_str(job.chain.append(block, self.identity, extends=job.extends))
        except ChainError as exc:
            raise JobFailed(f"round {r} of job {job.id}: {exc}; its workers signed their updates against "
                            f"{cid_str(job.extends)}: stop the other writer") from None
        job.to_pin = head
        job.pinning = self._pins.submit(self._pin_newest, job)
        return head

    def _pin_newest(self, job: JobRun) -> None:
        """On the pin thread: move the pin to the newest head, once (later moves queued behind this one
        find it done), so a slow pin never queues up one walk of the chain per round; after the rest
        that keeps pinning to `PIN_SHARE` of the time, cut short when the job ends (`job.pin_now`)."""
        if job.to_pin is None or job.to_pin == job.pinned:
            return
        job.pin_now.wait(max(0.0, job.pin_rest_until - time.monotonic()))  # heads appended meanwhile: to_pin
        started = time.monotonic()
        self._pin(job, job.to_pin)
        job.pin_rest_until = started + (time.monotonic() - started) / PIN_SHARE

    # -- the daemon ------------------------------------------------------------------------------------

    def _pin(self, job: JobRun, head: str) -> None:
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


    def announce(self, job: JobRun) -> None:
        """Publish the job message again if the last time was `REANNOUNCE_EVERY` ago: pubsub is lossy, and
        late joiners and restarted workers learn about the job this way. Not every round: each joined
        worker answers it with a join (64 workers, 64 messages)."""
        if time.monotonic() - job.announced >= REANNOUNCE_EVERY:
            self.publish(job.message)
            job.announced = time.monotonic()

    def publish(self, message) -> bool:
        topic = self.jobs_topic if isinstance(message, messages.Job) else messages.topic_of(message)
        return self.ipfs.pubsub_publish(topic, messages.encode(message, self.identity))


def _note_heads(job: JobRun, blocks: list) -> None:
    """On resume, the chain's heads as bases of an async job's updates (oldest first; only the recent stay)."""
    weights = None
    for cid, block in reversed(blocks):
        accepted = is_accepted(block)
        if accepted:
            weights = cid_str(block["weights"])
        buffered.note_head(job, cid_str(cid), block["round"], accepted, weights)


def _judge(job: JobRun, r: int, metrics: dict) -> tuple[bool, str]:
    """(accepted, why) by the job's acceptance rule; records `accepted` in `metrics`. No rule: accepted."""
    if job.accept is None:
        return True, ""
    try:
        accepted, why = job.accept.check(metrics, job.accepted.metrics)
    except ValueError as exc:
        raise JobFailed(f"round {r} of job {job.id}: {exc}") from None
    metrics["accepted"] = 1.0 if accepted else 0.0
    return accepted, why


def _time_split(ordered: list[Collected], wall: float) -> dict:
    """The round so far as the critical path (the slowest worker's own `compute_s`: what the round would
    take if every worker had its machine and nothing else cost time) and the rest, `coordination_s`
    (announcing, waiting, fetching, aggregating: the price of decentralisation). The workers report their
    compute themselves; without it in every update, neither figure is recorded."""
    computes = [c.update.metrics.get("compute_s") for c in ordered]
    if not computes or not all(isinstance(c, float) and c >= 0 for c in computes):
        return {}
    critical = max(computes)
    return {"critical_path_s": critical, "coordination_s": wall - critical}
