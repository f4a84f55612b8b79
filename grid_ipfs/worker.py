"""The worker role: `python -m grid_ipfs.worker --api MULTIADDR --data PATH` (a shard, CSV or image folder).

A worker listens on the jobs topic, joins each job it can train (its data, `grid_ipfs.sources`, fits
the model's input), and for every round it is selected for: fetches the global weights by CID, evaluates them on its
validation split (federated evaluation), trains locally with the model's own compile settings (plus
FedProx's proximal term when the job's config sets `proximal_mu`), adds the new weights to IPFS and
announces them in a signed `update`. `Worker.local_update` is the one step that turns global weights into
the update sent: subclass it to simulate other behaviour (tests/byzantine_worker.py does).

Everything fetched is data: models are vetted against an allow-list before Keras loads them
(`grid_ipfs.vetting`), weights are safetensors whose shapes and dtypes must match the model. A message
that does not parse, validate or verify is dropped with one log line; it never stops the worker.
SIGINT/SIGTERM stop it between steps.

With `--isolate` each job's model is loaded and trained in its own child process under rlimits
(`grid_ipfs.sandbox`): a model that kills its child (memory, CPU, the round deadline, a crash) gets one
log line and the job is refused; the worker serves on.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import messages
from .data import DataError, train_val_split
from .identity import Identity, IdentityError, default_key_path
from .ipfs import IPFSError, cid_str
from .ipfs.pubsub import PubsubMessage
from .ipfs.rpc import IPFSClient
from .kerasstate import KERAS_LOCK
from .limits import check_number
from .payloads import PayloadError, fetch_weights
from .peer import Peer, connect
from .runtime import quiet_tensorflow
from .sandbox import IsolatedModel, Limits, TrainerDied, limits_from_args
from .sandbox import add_arguments as add_isolation_arguments
from .secagg import MaskKey, dp_share, mask_context, mask_update, sign_mask_key, unsigned_mask_keys
from .sources import Arrays, Loader, LocalData, open_data
from .text import printable
from .vetting import Policy, policy_from_args
from .vetting import add_arguments as add_vetting_arguments

log = logging.getLogger("grid_ipfs.worker")

MAX_EPOCHS = 100
"""Default `--max-epochs`: local epochs per round a worker agrees to (FedAvg jobs use 1-20)."""
HEAD_TIMEOUT = 30.0
"""Seconds to fetch a round's head block and walk from it to the last head we signed against."""
MAX_HISTORY_STEPS = 1000
"""Most blocks a round's head may lie above the last head we signed against (rounds we were not
selected for, retries): a longer walk is refused, so an owner cannot buy long walks with round messages."""
MAX_BATCH_SIZE = 65536
"""Default `--max-batch-size`: a batch's activations are what a round holds in memory at once."""


MAX_HELD_DATA_BYTES = 4 << 30
"""Most memory the examples held for joined jobs may take together. Each distinct model input shape
(a stranger's choice) gets its own fitted copy of the data (a folder of images loaded at that size); a
job that would take the total past this is refused. A job whose input is already held costs nothing
more, and the first job is never refused for it (a shard larger than this still trains)."""


class Split(NamedTuple):
    """A worker's examples for one job's model: what it trains on and what it evaluates the global on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass
class JoinedJob:
    job: messages.Job
    model: object  # keras.Model (or sandbox.IsolatedModel), loaded once per job: its optimizer state carries
    split: Split
    """Our examples fitted to this job's model input, split into training and validation."""
    mask_key: MaskKey | None = None
    """This job's X25519 key when the job asks for secure aggregation (announced in our join)."""
    done_rounds: set[tuple[int, int, float]] = field(default_factory=set)
    """(round, attempt, deadline) of the round messages already answered: pubsub may deliver a message
    twice, and a resumed client announces the same round again with a new deadline."""
    witness: object = None
    """The job's `chain.witness.Witness`, opened at the first round."""
    newest: messages.Round | None = None
    """Async jobs: the newest round announced and not yet trained on (`Worker.idle` takes it)."""


