"""Draw a job's learning curves from its chain: one panel per metric, one line per source, round on x.

Every block records `metrics` (see `grid_ipfs.client`): the workers' example-weighted training metrics
(`loss`, `accuracy`, or `mae`, `mse`, ... for regression), the client's held-out evaluation of the new
global model (`val_*`, also at round 0 for the initial weights) and the workers' evaluation of the
incoming global model on their own validation split (`eval_*`). Metrics sharing a base name share a
panel (`loss`, `val_loss`, `eval_loss`), drawn solid / dashed / dotted; panels of loss-like metrics
come first, then accuracy-like ones, then anything else numeric. Bookkeeping counters (`attempts`,
`rejected_updates`, `dropped_messages`) are not learning curves and are left out.

`plot_chain(blocks, path)` takes decoded blocks (genesis first), so it needs no daemon; it draws with
matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).

Metric names come from whoever wrote the blocks, so every text the figure draws is plain text: no
mathtext (`$\\frac{`), no LaTeX, control characters escaped, names cut at `MAX_LABEL` characters; and at
most `MAX_PANELS` panels are drawn (a block may hold thousands of metric names).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["SOURCES", "BOOKKEEPING", "MAX_LABEL", "MAX_PANELS", "metric_kind", "collect_series", "plot_chain"]

MAX_PANELS = 24
"""Most metric panels one figure draws (in panel order); the title says how many were left out."""
MAX_LABEL = 60
"""Longest metric name drawn as is; longer ones are cut with an ellipsis."""

SOURCES = (
    ("", "train (workers)", "-", "o"),
    ("val_", "held-out (client)", "--", "s"),
    ("eval_", "incoming model (workers' eval)", ":", "^"),
)
"""(metric name prefix, legend label, line style, marker), in drawing order."""

BOOKKEEPING = frozenset({"attempts", "rejected_updates", "dropped_messages"})
"""Round counters recorded in `metrics` that are not learning curves."""

_LOSS_WORDS = ("loss", "error", "crossentropy", "hinge", "divergence", "poisson", "logcosh", "mse", "mae",
               "rmse", "mape", "msle", "huber", "perplexity")
_ACCURACY_WORDS = ("accuracy", "acc", "auc", "precision", "recall", "f1", "r2", "iou")

KINDS = ("loss", "accuracy", "other")


def metric_kind(base: str) -> str:
    """'loss' (lower is better), 'accuracy' (higher is better) or 'other', from a metric's base name."""
    name = base.lower()
    words = name.replace("-", "_").split("_")
    if any(w in _ACCURACY_WORDS for w in words) or "accuracy" in name:
        return "accuracy"
    if any(w in _LOSS_WORDS for w in words) or any(w in name for w in ("loss", "error", "crossentropy")):
        return "loss"
    return "other"


def _split(key: str) -> tuple[str, str]:
    """(source prefix, base name) of a metric key."""
    for prefix, *_ in SOURCES:
        if prefix and key.startswith(prefix) and len(key) > len(prefix):
            return prefix, key[len(prefix):]
    return "", key


