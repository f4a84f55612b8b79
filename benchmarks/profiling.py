"""Reading pyinstrument call trees: seconds spent in named grid_ipfs steps, and a trimmed text tree."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

Step = tuple[str, str, str]
"""(label, function name, path suffix of the file defining it). The first step of a list is the round:
the others are counted inside it only, except those whose label ends in "once)" (counted anywhere)."""

CLIENT_STEPS: list[Step] = [
    ("round (Client._run_round)", "_run_round", "grid_ipfs/client/core.py"),
    ("collect updates (collect.collect)", "collect", "grid_ipfs/client/collect.py"),
    ("waiting for messages (Inbox.drain)", "drain", "grid_ipfs/client/inbox.py"),
    ("fetch updates (IPFSClient.cat)", "cat", "grid_ipfs/ipfs/rpc.py"),
    ("parse + check weights (weights_from_bytes)", "weights_from_bytes", "grid_ipfs/payloads.py"),
    ("outlier screening (collect.screen_outliers)", "screen_outliers", "grid_ipfs/client/collect.py"),
    ("close round (Client._close_round)", "_close_round", "grid_ipfs/client/core.py"),
    ("aggregate (strategies.run)", "run", "grid_ipfs/strategies/base.py"),
    ("serialise weights (weights_to_bytes)", "weights_to_bytes", "grid_ipfs/payloads.py"),
    ("add weights (IPFSClient.add)", "add", "grid_ipfs/ipfs/rpc.py"),
    ("chain append (ChainLog.append)", "append", "grid_ipfs/chain/log.py"),
    ("evaluate global model (blocks.evaluate)", "evaluate", "grid_ipfs/client/blocks.py"),
    ("publish (Client.publish)", "publish", "grid_ipfs/client/core.py"),
]

WORKER_STEPS: list[Step] = [
    ("round (Worker.train_round)", "train_round", "grid_ipfs/worker.py"),
    ("fetch global weights (IPFSClient.cat)", "cat", "grid_ipfs/ipfs/rpc.py"),
    ("parse + check weights (weights_from_bytes)", "weights_from_bytes", "grid_ipfs/payloads.py"),
    ("evaluate on validation split (training.evaluate)", "evaluate", "grid_ipfs/training.py"),
    ("train (training.fit)", "fit", "grid_ipfs/training.py"),
    ("serialise weights (weights_to_bytes)", "weights_to_bytes", "grid_ipfs/payloads.py"),
    ("add weights (IPFSClient.add)", "add", "grid_ipfs/ipfs/rpc.py"),
    ("publish update (Peer.publish)", "publish", "grid_ipfs/peer.py"),
    ("join job (Worker.join, once)", "join", "grid_ipfs/worker.py"),
]


def _frames(frame) -> Iterator:
    yield frame
    for child in frame.children:
        yield from _frames(child)


def _matches(frame, function: str, suffix: str) -> bool:
    return frame.function == function and (frame.file_path or "").replace("\\", "/").endswith(suffix)


def seconds_in(root, function: str, suffix: str) -> float:
    """Total time of the outermost frames of `function` (a recursive call is not counted twice)."""
    if root is None:
        return 0.0
    total = 0.0
    stack = [root]
    while stack:
        frame = stack.pop()
        if _matches(frame, function, suffix):
            total += frame.time
            continue
        stack.extend(frame.children)
    return total


def _outermost(root, function: str, suffix: str) -> list:
    found, stack = [], [root] if root is not None else []
    while stack:
        frame = stack.pop()
        if _matches(frame, function, suffix):
            found.append(frame)
        else:
            stack.extend(frame.children)
    return found


def breakdown(root, steps: Sequence[Step]) -> dict[str, float]:
    """Seconds per step; steps after the first are counted inside the first (the round) only."""
    (scope_label, scope_function, scope_suffix), rest = steps[0], steps[1:]
    scopes = _outermost(root, scope_function, scope_suffix)
    out = {scope_label: round(sum(f.time for f in scopes), 4)}
    for label, function, suffix in rest:
        if label.endswith("once)"):
            out[label] = round(seconds_in(root, function, suffix), 4)
        else:
            out[label] = round(sum(seconds_in(f, function, suffix) for f in scopes), 4)
    return out


class _Node:
    """Frames merged by (function, file): pyinstrument keeps one node per call site and sample run."""

    def __init__(self, function: str, where: str):
        self.function, self.where, self.time = function, where, 0.0
        self.children: dict[tuple[str, str], _Node] = {}

    def add(self, frame) -> None:
        self.time += frame.time
        for child in frame.children:
            where = (child.file_path_short or child.file_path or "").replace("\\", "/")
            key = (child.function, where)
            if key not in self.children:
                self.children[key] = _Node(child.function, where)
            self.children[key].add(child)


def subtree_text(root, function: str, suffix: str, min_fraction: float = 0.03, max_depth: int = 8,
                 max_lines: int = 40) -> str:
    """The merged call tree under every outermost `function` frame, branches under `min_fraction` left out."""
    scopes = _outermost(root, function, suffix)
    if not scopes:
        return ""
    top = _Node(function, suffix)
    for frame in scopes:
        top.add(frame)
    lines: list[str] = []

    def walk(node: _Node, depth: int) -> None:
        if len(lines) >= max_lines or depth > max_depth:
            return
        lines.append(f"{'  ' * depth}{node.time:7.3f}s  {node.function}  {node.where}")
        for child in sorted(node.children.values(), key=lambda c: c.time, reverse=True):
            if child.time >= min_fraction * top.time:
                walk(child, depth + 1)

    walk(top, 0)
    return "\n".join(lines)