class Worker(Peer):
    """One worker process: local data, an identity, a daemon. `run()` until `stop()`.

    `data` is a `sources.LocalData` (a CSV export, a folder of images, the operator's loader) or an
    `(x, y)` pair of arrays; each job gets it fitted to its model's input, split by `val_split`."""

    log = log
    takes_part = "join"

    def __init__(self, client: IPFSClient, identity: Identity, data: LocalData | tuple, *, name: str = "worker",
                 val_split: float = 0.1, jobs_topic: str = messages.JOBS_TOPIC,
                 trusted_clients: set[str] | None = None, seed: int = 0, isolate: Limits | None = None,
                 isolated_jobs: int = 4, max_epochs: int = MAX_EPOCHS, max_batch_size: int = MAX_BATCH_SIZE,
                 policy: Policy | None = None, witness_dir: Path | None = None, slowdown: float = 1.0,
                 shared_models: SharedModels | None = None):
        super().__init__(client, identity, jobs_topic=jobs_topic, trusted_clients=trusted_clients, policy=policy)
        self.name = name
        self.witness_dir = witness_dir
        """Where the heads we signed against are recorded, one file per job (None: in memory only), so a
        restarted worker still refuses a rolled-back or forked history."""
        self.max_epochs, self.max_batch_size = max_epochs, max_batch_size
        """Ceilings on a job's local work per round (`--max-epochs`, `--max-batch-size`): a job over them
        is refused at join, before its model is fetched."""
        self.isolate, self.isolated_jobs = isolate, isolated_jobs
        """With `isolate`, each job's model lives in its own rlimited child (sandbox.IsolatedModel), at
        most `isolated_jobs` of them at a time (each holds a TensorFlow runtime, ~0.6 GB)."""
        self.data = Arrays(*data, where="data") if isinstance(data, tuple) else data
        self.val_split = val_split
        self._last_split: Split | None = None
        """The newest split made, for the job about to be joined (see `split`)."""
        self.seed = seed
        self.slowdown = slowdown
        """For experiments (`--slowdown`): each update takes this many times as long as its training
        did, the rest spent waiting, as on a machine that much slower."""
        self.jobs: dict[str, JoinedJob] = {}
        self.shared_models = shared_models
        """Workers hosted in one process (`grid_ipfs.pool`) share one Keras model per model file."""
        self._background = ThreadPoolExecutor(2, thread_name_prefix="round")
        """A round's history check and its fetch of the global weights, at the same time (both wait on
        the network), the check also while we train."""

    def started(self) -> None:
        log.info("%s (%s) listening on %s; data %s, %.0f%% held out for validation", self.name,
                 self.identity.id[:12], self.jobs_topic, self.data.description, 100 * self.val_split)

    # -- messages ------------------------------------------------------------------------------------

    def handle(self, raw: PubsubMessage) -> None:
        envelope = self.decode(raw)
        if envelope is None:
            return
        message, sender = envelope.message, envelope.sender
        try:
            if isinstance(message, messages.Job):
                self.join(message, sender)
            elif isinstance(message, messages.Round) and message.job in self.jobs:
                if self.jobs[message.job].job.owner != sender:
                    self.dropped += 1
                    log.warning("dropped round %d of %s: signed by %s, not the job's owner",
                                message.round, message.job, sender[:12])
                    return
                if self.jobs[message.job].job.config.get("mode") == "async":
                    self.jobs[message.job].newest = _newer(self.jobs[message.job].newest, message)
                else:
                    self.train_round(message)
            elif isinstance(message, messages.Done) and message.job in self.jobs:
                if self.jobs[message.job].job.owner == sender:
                    log.info("job %s done (%s); head %s", message.job, message.reason, message.head)
                    _close_model(self.jobs.pop(message.job).model)
                    self.unsubscribe(messages.job_topic(message.job))
        except Exception as exc:  # noqa: BLE001 - sorted by _failed: this job, not the worker
            self._failed(getattr(message, "job", "?"), message.TYPE, exc)

    def idle(self) -> bool:
        """Async jobs: train on the newest round announced while we were busy (the rounds in between are
        versions we were too slow for; our update on the newest is the least stale we can send)."""
        for job_id, joined in list(self.jobs.items()):
            if joined.newest is not None:
                round_, joined.newest = joined.newest, None
                try:
                    self.train_round(round_)
                except Exception as exc:  # noqa: BLE001 - sorted by _failed
                    self._failed(job_id, round_.TYPE, exc)
                return True
        return False

    def _failed(self, job: str, what: str, exc: Exception) -> None:
        if isinstance(exc, TrainerDied):  # the job's isolated child is gone: this job costs no more
            self.refuse_isolated(job, exc)
        elif isinstance(exc, (IPFSError, PayloadError)):
            log.warning("job %s: %s", job, exc)
        else:  # e.g. Keras refusing labels that do not fit the loss: this job, not the worker
            log.error("job %s: %s failed: %s: %s", job, what, type(exc).__name__,
                      printable(" ".join(str(exc).split()), 300))

    def join(self, job: messages.Job, sender: str) -> None:
        if job.job in self.jobs:
            if self.jobs[job.job].job.owner == sender:  # a re-announcement: the client may have restarted
                self.publish(self._join_message(self.jobs[job.job]))
            return
        if (job.owner, job.job) in self.refused:
            return
        found = self.job_model(job, sender, self.data,
                               check=lambda: (proximal_mu(job.config), secure_dp(job.config), compression(job.config),
                                              self._ceilings(job.config), self._room()))
        if found is None:
            return
        model, shard = found
        self.subscribe(messages.job_topic(job.job))
        joined = JoinedJob(job, model, self.split(shard),
                           MaskKey() if job.config.get("secure_aggregation") is True else None)
        self.jobs[job.job] = joined
        self.publish(self._join_message(joined))
        log.info("joined job %s (model %s, %s)", job.job, job.model, job.config)

    def train_round(self, round_: messages.Round) -> None:
        from .payloads import update_to_bytes, weights_to_bytes
        from .training import backend, evaluate

        joined = self.jobs[round_.job]
        key = (round_.round, round_.attempt, round_.deadline)
        if key in joined.done_rounds:
            return
        if round_.selected is not None and self.identity.id not in round_.selected:
            return
        if time.time() > round_.deadline:
            log.info("skipped round %d of %s: its deadline has passed", round_.round, round_.job)
            return
        if joined.mask_key is not None and (round_.mask_keys or {}).get(self.identity.id) != joined.mask_key.public:
            log.warning("skipped round %d of %s: it does not carry our mask key for secure aggregation",
                        round_.round, round_.job)
            return
        joined.done_rounds.add(key)
        model, split = joined.model, joined.split
        # The history is checked while we fetch and train: it only gates signing, so a refused round costs
        # one model's bytes and one round of training, what any round its owner announces costs.
        checking = self._background.submit(self.check_history, joined, round_)
        fetching = self._background.submit(_timed, fetch_weights, self.client, round_.weights,
                                           like=model.get_weights())
        if joined.mask_key is not None:
            # Masking against a key the owner made up would let the owner remove our mask: every key
            # must carry its worker's own signature.
            forged = unsigned_mask_keys(round_.job, round_.mask_keys, round_.mask_sigs)
            if forged:
                log.warning("skipped round %d of %s: the mask keys of %s are not signed by those workers, "
                            "so our update could be unmasked", round_.round, round_.job,
                            ", ".join(w[:12] for w in forged))
                return
        global_weights, fetch_s = fetching.result()
        started = time.monotonic()
        with KERAS_LOCK:  # workers hosted in one process (grid_ipfs.pool) take turns; alone, this never waits
            queued = time.monotonic() - started
            if not len(split.x_val):
                eval_metrics = {}
            elif isinstance(model, IsolatedModel):
                eval_metrics = model.evaluate(global_weights, deadline=round_.deadline)
            else:
                eval_metrics = evaluate(model, global_weights, split.x_val, split.y_val)
            trained = time.monotonic()
            new_weights, metrics = self.local_update(joined, global_weights, round_)
        if self.slowdown > 1:
            self._stop.wait((self.slowdown - 1) * (time.monotonic() - trained))
        if joined.mask_key is not None:  # what leaves this process is masked: only the round's sum is readable
            weight, dp = len(split.x_train), secure_dp(joined.job.config)
            if dp is not None:  # our clipped delta plus our share of the noise, equally weighted
                new_weights = dp_share(new_weights, global_weights, clip=dp[0], noise_multiplier=dp[1],
                                       workers=len(round_.mask_keys))
                weight = 1
            new_weights = mask_update(new_weights, weight, joined.mask_key, self.identity.id,
                                      round_.mask_keys, mask_context(round_.job, round_.round, round_.attempt))
        packed = compression(joined.job.config) if joined.mask_key is None else None
        cid = self.client.add(update_to_bytes(new_weights, global_weights, packed) if packed
                              else weights_to_bytes(new_weights))
        # this worker's part of the round (fetch, evaluate, train, add; not its turn's wait in a pool): with
        # every worker on its own machine, the slowest selected one's is the round's critical path
        metrics = {**metrics, "compute_s": round(fetch_s + time.monotonic() - started - queued, 3)}
        head_seq = checking.result()
        if head_seq is None:  # refused, in one log line: the update stays unsigned and unannounced
            return
        self.witness_signed(joined, round_, head_seq, cid_str(cid))  # on disk before the signature leaves
        self.publish(messages.Update(job=round_.job, round=round_.round, weights=cid_str(cid),
                                     num_examples=len(split.x_train), metrics=metrics,
                                     eval_metrics=eval_metrics, attempt=round_.attempt, head=round_.head,
                                     base=round_.weights, backend=backend()))
        log.info("job %s round %d: %d examples, loss %.4f, accuracy %s, %.1fs", round_.job, round_.round,
                 len(split.x_train), metrics.get("loss", float("nan")),
                 f"{metrics['accuracy']:.4f}" if "accuracy" in metrics else "n/a", time.monotonic() - started)

    # -- history: what our signatures extend ---------------------------------------------------------

    def check_history(self, joined: JoinedJob, round_: messages.Round) -> int | None:
        """The seq of the round's head if we may sign against it, else None after one log line.

        Our update names the head, so the signature ties us to one history: the head must be a block of
        this job signed by its owner, recording (when accepted) the round's base weights, and it must
        descend from the last head we signed against for this job (no rollback, no fork under our
        signature: `grid_ipfs.chain.witness`)."""
        from .chain import ChainError, check_signature, decode_block
        from .chain.verify import is_accepted
        from .chain.witness import check_extends
        from .ipfs import same_cid

        where = f"round {round_.round} of {round_.job}"
        deadline = time.monotonic() + HEAD_TIMEOUT  # the head and the walk down to our last one, in all
        if round_.head is None:
            log.warning("skipped %s: it names no chain head to sign our update against", where)
            return None
        try:
            head = decode_block(self.client.block_get(round_.head, timeout=HEAD_TIMEOUT), round_.head)
        except (IPFSError, ChainError) as exc:
            log.warning("skipped %s: its head %s: %s", where, round_.head, printable(str(exc), 300))
            return None
        owner = joined.job.owner
        reason = None
        if head["job"] != round_.job or head["signer"] != owner or not check_signature(head):
            reason = f"its head {round_.head} is not a block of this job signed by its owner"
        elif is_accepted(head) and not same_cid(head["weights"], round_.weights):
            reason = f"its base weights {round_.weights} are not those of its head {round_.head}"
        else:
            reason = check_extends(self.client, self.witness(joined).last(), round_.head, head,
                                   max_steps=MAX_HISTORY_STEPS, deadline=deadline)
        if reason is not None:
            log.warning("refused %s: %s", where, printable(reason, 400))
            return None
        return head["seq"]

    def witness(self, joined: JoinedJob):
        """The record of what we signed in `joined`'s job: a file under `witness_dir`, or in memory."""
        from .chain.witness import Witness

        if joined.witness is None:
            joined.witness = (Witness.for_job(self.witness_dir, joined.job.owner, joined.job.job)
                              if self.witness_dir is not None else _RememberedWitness())
        return joined.witness

    def witness_signed(self, joined: JoinedJob, round_: messages.Round, head_seq: int, update: str) -> None:
        from .chain.witness import WitnessRecord

        self.witness(joined).record(WitnessRecord(
            job=round_.job, owner=joined.job.owner, worker=self.identity.id, round=round_.round,
            attempt=round_.attempt, head=round_.head, seq=head_seq, base=round_.weights, update=update,
            time=time.time()))

    def _join_message(self, joined: JoinedJob) -> messages.Join:
        job, mask, examples = joined.job.job, joined.mask_key, len(joined.split.x_train)
        if mask is None:
            return messages.Join(job=job, name=self.name, num_examples=examples)
        return messages.Join(job=job, name=self.name, num_examples=examples, mask_key=mask.public,
                             mask_sig=sign_mask_key(self.identity, job, mask.public))

    def local_update(self, joined: JoinedJob, global_weights: list, round_: messages.Round) -> tuple[list, dict]:
        """Train on the local data from `global_weights`: the weights to send and the training metrics.

        The seed is (worker seed, round, attempt): a round announced again after its aggregate was
        rejected is trained with a different shuffle. The job's `proximal_mu` adds FedProx's term.
        """
        from .training import fit

        config = joined.job.config
        settings = dict(epochs=config["epochs"], batch_size=config["batch_size"],
                        seed=self.seed + round_.round + 100_003 * (round_.attempt - 1),
                        proximal_mu=proximal_mu(config))
        if isinstance(joined.model, IsolatedModel):
            return joined.model.fit(global_weights, deadline=round_.deadline, **settings)
        return fit(joined.model, global_weights, joined.split.x_train, joined.split.y_train, **settings)

    # -- isolation (--isolate) -------------------------------------------------------------------------

    def split(self, shard: tuple) -> Split:
        """`shard` (our examples fitted to a model) split into training and validation. Our examples
        fitted to one input shape are always the same, so jobs whose models share an input share one
        split: it is made once, not copied per job."""
        held = self._held_split(shard[0].shape[1:])
        if held is None:
            held = self._last_split = Split(*train_val_split(*shard, self.val_split, seed=self.seed))
        return held

    def _held_split(self, features: tuple) -> Split | None:
        """The split of examples of shape `features` that a joined job (or the job being joined) holds."""
        splits = [joined.split for joined in self.jobs.values()] + [self._last_split]
        return next((s for s in splits if s is not None and s.x_train.shape[1:] == features), None)

    def fit_data(self, data: LocalData, input_shape: tuple) -> tuple:
        """Our examples fitted to a job's model input; DataError when holding them beside the examples of
        the jobs already joined would take more than MAX_HELD_DATA_BYTES (see there): judged on the
        source's estimate before loading (a folder of images is decoded for each new size), and on
        what was loaded when there was none."""
        if self._held_split(tuple(input_shape)[1:]) is None:  # estimated first: a refused job loads nothing
            self._check_room_for(tuple(input_shape)[1:], data.nbytes_at(input_shape))
        shard = super().fit_data(data, input_shape)
        if self._held_split(shard[0].shape[1:]) is None:
            self._check_room_for(shard[0].shape[1:], shard[0].nbytes + shard[1].nbytes)
        return shard

    def _check_room_for(self, features: tuple, needed: int | None) -> None:
        held = {id(joined.split): joined.split for joined in self.jobs.values()}
        held_bytes = sum(a.nbytes for split in held.values() for a in split)
        if held_bytes and needed is not None and held_bytes + needed > MAX_HELD_DATA_BYTES:
            raise DataError(f"our examples at this model's input {tuple(features)} would take "
                            f"{needed / 2**20:.0f} MiB beside the {held_bytes / 2**20:.0f} MiB held for "
                            f"{len(self.jobs)} joined job(s), over the {MAX_HELD_DATA_BYTES / 2**20:.0f} MiB limit")

    def load_model(self, data: bytes, source: str, shard: tuple):
        if self.isolate is None:
            if self.shared_models is None:
                return super().load_model(data, source, shard)
            return self.shared_models.get(data, lambda: super(Worker, self).load_model(data, source, shard))
        split = self.split(shard)
        return IsolatedModel(data, source=source, x_train=split.x_train, y_train=split.y_train, x_val=split.x_val,
                             y_val=split.y_val, limits=self.isolate, load_kwargs=self.model_options)

    def _ceilings(self, config: dict) -> None:
        """ValueError when the job asks for more epochs or a larger batch than this worker allows."""
        for key, limit, flag in (("epochs", self.max_epochs, "--max-epochs"),
                                 ("batch_size", self.max_batch_size, "--max-batch-size")):
            if config[key] > limit:
                raise ValueError(f"config.{key} {config[key]} is over this worker's {flag} {limit}")

    def _room(self) -> None:
        """ValueError when `isolated_jobs` children are running already (checked before fetching a model)."""
        running = sum(isinstance(joined.model, IsolatedModel) for joined in self.jobs.values())
        if self.isolate is not None and running >= self.isolated_jobs:
            raise ValueError(f"{running} isolated jobs are running already (--isolated-jobs {self.isolated_jobs})")

    def refuse_isolated(self, job: str, exc: TrainerDied) -> None:
        """One line, and the job is over for this worker: never joined or fetched again."""
        log.error("job %s: the isolated trainer died: %s; refusing the job", job, exc)
        joined = self.jobs.pop(job, None)
        if joined is not None:
            self.refused.add((joined.job.owner, job))
            _close_model(joined.model)
            self.unsubscribe(messages.job_topic(job))

    def close(self) -> None:
        super().close()
        self._background.shutdown(wait=False, cancel_futures=True)
        for joined in self.jobs.values():
            _close_model(joined.model)


