"""A small typed client for the Kubo RPC API (`/api/v0`), on httpx.

Why not ipfshttpclient: its last release (0.7.0, 2021) raises VersionMismatch for any daemon >= 0.8,
its pubsub speaks the pre-0.11 wire format, and it is unmaintained. The surface the project needs is
small and documented, so we keep exactly that, typed, with one timeout object (`Timeout`) and typed
errors (every httpx failure mapped in one place, `errors.map_transport_errors`).

Works with Kubo >= 0.11 and with js-ipfs 0.66 (the local daemon on machines without Kubo). Where the
two differ, the difference is absorbed here and named in a comment, so nothing above this layer
needs to know which daemon it talks to.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dag_cbor
import httpx
from multiformats import CID, multihash

from .cids import cid_str, parse_cid
from .errors import DaemonError, DaemonUnreachable, IPFSTimeout, TooLarge, daemon_error, map_transport_errors
from .multibase import decode_text, encode_topic
from .timeouts import DEFAULT, Timeout, TimeoutTypes, resolve

if TYPE_CHECKING:
    from .pubsub import Subscription

log = logging.getLogger(__name__)

DEFAULT_API = "/ip4/127.0.0.1/tcp/5001"
#: A client's timeout unless given: 5 s to connect, 60 s between bytes of an answer, no total.
DEFAULT_TIMEOUT = Timeout(total=None, connect=5.0, read=60.0, write=60.0, pool=10.0)
KEEPALIVE_EXPIRY = 2.0
"""Seconds an idle connection to the daemon is kept for reuse. js-ipfs's HTTP server (Node) closes
idle keep-alive connections after 5 s, which is also httpx's default expiry: a request sent just
as the server closes its connection fails with "Server disconnected without sending a response"
(seen under 64 workers hosted on 4 js-ipfs daemons, where it lost a worker its round). Kubo keeps
idle connections longer, so a shorter expiry costs it an occasional new connection on loopback."""
ADD_PARAMS = {"cid-version": "1", "raw-leaves": "true", "chunker": "size-1048576"}
"""How `add` lays a file out: 1 MiB raw leaves under a CIDv1 root instead of the default 256 KiB
dag-pb-wrapped leaves. A 4.9 MB update is 6 blocks instead of 20 (the tree is two layers deep either
way), so the daemons exchange fewer, larger blocks (js-ipfs devnet, one remote `cat` of 4.9 MB: median
0.93 s against 1.75 s).
1 MiB is Kubo's largest fixed chunker size and half the 2 MiB a block may have to travel over bitswap."""


