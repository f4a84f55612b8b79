"""Documentation that runs: every fenced code block of README.md, docs/*.md and examples/README.md is
executed here, so a documented call can never break silently.

How a block is run, by its fence's language:
- ```python: executed as written; a block that names the documented daemon address runs against the
  session devnet (that address replaced by node 0's), in a directory holding the files it names.
- ```bash / ```console: each command (a `$ ` line in console blocks; `\\` continuations and heredocs
  joined) runs in bash, in order, on one of the "machines" of a small grid made here (its own directory
  and HOME), with the documented placeholders (`HEAD_CID`, `--api A`, `OWNER_ID`, `[--optional]`, ...)
  replaced by real values (`PLACEHOLDERS`); each must exit 0. Every `python -m grid_ipfs...` command,
  run or not, also has each of its options checked against its own `--help`.
- ```json: parsed (and, for docs/models.md, loaded as a model vocabulary).
- untagged fences are diagrams and sample output, not code.

A command that cannot run here is listed in `SKIP_BLOCKS` with the reason (keyed by file and a
substring of the command or block); the commands the grid itself is built from are in `SETUP` and run
by the `site` fixture. Anything else is executed: a new block runs by default, and a stale entry of
either table fails `test_every_listed_exception_names_a_block`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")), "examples/README.md"]
DOCUMENTED_API = "/ip4/127.0.0.1/tcp/5001"
ROUNDS = 5
"""The rounds of the README's jobs (`--rounds 5`, `rounds=5`): short, as each round trains 100 examples."""

SKIP_BLOCKS: dict[str, dict[str, str]] = {
    "README.md": {
        "make demo": "`make setup` plus the 35-50 s demo on a devnet of its own; python -m grid_ipfs.demo "
                     "is the same LocalGrid job that tests/test_end_to_end.py runs",
        "make test": "the whole suite, this file included",
        "git clone": "clones this repository",
        "docker compose": "needs Docker and the Kubo image; tests/test_compose.py checks the compose file "
                          "and trains its topology's twin on a devnet",
        "ipfs dag get": "the Kubo CLI; the daemon here is js-ipfs, and tests/test_end_to_end.py walks the "
                        "same dag paths over the RPC",
        "ipfs pin add": "the Kubo CLI; tests/test_end_to_end.py checks that one recursive pin keeps it all",
        "client submit ...": "`...` stands for a whole submit command (options only checked against --help); "
                             "the rules are trained in tests/test_beyond.py and tests/test_privacy.py",
        "grid_ipfs.miner --api A": "a miner runs until stopped and needs a --miners job: tests/test_beyond.py "
                                   "(options checked against --help)",
        "grid_ipfs.pool --api": "a pool runs until stopped: tests/test_pool.py hosts 8 workers through it "
                                "(options checked against --help)",
        "grid_ipfs.worker ...": "`...` stands for a worker's daemon and key, and a worker runs until stopped: "
                                "tests/test_sources.py trains one job on all four kinds of data "
                                "(options checked against --help)",
        "grid_ipfs.chain serve": "a web server runs until stopped: tests/test_dashboard_browser.py serves a real "
                                 "job's chain to headless Chromium (options checked against --help)",
    },
    "docs/async.md": {
        "client submit ...": "`...` stands for a whole submit command (options checked against --help); "
                             "async jobs with a slow worker are trained in tests/test_async.py",
        "grid_ipfs.worker ...": "`...` stands for a worker's options, and a worker runs until stopped; "
                                "tests/test_async.py runs one with --slowdown (options checked against --help)",
    },
    "docs/deployment.md": {
        "docker compose": "needs Docker and the Kubo image (tests/test_compose.py checks the compose file)",
    },
    "docs/protocol.md": {
        "ipfs dag get": "the Kubo CLI on a made-up CID; tests/test_end_to_end.py walks dag paths over the RPC",
    },
    "docs/models.md": {
        "--api ...": "`...` stands for a daemon, and a worker or miner runs until stopped "
                     "(options checked against --help)",
    },
    "examples/README.md": {
        "examples/xor.py": "run by tests/test_examples.py",
        "examples/diabetes.py": "run by tests/test_examples.py (2 rounds)",
        "examples/diabetes_custom_block.py": "run by tests/test_examples.py",
        "examples/fashion_mnist.py": "run by tests/test_examples.py, which checks this very message",
        "examples/digits.py": "a 5-round job on a devnet of its own (51 s); the README's job runs here "
                              "instead, on the same model and data",
    },
}

