"""A live, read-only web page of one job's chain: `python -m grid_ipfs.chain serve --api A HEAD`.

`ChainView` holds what the page shows: the chain from genesis to its head, summarised per block (round,
try, workers and their contributions, metrics), the metric curves, and every block's verification
status. It moves only forward: a new head is taken when it extends the head it has (its blocks are
walked down to the known head, at most `MAX_AHEAD`); anything else is dropped with a reason, and a head
refused for what its blocks say is not fetched again. Followed
from pubsub (`follow`), only `head` and `done` messages signed by the job's owner (genesis' signer) are
offered to it: a stranger's message is a dropped message, never a page change.

`Verifier` runs `verify_chain` in a background thread on the newest head (signer: the owner): one run
covers every block below that head, runs never overlap, heads that arrive during a run are folded into
the next one, and after each run it rests at least as long as the run took, so auditing takes at most
about half a core and the page answers at once whatever the chain costs to audit.

`DashboardServer` serves the page with the standard library's `ThreadingHTTPServer`, on 127.0.0.1 by
default: fixed routes only (`/`, `/dashboard.js`, `/dashboard.css`, `/api/state`; anything else 404,
no files are looked up by path), GET and HEAD only (any other method 405), and a Content-Security-
Policy that allows only the page's own script and style files. Everything a peer wrote (worker names,
metric names, reasons, CIDs) travels as JSON strings, escaped and cut by `text.printable`, and the
page's script puts it in the DOM with `textContent` only: it is text, never markup. Numbers are sent
as JSON numbers when finite, null otherwise. The owner's process serves the same page with more live
detail (`grid_ipfs.client.dashboard`).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import numbers
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from .. import messages
from ..ipfs.cids import cid_str, parse_cid, same_cid
from ..ipfs.errors import IPFSError
from ..text import printable
from .blocks import ChainError, decode_block
from .log import MAX_BLOCKS, BlockStore
from .plot import BOOKKEEPING, KINDS, collect_series, metric_kind
from .verify import is_accepted, verify_chain

log = logging.getLogger(__name__)

__all__ = ["ChainView", "Verifier", "DashboardServer", "follow", "serve", "json_safe"]

MAX_ROWS = 500
"""Newest blocks the page lists (the curves and worker totals cover every block)."""
MAX_SHOWN_UPDATES = 64
"""Update entries of one block the page lists (a block may record thousands)."""
MAX_SHOWN_METRICS = 48
"""Metrics of one block or update the page lists (a block may hold thousands of names)."""
MAX_PANELS = 8
"""Metric curves drawn (loss-like first, then accuracy-like, as `chain plot` orders them)."""
TIMINGS = frozenset({"compute_s", "coordination_s", "critical_path_s"})
"""A round's time split (seconds), recorded in its metrics: bookkeeping, not a learning curve."""
MAX_WORKERS = 500
"""Workers the page lists (most examples first)."""
TEXT_CHARS = 300
"""Longest peer text (a name, a metric name, a reason) the page shows, escapes included."""
MAX_AHEAD = 1000
"""Most blocks one announced head may add to the page. An owner announces each block it appends, so a
head further ahead is refused after reading one block: otherwise every head a hostile owner announces
(a fork whose bottom does not meet the page's head) would cost up to `max_blocks` fetches."""
MAX_REFUSED_HEADS = 256
"""Heads refused for what their blocks say, remembered (newest) so announcing one again costs no fetch."""
MAX_CONNECTIONS = 32
"""Connections served at once, each by its own thread (ThreadingHTTPServer): one more is closed as soon
as it is accepted, so idle or slow clients (slowloris) tie up at most this many threads."""