def _plain_text(text: str, limit: int = MAX_LABEL) -> str:
    """A peer's text safe to draw: control characters escaped, cut to `limit` characters."""
    text = "".join(repr(ch)[1:-1] if not ch.isprintable() else ch for ch in str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _as_plain(*artists) -> None:
    """Render these text artists literally: a `$` in a metric name is a dollar sign, not mathtext."""
    for artist in artists:
        artist.set_parse_math(False)
        artist.set_usetex(False)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _blocks(blocks: Iterable) -> tuple[list[dict], str | None]:
    """Accept plain blocks or (cid, block) pairs as `walk` yields them (reversed: genesis first)."""
    out, head = [], None
    for item in blocks:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            head = item[0]
            item = item[1]
        if not isinstance(item, dict):
            raise TypeError(f"expected decoded chain blocks (dicts), got {type(item).__name__}")
        out.append(item)
    return out, (None if head is None else str(head))


def collect_series(blocks: Sequence[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{base metric: {source prefix: [(round, value), ...]}} for every finite numeric metric in `blocks`.

    Blocks are taken in the order given; a metric missing from some rounds simply has fewer points.
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for block in blocks:
        metrics = block.get("metrics")
        round_ = block.get("round", block.get("seq"))
        if not isinstance(metrics, dict) or not isinstance(round_, int):
            continue
        for key, value in metrics.items():
            number = _number(value)
            if not isinstance(key, str) or key in BOOKKEEPING or number is None:
                continue
            prefix, base = _split(key)
            series.setdefault(base, {}).setdefault(prefix, []).append((round_, number))
    return series


def _ordered(series: dict) -> list[str]:
    """Panels: loss-like first (`loss` itself first), then accuracy-like (`accuracy` first), then other."""
    def key(base: str):
        kind = metric_kind(base)
        return KINDS.index(kind), base != kind, base
    return sorted(series, key=key)


def plot_chain(blocks: Iterable, path: str | os.PathLike, *, head: str | None = None,
               title: str | None = None, dpi: int = 110) -> dict[str, list[str]]:
    """Draw the learning curves of a chain into an image at `path` (format from its suffix, PNG usually).

    `blocks` are decoded blocks genesis first, or the (cid, block) pairs of `reversed(list(walk(...)))`
    (then the newest CID is the head). The title names the job and the first 12 characters of `head`.
    A chain with no metrics at all still gets an image saying so. Returns the panels drawn,
    {base metric: [metric keys]}, e.g. {"loss": ["loss", "val_loss", "eval_loss"], ...}.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    blocks, pair_head = _blocks(blocks)
    head = head if head is not None else pair_head
    series = collect_series(blocks)
    panels = _ordered(series)
    left_out = len(panels) - MAX_PANELS
    panels = panels[:MAX_PANELS]

    job = next((b.get("job") for b in blocks if isinstance(b.get("job"), str)), None)
    rounds = [b["round"] for b in blocks if isinstance(b.get("round"), int)]
    if title is None:
        title = f"job {job or '?'}"
        if head:
            title += f" · head {head[:12]}…"
        if rounds:
            title += f" · rounds {min(rounds)}–{max(rounds)}"
        if left_out > 0:
            title += f" · {left_out} more metrics not drawn"
    title = _plain_text(title, limit=200)

    ncols = 1 if len(panels) <= 1 else 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(6.0 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    _as_plain(fig.suptitle(title))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    drawn: dict[str, list[str]] = {}
    if not panels:
        _as_plain(axes[0].text(0.5, 0.5, "no metrics recorded in this chain", ha="center", va="center",
                               transform=axes[0].transAxes))
        axes[0].set_axis_off()
    for ax, base in zip(axes, panels):
        kind = metric_kind(base)
        name = _plain_text(base)
        drawn[base] = []
        values = []
        for prefix, label, style, marker in SOURCES:
            points = sorted(series[base].get(prefix, []))
            if not points:
                continue
            xs, ys = zip(*points)
            values.extend(ys)
            ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, label=f"{prefix}{name} · {label}")
            drawn[base].append(prefix + base)
        _as_plain(ax.set_title(name + ("" if kind == "other" else f"  ({kind}-like: "
                                      f"{'lower' if kind == 'loss' else 'higher'} is better)"), fontsize=10),
                  ax.set_xlabel("round"), ax.set_ylabel(name))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if rounds:  # every panel spans the whole chain, so rounds line up across panels
            ax.set_xlim(min(rounds) - 0.3, max(rounds) + 0.3)
        ax.grid(True, alpha=0.3)
        if kind == "accuracy" and values and 0.0 <= min(values) and max(values) <= 1.0:
            ax.set_ylim(-0.02, 1.02)
        elif kind == "loss" and values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        _as_plain(*ax.legend(fontsize=8).get_texts())
    for ax in axes[len(panels) or 1:]:
        ax.set_visible(False)
    fig.savefig(Path(path), dpi=dpi)
    return drawn