SETUP: dict[str, dict[str, str]] = {
    "README.md": {
        "identity new": "the client's key, created first: its id goes into the workers' owners.txt",
        "grid_ipfs.worker --api": "the grid's three workers (one machine each) are these two commands",
        "client submit --api": "the job whose chain the other commands read",
    },
}

PLACEHOLDERS: list[tuple[str, str]] = [
    (r"(^|\s)#.*$", ""),                                           # comments (none inside quotes here)
    (re.escape(DOCUMENTED_API), "{api}"),
    (r"--api A\b", "--api {api}"), (r"--api B\b", "--api {api_b}"),
    (r"\bworker0\.witness/JOB\.OWNER\.jsonl", "{witness}"),
    (r"\bHEAD_B\b", "{previous}"), (r"\bHEAD(_CID|_A)?\b", "{head}"),
    (r"\bOWNER_ID\b", "{owner}"), (r"\bJOB_ID\b", "{job}"),
    (r"--round R\b", "--round 1"),
    (r"\[([^\]]*)\]", r"\1"),                                      # optional arguments: given
    (r"(^|\s)\.venv/bin/python\b", r"\1{python}"),
]


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def commands(self) -> list[str]:
        """The shell commands of a bash or console block, continuations and heredocs joined."""
        lines, commands, i = self.text.splitlines(), [], 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if self.lang == "console":
                if not line.startswith("$ "):
                    continue  # sample output
                line = line[2:]
            while line.endswith("\\") and i < len(lines):
                line, i = line[:-1].rstrip() + " " + lines[i].strip(), i + 1
            heredoc = re.search(r"<<-?'?(\w+)'?", line)
            if heredoc:
                body = []
                while i < len(lines) and lines[i].strip() != heredoc.group(1):
                    body.append(lines[i])
                    i += 1
                line, i = "\n".join([line, *body, heredoc.group(1)]), i + 1
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
        return commands


def doc_blocks() -> list[Block]:
    found = []
    for name in DOC_FILES:
        text = (ROOT / name).read_text(encoding="utf-8")
        for match in re.finditer(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
            found.append(Block(name, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2)))
    return found


BLOCKS = doc_blocks()
SHELL = [b for b in BLOCKS if b.lang in ("bash", "console")]


def listed(table: dict[str, dict[str, str]], file: str, text: str) -> str | None:
    return next((why for key, why in table.get(file, {}).items() if key in text), None)


def runnable(block: Block) -> list[str]:
    return [c for c in block.commands() if not listed(SKIP_BLOCKS, block.file, c) and not listed(SETUP, block.file, c)]


def on_the_grid(text: str) -> bool:
    """Whether a command needs the grid: a daemon, a chain, or a placeholder the grid fills in."""
    return bool(re.search(r"--api|--car|\bHEAD|OWNER_ID|JOB_ID|witness|--role worker", text))


def substitute(command: str, values: dict) -> str:
    """The command with its placeholders filled in (a heredoc's body is left as written)."""
    line, newline, body = command.partition("\n")
    for pattern, replacement in PLACEHOLDERS:
        line = re.sub(pattern, replacement, line)
    line = re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), line)
    return line + newline + body


# -- the tables themselves -----------------------------------------------------------------------------


def test_every_listed_exception_names_a_block():
    """A skip or setup entry that matches nothing is stale: the block it excused changed or is gone."""
    texts = [(b.file, text) for b in BLOCKS for text in (b.commands() if b in SHELL else [b.text])]
    for table in (SKIP_BLOCKS, SETUP):
        for file, entries in table.items():
            assert file in DOC_FILES, file
            for key in entries:
                assert any(f == file and key in text for f, text in texts), f"{file}: no block has {key!r}"


def test_every_fenced_block_has_a_runner():
    assert len(BLOCKS) > 20, [str(b) for b in BLOCKS]
    unknown = [f"{b} ```{b.lang}" for b in BLOCKS if b.lang not in ("python", "bash", "console", "json", "")]
    assert not unknown, f"no runner for these blocks (add one here): {unknown}"
    assert all(b.commands() for b in SHELL), [str(b) for b in SHELL if not b.commands()]


# -- json and python without a daemon ------------------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "json"], ids=str)
def test_json_block_parses(block, tmp_path):
    document = json.loads(block.text)
    if block.file == "docs/models.md":  # the vocabulary example is a file operators copy
        from grid_ipfs.vetting import load_policy

        (tmp_path / "vocabulary.json").write_text(block.text)
        policy = load_policy(tmp_path / "vocabulary.json")
        assert policy.max_params == document["max_params"]


