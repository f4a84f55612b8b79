"""The job page (`grid_ipfs.chain.serve`, `chain serve`, `client submit --dashboard`) without a browser.

The view and the verifier run on the in-memory store of tests/test_chain_format.py (pure logic); the
server is a real ThreadingHTTPServer on 127.0.0.1 answering real HTTP requests: fixed routes only, GET
and HEAD only, the security headers on every answer, and whatever a block holds encodes as JSON. The
page in a real browser, during a real job on real daemons: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import http.client
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from grid_ipfs import messages
from grid_ipfs.chain import ChainError, ChainLog
from grid_ipfs.chain.serve import ChainView, DashboardServer, Verifier, json_safe
from grid_ipfs.identity import Identity
from grid_ipfs.ipfs.cids import cid_str

from .test_chain_format import OWNER, MemoryStore, build_chain, genesis_fields, round_fields
from .test_witness import fork_block
from .waiting import wait_for

STATIC = Path(__file__).resolve().parent.parent / "grid_ipfs" / "chain" / "static"
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def chain():
    store = MemoryStore()
    log, cids = build_chain(store, rounds=3)
    return store, log, cids


def head_message(identity: Identity, head, job: str = "job-1", round_: int = 3) -> bytes:
    return messages.encode(messages.Head(job=job, round=round_, head=cid_str(head), weights=cid_str(head)), identity)


def state(view: ChainView) -> dict:
    return json.loads(view.state()[1])


# -- the view ----------------------------------------------------------------------------------------------


def test_the_view_lists_every_block_its_workers_and_curves(chain):
    store, _, cids = chain
    view = ChainView(store, cid_str(cids[3]))
    s = state(view)
    assert [b["seq"] for b in s["blocks"]] == [0, 1, 2, 3] and s["head"] == cid_str(cids[3])
    assert s["owner"] == OWNER.id and s["job"] == "job-1" and s["mode"] == "sync"
    assert all(b["workers"] == 3 and len(b["updates"]) == 3 for b in s["blocks"][1:])
    assert len(s["workers"]) == 3 and all(w["blocks"] == 3 for w in s["workers"])
    assert [c["metric"] for c in s["curves"]] == ["loss", "accuracy"]
    assert [p[0] for p in s["curves"][0]["series"][0]["points"]] == [1, 2, 3]
    assert all(b["verify"] == "pending" for b in s["blocks"])


def test_a_head_that_extends_the_chain_adds_its_blocks_and_a_fork_changes_nothing(chain):
    store, log, cids = chain
    view = ChainView(store, cid_str(cids[1]))
    assert view.advance(cid_str(cids[3])) == 2 and view.head == cid_str(cids[3])
    assert view.advance(cid_str(cids[3])) == 0
    version = view.version
    other = fork_block(store, cids[2])  # the owner's second block at seq 3: not this history
    with pytest.raises(ChainError, match="does not extend"):
        view.advance(cid_str(other))
    with pytest.raises(ChainError, match="does not extend"):
        view.advance(cid_str(cids[1]))  # an older head
    assert view.head == cid_str(cids[3]) and view.version == version


def test_only_the_owner_s_heads_that_extend_the_chain_move_the_page(chain):
    store, log, cids = chain
    view = ChainView(store, cid_str(cids[1]))
    stranger = Identity.generate()
    before = [b["cid"] for b in state(view)["blocks"]]
    assert view.offer(head_message(stranger, cids[3])) == "not signed by the owner"
    assert view.offer(b"<html>not a message</html>") == "malformed"
    assert view.offer(b'{"v": 1, "type": "x' + HOSTILE.encode() + b'"}') == "malformed"  # one counter, any reason
    assert view.offer(head_message(OWNER, cids[3], job="job-2")) == "other job"
    assert view.offer(head_message(OWNER, fork_block(store, cids[0]))) == "does not extend the chain"
    assert [b["cid"] for b in state(view)["blocks"]] == before
    assert view.offer(head_message(OWNER, cids[3])) is None
    s = state(view)
    assert [b["seq"] for b in s["blocks"]] == [0, 1, 2, 3] and s["follow"]["taken"] == 1
    assert s["follow"]["dropped"] == {"not signed by the owner": 1, "malformed": 2,
                                      "other job": 1, "does not extend the chain": 1}


def test_a_stranger_s_junk_on_the_topic_never_makes_the_page_reread_the_whole_chain(chain, monkeypatch):
    """Every dropped message is a new version (the page shows the counts); the curves and worker totals
    cover every block, so they are computed when blocks are added, not once per junk message."""
    from grid_ipfs.chain import serve

    store, _, cids = chain
    view = ChainView(store, cid_str(cids[1]))
    reads = []
    monkeypatch.setattr(serve, "collect_series", lambda blocks: reads.append(len(blocks)) or {})
    for i in range(20):
        assert view.offer(b"junk %d" % i) == "malformed"
        assert state(view)["follow"]["dropped"] == {"malformed": i + 1}
    assert view.offer(head_message(OWNER, cids[3])) is None
    assert state(view)["head_seq"] == 3
    assert reads == [2, 4]  # once for the first two blocks, once when the head brought two more


def test_a_hostile_owner_s_heads_cost_a_bounded_number_of_fetches(chain, monkeypatch):
    """A head far ahead is refused after one block, and a refused head is not fetched again: else each
    announcement of a long fork would cost up to max_blocks fetches."""
    from grid_ipfs.chain import serve

    store, _, cids = chain
    view = ChainView(store, cid_str(cids[1]))
    fork = [fork_block(store, cids[1])]  # seq 2, 3, 4 on the owner's other block at seq 2
    for _ in range(2):
        fork.append(fork_block(store, fork[-1]))
    reads = []
    real_get = store.block_get
    monkeypatch.setattr(store, "block_get", lambda cid, **kw: reads.append(cid_str(cid)) or real_get(cid, **kw))
    monkeypatch.setattr(serve, "MAX_AHEAD", 1)
    for _ in range(3):
        assert view.offer(head_message(OWNER, cids[3])) == "does not extend the chain"  # 2 blocks ahead
    assert reads == [cid_str(cids[3])] * 3  # one block each (not remembered: a head between may come late)
    assert view.offer(head_message(OWNER, cids[2], round_=2)) is None and view.head_seq == 2
    monkeypatch.setattr(serve, "MAX_AHEAD", 2)
    reads.clear()
    for _ in range(3):
        assert view.offer(head_message(OWNER, fork[2], round_=4)) == "does not extend the chain"
    assert reads == [cid_str(fork[2]), cid_str(fork[1])]  # walked down to seq 3 once, then remembered
    assert view.offer(head_message(OWNER, cids[3])) is None and view.head_seq == 3


def test_the_owner_s_done_message_names_the_end(chain):
    store, _, cids = chain
    view = ChainView(store, cid_str(cids[3]))
    done = messages.encode(messages.Done(job="job-1", head=cid_str(cids[3]), reason="completed"), OWNER)
    assert view.offer(done) is None and state(view)["status"] == "done: completed"


def test_the_verifier_covers_every_block_below_the_newest_head(chain):
    store, log, cids = chain
    view = ChainView(store, cid_str(cids[2]))
    verifier = Verifier(view, store).start()
    try:
        wait_for(lambda: state(view)["verification"]["state"] == "ok", what="the first verification")
        log.append(round_fields(store, np.random.default_rng(9), genesis_fields(store, np.random.default_rng(0)), 4,
                                log), OWNER)
        view.advance(cid_str(log.head))
        s = wait_for(lambda: (s := state(view))["verification"].get("seq") == 4 and s, what="the new head verified")
        assert s["verification"]["state"] == "ok" and s["verification"]["blocks"] == 5
        assert [b["verify"] for b in s["blocks"]] == ["ok"] * 5
    finally:
        verifier.close()


def test_a_chain_that_does_not_verify_shows_the_failed_block(chain):
    store, log, cids = chain
    stranger = Identity.generate()
    bad = ChainLog(store, None)
    bad._head = cids[3]
    bad.append(round_fields(store, np.random.default_rng(5), genesis_fields(store, np.random.default_rng(0)), 4,
                            log), stranger)  # signed by someone else than the owner
    view = ChainView(store, cid_str(bad.head))
    verifier = Verifier(view, store).start()
    try:
        s = wait_for(lambda: (s := state(view))["verification"]["state"] == "failed" and s, what="the verdict")
        assert [b["verify"] for b in s["blocks"]] == ["ok"] * 4 + ["failed"]
        assert "signed by" in s["blocks"][-1]["verify_reason"] or "signer" in s["blocks"][-1]["verify_reason"]
    finally:
        verifier.close()


def test_huge_odd_and_hostile_metrics_encode_as_plain_json():
    store = MemoryStore()
    log = ChainLog(store, None)
    rng = np.random.default_rng(0)
    genesis = genesis_fields(store, rng)
    log.append(genesis, OWNER)
    odd = {"loss": 1.7976931348623157e308, "val_loss": -1.7976931348623157e308, "accuracy": 5e-324,
           "val_accuracy": -0.0, f"{HOSTILE}</script>": 1.0, "\u202egnp.exe": 2.0, "x" * 5000: 3.0}
    log.append({**round_fields(store, rng, genesis, 1, log), "metrics": odd}, OWNER)
    s = state(ChainView(store, cid_str(log.head)))
    metrics = s["blocks"][1]["metrics"]
    assert metrics["loss"] == 1.7976931348623157e308 and metrics["accuracy"] == 5e-324
    assert f"{HOSTILE}</script>" in metrics  # text, sent as it is: the page shows it with textContent
    assert "\\u202egnp.exe" in metrics  # a bidi override is escaped, not applied
    assert max(len(k) for k in metrics) <= 300
    assert s["curves"][0]["metric"] == "loss"


def test_json_safe_turns_what_json_cannot_hold_into_null_or_text():
    deep: object = 1
    for _ in range(10_000):  # deeper than json.dumps could recurse
        deep = [deep]
    value = {"nan": math.nan, "inf": -math.inf, "big": 10 ** 400, "int64": 2 ** 63, "np": np.float32(0.5),
             "deep": deep, "bytes": b"\x00\x1b[31m", 7: "seven"}
    out = json_safe(value)
    text = json.dumps(out, allow_nan=False)
    assert out["nan"] is None and out["inf"] is None and out["big"] is None and out["int64"] == 2.0 ** 63
    assert out["np"] == 0.5 and out["7"] == "seven" and "\x1b" not in text
    level, depth = json.loads(text)["deep"], 1
    while isinstance(level, list):
        level, depth = level[0], depth + 1
    assert level is None and depth <= 17


# -- the server --------------------------------------------------------------------------------------------


@pytest.fixture
def server(chain):
    store, _, cids = chain
    page = DashboardServer(ChainView(store, cid_str(cids[3]))).start()
    try:
        yield page
    finally:
        page.close()


def request(server, method: str, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)  # the path exactly as given
    conn.putheader("Host", (headers or {}).pop("Host", f"127.0.0.1:{port}"))
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def test_the_page_its_script_and_its_state_are_served_with_a_strict_policy(server):
    page = request(server, "GET", "/")
    assert page.status == 200 and page.getheader("Content-Type").startswith("text/html")
    policy = page.getheader("Content-Security-Policy")
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.getheader("X-Content-Type-Options") == "nosniff"
    assert b'<script src="/dashboard.js"' in page.body and b"<script>" not in page.body
    assert request(server, "GET", "/dashboard.js").getheader("Content-Type").startswith("text/javascript")
    api = request(server, "GET", "/api/state?since=1")
    assert api.status == 200 and json.loads(api.body)["job"] == "job-1"
    assert request(server, "GET", "/api/state", {"If-None-Match": api.getheader("ETag")}).status == 304
    assert request(server, "HEAD", "/").status == 200


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/static/index.html", "/api", "/api/state/..", "//etc/passwd",
                                  "/dashboard.js/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/favicon.ico"])
def test_only_fixed_routes_answer(server, path):
    response = request(server, "GET", path)
    assert response.status == 404 and b"root:" not in response.body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "BREW"])
def test_every_method_but_get_and_head_is_refused(server, method):
    response = request(server, method, "/api/state")
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"
    assert response.getheader("Content-Security-Policy")


def test_a_page_reached_through_another_host_name_is_refused(server):
    """DNS rebinding: a site whose name resolves to 127.0.0.1 must not read the job's state."""
    assert request(server, "GET", "/api/state", {"Host": "evil.example:80"}).status == 421
    port = server.httpd.server_address[1]
    assert request(server, "GET", "/api/state", {"Host": f"localhost:{port}"}).status == 200


