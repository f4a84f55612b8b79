"""The deployment files: docker-compose.yml, workers/ (Dockerfile, worker compose file, Kubo init script).

No Docker engine is needed. Three kinds of tests:

* structural checks: each `problems_*` function reads a loaded compose file and returns what is wrong with
  it. The real files must have no problems, and every check is also run on deliberately broken copies,
  so each one is shown to be able to fail;
* the Kubo init script, run with a stand-in `ipfs` command that keeps the config as JSON: what it
  configures, how it learns node 0's peer id, and what it refuses;
* the twin (integration): the compose topology run as local processes, one devnet daemon per Kubo
  service, the workers and the client started with the arguments the compose file gives them (read from
  it, container paths and `/dns4/ipfsN` addresses mapped to local ones), training two rounds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
WORKER_COMPOSE = REPO / "workers" / "docker-compose.worker.yml"
WORKER_ENV_EXAMPLE = REPO / "workers" / "worker.env.example"
DOCKERFILE = REPO / "workers" / "Dockerfile"
INIT_SCRIPT = REPO / "workers" / "kubo-init" / "001-grid.sh"
SAMPLE_KEY = REPO / "workers" / "swarm.key.SAMPLE"

KUBO_IMAGE = "ipfs/kubo"
MIN_KUBO = (0, 39, 0)  # AutoConf and the other config keys the init script sets
RPC_PORT, GATEWAY_PORT = 5001, 8080
LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}
API_RE = re.compile(r"^/dns4/([A-Za-z0-9_.-]+)/tcp/5001$")


# -- reading compose files ---------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose variable interpolation: $$, ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise ValueError(f"required variable {name} is not set: {arg}")
        return ""

    return _VAR.sub(one, text)


def _interpolate_tree(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@dataclass
class Compose:
    raw: dict  # as written (variables not substituted): used where a literal is required
    doc: dict  # interpolated, as `docker compose config` would see it with this environment
    base: Path  # the folder relative paths are resolved against

    @property
    def services(self) -> dict:
        return self.doc.get("services") or {}


def load_compose(path: Path = COMPOSE, env: dict[str, str] | None = None) -> Compose:
    raw = yaml.safe_load(path.read_text())
    return Compose(raw, _interpolate_tree(copy.deepcopy(raw), env or {}), path.parent)


def mutated(compose: Compose, change) -> Compose:
    """A deep copy of `compose` with `change(doc)` applied to both views (a change to raw text stays raw)."""
    out = copy.deepcopy(compose)
    change(out.doc)
    change(out.raw)
    return out


@dataclass
class Mount:
    type: str  # "bind" or "volume"
    source: str
    target: str
    read_only: bool


def mounts(service: dict) -> list[Mount]:
    found = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            found.append(Mount(entry.get("type", "volume"), str(entry.get("source", "")), entry["target"],
                               bool(entry.get("read_only"))))
            continue
        parts = entry.split(":")
        if len(parts) == 1:
            found.append(Mount("volume", "", parts[0], False))
            continue
        source, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "rw")
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        found.append(Mount(kind, source, target, "ro" in mode.split(",")))
    return found


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def image_parts(image: str) -> tuple[str, str | None, str | None]:
    """`registry/repo:tag@digest` -> (repo, tag, digest)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:], digest or None
    return name, None, digest or None