def _signed_fields() -> dict:
    """A real message as a peer parses it, without its signature (for docs/protocol.md's rule)."""
    from grid_ipfs import messages
    from grid_ipfs.identity import Identity

    message = messages.Join(job="digits-1", name="hôpital ß", num_examples=431)
    parsed = json.loads(messages.encode(message, Identity.generate()))
    del parsed["sig"]
    return parsed


def _protocol_signature_rule(namespace: dict) -> None:
    from grid_ipfs import messages

    assert namespace["_"] == messages.canonical_json(namespace["obj_without_sig"])


PYTHON_CHECKS = {
    ("docs/protocol.md", "json.dumps(obj_without_sig"): _protocol_signature_rule,
}
"""What a python block must have done, beyond running (keyed like SKIP_BLOCKS)."""


def run_python(block: Block, namespace: dict) -> dict:
    """Execute a python block; a block that is one expression leaves its value in `_`."""
    import ast

    tree = ast.parse(block.text, filename=str(block))
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
        namespace["_"] = eval(compile(ast.Expression(tree.body[0].value), str(block), "eval"), namespace)
    else:
        exec(compile(tree, str(block), "exec"), namespace)
    for (file, key), check in PYTHON_CHECKS.items():
        if file == block.file and key in block.text:
            check(namespace)
    return namespace


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python" and DOCUMENTED_API not in b.text
                                   and not listed(SKIP_BLOCKS, b.file, b.text)], ids=str)
def test_python_block_runs(block):
    run_python(block, {"json": json, "obj_without_sig": _signed_fields()})


# -- every documented option exists -------------------------------------------------------------------------


def _grid_ipfs_commands() -> list:
    return [pytest.param(b, c, id=f"{b}#{i}") for b in SHELL for i, c in enumerate(b.commands())
            if re.search(r"-m grid_ipfs\b", c)]