def json_safe(value: object, depth: int = 0) -> object:
    """`value` as plain JSON data: finite numbers, None for NaN and infinities, integers beyond 2**53
    as floats (what a browser reads anyway), strings escaped and cut by `printable`; lists and maps
    at most 16 levels deep. Whatever a block or a peer holds, `json.dumps(..., allow_nan=False)` of the
    result succeeds."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) <= 2 ** 53:
            return value
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return printable(value, TEXT_CHARS)
    if depth >= 16:
        return None
    if isinstance(value, dict):
        return {printable(k, TEXT_CHARS): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, numbers.Real):  # numpy scalars
        return json_safe(float(value), depth)
    return printable(value, TEXT_CHARS)  # CIDs, bytes, anything else: as text


def _metrics(metrics: object) -> dict:
    if not isinstance(metrics, dict):
        return {}
    return dict(list(metrics.items())[:MAX_SHOWN_METRICS])


def _summary(cid, block: dict) -> dict:
    """What the page lists of one block."""
    updates = block.get("updates") or []
    shown = [{"worker": u.get("worker"), "examples": u.get("num_examples"), "metrics": _metrics(u.get("metrics")),
              **({"staleness": u["staleness"]} if "staleness" in u else {})}
             for u in updates[:MAX_SHOWN_UPDATES]]
    return {"seq": block["seq"], "round": block["round"], "cid": cid_str(cid), "time": block.get("time"),
            "accepted": is_accepted(block), "aggregation": block["aggregation"].get("name"),
            "workers": len(updates), "examples": sum(u.get("num_examples", 0) for u in updates),
            "updates": shown, "more_updates": max(0, len(updates) - MAX_SHOWN_UPDATES),
            "metrics": _metrics(block.get("metrics"))}


class ChainView:
    """A job's chain as the page shows it, kept current by `advance` (thread-safe; see the module doc).

    `store` is read by `advance` only (one thread at a time); `extra`, when set, is called under the
    lock for more fields of the page's state (the owner's live detail)."""

    def __init__(self, store: BlockStore, head: str, *, max_blocks: int = MAX_BLOCKS, source: str = "chain"):
        self.store, self.max_blocks, self.source = store, max_blocks, source
        blocks = list(_walk_down(store, parse_cid(head), None, max_blocks))[::-1]
        if blocks[0][1]["seq"] != 0:
            raise ChainError(f"block {cid_str(blocks[0][0])} has seq {blocks[0][1]['seq']} and no prev")
        genesis = blocks[0][1]
        self.job, self.owner, self.genesis = genesis["job"], genesis["signer"], cid_str(blocks[0][0])
        self.mode = "async" if isinstance(genesis.get("config"), dict) and "async" in genesis["config"] else "sync"
        self.rounds_planned = (genesis.get("config") or {}).get("rounds")
        self._lock = threading.Lock()
        self._blocks: list[dict] = []  # decoded, genesis first (for the curves and the totals)
        self._rows: list[dict] = []
        self._verdicts: dict[str, tuple[str, str]] = {}
        self.verification: dict = {"state": "pending", "head": None, "seq": None, "reason": "", "blocks": 0}
        self.dropped: collections.Counter = collections.Counter()
        self.taken = 0
        self.status = ""
        self.version = 0
        self._cache: tuple[int, bytes] | None = None
        self._refused_heads: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._totals: tuple[int, list, list] | None = None  # (blocks, curves, workers): see `_chain_totals`
        self.extra = None
        self.listeners: list = []
        self._add(blocks)

    # -- the chain -------------------------------------------------------------------------------------

    @property
    def head(self) -> str:
        with self._lock:
            return self._rows[-1]["cid"]

    @property
    def head_seq(self) -> int:
        with self._lock:
            return self._rows[-1]["seq"]

    def advance(self, head: str) -> int:
        """Take `head` if it is the head or extends it: the number of new blocks (0 for the same head).
        ChainError (or IPFSError) when it does not extend the head, or its blocks cannot be read."""
        cid = parse_cid(head)
        known, seq = self.head, self.head_seq
        if same_cid(cid, known):
            return 0
        if cid_str(cid) in self._refused_heads:
            raise ChainError(f"{cid_str(cid)} was refused before")
        try:
            new = self._blocks_above(cid, known, seq)
        except _TooFarAhead:  # may be taken once a head between arrives (pubsub does not keep order)
            raise
        except ChainError:  # what its blocks say will not change: not fetched again
            self._refused_heads[cid_str(cid)] = None
            while len(self._refused_heads) > MAX_REFUSED_HEADS:
                self._refused_heads.popitem(last=False)
            raise
        with self._lock:
            if self._rows[-1]["cid"] != known:  # another thread took a head meanwhile: judge again
                raise ChainError("the head moved while this one was read")
            self._add(new[::-1])
        self._changed()
        return len(new)

    def _blocks_above(self, cid, known: str, seq: int) -> list:
        """The blocks from `cid` down to the one after `known` (at seq `seq`), newest first; ChainError
        unless they extend it, belong to this job and are at most MAX_AHEAD."""
        new = list(_walk_down(self.store, cid, seq, min(self.max_blocks, MAX_AHEAD)))
        oldest = new[-1][1]
        if oldest["seq"] != seq + 1 or not same_cid(oldest.get("prev"), parse_cid(known)):
            raise ChainError(f"{cid_str(cid)} does not extend the head {known} (seq {seq})")
        if new[0][1]["job"] != self.job:
            raise ChainError(f"{cid_str(cid)} is a block of job {printable(new[0][1]['job'], 80)}")
        return new

    def _add(self, blocks: list) -> None:
        for cid, block in blocks:
            self._blocks.append(block)
            self._rows.append(_summary(cid, block))
        self.version += 1

    def offer(self, data: bytes) -> str | None:
        """A pubsub message from the job's topic: None when it moved the page (or said nothing new), else
        why it was dropped (also counted in `dropped`). Only the owner's `head` and `done` count."""
        try:
            envelope = messages.decode(data)
        except messages.MessageError as exc:  # one counter for them all: a reason may quote the sender
            log.debug("dropped a message on job %s's topic: %s", self.job, printable(exc.reason, 300))
            return self._drop("malformed")
        message = envelope.message
        if not isinstance(message, (messages.Head, messages.Done)):
            return None  # joins, rounds, updates: the job's traffic, not for this page
        if envelope.sender != self.owner:
            return self._drop("not signed by the owner")
        if message.job != self.job:
            return self._drop("other job")
        try:
            self.advance(message.head)
        except ChainError as exc:
            log.warning("dropped a head of job %s: %s", self.job, printable(exc, 300))
            return self._drop("does not extend the chain")
        except IPFSError as exc:  # not (yet) retrievable here: the owner's next head brings it along
            log.warning("dropped a head of job %s: %s", self.job, printable(exc, 300))
            return self._drop("its blocks cannot be fetched")
        if isinstance(message, messages.Done):
            self.set_status(f"done: {message.reason}")
        with self._lock:
            self.taken += 1
            self.version += 1
        self._changed()
        return None

    def _drop(self, reason: str) -> str:
        with self._lock:
            self.dropped[reason] += 1
            self.version += 1
        return reason

    def set_status(self, status: str) -> None:
        with self._lock:
            self.status = printable(status, TEXT_CHARS)
            self.version += 1

    def touch(self) -> None:
        """Something `extra` reports changed: clients poll a new version."""
        with self._lock:
            self.version += 1

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    # -- verification ----------------------------------------------------------------------------------

    def verifying(self, head: str, seq: int) -> None:
        with self._lock:
            self.verification = {**self.verification, "state": "running", "running_head": head, "running_seq": seq}
            self.version += 1

    def verified(self, head: str, seq: int, report) -> None:
        """Record `verify_chain`'s report for `head`: a verdict for every block up to it."""
        verdicts = {}
        for check in report.checks:
            state = "ok" if check.ok else ("failed" if check.ok is False else "unchecked")
            verdicts[cid_str(check.cid)] = (state, check.reason)
        with self._lock:
            self._verdicts = verdicts
            self.verification = {"state": "ok" if report.ok else "failed", "head": head, "seq": seq,
                                 "reason": report.reason, "blocks": report.blocks, "at": time.time(),
                                 "unproven": report.unproven}
            self.version += 1

    def verify_error(self, head: str, error: str) -> None:
        with self._lock:
            self.verification = {**self.verification, "state": "error", "reason": error, "at": time.time()}
            self.version += 1

    # -- the page's state ------------------------------------------------------------------------------

    def state(self) -> tuple[int, bytes]:
        """(version, the page's state as JSON bytes); built once per version."""
        with self._lock:
            if self._cache is not None and self._cache[0] == self.version:
                return self._cache
            version = self.version
            data = json.dumps(json_safe(self._state()), allow_nan=False, ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8")
            self._cache = (version, data)
            return self._cache

    def _state(self) -> dict:
        curves, workers = self._chain_totals()
        rows = []
        newest = self._rows[-1]["seq"]
        for row in self._rows[-MAX_ROWS:]:
            state, reason = self._verdicts.get(row["cid"], ("pending", ""))
            rows.append({**row, "verify": state, "verify_reason": reason})
        state = {"version": self.version, "source": self.source, "job": self.job, "owner": self.owner,
                 "genesis": self.genesis, "head": self._rows[-1]["cid"], "head_seq": newest, "mode": self.mode,
                 "rounds_planned": self.rounds_planned, "blocks": rows,
                 "omitted": max(0, len(self._rows) - MAX_ROWS), "curves": curves,
                 "workers": workers, "verification": self.verification, "status": self.status,
                 "follow": {"taken": self.taken, "dropped": dict(self.dropped)}}
        if self.extra is not None:
            state["live"] = self.extra()
        return state

    def _chain_totals(self) -> tuple[list, list]:
        """(curves, workers), read from every block: computed again only when blocks are added, not for
        each new version (a stranger's junk on the topic bumps the drop counters, and so the version)."""
        if self._totals is None or self._totals[0] != len(self._blocks):
            self._totals = (len(self._blocks), self._curves(), self._workers())
        return self._totals[1], self._totals[2]

    def _curves(self) -> list[dict]:
        """Learning curves of the accepted blocks: [{metric, kind, series: [{source, points}]}]."""
        series = collect_series([b for b in self._blocks if is_accepted(b)])
        order = sorted(series, key=lambda base: (KINDS.index(metric_kind(base)), base != metric_kind(base), base))
        return [{"metric": base, "kind": metric_kind(base),
                 "series": [{"source": prefix, "points": points} for prefix, points in series[base].items()]}
                for base in [b for b in order if b not in BOOKKEEPING | TIMINGS][:MAX_PANELS]]

    def _workers(self) -> list[dict]:
        """Per worker over the whole chain: blocks it counts in, examples, its newest round and metrics."""
        totals: dict[str, dict] = {}
        for block in self._blocks:
            for u in block.get("updates") or ():
                t = totals.setdefault(u["worker"], {"worker": u["worker"], "blocks": 0, "examples": 0})
                t["blocks"] += 1
                t["examples"] += u.get("num_examples", 0)
                t["last_round"], t["last_metrics"] = block["round"], _metrics(u.get("metrics"))
        ranked = sorted(totals.values(), key=lambda t: (-t["examples"], t["worker"]))
        return ranked[:MAX_WORKERS]


class _TooFarAhead(ChainError):
    """A head more blocks ahead of the page than one walk may read."""


def _walk_down(store: BlockStore, cid, stop_seq: int | None, max_blocks: int):
    """(cid, block) from `cid` down to the block after seq `stop_seq` (to genesis when None), seq
    falling by one per step; at most `max_blocks` blocks are read."""
    expected = None
    for count in range(max_blocks + 1):
        block = decode_block(store.block_get(cid), cid)
        if count == 0 and stop_seq is not None and block["seq"] - stop_seq > max_blocks:
            raise _TooFarAhead(f"{cid_str(cid)} is {block['seq'] - stop_seq} blocks ahead (at most {max_blocks})")
        if count == 0 and stop_seq is None and block["seq"] >= max_blocks:
            raise ChainError(f"{cid_str(cid)} has seq {block['seq']}: longer than the {max_blocks} blocks allowed")
        if expected is not None and block["seq"] != expected:
            raise ChainError(f"block {cid_str(cid)} has seq {block['seq']}, expected {expected}")
        yield cid, block
        if block["seq"] == 0 or (stop_seq is not None and block["seq"] <= stop_seq + 1):
            return
        expected, cid = block["seq"] - 1, block.get("prev")
        if cid is None:
            raise ChainError(f"block at seq {block['seq']} has no prev")
    raise ChainError(f"more than {max_blocks} blocks")


class Verifier:
    """Verifies the view's newest head in a background thread whenever it moves (see the module doc)."""

    def __init__(self, view: ChainView, store: BlockStore, *, recompute: bool = True, min_pause: float = 1.0):
        self.view, self.store, self.recompute, self.min_pause = view, store, recompute, min_pause
        self._wake, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"verify:{view.job}", daemon=True)
        self.runs = 0
        view.listeners.append(self._wake.set)

    def start(self) -> Verifier:
        self._wake.set()
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        done = None
        while not self._closed.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._closed.is_set():
                return
            head, seq = self.view.head, self.view.head_seq
            if head == done:
                continue
            self.view.verifying(head, seq)
            started = time.monotonic()
            try:
                report = verify_chain(self.store, head, recompute=self.recompute, signer=self.view.owner,
                                      max_blocks=self.view.max_blocks)
            except Exception as exc:  # noqa: BLE001 - verify_chain names bad blocks; this is the daemon failing
                self.view.verify_error(head, printable(f"{type(exc).__name__}: {exc}", TEXT_CHARS))
            else:
                self.runs += 1
                self.view.verified(head, seq, report)
                done = head
            # At most half a core: rest as long as the run took (a long chain of big models costs seconds).
            if self._closed.wait(max(self.min_pause, time.monotonic() - started)):
                return