def kubo_services(compose: Compose) -> list[str]:
    """Services running Kubo, in file order (node 0 first)."""
    return [name for name, svc in compose.services.items()
            if image_parts(str(svc.get("image", "")))[0] in (KUBO_IMAGE, "docker.io/" + KUBO_IMAGE)]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_of(compose: Compose, service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    return (compose.base / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()


def entrypoint(compose: Compose, service: dict) -> list[str]:
    value = service.get("entrypoint")
    if value is None and (dockerfile := dockerfile_of(compose, service)) is not None and dockerfile.is_file():
        for keyword, rest in dockerfile_instructions(dockerfile):
            if keyword == "ENTRYPOINT":
                value = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
    if isinstance(value, str):
        value = shlex.split(value)
    return list(value or [])


def role_services(compose: Compose, module: str) -> list[str]:
    """Services whose entrypoint runs `python -m <module>`."""
    return [name for name, svc in compose.services.items() if module in entrypoint(compose, svc)]


def command(service: dict) -> list[str]:
    value = service.get("command")
    if isinstance(value, list):
        return [str(arg) for arg in value]
    return shlex.split(value or "")


def arg_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def service_networks(service: dict) -> set[str]:
    nets = service.get("networks")
    if not nets:
        return {"default"}
    return set(nets) if isinstance(nets, (list, dict)) else {str(nets)}


def init_scripts(compose: Compose, service: dict) -> tuple[list[Path], list[str]]:
    """The *.sh files a Kubo service gets in /container-init.d, and problems finding them."""
    scripts, problems = [], []
    for mount in mounts(service):
        if mount.target.rstrip("/") != "/container-init.d" and not mount.target.startswith("/container-init.d/"):
            continue
        if mount.type != "bind":
            problems.append(f"{mount.target} is not a bind mount of a file in the repository")
            continue
        if not mount.read_only:
            problems.append(f"{mount.target} is mounted read-write (the node must not be able to edit its init)")
        source = (compose.base / mount.source).resolve()
        if source.is_dir():
            scripts += sorted(source.glob("*.sh"))
        elif source.is_file() and source.suffix == ".sh":
            scripts.append(source)
        else:
            problems.append(f"{mount.source} (mounted at {mount.target}) is not a .sh file or a folder")
    return scripts, problems


def _code(text: str) -> str:
    """Shell text without comment lines, so a commented-out command does not count."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


# -- the checks ------------------------------------------------------------------------------------------


def problems_images(compose: Compose) -> list[str]:
    problems = []
    if not kubo_services(compose):
        problems.append(f"no service runs the {KUBO_IMAGE} image")
    for name, svc in compose.services.items():
        image = svc.get("image")
        if not image:
            if "build" not in svc:
                problems.append(f"{name}: neither image nor build")
            continue
        repo, tag, digest = image_parts(str(image))
        if "go-ipfs" in repo:
            problems.append(f"{name}: {image} is the retired go-ipfs image; use {KUBO_IMAGE}")
        if not digest and (tag is None or tag == "latest"):
            problems.append(f"{name}: image {image} is not pinned to a tag")
        if name in kubo_services(compose):
            match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag or "")
            if not match:
                problems.append(f"{name}: Kubo image tag {tag!r} is not a release tag vX.Y.Z")
            elif tuple(map(int, match.groups())) < MIN_KUBO:
                problems.append(f"{name}: Kubo {tag} is older than v{'.'.join(map(str, MIN_KUBO))}")
    return problems


def problems_kubo_init(compose: Compose) -> list[str]:
    problems = []
    for name in kubo_services(compose):
        svc = compose.services[name]
        if "--enable-pubsub-experiment" in " ".join(command(svc)):
            problems.append(f"{name}: uses the deprecated --enable-pubsub-experiment flag")
        if "entrypoint" in svc:
            problems.append(f"{name}: overrides the image's entrypoint, which is what runs /container-init.d")
        scripts, found = init_scripts(compose, svc)
        problems += [f"{name}: {p}" for p in found]
        if not scripts:
            problems.append(f"{name}: no init script mounted in /container-init.d")
            continue
        code = "\n".join(_code(script.read_text()) for script in scripts)
        for what, pattern in (("enables pubsub", r"ipfs\s+config\s+--json\s+Pubsub\.Enabled\s+true\b"),
                              ("removes the bootstrap list", r"ipfs\s+bootstrap\s+rm\s+--all\b"),
                              ("disables AutoConf", r"ipfs\s+config\s+--json\s+AutoConf\.Enabled\s+false\b")):
            if not re.search(pattern, code):
                problems.append(f"{name}: no init script {what}")
    return problems


def problems_private_network(compose: Compose) -> list[str]:
    problems, sources = [], set()
    declared = compose.doc.get("secrets") or {}
    for name in kubo_services(compose):
        svc = compose.services[name]
        env = environment(svc)
        if env.get("LIBP2P_FORCE_PNET") != "1":
            problems.append(f"{name}: LIBP2P_FORCE_PNET is {env.get('LIBP2P_FORCE_PNET')!r}, not '1'")
        if "IPFS_SWARM_KEY" in env:
            sources.add(("env", env["IPFS_SWARM_KEY"]))
        elif key_file := env.get("IPFS_SWARM_KEY_FILE"):
            targets = {}  # where each of the service's secrets appears in the container -> the secret's name
            for secret in svc.get("secrets") or []:
                source = secret if isinstance(secret, str) else secret.get("source", "")
                target = source if isinstance(secret, str) else secret.get("target", source)
                targets[target if target.startswith("/") else f"/run/secrets/{target}"] = source
            bound = {m.target: m.source for m in mounts(svc)}
            if key_file in targets and targets[key_file] in declared:
                source = str((declared[targets[key_file]] or {}).get("file", ""))
                sources.add(("file", source))
            elif key_file in bound:
                source = bound[key_file]
                sources.add(("file", source))
            else:
                problems.append(f"{name}: IPFS_SWARM_KEY_FILE={key_file} is neither a declared secret nor a mount")
                continue
            if "SAMPLE" in source.upper():
                problems.append(f"{name}: the swarm key is the public sample {source}")
        else:
            problems.append(f"{name}: no IPFS_SWARM_KEY or IPFS_SWARM_KEY_FILE")
    if len(sources) > 1:
        problems.append(f"Kubo nodes use different swarm keys: {sorted(sources)}")
    return problems


def _api_target(compose: Compose, who: str, args: list[str], problems: list[str]) -> str | None:
    api = arg_value(args, "--api")
    match = API_RE.match(api or "")
    if not match:
        problems.append(f"{who}: --api {api!r} is not /dns4/<kubo service>/tcp/5001")
        return None
    if match.group(1) not in kubo_services(compose):
        problems.append(f"{who}: --api {api} names {match.group(1)!r}, not a Kubo service of this file")
        return None
    return match.group(1)


def _check_dependency(compose: Compose, who: str, svc: dict, node: str, problems: list[str]) -> None:
    depends = svc.get("depends_on") or {}
    condition = depends.get(node, {}).get("condition") if isinstance(depends, dict) else None
    if condition != "service_healthy":
        problems.append(f"{who}: does not depend on {node} with condition service_healthy")
    if not service_networks(svc) & service_networks(compose.services[node]):
        problems.append(f"{who}: shares no network with {node}")


def problems_workers(compose: Compose) -> list[str]:
    problems, shards = [], []
    workers = role_services(compose, "grid_ipfs.worker")
    if not workers:
        problems.append("no worker service (entrypoint python -m grid_ipfs.worker)")
    for name in workers:
        svc = compose.services[name]
        if not isinstance(svc.get("command"), list):
            problems.append(f"{name}: command is not a list of arguments")
        args = command(svc)
        node = _api_target(compose, name, args, problems)
        if node:
            _check_dependency(compose, name, svc, node, problems)
        if not str(svc.get("restart", "")).startswith("on-failure"):
            problems.append(f"{name}: restart is {svc.get('restart')!r}, not on-failure")
        data = arg_value(args, "--data")
        bound = [m for m in mounts(svc) if m.target == data]
        if not bound or bound[0].type != "bind":
            problems.append(f"{name}: --data {data!r} is not a bind-mounted shard")
        elif not bound[0].read_only:
            problems.append(f"{name}: the shard {bound[0].source} is mounted read-write")
        else:
            shards.append(bound[0].source)
    if len(shards) != len(set(shards)):
        problems.append(f"workers share a data shard: {shards}")
    return problems


def problems_client(compose: Compose) -> list[str]:
    problems = []
    clients = role_services(compose, "grid_ipfs.client")
    if len(clients) != 1:
        return [f"expected one client service (entrypoint python -m grid_ipfs.client), found {clients}"]
    name = clients[0]
    svc = compose.services[name]
    if not svc.get("profiles"):
        problems.append(f"{name}: not under a compose profile, so `docker compose up` would start a job")
    if not isinstance(svc.get("command"), list):
        problems.append(f"{name}: command is not a list of arguments")
    args = command(svc)
    if args[:1] != ["submit"]:
        problems.append(f"{name}: command does not start with submit")
    if node := _api_target(compose, name, args, problems):
        _check_dependency(compose, name, svc, node, problems)
    model = arg_value(args, "--model") or ""
    if not any(model == m.target or model.startswith(m.target.rstrip("/") + "/") for m in mounts(svc)):
        problems.append(f"{name}: --model {model!r} is not inside a mounted folder")
    return problems


_COLON = re.compile(r":(?![^{]*\})")  # a colon that is not inside ${...}


def _port_range(text: str) -> range:
    text = text.split("/")[0]
    low, _, high = text.partition("-")
    return range(int(low), int(high or low) + 1)


def problems_rpc_exposure(compose: Compose) -> list[str]:
    """The RPC API (and the gateway) may be published on loopback only, with a literal host address."""
    problems = []
    for name, svc in (compose.raw.get("services") or {}).items():
        if svc.get("network_mode") == "host" and name in kubo_services(compose):
            problems.append(f"{name}: network_mode host puts the RPC API on every host interface")
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                host_ip, container = str(port.get("host_ip", "")), str(port.get("target", ""))
            else:
                parts = _COLON.split(str(port))
                container = parts[-1]
                host_ip = parts[0] if len(parts) == 3 else ""
            container = interpolate(container, {})
            for guarded in (RPC_PORT, GATEWAY_PORT):
                if guarded not in _port_range(container):
                    continue
                if "$" in host_ip:
                    problems.append(f"{name}: port {guarded} published on a variable host address {host_ip!r}")
                elif host_ip not in LOOPBACK:
                    problems.append(f"{name}: port {guarded} published on {host_ip or '0.0.0.0'} ({port!r})")
    return problems


def problems_healthchecks(compose: Compose) -> list[str]:
    problems = []
    for name in kubo_services(compose):
        check = compose.services[name].get("healthcheck") or {}
        test = check.get("test")
        test = [test] if isinstance(test, str) else list(test or [])
        if check.get("disable") or not test or test[0] == "NONE":
            problems.append(f"{name}: no healthcheck")
        elif not any(re.search(r"\bipfs\b", str(part)) for part in test):
            problems.append(f"{name}: the healthcheck does not ask the daemon ({test})")
    return problems


def problems_volumes(compose: Compose) -> list[str]:
    problems, repos = [], []
    declared = compose.doc.get("volumes") or {}
    for name in kubo_services(compose):
        repo = [m for m in mounts(compose.services[name]) if m.target.rstrip("/") == "/data/ipfs"]
        if not repo:
            problems.append(f"{name}: no volume at /data/ipfs (the repo would die with the container)")
        elif repo[0].type != "volume" or repo[0].source not in declared:
            problems.append(f"{name}: /data/ipfs is not a named volume declared under volumes: ({repo[0].source})")
        else:
            repos.append(repo[0].source)
    if len(repos) != len(set(repos)):
        problems.append(f"Kubo nodes share a repo volume: {repos}")
    return problems


def problems_dockerfile(path: Path) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(path)
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    if not froms or not re.match(r"python:3\.11[.\d]*-slim", froms[-1]):
        problems.append(f"base image {froms[-1:]} is not a slim Python 3.11")
    users = [rest.split(":")[0] for keyword, rest in instructions if keyword == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"the image runs as root (USER instructions: {users})")
    entry = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    try:
        parsed = json.loads(entry[-1]) if entry else None
    except ValueError:
        parsed = entry[-1]
    if parsed != ["python", "-m", "grid_ipfs.worker"]:
        problems.append(f"ENTRYPOINT is {parsed!r}, not the exec form ['python', '-m', 'grid_ipfs.worker']")
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    if not re.search(r"\bTF_CPP_MIN_LOG_LEVEL=[23]\b", env):
        problems.append("TensorFlow logs are not quieted (ENV TF_CPP_MIN_LOG_LEVEL)")
    return problems


CHECKS = [problems_images, problems_kubo_init, problems_private_network, problems_workers, problems_rpc_exposure,
          problems_healthchecks, problems_volumes]


# -- the real files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def worker_compose() -> Compose:
    return load_compose(WORKER_COMPOSE, read_env_file(WORKER_ENV_EXAMPLE))


@pytest.mark.parametrize("check", [*CHECKS, problems_client], ids=lambda f: f.__name__)
def test_compose_file_passes(compose, check):
    assert check(compose) == []


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_worker_machine_compose_file_passes(worker_compose, check):
    assert check(worker_compose) == []


def test_dockerfile_passes():
    assert problems_dockerfile(DOCKERFILE) == []


def test_three_kubo_nodes_one_worker_each(compose):
    nodes = kubo_services(compose)
    assert len(nodes) == 3
    apis = [arg_value(command(compose.services[w]), "--api") for w in role_services(compose, "grid_ipfs.worker")]
    assert sorted(API_RE.match(api).group(1) for api in apis) == sorted(nodes)


def test_worker_machine_needs_its_settings():
    with pytest.raises(ValueError, match="GRID_PEERS"):
        load_compose(WORKER_COMPOSE, {})


def test_build_context_excludes_secrets_and_data():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the build context should be an allow-list"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed <= {"setup.cfg", "pyproject.toml", "README.md", "grid_ipfs"}, allowed
    copied = {part.rstrip("/") for keyword, rest in dockerfile_instructions(DOCKERFILE) if keyword == "COPY"
              for part in rest.split()[:-1] if not part.startswith("--")}
    assert copied <= allowed, f"the Dockerfile copies {copied - allowed}, which .dockerignore leaves out"


def test_sample_swarm_key_is_labelled_and_not_used(compose):
    lines = SAMPLE_KEY.read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and re.fullmatch(r"[0-9a-f]{64}", lines[2])
    assert bytes.fromhex(lines[2]) == b"grid_ipfs SAMPLE key, NOT SECRET"
    assert lines[2] in INIT_SCRIPT.read_text(), "the init script must recognise (and refuse) the sample key"
    for secret in (compose.doc.get("secrets") or {}).values():
        assert "SAMPLE" not in str(secret.get("file", "")).upper()


def test_init_script_is_executable_posix_sh():
    assert INIT_SCRIPT.stat().st_mode & stat.S_IXUSR
    assert INIT_SCRIPT.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(INIT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- each check can fail -------------------------------------------------------------------------------------


def _set(name, key, value):
    def change(doc):
        doc["services"][name][key] = value
    return change


def _drop(name, key):
    return lambda doc: doc["services"][name].pop(key, None)


def _set_env(name, key, value):
    def change(doc):
        env = dict(doc["services"][name].get("environment") or {})
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
        doc["services"][name]["environment"] = env
    return change


def _set_arg(name, flag, value):
    def change(doc):
        args = list(doc["services"][name]["command"])
        args[args.index(flag) + 1] = value
        doc["services"][name]["command"] = args
    return change


def _add_port(name, port):
    return lambda doc: doc["services"][name].setdefault("ports", []).append(port)


def _set_volumes(name, replace):
    def change(doc):
        doc["services"][name]["volumes"] = replace(list(doc["services"][name]["volumes"]))
    return change


def _init_mount_to(path: str):
    def replace(volumes):
        out = []
        for v in volumes:
            if isinstance(v, str) and ":/container-init.d" in v:
                v = f"{path}:/container-init.d:ro"
            out.append(v)
        return out
    return replace


BROKEN = {
    problems_images: [
        ("latest", _set("ipfs1", "image", "ipfs/kubo:latest")),
        ("untagged", _set("ipfs2", "image", "ipfs/kubo")),
        ("go-ipfs", _set("ipfs0", "image", "ipfs/go-ipfs:v0.39.0")),
        ("old kubo", _set("ipfs0", "image", "ipfs/kubo:v0.23.0")),
        ("worker latest", _set("worker1", "image", "grid-ipfs-worker:latest")),
    ],
    problems_kubo_init: [
        ("no init mount", _set_volumes("ipfs2", lambda vs: [v for v in vs if "container-init.d" not in str(v)])),
        ("init mount rw", _set_volumes("ipfs1", lambda vs: [v.replace(":ro", "") if "container-init" in str(v) else v
                                                            for v in vs])),
        ("missing folder", _set_volumes("ipfs0", _init_mount_to("./workers/no-such-folder"))),
        ("pubsub flag", _set("ipfs0", "command", ["daemon", "--enable-pubsub-experiment"])),
        ("entrypoint", _set("ipfs2", "entrypoint", ["ipfs", "daemon"])),
    ],
    problems_private_network: [
        ("no FORCE_PNET", _set_env("ipfs1", "LIBP2P_FORCE_PNET", None)),
        ("FORCE_PNET 0", _set_env("ipfs0", "LIBP2P_FORCE_PNET", "0")),
        ("no key", _set_env("ipfs2", "IPFS_SWARM_KEY_FILE", None)),
        ("undeclared key file", _set_env("ipfs2", "IPFS_SWARM_KEY_FILE", "/run/secrets/other")),
        ("another key", _set_env("ipfs1", "IPFS_SWARM_KEY", "/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 32)),
        ("sample key", lambda doc: doc["secrets"]["swarm_key"].update(file="./workers/swarm.key.SAMPLE")),
    ],
    problems_workers: [
        ("api to unknown service", _set_arg("worker1", "--api", "/dns4/ipfs9/tcp/5001")),
        ("api on loopback", _set_arg("worker2", "--api", "/ip4/127.0.0.1/tcp/5001")),
        ("not healthy", _set("worker0", "depends_on", {"ipfs0": {"condition": "service_started"}})),
        ("no restart", _set("worker1", "restart", "no")),
        ("command string", _set("worker2", "command", "--api /dns4/ipfs2/tcp/5001 --data /data/shard.npz")),
        ("shard rw", _set_volumes("worker0", lambda vs: [{**v, "read_only": False} if isinstance(v, dict) else v
                                                         for v in vs])),
        ("shared shard", _set_volumes("worker2", lambda vs: [{**v, "source": "./shards/shard-000.npz"}
                                                             if isinstance(v, dict) else v for v in vs])),
        ("other network", _set("worker1", "networks", ["rpc0"])),
    ],
    problems_rpc_exposure: [
        ("all interfaces", _add_port("ipfs1", "5001:5001")),
        ("explicit 0.0.0.0", _add_port("ipfs2", "0.0.0.0:15001:5001")),
        ("variable host", _add_port("ipfs2", "${RPC_HOST:-127.0.0.1}:5001:5001")),
        ("long syntax", _add_port("ipfs1", {"target": 5001, "published": 5001})),
        ("range", _add_port("ipfs1", "5000-5002:5000-5002")),
        ("gateway", _add_port("ipfs0", "8080:8080")),
        ("host network", _set("ipfs2", "network_mode", "host")),
    ],
    problems_healthchecks: [
        ("none", _drop("ipfs2", "healthcheck")),
        ("disabled", _set("ipfs1", "healthcheck", {"disable": True})),
        ("NONE", _set("ipfs0", "healthcheck", {"test": ["NONE"]})),
        ("not the daemon", _set("ipfs0", "healthcheck", {"test": ["CMD", "true"]})),
    ],
    problems_volumes: [
        ("bind repo", _set_volumes("ipfs1", lambda vs: ["./repo1:/data/ipfs", *vs[1:]])),
        ("no repo", _set_volumes("ipfs2", lambda vs: vs[1:])),
        ("shared repo", _set_volumes("ipfs2", lambda vs: ["ipfs0-repo:/data/ipfs", *vs[1:]])),
        ("undeclared", _set_volumes("ipfs0", lambda vs: ["nowhere:/data/ipfs", *vs[1:]])),
    ],
    problems_client: [
        ("no profile", _drop("client", "profiles")),
        ("api not kubo", _set_arg("client", "--api", "/dns4/worker0/tcp/5001")),
        ("not submit", lambda doc: doc["services"]["client"]["command"].__setitem__(0, "status")),
        ("model not mounted", _set_arg("client", "--model", "/elsewhere/model.keras")),
        ("no client", lambda doc: doc["services"].pop("client")),
    ],
}


@pytest.mark.parametrize(("check", "change"), [(check, change) for check, cases in BROKEN.items()
                                                for _, change in cases],
                         ids=[f"{check.__name__}-{label}" for check, cases in BROKEN.items() for label, _ in cases])
def test_check_catches(compose, check, change):
    assert check(mutated(compose, change)) != []


def test_init_check_reads_the_script_not_its_comments(compose, tmp_path):
    (tmp_path / "001.sh").write_text("#!/bin/sh\n# ipfs config --json Pubsub.Enabled true\n"
                                     "ipfs bootstrap rm --all\nipfs config --json AutoConf.Enabled false\n")
    broken = mutated(compose, _set_volumes("ipfs1", _init_mount_to(str(tmp_path))))
    assert problems_kubo_init(broken) == ["ipfs1: no init script enables pubsub"]


@pytest.mark.parametrize(("label", "edit"), [
    ("no USER", lambda text: re.sub(r"(?m)^USER .*$", "", text)),
    ("USER root", lambda text: text + "\nUSER root\n"),
    ("shell-form ENTRYPOINT", lambda text: re.sub(r"(?m)^ENTRYPOINT .*$", "ENTRYPOINT python -m grid_ipfs.worker",
                                                  text)),
    ("client ENTRYPOINT", lambda text: text.replace('"grid_ipfs.worker"', '"grid_ipfs.client"')),
    ("full python", lambda text: text.replace("python:3.11-slim-bookworm", "python:3.11-bookworm")),
    ("noisy TF", lambda text: text.replace("TF_CPP_MIN_LOG_LEVEL=3", "TF_CPP_MIN_LOG_LEVEL=0")),
])
def test_dockerfile_check_catches(tmp_path, label, edit):
    broken = tmp_path / "Dockerfile"
    broken.write_text(edit(DOCKERFILE.read_text()))
    assert problems_dockerfile(broken) != [], label


# -- the Kubo init script, with a stand-in `ipfs` -------------------------------------------------------------

FAKE_IPFS = r'''
import json, os, sys
args = sys.argv[1:]
api = None
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag.startswith("--api="):
        api = flag.split("=", 1)[1]
path = os.path.join(os.environ["IPFS_PATH"], "config")
config = json.load(open(path))
with open(os.path.join(os.environ["IPFS_PATH"], "calls.log"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
if args[0] == "id":
    if api is None or api not in os.environ.get("FAKE_APIS", "").split():
        sys.exit("Error: cannot connect to the api")
    print(os.environ["FAKE_SEED_ID"], end="")
    sys.exit(0)
if args[:3] == ["bootstrap", "rm", "--all"]:
    config["Bootstrap"] = []
elif args[:2] == ["bootstrap", "add"]:
    if not args[2].split("/p2p/")[-1].startswith("12D3Koo"):
        sys.exit("Error: invalid peer id")
    config["Bootstrap"].append(args[2])
elif args[0] == "config":
    as_json = args[1] == "--json"
    rest = args[2:] if as_json else args[1:]
    keys = rest[0].split(".")
    if len(rest) == 1:
        node = config
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                sys.exit(f"Error: key has no attributes")
            node = node[key]
        print(node if isinstance(node, str) else json.dumps(node, indent=2))
        sys.exit(0)
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = json.loads(rest[1]) if as_json else rest[1]
else:
    sys.exit(f"fake ipfs: unexpected {args}")
json.dump(config, open(path, "w"))
'''

SEED_ID = "12D3KooWSeedSeedSeedSeedSeedSeedSeedSeedSeedSeedSeed"


@pytest.fixture
def kubo_repo(tmp_path):
    """A fresh 'repo' as the image leaves it after `ipfs init`, a stand-in ipfs on PATH, and a key file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ipfs"
    fake.write_text(f"#!{sys.executable}\n{FAKE_IPFS}")
    fake.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config").write_text(json.dumps({
        "Identity": {"PeerID": "12D3KooWThisNodeThisNodeThisNodeThisNodeThisNode"},
        "Bootstrap": ["auto"], "Addresses": {"API": "/ip4/0.0.0.0/tcp/5001", "Gateway": "/ip4/0.0.0.0/tcp/8080"}}))
    key = tmp_path / "swarm.key"
    key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "3f" * 32 + "\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "IPFS_PATH": str(repo), "IPFS_SWARM_KEY_FILE": str(key),
           "LIBP2P_FORCE_PNET": "1", "FAKE_SEED_ID": SEED_ID, "FAKE_APIS": "/dns4/ipfs0/tcp/5001"}

    def run(**overrides):
        run_env = {k: v for k, v in {**env, **overrides}.items() if v is not None}
        result = subprocess.run(["sh", str(INIT_SCRIPT)], env=run_env, capture_output=True, text=True, timeout=60)
        return result, json.loads((repo / "config").read_text())

    run.repo, run.key = repo, key
    return run