@pytest.mark.parametrize("block, command", _grid_ipfs_commands())
def test_documented_options_are_in_the_commands_help(block, command):
    """Run or skipped, each `--option` a documented grid_ipfs command uses is one its parser has."""
    import importlib

    words = shlex.split(re.sub(r"(^|\s)#.*$", "", command, flags=re.M).replace("[", " ").replace("]", " "))
    module = next(w for w in words if w.startswith("grid_ipfs"))
    rest = words[words.index(module) + 1:]
    sub = [rest[0]] if rest and not rest[0].startswith("-") else []
    try:
        main = importlib.import_module(f"{module}.__main__").main
    except ModuleNotFoundError:
        main = importlib.import_module(module).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*sub, "--help"])
    assert exited.value.code == 0, f"{module} {' '.join(sub)} --help"
    options = {w.split("=")[0] for w in rest if re.fullmatch(r"--?[a-z][\w-]*(=.*)?", w)}
    missing = [o for o in sorted(options) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", out.getvalue())]
    assert not missing, f"{block}: `{module} {' '.join(sub)}` has no {missing}"


# -- the grid: a client machine and three worker machines on the session devnet ----------------------------


class Machine:
    """A directory with its own HOME (so its own ~/.grid_ipfs) and its own daemon address."""

    def __init__(self, directory: Path, api: str):
        self.dir, self.api = directory, api
        (directory / "home").mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if k != "GRID_IPFS_HOME"}
        self.env.update(HOME=str(directory / "home"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                        TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONUNBUFFERED="1")

    def run(self, command: str, values: dict, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        command = substitute(command, {"python": sys.executable, **values, "api": self.api})
        proc = subprocess.run(["bash", "-c", command], cwd=cwd or self.dir, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc

    def start(self, command: str, values: dict) -> subprocess.Popen:
        command = substitute(command, {"python": sys.executable, **values, "api": self.api})
        with open(self.dir / "log.txt", "ab") as log:
            return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.dir, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return (self.dir / "log.txt").read_text(errors="replace") if (self.dir / "log.txt").exists() else ""


def setup_command(key: str) -> list[str]:
    return [c for b in SHELL if b.file == "README.md" for c in b.commands() if key in c]


def _listening(machine: Machine, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"worker in {machine.dir} exited {proc.returncode}:\n{machine.log()[-3000:]}")
    return "listening on" in machine.log()


@pytest.fixture(scope="module")
def site(devnet, tmp_path_factory):
    """The README's "Train across machines": the client's key, three workers started with the documented
    commands (two with the first, one isolated with the second), then the documented submit (--json)."""
    from grid_ipfs import data, zoo
    from grid_ipfs.identity import Identity

    root = tmp_path_factory.mktemp("docs")
    apis = [node.api for node in devnet.nodes]
    client = Machine(root / "client", apis[0])
    workers = [Machine(root / f"worker{i}", apis[i % len(apis)]) for i in range(3)]
    x, y, x_test, y_test = data.digits()
    for machine, (xs, ys) in zip(workers, data.split_iid(x[:300], y[:300], 3, seed=0)):
        data.save_shard(machine.dir / "my_shard.npz", xs, ys)
    zoo.digits_mlp(seed=0).save(client.dir / "model.keras")
    data.save_shard(client.dir / "heldout.npz", x_test, y_test)
    vocabulary = next(b for b in BLOCKS if b.file == "docs/models.md" and b.lang == "json")
    (workers[2].dir / "my_layers.json").write_text(vocabulary.text)

    [new_key] = setup_command("identity new")
    owner = client.run(new_key, {}).stdout.strip()
    script_owner = Identity.load_or_create(client.dir / "client.key").id  # the Python example's key file
    (workers[2].dir / "owners.txt").write_text(f"{owner}\n{script_owner}\n")
    plain, isolated = setup_command("grid_ipfs.worker --api")
    procs = []
    try:
        for machine, command in zip(workers, (plain, plain, isolated)):
            procs.append(machine.start(command, {}))
        for machine, proc in zip(workers, procs):
            wait_for(lambda m=machine, p=proc: _listening(m, p), timeout=180, what=f"{machine.dir.name} to listen")
        [submit] = setup_command("client submit --api")
        result = json.loads(client.run(submit, {}).stdout)
        assert len(result["rounds"]) == ROUNDS and all(r["updates"] == 3 for r in result["rounds"]), result
        job, head = result["job"], result["head"]
        witness = workers[0].dir / "home" / ".grid_ipfs" / "worker-hospital-a.witness" / f"{job}.{owner}.jsonl"
        assert witness.exists(), sorted(str(p) for p in (workers[0].dir / "home").rglob("*"))
        values = {"head": head, "previous": result["rounds"][-2]["head"], "job": job, "owner": owner,
                  "api_b": apis[1], "witness": str(witness)}
        yield SimpleNamespace(client=client, workers=workers, values=values, devnet=devnet)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _machine_for(site, command: str) -> Machine:
    return site.workers[0] if "--role worker-" in command else site.client


def _grid_blocks(grid: bool) -> list:
    chosen = [b for b in SHELL if runnable(b) and any(on_the_grid(c) for c in runnable(b)) == grid]
    heavy = lambda b: grid or any("grid_ipfs.devnet" in c for c in runnable(b))  # noqa: E731
    return [pytest.param(b, id=str(b), marks=[pytest.mark.integration] if heavy(b) else []) for b in chosen]


@pytest.mark.parametrize("block", _grid_blocks(grid=True))
def test_shell_block_on_the_grid(site, block, tmp_path):
    """In order, as a reader types them, each machine's commands in a copy of its files (so that, say,
    `export -o model.keras` does not replace the model another block trains)."""
    for command in runnable(block):
        machine = _machine_for(site, command)
        cwd = tmp_path / machine.dir.name
        if not cwd.exists():
            shutil.copytree(machine.dir, cwd, ignore=shutil.ignore_patterns("home", "log.txt"))
        machine.run(command, site.values, cwd=cwd)


@pytest.mark.parametrize("block", _grid_blocks(grid=False))
def test_shell_block_runs_here(block, tmp_path):
    from grid_ipfs.ipfs.devnet import Devnet

    machine = Machine(tmp_path, api=DOCUMENTED_API)
    try:
        for command in runnable(block):
            machine.run(command, {})
    finally:
        for state in tmp_path.rglob("devnet.json"):  # a devnet the block started and did not stop
            Devnet.down(state.parent)


@pytest.mark.integration
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python" and DOCUMENTED_API in b.text], ids=str)
def test_python_block_on_the_grid(site, block, monkeypatch, capsys):
    monkeypatch.chdir(site.client.dir)
    monkeypatch.setenv("HOME", site.client.env["HOME"])
    monkeypatch.delenv("GRID_IPFS_HOME", raising=False)
    here = Block(block.file, block.line, block.lang, block.text.replace(DOCUMENTED_API, site.client.api))
    namespace = run_python(here, {"__name__": "__doc_example__"})
    if "result" in namespace:  # the README's job: every round reported by its callback
        printed = capsys.readouterr().out.splitlines()
        assert len(namespace["result"].rounds) == ROUNDS and len(printed) == ROUNDS, printed
