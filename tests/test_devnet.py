"""`python -m grid_ipfs.devnet` as a user runs it: up, status, down, and the ways it can go wrong."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from grid_ipfs.ipfs import devnet as devnet_module
from grid_ipfs.ipfs.devnet import PID_FILE, Devnet, DevnetError, _ephemeral_range, _pid_alive, free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def devnet_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grid_ipfs.devnet", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_up_status_down_leaves_no_process(tmp_path):
    directory = tmp_path / "net"
    try:
        up = devnet_cli("up", "--nodes", "3", "--dir", str(directory), "--json")
        assert up.returncode == 0, up.stderr
        state = json.loads(up.stdout)
        written = json.loads((directory / "devnet.json").read_text())
        assert [n["api"] for n in state["nodes"]] == [n["api"] for n in written["nodes"]]
        nodes = state["nodes"]
        assert len(nodes) == 3
        for node in nodes:
            assert node["api"].startswith("/ip4/127.0.0.1/tcp/") and node["peer_id"]
            assert node["swarm"].startswith("/ip4/127.0.0.1/")
        assert len({node["api"] for node in nodes}) == 3
        pids = [node["pid"] for node in nodes]
        assert all(_pid_alive(pid) for pid in pids)

        status = devnet_cli("status", "--dir", str(directory), "--json")
        assert status.returncode == 0 and all(row["up"] and row["peers"] >= 2 for row in json.loads(status.stdout))

        again = devnet_cli("up", "--nodes", "1", "--dir", str(directory))
        assert again.returncode == 1
        assert "holds a running devnet" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    finally:
        down = devnet_cli("down", "--dir", str(directory))
    assert down.returncode == 0 and "stopped 3" in down.stdout
    wait_for(lambda: not any(_pid_alive(pid) for pid in pids), 10, what="daemons to exit")


def test_status_says_which_nodes_are_down(make_devnet):
    net = make_devnet(2)
    net.stop_node(1)
    status = devnet_cli("status", "--dir", str(net.directory))
    assert status.returncode == 1 and "DOWN" in status.stdout and "up, " in status.stdout


def test_nodes_below_one_is_a_one_line_error(tmp_path):
    result = devnet_cli("up", "--nodes", "0", "--dir", str(tmp_path))
    assert result.returncode == 1 and result.stderr.strip() == "error: --nodes must be at least 1 (got 0)"


def test_daemon_dying_during_start_names_the_cause_and_leaves_nothing(tmp_path):
    Devnet.up(1, tmp_path).stop()  # makes a repo we can break
    config_file = tmp_path / "node0" / "config"
    config = json.loads(config_file.read_text())
    config["Identity"]["PrivKey"] = "bm90IGEga2V5"  # valid JSON, but the daemon cannot load its key
    config_file.write_text(json.dumps(config))
    with pytest.raises(DevnetError, match="node 0 did not start: exited with code") as error:
        Devnet.up(1, tmp_path)
    assert "\n" not in str(error.value)
    assert not any(_pid_alive(int(p.read_text())) for p in tmp_path.glob(f"node*/{PID_FILE}"))


def test_picked_ports_avoid_the_ephemeral_range_and_never_repeat():
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports), "outgoing connections take ports from that range"


def test_a_port_taken_before_the_daemon_binds_it_is_replaced(tmp_path, monkeypatch):
    """Between picking a port and the daemon binding it, someone else can take it; js-ipfs then hangs
    with "could not listen" instead of exiting. `up` must notice from the log and pick new ports."""
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_port = devnet_module.free_port
    handed = []

    def first_swarm_port_taken() -> int:
        handed.append(None)
        return taken if len(handed) == 3 else real_free_port()  # api, gateway, then swarm

    monkeypatch.setattr(devnet_module, "free_port", first_swarm_port_taken)
    net = None
    try:
        net = Devnet.up(1, tmp_path / "net", timeout=60)
        assert net.nodes[0].ports["swarm"] != taken
        assert len(handed) == 8, "a second set of ports was picked after the first failed"
    finally:
        squatter.close()
        Devnet.down(tmp_path / "net")
    assert net is not None and not _pid_alive(net.nodes[0].pid)


def test_corrupt_config_is_named(tmp_path):
    Devnet.up(1, tmp_path).stop()
    (tmp_path / "node0" / "config").write_text("{ this is not json")
    with pytest.raises(DevnetError, match="config is not valid JSON"):
        Devnet.up(1, tmp_path)


def test_down_after_an_interrupted_up(tmp_path):
    """Kill `up` as soon as a daemon PID is recorded: `down` still finds and stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "grid_ipfs.devnet", "up", "--nodes", "2", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid_files = wait_for(lambda: list(tmp_path.glob(f"node*/{PID_FILE}")), 120, what="a daemon to start")
        pids = [int(p.read_text()) for p in pid_files if p.read_text().strip()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    down = devnet_cli("down", "--dir", str(tmp_path))
    assert down.returncode == 0
    wait_for(lambda: not any(_pid_alive(pid) for pid in pids), 15, what="orphaned daemons to exit")
    assert not list(tmp_path.glob(f"node*/{PID_FILE}"))


def test_help_exits_zero():
    result = devnet_cli("--help")
    assert result.returncode == 0 and "up" in result.stdout and "down" in result.stdout


def test_js_ipfs_daemons_run_with_their_preloads(make_devnet):
    """js-ipfs daemons preload nodelay.cjs (TCP_NODELAY, Go's default and so Kubo's: without it each
    remote block waits ~0.27 s on delayed ACKs) and native_aead.cjs (Noise's cipher in OpenSSL). Both
    must be in the running daemon's environment and must load in Node without error."""
    net = make_devnet(1)
    if net.daemon.kind != "js-ipfs":
        pytest.fail(f"this test is about js-ipfs; the devnet runs {net.daemon.kind}")
    environ = open(f"/proc/{net.nodes[0].pid}/environ", "rb").read().split(b"\0")
    options = [e for e in environ if e.startswith(b"NODE_OPTIONS=")]
    assert options
    for preload in devnet_module.JSIPFS_PRELOADS:
        assert str(preload).encode() in options[0]
    loaded = subprocess.run(["node", "--require", str(devnet_module.NODELAY_PRELOAD), "-e",
                             "const s = require('net').createServer(); s.emit('connection', "
                             "new (require('net').Socket)()); console.log('ok')"],
                            capture_output=True, text=True, timeout=30)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "ok", loaded.stderr


AEAD_CHECK = r"""
const crypto = require('crypto')
const { ChaCha20Poly1305 } = require(process.argv[1])
const stablelib = { seal: ChaCha20Poly1305.prototype.seal, open: ChaCha20Poly1305.prototype.open }
require(process.argv[2])
if (!ChaCha20Poly1305.prototype.seal.native || !ChaCha20Poly1305.prototype.open.native) throw new Error('not patched')
const same = (a, b) => a !== null && b !== null && Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0
let checked = 0
for (const length of [0, 1, 15, 16, 17, 64, 65, 1000, 65519]) for (const adLength of [0, 1, 16, 32, 33]) {
  const aead = new ChaCha20Poly1305(crypto.randomBytes(32))
  const nonce = crypto.randomBytes(12)
  const plain = new Uint8Array(crypto.randomBytes(length)), ad = new Uint8Array(crypto.randomBytes(adLength))
  const sealed = aead.seal(nonce, plain, ad)
  if (!same(sealed, stablelib.seal.call(aead, nonce, plain, ad))) throw new Error(`seal ${length}/${adLength}`)
  if (!same(aead.open(nonce, sealed, ad), plain)) throw new Error(`open ${length}/${adLength}`)
  const inPlace = new Uint8Array(sealed)  // libp2p-noise decrypts into the ciphertext's own buffer
  if (!same(aead.open(nonce, inPlace, ad, inPlace.subarray(0, length)), plain)) throw new Error('in place')
  const forged = new Uint8Array(sealed); forged[forged.length - 1] ^= 1
  const before = new Uint8Array(forged)
  if (aead.open(nonce, forged, ad, forged.subarray(0, length)) !== null) throw new Error('forgery opened')
  if (!same(forged, before)) throw new Error('dst written on a forgery')
  if (aead.open(nonce, sealed, crypto.randomBytes(adLength + 1)) !== null) throw new Error('wrong ad opened')
  if (aead.open(nonce, sealed.subarray(0, 15), ad) !== null) throw new Error('short input opened')
  const odd = crypto.randomBytes(8)  // not a 12-byte nonce: stablelib's own code
  if (!same(aead.seal(odd, plain, ad), stablelib.seal.call(aead, odd, plain, ad))) throw new Error('fallback')
  checked++
}
console.log(checked)
"""


def test_native_aead_matches_stablelib_byte_for_byte():
    """The preload swaps libp2p-noise's ChaCha20-Poly1305 for OpenSSL's. On the wire nothing may change:
    the same ciphertext and tag as stablelib for every length and associated data, and a forged or
    truncated message refused without touching the caller's buffer."""
    stablelib = Path(devnet_module.__file__).resolve().parents[2] / "node_modules/@stablelib/chacha20poly1305"
    if not stablelib.is_dir():
        pytest.fail(f"{stablelib} is missing: run `make setup`")
    result = subprocess.run(["node", "-e", AEAD_CHECK, str(stablelib), str(devnet_module.NATIVE_AEAD_PRELOAD)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "45"


def test_the_preload_keeps_the_callers_node_options(monkeypatch):
    monkeypatch.setenv("NODE_OPTIONS", "--max-old-space-size=2048")
    js = devnet_module.Daemon("js-ipfs", "jsipfs").environment()["NODE_OPTIONS"]
    assert js.startswith("--max-old-space-size=2048 ")
    assert all(js.count(str(preload)) == 1 for preload in devnet_module.JSIPFS_PRELOADS)
    monkeypatch.setenv("NODE_OPTIONS", js)
    assert devnet_module.Daemon("js-ipfs", "jsipfs").environment()["NODE_OPTIONS"] == js  # not twice
    assert devnet_module.Daemon("kubo", "ipfs").environment() == {}