def test_init_script_configures_the_seed(kubo_repo):
    result, config = kubo_repo()
    assert result.returncode == 0, result.stderr
    assert config["Pubsub"]["Enabled"] is True and config["AutoConf"]["Enabled"] is False
    assert config["Bootstrap"] == [] and config["Peering"]["Peers"] == []
    assert config["Routing"]["Type"] == "dhtserver" and config["Routing"]["DelegatedRouters"] == []
    assert config["Addresses"]["API"] == "/ip4/0.0.0.0/tcp/5001"
    assert config["Addresses"]["Gateway"].startswith("/ip4/127.0.0.1/")
    assert config["Addresses"]["Swarm"] == ["/ip4/0.0.0.0/tcp/4001"]
    installed = kubo_repo.repo / "swarm.key"
    assert installed.read_text() == kubo_repo.key.read_text()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o400
    assert "this is the seed" in result.stdout


def test_init_script_peers_with_the_seed_it_asks_for_its_id(kubo_repo):
    result, config = kubo_repo(GRID_SEED_API="/dns4/ipfs0/tcp/5001", GRID_SEED_SWARM="/dns4/ipfs0/tcp/4001")
    assert result.returncode == 0, result.stderr
    assert config["Peering"]["Peers"] == [{"ID": SEED_ID, "Addrs": ["/dns4/ipfs0/tcp/4001"]}]
    assert config["Bootstrap"] == [f"/dns4/ipfs0/tcp/4001/p2p/{SEED_ID}"]
    calls = [json.loads(line) for line in (kubo_repo.repo / "calls.log").read_text().splitlines()]
    assert ["--api=/dns4/ipfs0/tcp/5001", "--timeout=20s", "id", "-f=<id>"] in calls

    # Restarted while the seed is down: the peering it had is kept, with a warning.
    result, again = kubo_repo(GRID_SEED_API="/dns4/ipfs0/tcp/5001", GRID_SEED_SWARM="/dns4/ipfs0/tcp/4001",
                              FAKE_APIS="")
    assert result.returncode == 0, result.stderr
    assert "keeping the previous Peering.Peers" in result.stdout
    assert again["Peering"] == config["Peering"] and again["Pubsub"]["Enabled"] is True