@pytest.mark.parametrize("host, port, allowed", [
    ("127.0.0.1", 80, True), ("localhost", 80, True), ("[::1]", 80, True), ("127.0.0.1:80", 80, True),
    ("LOCALHOST:8080", 8080, True), ("127.0.0.1", 8080, False), ("127.0.0.1:8080@evil.example", 8080, False),
    ("evil.example:8080", 8080, False), ("127.0.0.1:http", 8080, False), ("", 8080, False),
    ("127.0.0.1:99999999", 8080, False)])
def test_the_host_header_must_name_this_server_with_its_port_or_port_80_left_out(host, port, allowed):
    from types import SimpleNamespace

    from grid_ipfs.chain.serve import _Server

    assert _Server.host_allowed(SimpleNamespace(bound="127.0.0.1", server_port=port), host) is allowed


def test_the_script_puts_no_text_into_markup():
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in script
    assert not re.search(r"<script>|style=|\son\w+=", (STATIC / "index.html").read_text())


def test_http_server_s_own_errors_carry_the_policy_too(server):
    host, port = server.httpd.server_address[:2]
    import socket

    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n")  # a header line too long
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    assert b"Content-Security-Policy: default-src 'self'" in answer


def test_idle_connections_beyond_the_limit_are_closed_and_never_hold_a_thread(chain, monkeypatch):
    """A flood of idle connections (slowloris) ties up at most MAX_CONNECTIONS threads: one more is
    closed at once, and the page answers again as soon as one of them leaves."""
    import socket

    from grid_ipfs.chain import serve

    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 2)
    store, _, cids = chain
    page = DashboardServer(ChainView(store, cid_str(cids[3]))).start()
    host, port = page.httpd.server_address[:2]
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection((host, port), timeout=10) as extra:
            assert extra.recv(1) == b""  # closed by the server, not left to its 30 s timeout
        idle.pop().close()

        def answers() -> bool:
            try:
                return request(page, "GET", "/api/state").status == 200
            except ConnectionError:  # closed: the leaving connection's slot is not free yet
                return False

        assert wait_for(answers, timeout=20, what="a free slot")
    finally:
        for sock in idle:
            sock.close()
        page.close()


