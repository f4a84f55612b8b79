"""The job page in a real browser during a real job: headless Chromium (Debian's, installed by `make
setup`) driven by Playwright, two workers on real loopback daemons training digits.

The owner serves its page (`client submit --dashboard 0`); a reader on the other node serves the chain's
(`chain serve`) from the genesis head and follows the job's topic. Both pages must show the rounds and
the verification of their blocks without a reload; one worker calls itself `<img src=x onerror=alert(1)>`
and must show as that text, creating no element and running nothing; a stranger's `head` message is
counted as dropped and moves nothing. The chain page's final screenshot is docs/dashboard.png (kept
when DASHBOARD_SCREENSHOT=1). A test that cannot start the browser fails with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from grid_ipfs import data, messages, zoo
from grid_ipfs.identity import Identity
from grid_ipfs.localgrid import LocalGrid

from .waiting import wait_for

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
HOSTILE = "<img src=x onerror=alert(1)>"
ROUNDS = 5
JOB = "dash-e2e"
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"cannot start the browser: playwright is not installed ({exc}); `make setup` installs it")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"cannot start the browser: no {CHROMIUM}; `make setup` installs Debian's chromium")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--headless", "--no-sandbox", "--disable-gpu"])
    except Exception as exc:  # noqa: BLE001 - whatever stops it, the test fails saying so
        playwright.stop()
        pytest.fail(f"cannot start the browser {CHROMIUM}: {exc}")
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


def spawn(log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def url_in(log: Path, pattern: str) -> str | None:
    found = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
    return found.group(1) if found else None


def api_state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/state", timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 5-round digits job run by the client CLI with `--dashboard 0` on node 0, and `chain serve` of its
    genesis on node 1; both running while the tests look."""
    root = tmp_path_factory.mktemp("dashboard")
    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x_train, y_train, 2, seed=0))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    local = LocalGrid(root / "grid", shards[:1], nodes=2)
    processes: list[subprocess.Popen] = []
    try:
        local.start()
        local.add_worker(shards[1], ["--name", HOSTILE])
        owner_log, reader_log = root / "client.log", root / "serve.log"
        client = spawn(owner_log, "grid_ipfs.client", "submit", "--api", local.apis[0], "--model",
                       str(root / "digits.keras"), "--rounds", str(ROUNDS), "--min-workers", "2", "--epochs", "1",
                       "--eval-data", str(root / "test.npz"), "--key", str(root / "client.key"),
                       "--head-dir", str(root / "heads"), "--job", JOB, "--dashboard", "0")
        processes.append(client)
        owner_url = wait_for(lambda: url_in(owner_log, r"dashboard: (http://127\.0\.0\.1:\d+/)")
                             or client.poll() is not None, timeout=120, what="the owner's dashboard address")
        assert isinstance(owner_url, str), owner_log.read_text()
        head_file = root / "heads" / f"{JOB}.head"
        genesis = wait_for(lambda: head_file.exists() and head_file.read_text().strip(), timeout=120,
                           what="the genesis block")
        reader = spawn(reader_log, "grid_ipfs.chain", "serve", "--api", local.apis[1], genesis, "--port", "0")
        processes.append(reader)
        reader_url = wait_for(lambda: url_in(reader_log, r"serving job \S+ at (http://127\.0\.0\.1:\d+/)")
                              or reader.poll() is not None, timeout=60, what="chain serve's address")
        assert isinstance(reader_url, str), reader_log.read_text()
        yield type("Job", (), {"local": local, "client": client, "owner_url": owner_url, "reader_url": reader_url,
                               "genesis": genesis, "owner_log": owner_log, "reader_log": reader_log})
    finally:
        for proc in processes:
            stop(proc)
        local.stop()


def rows(page) -> int:
    return page.locator("#rows tbody tr").count()


def test_the_owner_s_page_shows_rounds_verification_and_a_hostile_name_as_text(browser, job):
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(job.owner_url)
    # A round block listed and verified: `ok` in a round row's verified cell (verdicts only ever grow).
    page.wait_for_function("""() => [...document.querySelectorAll('#rows tbody tr')].some(
        (tr) => tr.cells[1].textContent !== '0' && tr.cells[10].textContent === 'ok')""", timeout=240_000)
    assert page.locator("#workers td", has_text=HOSTILE).count() >= 1  # the name, as text
    assert page.locator("#events li", has_text=f"worker {HOSTILE}").count() >= 1
    assert page.locator("img").count() == 0 and dialogs == []  # no element made, nothing run
    assert page.locator("#curves svg").count() >= 1
    page.close()


def test_chain_serve_follows_the_owner_s_heads_to_the_end_and_verifies_them(browser, job):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(job.reader_url)
    page.wait_for_function("() => document.querySelectorAll('#rows tbody tr').length >= 2", timeout=240_000)
    assert job.client.wait(300) == 0, job.owner_log.read_text()
    # every round appeared without a reload, and the final head is verified
    page.wait_for_function(f"""() => document.querySelectorAll('#rows tbody tr').length === {ROUNDS + 1}
        && document.getElementById('verification').textContent === 'verified'
        && /from seq {ROUNDS} to genesis/.test(document.getElementById('verification-detail').textContent)""",
                           timeout=240_000)
    assert page.locator("#status").text_content().startswith("done: completed")
    assert page.locator("#rows tbody td.badge", has_text="ok").count() == ROUNDS + 1
    assert page.locator("#curves svg polyline").count() >= 2  # loss and accuracy curves drawn
    state = api_state(job.reader_url)
    assert state["head_seq"] == ROUNDS and state["follow"]["taken"] >= 1
    screenshot = page.screenshot(full_page=False)
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DASHBOARD_SCREENSHOT") == "1":  # `make` never rewrites the docs; a person does
        DOCS_SCREENSHOT.write_bytes(screenshot)
    page.close()


def test_a_stranger_s_head_message_is_dropped_not_shown(job):
    before = api_state(job.reader_url)
    stranger = Identity.generate()
    forged = messages.encode(messages.Head(job=JOB, round=99, head=job.genesis, weights=job.genesis), stranger)
    with job.local.client(0) as ipfs:
        wait_for(lambda: ipfs.pubsub_publish(messages.job_topic(JOB), forged)
                 and api_state(job.reader_url)["follow"]["dropped"].get("not signed by the owner"),
                 timeout=60, interval=0.5, what="the forged head to be dropped")
    after = api_state(job.reader_url)
    assert after["head"] == before["head"] and len(after["blocks"]) == len(before["blocks"])


def test_the_pages_need_nothing_from_outside(job):
    with urllib.request.urlopen(job.reader_url, timeout=10) as response:
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    assert "http" not in page.replace("http-equiv", "") and "default-src 'self'" in policy
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == ["/dashboard.css", "/dashboard.js"]