def test_init_script_static_peers_on_other_machines(kubo_repo):
    peer = "/dns4/seed.example.org/tcp/4001/p2p/12D3KooWRemoteRemoteRemoteRemoteRemoteRemote"
    result, config = kubo_repo(GRID_PEERS=peer)
    assert result.returncode == 0, result.stderr
    assert config["Peering"]["Peers"] == [{"ID": peer.split("/p2p/")[1], "Addrs": ["/dns4/seed.example.org/tcp/4001"]}]


@pytest.mark.parametrize(("label", "overrides", "message"), [
    ("seed down at first start", {"GRID_SEED_API": "/dns4/ipfs0/tcp/5001", "GRID_SEED_SWARM": "/dns4/ipfs0/tcp/4001",
                                  "FAKE_APIS": ""}, "does not answer"),
    ("no key", {"IPFS_SWARM_KEY_FILE": None}, "no swarm key"),
    ("sample key", {"IPFS_SWARM_KEY_FILE": str(SAMPLE_KEY)}, "PUBLIC SAMPLE"),
    ("peer without id", {"GRID_PEERS": "/dns4/seed.example.org/tcp/4001"}, "has no /p2p/"),
    ("placeholder id", {"GRID_PEERS": "/dns4/x/tcp/4001/p2p/ReplaceWithTheSeedsPeerId"}, "invalid peer id"),
])
def test_init_script_refuses(kubo_repo, label, overrides, message):
    result, _ = kubo_repo(**overrides)
    assert result.returncode != 0, label
    assert message in result.stderr, result.stderr


