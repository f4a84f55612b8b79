"""Loopback IPFS daemons for development, tests and demos.

`Devnet.up(n, directory)` starts `n` daemons, each with its own repo under `directory`, bound to
127.0.0.1 only (API, gateway, swarm), with no bootstrap peers, no mDNS, no NAT mapping and pubsub on,
and connects them all to each other. It returns once every node answers `/api/v0/id` and sees its
peers. The state (ports, peer IDs, PIDs) goes to `directory/devnet.json`; each PID is also written to
`nodeK/daemon.pid` the moment the process starts, so `Devnet.down(directory)` finds every process
even after an interrupted `up`.

Kubo is used when an `ipfs` binary is on PATH (production daemon); otherwise js-ipfs 0.66 from the
project's own `node_modules` (installed by `make setup` with `npm ci`), with two preloads that make
it behave like Go's Kubo: `nodelay.cjs` (TCP sockets do not wait on Nagle's algorithm) and
`native_aead.cjs` (libp2p-noise's cipher runs in OpenSSL, not pure JavaScript). Repos are reused
between runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import GridError
from .errors import IPFSError
from .rpc import IPFSClient

log = logging.getLogger(__name__)

STATE_FILE = "devnet.json"
NODELAY_PRELOAD = Path(__file__).with_name("nodelay.cjs")
NATIVE_AEAD_PRELOAD = Path(__file__).with_name("native_aead.cjs")
JSIPFS_PRELOADS = (NODELAY_PRELOAD, NATIVE_AEAD_PRELOAD)
PID_FILE = "daemon.pid"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
# How a daemon says a port was taken between our check and its bind: Kubo and Node print EADDRINUSE;
# js-ipfs's libp2p wraps it as "could not listen" and then hangs instead of exiting.
PORT_TAKEN_MARKERS = ("EADDRINUSE", "address already in use", "could not listen on any available address")


class DevnetError(GridError, RuntimeError):
    """A devnet could not be started or stopped; the message names the cause in one line."""


@dataclass
class Daemon:
    """Which IPFS implementation to run, and how."""

    kind: str  # "kubo" or "js-ipfs"
    binary: str

    @classmethod
    def find(cls, prefer: str | None = None) -> Daemon:
        """Kubo if `ipfs` is on PATH, else js-ipfs from node_modules (override: GRID_IPFS_DAEMON=kubo|js-ipfs)."""
        prefer = prefer or os.environ.get("GRID_IPFS_DAEMON")
        kubo = shutil.which("ipfs")
        if prefer in (None, "kubo") and kubo:
            return cls("kubo", kubo)
        if prefer == "kubo":
            raise DevnetError("GRID_IPFS_DAEMON=kubo but no `ipfs` binary is on PATH")
        for candidate in _jsipfs_candidates():
            if candidate.is_file():
                return cls("js-ipfs", str(candidate))
        raise DevnetError("no IPFS daemon found: put Kubo's `ipfs` on PATH, or run `make setup` "
                          "(it installs js-ipfs into node_modules with `npm ci`)")

    def init_args(self) -> list[str]:
        return [self.binary, "init", "--profile", "test"]

    def daemon_args(self) -> list[str]:
        if self.kind == "kubo":
            return [self.binary, "daemon", "--migrate=false"]
        return [self.binary, "daemon"]

    def environment(self) -> dict[str, str]:
        """What the daemon's environment adds to ours. js-ipfs: `JSIPFS_PRELOADS` required first, so its
        libp2p sockets send small frames at once, as Kubo's (Go's default) do, and its Noise cipher runs
        natively. Without them each remote block costs ~0.27 s of Nagle and delayed-ACK waits on
        loopback, and every byte ~10 ns of JavaScript ChaCha20-Poly1305 per side."""
        if self.kind != "js-ipfs":
            return {}
        options = os.environ.get("NODE_OPTIONS", "")
        for preload in JSIPFS_PRELOADS:
            flag = f'--require "{preload}"'
            if flag not in options:
                options = f"{options} {flag}".strip()
        return {"NODE_OPTIONS": options}

    def configure(self, config: dict, ports: dict[str, int]) -> dict:
        """Loopback only, chosen ports, no bootstrap/mDNS/NAT, pubsub on. Edited as JSON: a CLI call costs seconds."""
        addresses = config.setdefault("Addresses", {})
        addresses["API"] = f"/ip4/127.0.0.1/tcp/{ports['api']}"
        addresses["Gateway"] = f"/ip4/127.0.0.1/tcp/{ports['gateway']}"
        addresses["Swarm"] = [f"/ip4/127.0.0.1/tcp/{ports['swarm']}"]
        addresses["Announce"] = []
        config["Bootstrap"] = []
        discovery = config.setdefault("Discovery", {})
        discovery.setdefault("MDNS", {})["Enabled"] = False
        pubsub = config.setdefault("Pubsub", {})
        pubsub["Enabled"] = True  # the `--enable-pubsub-experiment` flag is deprecated since Kubo 0.40
        pubsub.setdefault("Router", "gossipsub")
        swarm = config.setdefault("Swarm", {})
        swarm["DisableNatPortMap"] = True
        config.setdefault("Routing", {})["Type"] = "none"  # every node dials every other: no DHT to ask
        if self.kind == "js-ipfs":
            addresses["RPC"] = f"/ip4/127.0.0.1/tcp/{ports['rpc']}"  # js-ipfs's gRPC port, fixed at 5003 by default
            addresses["Delegates"] = []
            discovery.setdefault("webRTCStar", {})["Enabled"] = False
        else:
            config.setdefault("AutoNAT", {})["ServiceMode"] = "disabled"
        return config


def _jsipfs_candidates() -> list[Path]:
    env = os.environ.get("GRID_IPFS_JSIPFS")
    repo_root = Path(__file__).resolve().parents[2]
    found = [Path(env)] if env else []
    return found + [repo_root / "node_modules/.bin/jsipfs", Path.cwd() / "node_modules/.bin/jsipfs"]


@dataclass
class Node:
    index: int
    repo: str
    api: str
    peer_id: str = ""
    swarm: str = ""
    pid: int = 0
    ports: dict = field(default_factory=dict)

    def client(self, **kwargs) -> IPFSClient:
        return IPFSClient(self.api, **kwargs)


class Devnet:
    """A set of loopback daemons under one directory. Use as a context manager to always stop them."""

    def __init__(self, directory: Path, daemon: Daemon, nodes: list[Node]):
        self.directory = Path(directory)
        self.daemon = daemon
        self.nodes = nodes
        self._procs: dict[int, subprocess.Popen] = {}  # daemons this object started, by node index

    # -- lifecycle -----------------------------------------------------------------------------------

    @classmethod
    def up(cls, n: int, directory: str | Path, *, daemon: Daemon | None = None,
           timeout: float = START_TIMEOUT) -> Devnet:
        if not isinstance(n, int) or n < 1:
            raise DevnetError(f"--nodes must be at least 1 (got {n})")
        directory = Path(directory).resolve()
        running = _alive_pids(directory)
        if running:
            raise DevnetError(f"{directory} holds a running devnet (PIDs {', '.join(map(str, running))}); "
                              f"stop it first: python -m grid_ipfs.devnet down --dir {directory}")
        daemon = daemon or Daemon.find()
        directory.mkdir(parents=True, exist_ok=True)
        nodes = [Node(i, str(directory / f"node{i}"), api="") for i in range(n)]
        net = cls(directory, daemon, nodes)
        try:
            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(net._init_repo, nodes))
                list(pool.map(lambda node: net._start(node, timeout), nodes))
            try:
                net._connect_all(timeout)
            except IPFSError as exc:
                # A daemon can answer `id` and still die a moment later (js-ipfs with a key it
                # cannot load does); name the node and its exit rather than the refused connection.
                raise net._exited_node_error() or exc from None
            net.save()
        except BaseException:
            Devnet.down(directory)
            raise
        return net

    @classmethod
    def load(cls, directory: str | Path) -> Devnet:
        directory = Path(directory).resolve()
        state_file = directory / STATE_FILE
        if not state_file.is_file():
            raise DevnetError(f"no devnet in {directory} (missing {STATE_FILE})")
        state = json.loads(state_file.read_text())
        nodes = [Node(**{k: v for k, v in node.items() if k in Node.__dataclass_fields__})
                 for node in state["nodes"]]
        return cls(directory, Daemon(state["daemon"], state["binary"]), nodes)

    @staticmethod
    def down(directory: str | Path, timeout: float = STOP_TIMEOUT) -> list[int]:
        """Stop every daemon started under `directory` (by the PIDs recorded there). Returns the PIDs stopped."""
        directory = Path(directory).resolve()
        pids = _alive_pids(directory)
        for pid in pids:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in pids:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                log.warning("daemon %d ignored SIGTERM; killing it", pid)
                _signal_group(pid, signal.SIGKILL)
                while _pid_alive(pid) and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
        for pid_file in directory.glob(f"node*/{PID_FILE}"):
            pid_file.unlink(missing_ok=True)
        return pids

    def stop(self) -> None:
        Devnet.down(self.directory)

    def __enter__(self) -> Devnet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one node (used by fault tests: kill a daemon, bring it back on the same ports) --------------

    def stop_node(self, index: int, sig: int = signal.SIGTERM) -> None:
        node = self.nodes[index]
        _signal_group(node.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid_alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(node.pid):
            _signal_group(node.pid, signal.SIGKILL)
        (Path(node.repo) / PID_FILE).unlink(missing_ok=True)

    def start_node(self, index: int, timeout: float = START_TIMEOUT) -> None:
        node = self.nodes[index]
        self._start(node, timeout, keep_ports=True)
        for other in self.nodes:
            if other.index != index and _pid_alive(other.pid):
                node.client().swarm_connect(other.swarm)
        self.save()

    def status(self) -> list[dict]:
        rows = []
        for node in self.nodes:
            try:
                with node.client(timeout=3.0) as client:
                    client.id()
                    peers = len(client.swarm_peers())
                rows.append({"node": node.index, "api": node.api, "pid": node.pid, "up": True, "peers": peers})
            except IPFSError as exc:
                rows.append({"node": node.index, "api": node.api, "pid": node.pid, "up": False,
                             "error": str(exc)})
        return rows

    def save(self) -> None:
        state = self.as_dict()
        state.update(daemon=self.daemon.kind, binary=self.daemon.binary)
        tmp = self.directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.directory / STATE_FILE)

    def as_dict(self) -> dict:
        return {"nodes": [asdict(node) for node in self.nodes]}

    @property
    def apis(self) -> list[str]:
        return [node.api for node in self.nodes]

    # -- internals -------------------------------------------------------------------------------------

    def _init_repo(self, node: Node) -> None:
        repo = Path(node.repo)
        if (repo / "config").is_file():
            return
        if repo.exists():
            shutil.rmtree(repo)  # a half-made repo from an interrupted init
        env = {**os.environ, "IPFS_PATH": str(repo)}
        result = subprocess.run(self.daemon.init_args(), env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DevnetError(f"`{self.daemon.kind} init` failed for {repo}: {tail[0]}")

    def _start(self, node: Node, timeout: float, keep_ports: bool = False) -> None:
        repo = Path(node.repo)
        for _attempt in range(3):
            if not (keep_ports and node.ports):
                node.ports = {name: free_port() for name in ("api", "gateway", "swarm", "rpc")}
            config_file = repo / "config"
            try:
                config = self.daemon.configure(json.loads(config_file.read_text()), node.ports)
            except ValueError as exc:
                raise DevnetError(f"node {node.index}: {config_file} is not valid JSON ({exc})") from None
            config_file.write_text(json.dumps(config, indent=2))
            node.peer_id = config.get("Identity", {}).get("PeerID", "")
            (repo / "api").unlink(missing_ok=True)  # stale after a crash; the daemon rewrites it
            _remove_stale_lock(repo / "repo.lock")  # left by a killed daemon (js-ipfs: a directory)
            log_path = repo / "daemon.log"
            # The shell writes the PID file and then becomes the daemon (exec keeps the PID), so no
            # instant exists where a daemon runs unrecorded, even if `up` is killed mid-start.
            launcher = ['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', str(repo / PID_FILE),
                        *self.daemon.daemon_args()]
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(launcher, env={**os.environ, **self.daemon.environment(),
                                                              "IPFS_PATH": str(repo)},
                                        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            node.pid = proc.pid
            self._procs[node.index] = proc
            node.api = f"/ip4/127.0.0.1/tcp/{node.ports['api']}"
            error = self._wait_started(node, proc, log_path, timeout)
            if error is None:
                return
            if any(marker in error for marker in PORT_TAKEN_MARKERS):
                if keep_ports:
                    raise DevnetError(f"node {node.index}: a port is already taken ({error})")
                log.info("node %d: port taken (%s); retrying with other ports", node.index, error)
                continue
            raise DevnetError(f"node {node.index} did not start: {error} (log: {log_path})")
        raise DevnetError(f"node {node.index}: ports kept being taken; is something grabbing ports?")

    def _wait_started(self, node: Node, proc: subprocess.Popen, log_path: Path, timeout: float) -> str | None:
        """None once the daemon answers `id`; otherwise the reason it will not."""
        deadline = time.monotonic() + timeout
        next_log_check = 0.0
        with node.client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return f"exited with code {proc.returncode}: {_last_line(log_path)}"
                if time.monotonic() >= next_log_check:
                    # A daemon that lost a port can hang rather than exit: read its log, not the clock.
                    next_log_check = time.monotonic() + 0.5
                    taken = _port_taken_line(log_path)
                    if taken:
                        _signal_group(proc.pid, signal.SIGKILL)
                        proc.wait()
                        return taken
                try:
                    info = client.id()
                except IPFSError:
                    time.sleep(0.1)
                    continue
                node.peer_id = info["ID"]
                node.swarm = _loopback_swarm(info, node)
                return None
        _signal_group(proc.pid, signal.SIGKILL)
        return f"no answer on {node.api} within {timeout:.0f}s: {_last_line(log_path)}"

    def _exited_node_error(self, grace: float = 5.0) -> DevnetError | None:
        """The first started daemon that exited (waiting up to `grace` s for a dying one), as an error."""
        deadline = time.monotonic() + grace
        while True:
            for node in self.nodes:
                proc = self._procs.get(node.index)
                if proc is not None and proc.poll() is not None:
                    log_path = Path(node.repo) / "daemon.log"
                    return DevnetError(f"node {node.index} did not start: exited with code {proc.returncode}: "
                                       f"{_last_line(log_path)} (log: {log_path})")
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def _connect_all(self, timeout: float) -> None:
        for node in self.nodes:
            with node.client() as client:
                for other in self.nodes[node.index + 1:]:
                    client.swarm_connect(other.swarm)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            with node.client() as client:
                while len(set(client.swarm_peers()) & {o.peer_id for o in self.nodes}) < len(self.nodes) - 1:
                    if time.monotonic() > deadline:
                        raise DevnetError(f"node {node.index} sees only {client.swarm_peers()} after {timeout:.0f}s")
                    time.sleep(0.05)


def _loopback_swarm(info: dict, node: Node) -> str:
    for addr in info.get("Addresses") or []:
        if addr.startswith("/ip4/127.0.0.1/tcp/") and "/ws" not in addr:
            return addr if "/p2p/" in addr else f"{addr}/p2p/{info['ID']}"
    return f"/ip4/127.0.0.1/tcp/{node.ports['swarm']}/p2p/{info['ID']}"


def _remove_stale_lock(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that binds now, outside the kernel's ephemeral range, never handed out twice.

    Ports from `bind(0)` come from the ephemeral range, where every outgoing connection (our RPC
    calls, the daemons' dials) also takes its source port; between our check and the daemon's bind
    one of those can land on it (measured in CI: js-ipfs then hangs with "could not listen").
    """
    low, high = _ephemeral_range()
    if low > 11000:
        candidates = range(10000, low)
    elif high < 64535:
        candidates = range(high + 1, 65536)
    else:
        candidates = range(0)  # the kernel hands out nearly every port: fall back to bind(0)
    with _ports_lock:
        for _ in range(200):
            port = random.choice(candidates) if candidates else _kernel_port()
            if port not in _ports_handed_out and _binds(port):
                _ports_handed_out.add(port)
                return port
        port = _kernel_port()
        _ports_handed_out.add(port)
        return port


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux default; macOS uses 49152-65535, also above 32768
    return low, high


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_taken_line(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if any(marker in line for marker in PORT_TAKEN_MARKERS):
            return line.strip()[:300]
    return None


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:300] if lines else "no output"


def _recorded_pids(directory: Path) -> list[int]:
    pids = set()
    for pid_file in directory.glob(f"node*/{PID_FILE}"):
        try:
            pids.add(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def _pids_by_repo(directory: Path) -> set[int]:
    """Daemons whose IPFS_PATH lies under `directory`: found even if a PID file was lost."""
    found = set()
    prefix = f"IPFS_PATH={directory}/".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(var.startswith(prefix) for var in (proc / "environ").read_bytes().split(b"\0")):
                found.add(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def _alive_pids(directory: Path) -> list[int]:
    """PIDs under `directory` that still run an IPFS daemon (a recycled PID running something else is left alone)."""
    pids = set(_recorded_pids(directory)) | _pids_by_repo(directory)
    return sorted(pid for pid in pids if pid != os.getpid() and _pid_alive(pid) and _is_daemon(pid))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):  # our own child (a devnet run in-process): reap it
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _is_daemon(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc: trust the PID file
    return b"ipfs" in cmdline  # js-ipfs rewrites its title to plain "ipfs"


def _signal_group(pid: int, sig: int) -> None:
    """Signal the daemon's process group (started with start_new_session), so helpers die with it."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