class SharedModels:
    """Keras models by the hash of their file, for the workers one process hosts (`grid_ipfs.pool`).

    They take turns at Keras (`KERAS_LOCK`) and every evaluate and fit sets its weights and resets the
    optimizer first, so one model per file serves them all, and Keras traces it once instead of once per
    worker (64 hosted workers: about 5 minutes of a job's first round). An entry lives as long as a
    joined job holds its model."""

    def __init__(self) -> None:
        self._models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, data: bytes, load: Callable[[], object]) -> object:
        key = hashlib.sha256(data).digest()
        with self._lock:  # one load per file, even when several workers join the job at once
            model = self._models.get(key)
            if model is None:
                model = load()
                self._models[key] = model
            return model


class _RememberedWitness:
    """A witness kept in memory only (`Worker(witness_dir=None)`: tests, throwaway runs): the same
    refusals while the process lives, nothing to show after it."""

    def __init__(self) -> None:
        self.kept: list = []

    def last(self):
        return max(reversed(self.kept), key=lambda record: record.seq, default=None)

    def record(self, record) -> None:
        self.kept.append(record)


def _newer(kept: messages.Round | None, arrived: messages.Round) -> messages.Round:
    """The round to train on next of two announcements: the later (round, attempt); on a tie the one that
    arrived (a resumed owner announces the same round again with a new deadline)."""
    if kept is not None and (kept.round, kept.attempt) > (arrived.round, arrived.attempt):
        return kept
    return arrived