# -- the owner's page (no job: what it holds before genesis, and what it keeps of peers' text) --------------


def test_the_owner_s_page_keeps_peers_names_as_escaped_text_and_serves_before_the_job():
    from grid_ipfs.client.dashboard import DashboardProgress

    page = DashboardProgress("/ip4/127.0.0.1/tcp/9", 0)  # no daemon is touched before the job starts
    try:
        assert page.url.startswith("http://127.0.0.1:")
        page.on_worker_joined("w" * 43, f"{HOSTILE}\x1b[2J\u202e\n", 1, 2)
        live = page._live()
        assert live["names"]["w" * 43] == f"{HOSTILE}\\x1b[2J\\u202e\\n" and live["joined"] == 1
        assert "\x1b" not in live["events"][0]["text"] and HOSTILE in live["events"][0]["text"]
        from grid_ipfs.client import RoundResult

        turned_down = RoundResult(2, "w", "h", 2, {}, 1.0, rejected={f"bad weights {HOSTILE}": 1}, accepted=False,
                                  tries=1)
        page.on_round_rejected(turned_down, "val_accuracy 0.41 fails val_accuracy>=0.6\n[forged line]")
        live = page._live()
        assert live["rejected_tries"] == [{"round": 2, "try": 1,
                                           "why": "val_accuracy 0.41 fails val_accuracy>=0.6\\n[forged line]"}]
        assert live["refused"] == [{"round": 2, "reason": f"bad weights {HOSTILE}", "count": 1}]
        answer = request(page.server, "GET", "/api/state")
        assert answer.status == 200 and json.loads(answer.body)["status"] == "waiting for the job to start"
    finally:
        page.close()