def test_init_script_accepts_a_key_given_inline(kubo_repo):
    key = kubo_repo.key.read_text().strip()
    result, _ = kubo_repo(IPFS_SWARM_KEY_FILE=None, IPFS_SWARM_KEY=key)
    assert result.returncode == 0, result.stderr
    assert (kubo_repo.repo / "swarm.key").read_text() == key + "\n"


def test_init_script_installs_a_rotated_key(kubo_repo):
    assert kubo_repo()[0].returncode == 0
    kubo_repo.key.write_text("/key/swarm/psk/1.0.0/\n/base16/\n" + "4e" * 32 + "\n")
    result, _ = kubo_repo()
    assert result.returncode == 0 and "installed the swarm key" in result.stdout
    assert (kubo_repo.repo / "swarm.key").read_text() == kubo_repo.key.read_text()


# -- the twin: the compose topology as local processes ----------------------------------------------------------


class Twin:
    """Maps one compose service's container world (mounts, /dns4 APIs) onto a temp folder and a devnet."""

    def __init__(self, compose: Compose, root: Path, apis: dict[str, str]):
        self.compose, self.root, self.apis = compose, root, apis

    def paths(self, name: str) -> dict[str, Path]:
        mapping = {}
        for mount in mounts(self.compose.services[name]):
            if mount.type == "bind":
                relative = Path(os.path.normpath(mount.source.lstrip("/"))).as_posix().replace("../", "up/")
                mapping[mount.target] = self.root / "binds" / relative
            else:
                mapping[mount.target] = self.root / "volumes" / (mount.source or f"{name}-anonymous")
                mapping[mount.target].mkdir(parents=True, exist_ok=True)
        return mapping

    def path(self, name: str, container_path: str) -> str:
        mapping = self.paths(name)
        for target in sorted(mapping, key=len, reverse=True):
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return str(mapping[target]) + container_path[len(target.rstrip("/")):]
        return str(self.root / "container" / container_path.lstrip("/"))  # not a mount: the container's own disk

    def argv(self, name: str) -> list[str]:
        entry = entrypoint(self.compose, self.compose.services[name])
        assert entry[:2] == ["python", "-m"], entry
        out, args = [sys.executable, *entry[1:]], command(self.compose.services[name])
        for i, arg in enumerate(args):
            if i and args[i - 1] == "--api":
                out.append(self.apis[API_RE.match(arg).group(1)])
            elif arg.startswith("/"):
                out.append(self.path(name, arg))
            else:
                out.append(arg)
        return out

    def env(self, name: str) -> dict[str, str]:
        svc = self.compose.services[name]
        image_env = {}
        dockerfile = dockerfile_of(self.compose, svc)
        for keyword, rest in (dockerfile_instructions(dockerfile) if dockerfile else []):
            if keyword == "ENV":
                image_env.update(item.split("=", 1) for item in shlex.split(rest) if "=" in item)
        merged = {**image_env, **environment(svc)}
        return {**os.environ, "PYTHONUNBUFFERED": "1",
                **{k: self.path(name, v) if v.startswith("/") else v for k, v in merged.items()}}


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.integration
def test_twin_of_the_compose_topology_trains_two_rounds(compose, tmp_path):
    from grid_ipfs import data, zoo
    from grid_ipfs.ipfs.devnet import Devnet

    nodes = kubo_services(compose)
    workers = role_services(compose, "grid_ipfs.worker")
    (client,) = role_services(compose, "grid_ipfs.client")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    net = Devnet.up(len(nodes), tmp_path / "devnet")
    try:
        twin = Twin(compose, tmp_path / "twin", {name: node.api for name, node in zip(nodes, net.nodes)})
        x_train, y_train, x_test, y_test = data.digits()
        shards = data.split_iid(x_train, y_train, len(workers), seed=0)
        client_argv = twin.argv(client)
        model = Path(arg_value(client_argv, "--model"))
        model.parent.mkdir(parents=True, exist_ok=True)
        zoo.digits_mlp(seed=0).save(model)
        if eval_data := arg_value(client_argv, "--eval-data"):
            data.save_shard(eval_data, x_test, y_test)

        for name, shard in zip(workers, shards):
            argv = twin.argv(name)
            data.save_shard(arg_value(argv, "--data"), *shard)
            with open(logs / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(argv, env=twin.env(name), stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)

        client_argv = _set_flag(client_argv, "--rounds", "2") + ["--json"]
        with open(logs / "client.out", "wb") as out, open(logs / "client.err", "wb") as err:
            procs[client] = subprocess.Popen(client_argv, env=twin.env(client), stdout=out, stderr=err,
                                             stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 150
        while procs[client].poll() is None:
            dead = {name: procs[name].returncode for name in workers if procs[name].poll() is not None}
            assert not dead, f"workers exited early {dead}:\n{_tails(logs)}"
            assert time.monotonic() < deadline, f"the client did not finish in time:\n{_tails(logs)}"
            try:
                procs[client].wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        assert procs[client].returncode == 0, _tails(logs)
        result = json.loads((logs / "client.out").read_text())
        min_workers = int(arg_value(client_argv, "--min-workers") or 1)
        assert [r["round"] for r in result["rounds"]] == [1, 2]
        assert all(r["updates"] >= min_workers for r in result["rounds"]), result["rounds"]
        head_dir = Path(arg_value(client_argv, "--head-dir"))
        assert (head_dir / f"{result['job']}.head").is_file()
    finally:
        for proc in procs.values():
            _stop(proc)
        net.stop()


def _tails(logs: Path, lines: int = 25) -> str:
    return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                     for path in sorted(logs.iterdir()))