def api_url(api: str) -> str:
    """Turn an API multiaddr (`/ip4/127.0.0.1/tcp/5001[/http]`, `/dns4/kubo0/tcp/5001`) or URL into a base URL."""
    api = api.strip()
    if api.startswith(("http://", "https://")):
        return api.rstrip("/")
    parts = [p for p in api.split("/") if p]
    try:
        proto, host, transport, port = parts[:4]
        int(port)
    except ValueError:
        raise ValueError(f"not an API multiaddr or URL: {api!r} (expected e.g. /ip4/127.0.0.1/tcp/5001)") from None
    if proto not in ("ip4", "ip6", "dns", "dns4", "dns6") or transport != "tcp":
        raise ValueError(f"unsupported API multiaddr {api!r}: need /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT")
    scheme = "https" if parts[4:5] == ["https"] else "http"
    if proto == "ip6":
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class IPFSClient:
    """One daemon, one client. Thread-safe for concurrent calls (httpx.Client is).

    Every `timeout` parameter, here and in each method, means the same (grid_ipfs.ipfs.timeouts):

    - `DEFAULT`: the client's timeout (for a method: the one given here; here: `DEFAULT_TIMEOUT`);
    - `None`: no limit at all;
    - seconds `s`: the whole call within `s`; the daemon is passed `s` as its own `timeout` option,
      so it stops searching when we stop waiting;
    - a `Timeout`: exactly as given (an `httpx.Timeout` is taken too, as a Timeout with no total).

    Methods that fetch by CID (`cat`, `block_get`, `dag_get`) and `repo_gc` default to seconds, not to
    `DEFAULT`, so that content nobody has fails in bounded time; the others default to `DEFAULT`.
    A failure to reach the daemon raises `DaemonUnreachable`, a limit passed `IPFSTimeout`.
    """

    def __init__(self, api: str = DEFAULT_API, *, timeout: TimeoutTypes = DEFAULT):
        self.api = api
        self.base_url = api_url(api)
        self.timeout: Timeout = resolve(timeout, DEFAULT_TIMEOUT)
        self._http = httpx.Client(base_url=self.base_url + "/api/v0", timeout=self.timeout.to_httpx(),
                                  limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY))
        self._flavour: str | None = None  # "kubo" or "js-ipfs", learnt lazily from `version`

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IPFSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IPFSClient({self.api!r})"

    def _request(self, endpoint: str, *, params: dict | None = None, files: Any = None,
                 timeout: TimeoutTypes = DEFAULT) -> httpx.Response:
        """POST (every RPC call is a POST since Kubo 0.5) and map failures to typed errors."""
        limits = resolve(timeout, self.timeout)
        with map_transport_errors(self.api, endpoint, limits):
            response = self._http.post(endpoint, params=_with_daemon_timeout(params, limits), files=files,
                                       timeout=limits.to_httpx())
        if response.status_code >= 400:
            raise daemon_error(endpoint, response.status_code, response.read())
        return response

    def _json(self, endpoint: str, **kwargs: Any) -> Any:
        response = self._request(endpoint, **kwargs)
        text = response.text.strip()
        if not text:
            return {}
        try:
            return json.loads(text.splitlines()[-1]) if "\n" in text else json.loads(text)
        except ValueError:
            raise DaemonError(endpoint, response.status_code, f"answer is not JSON: {text[:200]!r}") from None

    def _stream(self, endpoint: str, *, params: dict, max_size: int | None, timeout: TimeoutTypes,
                what: str, sink: Callable[[bytes], object] | None = None) -> bytes:
        """Read a streamed body within `timeout` in all, with a size cap that stops reading early.
        With `sink`, each chunk goes to it instead of memory (and b"" is returned)."""
        limits = resolve(timeout, self.timeout)
        chunks: list[bytes] = []
        with map_transport_errors(self.api, what, limits), \
                self._http.stream("POST", endpoint, params=_with_daemon_timeout(params, limits),
                                  timeout=limits.to_httpx()) as response:
            if response.status_code >= 400:
                raise _stream_error(daemon_error(endpoint, response.status_code, response.read()), what, limits)
            announced = response.headers.get("X-Content-Length") or response.headers.get("Content-Length")
            if max_size is not None and announced and announced.isdigit() and int(announced) > max_size:
                raise TooLarge(what, max_size)
            _read_body(response, what=what, max_size=max_size, limits=limits,
                       sink=chunks.append if sink is None else sink)
            # Kubo reports errors that happen mid-stream in a trailer.
            if response.headers.get("X-Stream-Error"):
                raise DaemonError(endpoint, 200, response.headers["X-Stream-Error"])
        return b"".join(chunks)

    @property
    def flavour(self) -> str:
        """`"kubo"` or `"js-ipfs"`: only for the few calls whose parameters differ."""
        if self._flavour is None:
            agent = self.id().get("AgentVersion", "")
            self._flavour = "js-ipfs" if agent.startswith("js-ipfs") else "kubo"
        return self._flavour

    # -- node ---------------------------------------------------------------------------------------

    def id(self) -> dict:
        return self._json("id")

    def version(self) -> dict:
        return self._json("version")

    def wait_ready(self, timeout: TimeoutTypes = 30.0, interval: float = 0.1) -> dict:
        """Poll `id` until the daemon answers or `timeout` passes in all (then DaemonUnreachable)."""
        limits = resolve(timeout, self.timeout)
        deadline = _deadline(limits)
        while True:
            try:
                return self._json("id", timeout=_left(limits, deadline))
            except (DaemonUnreachable, IPFSTimeout) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise DaemonUnreachable(self.api, f"not ready after {limits.total:g}s ({exc})") from None
                time.sleep(interval)

    # -- files --------------------------------------------------------------------------------------

    def add(self, data: bytes, *, pin: bool = True, name: str = "blob") -> CID:
        """Add bytes as one file laid out as `ADD_PARAMS` says; returns its CID (a CIDv1: a file of at
        most 1 MiB is one raw block, a larger one a dag-pb root over raw leaves)."""
        answer = self._json("add", params={"pin": _flag(pin), "quieter": "true", **ADD_PARAMS},
                            files={"file": (name, data, "application/octet-stream")})
        # js-ipfs sends Size as a number, Kubo as a string; we only need the hash.
        return parse_cid(answer["Hash"])

    def cat(self, cid: str | CID, *, max_size: int | None = None, timeout: TimeoutTypes = 60.0,
            sink: Callable[[bytes], object] | None = None) -> bytes:
        """Fetch a file's bytes. Stops as soon as `max_size` is passed, or when `timeout` passes. With
        `sink`, each chunk goes to it as it arrives and b"" is returned."""
        arg = cid_str(cid)
        return self._stream("cat", params={"arg": arg}, max_size=max_size, timeout=timeout, what=f"cat {arg}",
                            sink=sink)

    # -- pins ---------------------------------------------------------------------------------------

    def pin_add(self, cid: str | CID, *, recursive: bool = True, timeout: TimeoutTypes = DEFAULT) -> None:
        self._json("pin/add", params={"arg": cid_str(cid), "recursive": _flag(recursive)},
                   timeout=timeout)

    def pin_rm(self, cid: str | CID, *, recursive: bool = True, timeout: TimeoutTypes = DEFAULT) -> None:
        self._json("pin/rm", params={"arg": cid_str(cid), "recursive": _flag(recursive)},
                   timeout=timeout)

    def pin_update(self, old: str | CID | None, new: str | CID, *, timeout: TimeoutTypes = DEFAULT) -> None:
        """Move a recursive pin from `old` (None: there is none yet) to `new`, which holds all of it and more.

        Kubo diffs the two DAGs (`pin/update`) and so only walks what is new. js-ipfs has no `pin/update`:
        there `new` is pinned first (a full walk of its DAG) and `old` unpinned after, so nothing
        reachable from either is unpinned in between; each of the two calls gets `timeout`.
        """
        new = parse_cid(new)
        if old is None:
            self.pin_add(new, timeout=timeout)
        elif self.flavour == "js-ipfs":
            self.pin_add(new, timeout=timeout)
            if parse_cid(old).digest != new.digest:
                self.pin_rm(old, timeout=timeout)
        else:
            self._json("pin/update", params={"arg": [cid_str(old), cid_str(new)], "unpin": "true"},
                       timeout=timeout)

    def repo_gc(self, *, timeout: TimeoutTypes = 120.0) -> None:
        """Delete every block not pinned (and not in MFS): what a node forgets when nobody pins it."""
        self._request("repo/gc", params={}, timeout=timeout)

    def pin_ls(self, cid: str | CID | None = None, *, type: str = "all") -> dict[str, str]:
        """Map of pinned CID (text as the daemon prints it) -> pin type."""
        params: dict[str, str] = {"type": type}
        if cid is not None:
            params["arg"] = cid_str(cid)
        response = self._request("pin/ls", params=params)
        keys: dict[str, str] = {}
        for line in response.text.splitlines():  # Kubo: one object; js-ipfs: may stream one per line
            if not line.strip():
                continue
            doc = json.loads(line)
            if "Keys" in doc:
                keys.update({k: v.get("Type", "") for k, v in doc["Keys"].items()})
            elif "Cid" in doc:
                keys[doc["Cid"]] = doc.get("Type", "")
        return keys

    # -- blocks and DAG -----------------------------------------------------------------------------

    def block_put(self, data: bytes, *, codec: str = "dag-cbor", pin: bool = True) -> CID:
        """Store one raw block; returns the CIDv1 the daemon computed (check it against your own)."""
        params = {"mhtype": "sha2-256", "pin": _flag(pin)}
        if self.flavour == "js-ipfs":
            params.update({"format": codec, "version": "1"})  # js-ipfs names the codec `format`
        else:
            params["cid-codec"] = codec
        answer = self._json("block/put", params=params,
                            files={"file": ("block", data, "application/octet-stream")})
        return parse_cid(answer["Key"])

    def block_get(self, cid: str | CID, *, max_size: int = 2 << 20, timeout: TimeoutTypes = 30.0) -> bytes:
        """Fetch one block's raw bytes, and check they hash to the CID asked for."""
        cid, arg = parse_cid(cid), cid_str(cid)
        data = self._stream("block/get", params={"arg": arg}, max_size=max_size, timeout=timeout,
                            what=f"block {arg}")
        if cid.hashfun.name == "sha2-256" and multihash.digest(data, "sha2-256") != cid.digest:
            raise DaemonError("block/get", 200, f"bytes returned for {arg} do not hash to it")
        return data

    def dag_put(self, node: Any, *, pin: bool = True) -> CID:
        """Store `node` as dag-cbor. Encoded here, not by the daemon, so both daemons agree byte for byte."""
        return self.block_put(dag_cbor.encode(node), codec="dag-cbor", pin=pin)

    def dag_get(self, path: str, *, timeout: TimeoutTypes = 30.0) -> Any:
        """Resolve an IPLD path (`CID/prev/prev/round`) on the daemon and return the value as JSON.

        js-ipfs answers 500 for a node that holds links; resolve to a scalar there, or use
        `block_get` and decode locally. js-ipfs also writes a string scalar bare (`init`, not
        `"init"`): an answer that is not JSON is returned as that string.
        """
        text = self._request("dag/get", params={"arg": path}, timeout=timeout).text.strip()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def dag_export(self, cid: str | CID, path: str | os.PathLike, *, timeout: TimeoutTypes = DEFAULT,
                   max_size: int | None = None) -> int:
        """Write the whole DAG under `cid` as a CARv1 file (root `cid`) to `path`; returns its size.

        Streamed to a temp file beside `path` and renamed at the end, so a failure (a block nobody
        has, `timeout` passed, `max_size` bytes passed) leaves no file behind. Both
        daemons take `arg` (js-ipfs renames it to `root`).
        """
        arg, path = cid_str(cid), Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                self._stream("dag/export", params={"arg": arg}, max_size=max_size, timeout=timeout,
                             what=f"dag export {arg}", sink=f.write)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def dag_import(self, path: str | os.PathLike, *, timeout: TimeoutTypes = DEFAULT) -> list[CID]:
        """Load a CAR file's blocks into the daemon and pin its roots recursively; returns the roots.

        Kubo and js-ipfs both answer one JSON line per root, `{"Root": {"Cid": {"/": CID},
        "PinErrorMsg": ""}}` (Kubo may add a `Stats` line); a root that could not be pinned, because
        the CAR lacks part of its DAG, is a DaemonError naming it.
        """
        path = Path(path)
        with open(path, "rb") as f:
            response = self._request("dag/import", params={"pin-roots": "true"}, timeout=timeout,
                                     files={"file": (path.name, f, "application/vnd.ipld.car")})
        roots: list[CID] = []
        for line in response.text.splitlines():
            try:
                root = json.loads(line).get("Root") if line.strip() else None
            except (ValueError, AttributeError):
                raise DaemonError("dag/import", response.status_code, f"answer is not JSON: {line[:200]!r}") from None
            if not isinstance(root, dict):
                continue
            cid = root.get("Cid")
            cid = parse_cid(cid.get("/", "") if isinstance(cid, dict) else cid)
            if root.get("PinErrorMsg"):
                raise DaemonError("dag/import", response.status_code,
                                  f"root {cid_str(cid)} not pinned: {root['PinErrorMsg']}")
            roots.append(cid)
        return roots

    # -- swarm --------------------------------------------------------------------------------------

    def swarm_connect(self, addr: str) -> None:
        self._json("swarm/connect", params={"arg": addr})

    def swarm_peers(self) -> list[str]:
        """Peer IDs this node is connected to."""
        peers = self._json("swarm/peers").get("Peers") or []
        return [p.get("Peer") or p.get("Addr", "").rsplit("/", 1)[-1] for p in peers]

    # -- pubsub (wire format of Kubo >= 0.11: multibase topics and data) ----------------------------

    def pubsub_publish(self, topic: str, data: bytes) -> bool:
        """Publish `data` on `topic`. Returns False when the daemon knew no subscriber to send it to.

        js-ipfs with gossipsub answers 500 `PublishError.InsufficientPeers` when nobody subscribes;
        that is "delivered to nobody", not a failure of ours, so it is reported as False.
        """
        try:
            self._json("pubsub/pub", params={"arg": encode_topic(topic)},
                       files={"file": ("data", data, "application/octet-stream")})
        except DaemonError as exc:
            if "InsufficientPeers" in exc.message:
                return False
            raise
        return True

    def pubsub_ls(self) -> list[str]:
        return [decode_text(t) for t in self._json("pubsub/ls").get("Strings") or []]

    def pubsub_peers(self, topic: str | None = None) -> list[str]:
        params = {"arg": encode_topic(topic)} if topic is not None else None
        return list(self._json("pubsub/peers", params=params).get("Strings") or [])

    def wait_topic_peers(self, topic: str, count: int = 1, timeout: TimeoutTypes = 30.0) -> list[str]:
        """Wait until at least `count` peers subscribe to `topic` (gossipsub needs a moment to learn)."""
        limits = resolve(timeout, self.timeout)
        deadline = _deadline(limits)
        while True:
            peers = self.pubsub_peers(topic)
            if len(peers) >= count:
                return peers
            if deadline is not None and time.monotonic() > deadline:
                raise IPFSTimeout(f"only {len(peers)} of {count} peers on topic {topic!r} after {limits.total:g}s")
            time.sleep(0.05)

    def pubsub_subscribe(self, topic: str, **kwargs: Any) -> Subscription:
        """Subscribe in the background; see `Subscription` for the iterator/callback API.
        It connects within this client's connect timeout and then waits for messages without limit."""
        from .pubsub import Subscription

        return Subscription(self.api, topic, timeout=self.timeout, **kwargs)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _with_daemon_timeout(params: dict | None, limits: Timeout) -> dict | None:
    """`params` plus the daemon's own `timeout` option when the call has a total limit (both daemons
    take it on every endpoint), so the daemon stops working when we stop waiting."""
    option = limits.daemon_option()
    if option is None:
        return params
    return {**(params or {}), "timeout": option}