def _timed(function: Callable, *args, **kwargs) -> tuple:
    """(what `function` returns, the seconds it took)."""
    started = time.monotonic()
    return function(*args, **kwargs), time.monotonic() - started


def _close_model(model: object) -> None:
    """Stop an isolated job's child (in-process Keras models need nothing)."""
    if isinstance(model, IsolatedModel):
        model.close()


def proximal_mu(config: dict) -> float:
    """The job config's `proximal_mu` (FedProx; absent means 0); ValueError unless a finite number >= 0."""
    return check_number(config.get("proximal_mu", 0.0), "config.proximal_mu")


def compression(config: dict) -> str | None:
    """The job config's `compression` (`payloads.COMPRESSIONS`; absent: None); ValueError on another value."""
    from .payloads import COMPRESSIONS

    value = config.get("compression")
    if value is not None and value not in COMPRESSIONS:
        raise ValueError(f"config.compression must be one of {', '.join(COMPRESSIONS)}, got {str(value)[:20]!r}")
    if value is not None and config.get("secure_aggregation") is True:
        raise ValueError("config.compression: masked updates (secure aggregation) are sent as they are")
    return value


def secure_dp(config: dict) -> tuple[float, float] | None:
    """(clip, noise multiplier) when the job runs DP-FedAvg over secure aggregation (`dp_clip` and
    `dp_noise` in its config, with `secure_aggregation`), else None; ValueError on bad values."""
    if "dp_clip" not in config and "dp_noise" not in config:
        return None
    clip, noise = config.get("dp_clip"), config.get("dp_noise")
    check_number(clip, "config.dp_clip", low_open=True)
    check_number(noise, "config.dp_noise")
    if config.get("secure_aggregation") is not True:
        raise ValueError("config.dp_clip/dp_noise: worker-side noise comes with secure_aggregation")
    return float(clip), float(noise)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser(prog: str = "python -m grid_ipfs.worker") -> argparse.ArgumentParser:
    """The worker's command line; `main` takes an extended copy (see tests/byzantine_worker.py)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--api", required=True, help="the IPFS daemon's API multiaddr, e.g. /ip4/127.0.0.1/tcp/5001")
    data = parser.add_argument_group("local data (never leaves this machine; only its size is announced)")
    data.add_argument("--data", default=None, metavar="PATH",
                      help="an .npz shard (arrays x and y), a .csv file (with --label-column), or a folder with "
                           "one sub-folder of images per class (loaded at each model's input size)")
    data.add_argument("--label-column", default=None, metavar="NAME",
                      help="CSV: the column holding the labels; every other column is a numeric feature")
    data.add_argument("--class-names", default=None, metavar="A,B,...",
                      help="folder of images: the classes in label order (default: the sub-folders, sorted); "
                           "needed when this worker lacks a class the others have")
    data.add_argument("--data-loader", default=None, metavar="MODULE:FUNCTION",
                      help="your own loader instead of --data (module:function or path/to/file.py:function) "
                           "returning (x, y) arrays, a tf.data.Dataset or (x, y) batches; given an "
                           "input_shape parameter, it is called with each model's input shape")
    parser.add_argument("--name", default=None,
                        help="a name for logs and the key file (default: the data's file or folder name)")
    parser.add_argument("--key", default=None, help="Ed25519 key file (default ~/.grid_ipfs/worker-NAME.key)")
    parser.add_argument("--witness-dir", type=Path, default=None, metavar="DIR",
                        help="record here the chain heads this worker signed updates against, a file per job "
                             "(default: beside the key file, KEY.witness/); `chain verify --witness FILE` "
                             "checks a chain against one")
    add_training_arguments(parser)
    add_isolation_arguments(parser, "load, evaluation or round")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every worker takes, alone or hosted in a pool (`grid_ipfs.pool`): which jobs it
    follows and how much work it agrees to; `training_options` reads them back."""
    parser.add_argument("--topic", default=messages.JOBS_TOPIC, help=f"jobs topic (default {messages.JOBS_TOPIC})")
    parser.add_argument("--val-split", type=float, default=0.1, help="fraction held out for federated evaluation")
    parser.add_argument("--trust-clients", default=None, help="join only jobs signed by the keys in this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=_positive_int, default=MAX_EPOCHS, metavar="N",
                        help=f"refuse jobs asking for more local epochs per round (default {MAX_EPOCHS})")
    parser.add_argument("--max-batch-size", type=_positive_int, default=MAX_BATCH_SIZE, metavar="N",
                        help=f"refuse jobs asking for a larger batch size (default {MAX_BATCH_SIZE})")
    parser.add_argument("--slowdown", type=float, default=1.0, metavar="F",
                        help="for experiments: take F times as long per update as training did, waiting the "
                             "rest, like a machine F times slower (default 1)")
    add_vetting_arguments(parser)


