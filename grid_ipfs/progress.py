"""Progress a person can watch while a job runs: a rich live display, or plain log lines.

Both are `ClientCallback`s; the client does not know which one it has. What a peer wrote (worker names,
metric names, reasons, errors quoting them) is shown as text: `shown` escapes rich markup and control
characters, so `[/x]` cannot raise MarkupError in the round loop and `\n[bold]done: ...` cannot print a
forged line.
"""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from .client import ClientCallback, JobResult, RoundResult
from .text import printable

log = logging.getLogger("grid_ipfs.client")


def shown(value: object, limit: int = 200) -> str:
    """A peer's text for a rich console: one line, control characters escaped, markup escaped."""
    return escape(printable(value, limit))


def _fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, float) else "-"


def rejected_line(result: RoundResult, why: str) -> str:
    """One line for a try whose aggregate the acceptance rule turned down, e.g. "round 3 try 1 rejected:
    val_accuracy 0.41 fails val_accuracy>=0.6"."""
    return f"round {result.round} try {result.tries} rejected: {why}"


class LogProgress(ClientCallback):
    """One log line per event: for `--json` runs, CI logs and files. (A try rejected by the acceptance
    rule is logged by the client itself, as a warning naming the rule and the retry.)"""

    def on_job_start(self, job, genesis):
        log.info("job %s: model %s, genesis %s; waiting for workers", job.job, job.model, genesis)

    def on_worker_joined(self, worker, name, joined, needed):
        log.info("worker %s (%s) joined: %d/%d", printable(name), worker[:12], joined, needed)

    def on_round_start(self, round, expected, deadline):
        log.info("round %d: asked %d worker(s), deadline in %.0fs", round, expected, deadline - time.time())

    def on_update(self, round, worker, received, expected):
        log.info("round %d: update %d/%d from %s", round, received, expected, worker[:12])

    def on_round_retry(self, round, attempt, received, needed):
        log.warning("round %d attempt %d: %d of %d updates by the deadline", round, attempt, received, needed)

    def on_round_end(self, result: RoundResult):
        m = result.metrics
        stale = f", staleness {_staleness(m)}" if "staleness_max" in m else ""
        log.info("round %d done: %d updates%s, loss %s, accuracy %s, val_accuracy %s, %.1fs; head %s",
                 result.round, result.updates, stale, _fmt(m, "loss"), _fmt(m, "accuracy"), _fmt(m, "val_accuracy"),
                 result.seconds, result.head)

    def on_job_end(self, result: JobResult):
        log.info("job %s complete: head %s, final weights %s", result.job, result.head, result.weights)

    def on_job_failed(self, job, error):
        log.error("job %s failed: %s", job.job, printable(error, 500))


def _staleness(metrics: dict) -> str:
    """An async block's staleness as "mean/max" versions behind ("-" for a synchronous round)."""
    if "staleness_max" not in metrics:
        return "-"
    return f"{metrics['staleness_mean']:.1f}/{metrics['staleness_max']:.0f}"


class RichProgress(ClientCallback):
    """A live table on stderr: one row per round, the current one updating as updates arrive; a try the
    acceptance rule rejected is a red row marked ✗, with the reason under the table. An async job's
    rows are blocks, with their updates' staleness (mean/max) and the updates per minute so far."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.rows: list[tuple] = []
        self.current: dict = {}
        self.live: Live | None = None
        self.job = ""
        self.rejections: list[str] = []
        self.buffered = False
        self.started = time.monotonic()
        self.updates = 0

    def _table(self) -> Table:
        table = Table(title=f"job {self.job}", expand=False)
        extra = ("staleness", "updates/min") if self.buffered else ()
        for column in ("block" if self.buffered else "round", "updates", *extra, "loss", "accuracy", "val_loss",
                       "val_accuracy", "seconds"):
            table.add_column(column, justify="right")
        for *row, style in self.rows:
            table.add_row(*row, style=style)
        if self.rejections:  # why each ✗ row was turned down (the last few), under the table
            table.caption = "\n".join(shown(line, 300) for line in self.rejections[-5:])
            table.caption_style = "red"
        if self.current:
            c = self.current
            table.add_row(str(c["round"]), f"{c['received']}/{c['expected']}", *("…",) * (len(extra) + 4),
                          f"{time.monotonic() - c['started']:.1f}", style="yellow")
        return table

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table())

    def on_job_start(self, job, genesis):
        self.job = job.job
        self.buffered, self.started = job.config.get("mode") == "async", time.monotonic()
        self.console.print(f"[bold]job {job.job}[/]: model {job.model}\n  genesis {genesis}; waiting for workers…")
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def on_worker_joined(self, worker, name, joined, needed):
        self.console.print(f"  worker [cyan]{shown(name)}[/] ({shown(worker[:12])}…) joined ({joined}/{needed} needed)")

    def on_round_start(self, round, expected, deadline):
        self.current = {"round": round, "received": 0, "expected": expected, "started": time.monotonic()}
        self._refresh()

    def on_update(self, round, worker, received, expected):
        self.current.update(received=received, expected=expected)
        self._refresh()

    def on_round_retry(self, round, attempt, received, needed):
        self.console.print(f"  [yellow]round {round} attempt {attempt}[/]: {received} of {needed} updates by the "
                           "deadline; announcing it again")

    def _row(self, result: RoundResult, label: str, style: str | None) -> tuple:
        m = result.metrics
        self.updates += result.updates
        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        extra = (_staleness(m), f"{self.updates / minutes:.1f}") if self.buffered else ()
        return (label, str(result.updates), *extra, _fmt(m, "loss"), _fmt(m, "accuracy"), _fmt(m, "val_loss"),
                _fmt(m, "val_accuracy"), f"{result.seconds:.1f}", style)

    def on_round_rejected(self, result: RoundResult, why: str):
        self.rows.append(self._row(result, f"{result.round} ✗", "red"))
        self.rejections.append(rejected_line(result, why))
        self.current = {}
        self._refresh()

    def on_round_end(self, result: RoundResult):
        self.rows.append(self._row(result, str(result.round), None))
        self.current = {}
        self._refresh()

    def on_job_end(self, result: JobResult):
        if self.live is not None:
            self.live.stop()
        self.console.print(f"[green]done[/]: head {result.head}\n  final weights {result.weights}")

    def on_job_failed(self, job, error):
        if self.live is not None:
            self.live.stop()
        self.console.print(f"[red]failed[/]: {shown(error, 500)}")