def _read_body(response: httpx.Response, *, what: str, max_size: int | None, limits: Timeout,
               sink: Callable[[bytes], object]) -> None:
    """Pass the body to `sink` chunk by chunk; TooLarge past `max_size`, IPFSTimeout past `limits.total`."""
    deadline = _deadline(limits)
    size = 0
    # chunks as they come off the socket: asking httpx for fixed-size ones makes it gather each in a buffer
    # and copy it twice more, megabytes per reading thread that glibc then keeps in that thread's arena
    for chunk in response.iter_raw():
        size += len(chunk)
        if max_size is not None and size > max_size:
            raise TooLarge(what, max_size)
        if deadline is not None and time.monotonic() > deadline:
            raise IPFSTimeout(f"{what}: not complete after {limits.total:g}s")
        sink(chunk)


def _stream_error(error: Exception, what: str, limits: Timeout) -> Exception:
    """A daemon's own deadline passing (the `timeout` option we sent) says what was not found in time."""
    if isinstance(error, IPFSTimeout) and limits.total is not None:
        return IPFSTimeout(f"{what}: not found within {limits.total:g}s ({error})")
    return error


def _deadline(limits: Timeout) -> float | None:
    return None if limits.total is None else time.monotonic() + limits.total


def _left(limits: Timeout, deadline: float | None) -> Timeout:
    """`limits` for one more attempt before `deadline`: what is left of the total, at least a millisecond."""
    if deadline is None:
        return limits
    return limits.limited_to(max(deadline - time.monotonic(), 0.001))


