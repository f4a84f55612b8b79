"""The job's live page served by its owner while the job runs: `client submit ... --dashboard PORT`.

The same page as `python -m grid_ipfs.chain serve` (`grid_ipfs.chain.serve`), fed by the client's
callbacks instead of pubsub, so it also shows what only the owner sees: workers joining (with the
names they gave), the round in progress, updates refused and why, tries the acceptance rule turned
down and why. Names and reasons come from peers: they are cut and escaped (`text.printable`) here and
shown as text by the page.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ..chain.serve import TEXT_CHARS, ChainView, DashboardServer, Verifier
from ..ipfs.rpc import IPFSClient
from ..text import printable
from .job import ClientCallback, JobResult, RoundResult

log = logging.getLogger(__name__)

__all__ = ["DashboardProgress"]

MAX_EVENTS = 200
"""Newest events the page lists."""
MAX_REFUSALS = 100
"""Newest refusals (one per round and reason) and rejected tries the page lists and this process keeps."""
MAX_NAMES = 10_000
"""Worker names remembered (one per joined worker; joins are bounded by the client's own limits)."""


class DashboardProgress(ClientCallback):
    """Serves the job's page at `url` from construction (a port in use fails here, before the job)."""

    def __init__(self, api: str, port: int = 0, host: str = "127.0.0.1"):
        self.api = api
        self._lock = threading.Lock()
        self.view: ChainView | None = None
        self.verifier: Verifier | None = None
        self._stores: list[IPFSClient] = []
        self.names: dict[str, str] = {}
        self.events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.refused: collections.deque = collections.deque(maxlen=MAX_REFUSALS)
        self.rejected_tries: collections.deque = collections.deque(maxlen=MAX_REFUSALS)
        self.current: dict | None = None
        self.state_text = "waiting for the job to start"
        self.server = DashboardServer(self, host, port).start()
        log.info("dashboard: %s", self.server.url)

    @property
    def url(self) -> str:
        return self.server.url

    def state(self) -> tuple[int, bytes]:
        """What `DashboardServer` serves: the view's state, or a placeholder before genesis."""
        view = self.view
        if view is None:
            return 0, b'{"version":0,"job":"","blocks":[],"curves":[],"workers":[],"head":"","head_seq":0,' \
                      b'"verification":{"state":"pending"},"status":"waiting for the job to start"}'
        return view.state()

    def _live(self) -> dict:
        """The owner-only part of the page's state (called by the view under its lock)."""
        with self._lock:
            return {"state": self.state_text, "names": dict(self.names), "joined": len(self.names),
                    "current": self.current, "events": list(self.events), "refused": list(self.refused),
                    "rejected_tries": list(self.rejected_tries)}

    def _event(self, text: str) -> None:
        with self._lock:
            self.events.append({"time": time.time(), "text": printable(text, TEXT_CHARS)})
        if self.view is not None:
            self.view.touch()

    def _advance(self, head: str) -> None:
        if self.view is None:
            return
        try:
            self.view.advance(head)
        except Exception as exc:  # noqa: BLE001 - the page must never stop the job
            log.warning("dashboard: cannot show head %s: %s", head, printable(exc, 300))

    # -- callbacks ---------------------------------------------------------------------------------------

    def on_job_start(self, job, genesis):
        store, verify_store = IPFSClient(self.api), IPFSClient(self.api)
        self._stores = [store, verify_store]
        try:
            view = ChainView(store, genesis, source="owner")
        except Exception as exc:  # noqa: BLE001 - the page must never stop the job
            log.warning("dashboard: cannot read the chain at %s: %s", genesis, printable(exc, 300))
            return
        view.extra = self._live
        self.state_text = "waiting for workers"
        self.verifier = Verifier(view, verify_store).start()
        self.view = view
        self._event(f"job {job.job} started: genesis {genesis}")

    def on_worker_joined(self, worker, name, joined, needed):
        with self._lock:
            if len(self.names) < MAX_NAMES or worker in self.names:
                self.names[worker] = printable(name, 100)
        self._event(f"worker {printable(name, 100)} ({worker[:12]}) joined: {joined}/{needed}")

    def on_round_start(self, round, expected, deadline):
        with self._lock:
            self.current = {"round": round, "received": 0, "expected": expected, "deadline": deadline}
            self.state_text = "running"
        self._event(f"round {round}: asked {expected} worker(s)")

    def on_update(self, round, worker, received, expected):
        with self._lock:
            self.current = {**(self.current or {}), "round": round, "received": received, "expected": expected}
        self._event(f"round {round}: update {received}/{expected} from {self.names.get(worker, worker[:12])}")

    def on_round_retry(self, round, attempt, received, needed):
        self._event(f"round {round} attempt {attempt}: {received} of {needed} updates by the deadline")

    def _refusals(self, result: RoundResult) -> None:
        with self._lock:
            for reason, count in sorted(result.rejected.items()):
                self.refused.append({"round": result.round, "reason": printable(reason, TEXT_CHARS), "count": count})

    def on_round_rejected(self, result: RoundResult, why: str):
        self._refusals(result)
        with self._lock:
            self.rejected_tries.append({"round": result.round, "try": result.tries, "why": printable(why, TEXT_CHARS)})
        self._event(f"round {result.round} try {result.tries} rejected: {why}")
        self._advance(result.head)

    def on_round_end(self, result: RoundResult):
        self._refusals(result)
        with self._lock:
            self.current = None
        self._event(f"round {result.round} done: {result.updates} updates, head {result.head}")
        self._advance(result.head)

    def on_job_end(self, result: JobResult):
        with self._lock:
            self.state_text = "done"
        self._event(f"job {result.job} complete: head {result.head}")

    def on_job_failed(self, job, error):
        with self._lock:
            self.state_text = "failed"
        self._event(f"job {job.job} failed: {error}")

    def close(self) -> None:
        """Stop serving and verifying (a process that exits need not call it: its threads are daemons)."""
        self.server.close()
        if self.verifier is not None:
            self.verifier.close(timeout=5)
        for store in self._stores:
            store.close()
