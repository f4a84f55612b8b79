"""transfer: add + cat of weights-like payloads through `IPFSClient` against raw httpx POSTs to the same daemon.

For 1, 10 and 100 MB of random float32 tensors serialised as grid weights (safetensors), one repeat
adds fresh bytes and cats them back through `grid_ipfs.ipfs.IPFSClient`, and does the same with plain
`httpx.Client.post` calls on `/api/v0/add` (multipart, same parameters) and `/api/v0/cat` on the same
daemon. Each path gets its own fresh random bytes (no deduplication help) and the two paths alternate
which goes first. Throughput is `bytes / (add seconds + cat seconds)` in MB/s (10^6 bytes); `ratio` is
grid over raw, computed per repeat, then median/min/max over repeats. Target: ratio >= 0.9.

Run alone: `python -m benchmarks.transfer [--quick] [--repeats N]` prints the table.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks import common
from benchmarks.common import cell, log, table, verdict

NAME = "transfer"
DEFAULT_REPEATS = (5, 2)
SIZES_MB = (1, 10, 100)
TARGET_RATIO = 0.9
MB = 1_000_000


def weights_like(total_bytes: int, rng: np.random.Generator) -> bytes:
    """Safetensors bytes of a dense layer (kernel + bias) of random float32 holding ~`total_bytes`."""
    from grid_ipfs.payloads import weights_to_bytes

    width = 1024
    rows = max(1, total_bytes // 4 // width - 1)
    kernel = rng.standard_normal((rows, width), dtype=np.float32)
    bias = rng.standard_normal(width, dtype=np.float32)
    return weights_to_bytes([kernel, bias])


def _grid_roundtrip(client, data: bytes) -> tuple[float, float]:
    from grid_ipfs.payloads import MAX_WEIGHTS_BYTES

    t0 = time.perf_counter()
    cid = client.add(data)
    t1 = time.perf_counter()
    back = client.cat(cid, max_size=MAX_WEIGHTS_BYTES, timeout=300)
    t2 = time.perf_counter()
    if back != data:
        raise AssertionError("IPFSClient.cat returned other bytes than were added")
    return t1 - t0, t2 - t1


def _raw_roundtrip(http, data: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    response = http.post("/api/v0/add", params={"pin": "true", "quieter": "true"},
                         files={"file": ("blob", data, "application/octet-stream")})
    response.raise_for_status()
    cid = response.json()["Hash"]
    t1 = time.perf_counter()
    response = http.post("/api/v0/cat", params={"arg": cid})
    response.raise_for_status()
    back = response.content
    t2 = time.perf_counter()
    if back != data:
        raise AssertionError("raw /api/v0/cat returned other bytes than were added")
    return t1 - t0, t2 - t1


def measure(api: str, sizes_mb: tuple[int, ...], repeats: int, seed: int = 0) -> list[dict]:
    import httpx

    from grid_ipfs.ipfs.rpc import IPFSClient, api_url

    rng = np.random.default_rng(seed)
    rows = []
    with IPFSClient(api, timeout=httpx.Timeout(connect=5.0, read=300.0, write=300.0, pool=10.0)) as client, \
            httpx.Client(base_url=api_url(api), timeout=httpx.Timeout(300.0, connect=5.0)) as http:
        # Warm both connections and the daemon's add path once; not measured.
        _grid_roundtrip(client, weights_like(64 * 1024, rng))
        _raw_roundtrip(http, weights_like(64 * 1024, rng))
        for size_mb in sizes_mb:
            samples = []
            for rep in range(repeats):
                grid_data = weights_like(size_mb * MB, rng)
                raw_data = weights_like(size_mb * MB, rng)
                order = ("grid", "raw") if rep % 2 == 0 else ("raw", "grid")
                timings = {}
                for path in order:
                    if path == "grid":
                        timings[path] = _grid_roundtrip(client, grid_data)
                    else:
                        timings[path] = _raw_roundtrip(http, raw_data)
                size = len(grid_data)
                grid_add, grid_cat = timings["grid"]
                raw_add, raw_cat = timings["raw"]
                sample = {
                    "grid_MBps": size / MB / (grid_add + grid_cat),
                    "raw_MBps": len(raw_data) / MB / (raw_add + raw_cat),
                    "grid_add_MBps": size / MB / grid_add, "grid_cat_MBps": size / MB / grid_cat,
                    "raw_add_MBps": len(raw_data) / MB / raw_add, "raw_cat_MBps": len(raw_data) / MB / raw_cat,
                }
                sample["ratio"] = sample["grid_MBps"] / sample["raw_MBps"]
                samples.append(sample)
                log(f"transfer {size_mb} MB repeat {rep + 1}/{repeats}: grid {sample['grid_MBps']:.1f} MB/s, "
                    f"raw {sample['raw_MBps']:.1f} MB/s, ratio {sample['ratio']:.3f}")
            row = {"bytes": size}
            row.update(common.fold(samples, ["grid_MBps", "raw_MBps", "ratio"], digits=3))
            row["detail"] = common.fold(samples, ["grid_add_MBps", "grid_cat_MBps", "raw_add_MBps",
                                                  "raw_cat_MBps"], digits=2)
            row["repeats"] = repeats
            rows.append(row)
    return rows


def daemon_version(api: str) -> str:
    from grid_ipfs.ipfs.rpc import IPFSClient

    with IPFSClient(api) as client:
        info = client.version()
        agent = client.id().get("AgentVersion", "")
    return agent or f"version {info.get('Version', '?')}"


def run(ctx: common.Context) -> list[dict]:
    from grid_ipfs.ipfs.devnet import Devnet

    ctx.info["sizes_mb"] = list(SIZES_MB)
    net = Devnet.up(1, ctx.workdir / "devnet")
    try:
        ctx.info["daemon"] = f"{net.daemon.kind}: {daemon_version(net.apis[0])}"
        return measure(net.apis[0], SIZES_MB, ctx.repeats)
    finally:
        net.stop()


def render(rows: list[dict]) -> str:
    body = table(["payload", "grid MB/s", "raw httpx MB/s", "ratio grid/raw", f"ratio >= {TARGET_RATIO}"],
                 [[f"{r['bytes'] / MB:.0f} MB", cell(r, "grid_MBps", "{:.1f}"), cell(r, "raw_MBps", "{:.1f}"),
                   cell(r, "ratio", "{:.3f}"), verdict(r["ratio"] >= TARGET_RATIO)] for r in rows])
    detail = table(["payload", "grid add", "grid cat", "raw add", "raw cat"],
                   [[f"{r['bytes'] / MB:.0f} MB", *(cell(r["detail"], k, "{:.1f}") for k in
                     ("grid_add_MBps", "grid_cat_MBps", "raw_add_MBps", "raw_cat_MBps"))] for r in rows])
    return (f"{body}\n\nThroughput = payload / (add s + cat s), one daemon, median (min–max) over "
            f"{rows[0]['repeats'] if rows else 0} repeat(s). Per direction (MB/s):\n\n{detail}")


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