def test_the_owner_s_page_keeps_only_the_newest_refusals_of_a_long_job():
    """Each round's refusal reasons may quote its workers (all distinct): a long job must not grow them."""
    from grid_ipfs.client import RoundResult
    from grid_ipfs.client.dashboard import MAX_REFUSALS, DashboardProgress

    page = DashboardProgress("/ip4/127.0.0.1/tcp/9", 0)
    try:
        for round_ in range(1, 3 * MAX_REFUSALS):
            reasons = {f"bad weights from worker {round_}-{i}": 1 for i in range(3)}
            page.on_round_rejected(RoundResult(round_, "w", "h", 2, {}, 1.0, rejected=reasons, accepted=False,
                                               tries=1), f"try {round_} fails")
        assert len(page.refused) == len(page.rejected_tries) == MAX_REFUSALS
        live = page._live()
        assert live["rejected_tries"][-1]["why"] == f"try {3 * MAX_REFUSALS - 1} fails"
        assert len(live["refused"]) == MAX_REFUSALS
    finally:
        page.close()


# -- the command lines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["serve", "--api", "/ip4/127.0.0.1/tcp/9", "not-a-cid"], "error: "),
    (["serve", "--api", "/ip4/127.0.0.1/tcp/9", "bafyreigdrzdl5o4hukzvndpm5qqn5iqonolbgtgs5zwapgoe6aakihndku"],
     "error: "),
    (["serve", "--api", "/ip4/127.0.0.1/tcp/9", "bafyreigdrzdl5o4hukzvndpm5qqn5iqonolbgtgs5zwapgoe6aakihndku",
      "--port", "70000"], "error: --port must be in 0..65535"),
])
def test_chain_serve_refuses_bad_input_in_one_line(args, message):
    from .cli import run_cli

    proc = run_cli("grid_ipfs.chain", *args, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


def test_client_refuses_a_dashboard_port_out_of_range(tmp_path):
    from .cli import run_cli

    model = tmp_path / "m.keras"
    model.write_bytes(b"not used")
    proc = run_cli("grid_ipfs.client", "submit", "--api", "/ip4/127.0.0.1/tcp/9", "--model", str(model),
                   "--rounds", "1", "--dashboard", "-1", timeout=120)
    assert proc.returncode == 2 and "error: --dashboard must be a port in 0..65535, got -1" in proc.stderr