def training_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """`Worker` keywords from `add_training_arguments`' options (all but trusted clients, which need a
    file read: `peer.connect`); exits through `parser.error` on a bad value."""
    if not 0 <= args.val_split < 1:
        parser.error("--val-split must be in [0, 1)")
    if not 1 <= args.slowdown <= 1000:
        parser.error("--slowdown must be in [1, 1000]")
    return dict(val_split=args.val_split, jobs_topic=args.topic, seed=args.seed, max_epochs=args.max_epochs,
                max_batch_size=args.max_batch_size, slowdown=args.slowdown)


def local_data(args: argparse.Namespace) -> LocalData:
    """The source `--data` / `--data-loader` name (DataError with what was expected when it cannot be read)."""
    if args.data_loader is not None:
        return Loader(args.data_loader)
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    return open_data(args.data, label_column=args.label_column, class_names=class_names)


def main(argv: list[str] | None = None, *, parser: argparse.ArgumentParser | None = None,
         make_worker: Callable[..., Worker] | None = None) -> int:
    """Run a worker until SIGINT/SIGTERM. `parser` and `make_worker(args, **worker_kwargs)` let a variant
    (another `Worker` subclass with extra options) reuse the whole command line and lifecycle."""
    quiet_tensorflow()  # before anything loads TensorFlow; an entry point's choice
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if (args.data is None) == (args.data_loader is None):
        parser.error("give one of --data PATH or --data-loader MODULE:FUNCTION")
    if args.data_loader is not None and (args.label_column or args.class_names):
        parser.error("--label-column and --class-names describe --data, not --data-loader")
    name = args.name or (Path(args.data).stem if args.data else args.data_loader.rpartition(":")[2])
    options = training_options(args, parser)
    try:
        data = local_data(args)
        policy = policy_from_args(args)
        client, identity, trusted = connect(args.api, args.key, f"worker-{name}", args.trust_clients)
        witness_dir = args.witness_dir or (Path(args.key) if args.key else default_key_path(f"worker-{name}")
                                           ).with_suffix(".witness")
        kwargs = dict(name=name, trusted_clients=trusted, witness_dir=witness_dir, isolate=limits_from_args(args),
                      isolated_jobs=args.isolated_jobs, policy=policy, **options)
        if make_worker is None:
            worker = Worker(client, identity, data, **kwargs)
        else:
            worker = make_worker(args, client, identity, data, **kwargs)
    except (DataError, IPFSError, IdentityError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    worker.serve()
    log.info("%s stopped (%d messages dropped, %d failed)", name, worker.dropped, worker.failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