def follow(view: ChainView, api: str):
    """Subscribe to the job's topic and offer every message to `view`; close the returned subscription."""
    from ..ipfs.pubsub import Subscription

    return Subscription(api, messages.job_topic(view.job), on_message=lambda m: view.offer(m.data))


# -- the web server -----------------------------------------------------------------------------------------

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
_ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
           "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
           "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of the fixed routes; every other method 405, every other path 404."""

    server_version = "grid_ipfs-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle or slow connection is kept

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any method but GET and HEAD: PUT, DELETE, PROPFIND, BREW...
            return self._not_allowed
        raise AttributeError(name)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _not_allowed(self) -> None:
        self._send(405, b"method not allowed: this page is read-only\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD"})

    def _answer(self, body: bool) -> None:
        if not self.server.host_allowed(self.headers.get("Host", "")):
            self._send(421, b"unexpected Host header\n", "text/plain; charset=utf-8", body=body)
            return
        path = urlsplit(self.path).path
        if path == "/api/state":
            version, data = self.server.source.state()
            etag = f'"{version}"'
            if self.headers.get("If-None-Match") == etag:
                self._send(304, b"", None, {"ETag": etag}, body=False)
            else:
                self._send(200, data, "application/json; charset=utf-8", {"ETag": etag}, body=body)
        elif path in _ASSETS:
            name, kind = _ASSETS[path]
            self._send(200, self.server.assets[name], kind, body=body)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", body=body)

    def _send(self, code: int, data: bytes, kind: str | None, headers: dict | None = None, body: bool = True) -> None:
        self.send_response(code)
        if kind is not None:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and data:
            self.wfile.write(data)

    def end_headers(self) -> None:
        """Every answer, http.server's own errors (400, 414, ...) included, carries the policy."""
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), printable(format % args, 300))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_activate(self) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_activate()

    def process_request(self, request, client_address) -> None:
        """A thread for the connection while fewer than MAX_CONNECTIONS are served, else closed at once."""
        if not self.slots.acquire(blocking=False):
            log.debug("closed a connection from %s: %d are open", client_address[0], MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (e.g. the system refused one): the slot is free again
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def host_allowed(self, host: str) -> bool:
        """On loopback, only requests naming this server itself: a web page elsewhere cannot read the job's
        state through a DNS name rebound to 127.0.0.1."""
        if self.bound not in _LOOPBACK:
            return True
        try:  # "127.0.0.1:8080", "[::1]:8080", or without a port (a browser leaves out :80)
            named = urlsplit("//" + host)
            return named.hostname in _LOOPBACK and (named.port or 80) == self.server_port
        except ValueError:  # a port that is not a number
            return False


class DashboardServer:
    """The page at http://HOST:PORT/ (port 0: any free one; see `url`), for `source.state()`."""

    def __init__(self, source, host: str = "127.0.0.1", port: int = 0):
        self.httpd = _Server((host, port), _Handler)
        self.httpd.source, self.httpd.bound = source, host
        self.httpd.assets = {name: _asset(name) for name, _ in _ASSETS.values()}
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(api: str, head: str, *, host: str = "127.0.0.1", port: int = 0, max_blocks: int = MAX_BLOCKS,
          ready=None) -> None:
    """`chain serve`: the page of the chain at `head`, following the job's topic until interrupted.
    `ready(url, view)` is called once it serves (the CLI prints the address)."""
    from ..ipfs.rpc import IPFSClient

    with IPFSClient(api) as store, IPFSClient(api) as verify_store:
        store.wait_ready(timeout=5)
        view = ChainView(store, head, max_blocks=max_blocks)
        view.set_status("following the job's topic")
        verifier = Verifier(view, verify_store).start()
        subscription = follow(view, api)
        server = DashboardServer(view, host, port).start()
        try:
            subscription.wait_ready(timeout=30)
            if ready is not None:
                ready(server.url, view)
            threading.Event().wait()
        finally:
            server.close()
            subscription.close()
            verifier.close(timeout=5)
