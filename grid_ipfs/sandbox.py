"""An untrusted job's model in a child process with rlimits: a gap in model vetting costs one job.

`IsolatedModel(model_bytes, ...)` starts one child per job (multiprocessing *spawn*: a process forked
after TensorFlow ran hangs) that loads the model once and keeps it, so its optimizer state lives there
across rounds. The parent then asks it to `evaluate(weights)` and `fit(weights, ...)`; weights travel as
safetensors bytes both ways and the parent parses the answer like any peer's weights (shapes, dtypes,
finite values). The child gets the data shard once, at start; nothing but metrics and weights comes back.

Before it imports Keras/TensorFlow the child limits itself (`resource.setrlimit`):

* RLIMIT_DATA (`memory_mb`): private writable memory. Not RLIMIT_AS: TensorFlow reserves address space
  it never touches (2.4 GB of address space for 0.64 GB resident with the digits MLP), so an AS limit
  would have to be several times the real need; RLIMIT_DATA tracks what is allocated (0.54 GB there);
* RLIMIT_CPU (`cpu_seconds` per request, the model load included, after `STARTUP_CPU_SECONDS` for
  importing TensorFlow: the soft limit moves up before each request; SIGXCPU ends a child that overruns);
* RLIMIT_FSIZE 0 (no file gets content; SIGXFSZ is ignored so a write fails with an error instead), which
  works because `payloads.model_from_bytes` loads from memory;
* RLIMIT_NOFILE (`open_files`) and RLIMIT_NPROC (the user's current task count plus room for the
  child's own thread pools; root is exempt from NPROC);
* and TF_CPP_MIN_LOG_LEVEL=3, TF_ENABLE_ONEDNN_OPTS=0 in its environment.

The child inherits the worker's environment, `KERAS_BACKEND` included, so it trains on the worker's
Keras backend (JAX and PyTorch children train the digits MLP within the default limits too).

The parent enforces a wall-clock deadline per request (the round's deadline plus `GRACE_SECONDS`; the
load gets `load_seconds`) and kills the child on overrun. Whatever ends the child (the deadline, a
limit, running out of memory, a crash) surfaces as one `TrainerDied` whose message says what happened
("killed by SIGXCPU after exceeding 30 CPU seconds"); a Python error inside a request is a
`TrainerFailed` and the child lives on. A dead child is started afresh by the next request (same
model bytes, same data), but the roles refuse a job whose trainer died rather than feed it again.

This module is role support: it uses payloads and training, and the roles (worker, miner) use it.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any

import numpy as np

from .errors import GridError

GRACE_SECONDS = 5.0
"""Wall-clock slack past a request's deadline before the child is killed: a late answer is merely
useless, a child still running well past it is runaway."""

STARTUP_CPU_SECONDS = 60
"""CPU allowed for the child's start-up (importing TensorFlow takes ~5 CPU seconds) before the first
request's own budget begins."""

_MEMORY_ERRORS = ("MemoryError", "ResourceExhaustedError")
"""Exception class names that mean out of memory (TensorFlow's C++ std::bad_alloc arrives as MemoryError)."""


@dataclass(frozen=True)
class Limits:
    """What one isolated job may use. The defaults fit small and medium models on a laptop."""

    memory_mb: int = 4096
    """RLIMIT_DATA of the child, MB. TensorFlow alone takes ~0.5 GB of it."""
    cpu_seconds: float = 600.0
    """CPU seconds per request (the model load, one evaluation, one round's training)."""
    load_seconds: float = 120.0
    """Wall-clock bound on starting the child and loading the model (TensorFlow's import is ~5 s)."""
    open_files: int = 64
    """RLIMIT_NOFILE of the child (it holds 8 descriptors while training the digits MLP)."""
    threads: int = field(default_factory=lambda: 64 + 4 * (os.cpu_count() or 1))
    """Tasks the child may add to its user's count (RLIMIT_NPROC headroom for TF's thread pools)."""

    def __post_init__(self):
        for name in ("memory_mb", "cpu_seconds", "load_seconds", "open_files", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"isolation limit {name}: expected a number > 0, got {value!r}")


class TrainerFailed(GridError):
    """A request to the isolated trainer raised inside the child (the child lives on)."""


class TrainerDied(TrainerFailed):
    """The isolated trainer is gone: killed at its deadline or by a limit, out of memory, or crashed."""


class IsolatedModel:
    """One job's model in its own child process; stands in for the Keras model in worker and miner.

    `input_shape` and `get_weights()` (placeholders with the model's shapes and dtypes, for
    `weights_from_bytes(like=...)`) answer without a round trip.
    """

    def __init__(self, model_bytes: bytes, *, source: str, x_train=None, y_train=None, x_val=None, y_val=None,
                 limits: Limits | None = None, load_kwargs: dict | None = None):
        empty = np.zeros((0,), np.float32)
        self.source = source
        self.limits = limits or Limits()
        self._start_args = (bytes(model_bytes), source, dict(load_kwargs or {}),
                            *(empty if a is None else a for a in (x_train, y_train, x_val, y_val)))
        self._process: Any = None
        self._conn: Any = None
        self.input_shape: tuple | None = None
        self._like: list[np.ndarray] = []
        self.started_in = 0.0
        """Seconds the last child took from start to a loaded model."""
        self._start()

    # -- the model-like interface ---------------------------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        return list(self._like)

    def evaluate(self, weights: list[np.ndarray] | None, *, deadline: float | None = None) -> dict[str, float]:
        """`training.evaluate` in the child, on its validation split."""
        return self._request(("evaluate", _to_bytes(weights), {}), deadline, "evaluation")

    def fit(self, weights: list[np.ndarray] | None, *, deadline: float | None = None,
            **kwargs: Any) -> tuple[list[np.ndarray], dict[str, float]]:
        """`training.fit(..., **kwargs)` in the child, on its training split: (new weights, metrics)."""
        from .payloads import weights_from_bytes

        data, metrics = self._request(("fit", _to_bytes(weights), kwargs), deadline, "training")
        return weights_from_bytes(data, source=f"the isolated trainer of {self.source}", like=self._like), metrics

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def close(self) -> None:
        """Stop the child (politely: its pipe closes and it exits; SIGKILL if it does not)."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            process.join(2)
            if process.is_alive():
                process.kill()
                process.join(10)
            process.close()

    def __enter__(self) -> IsolatedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the parent's side ------------------------------------------------------------------------------

    def _start(self) -> None:
        started = time.monotonic()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_child_main, args=(child, self.limits, *self._start_args),
                                        name=f"grid_ipfs isolated trainer ({self.source})", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        try:
            shape, specs = self._answer(time.time() + self.limits.load_seconds, "loading the model",
                                        f"{self.limits.load_seconds:g} s to load the model")
        except TrainerDied:
            raise
        except TrainerFailed as exc:  # not the model's fault (that is a PayloadError): the child's
            self._kill()
            raise TrainerDied(str(exc)) from None
        self.input_shape = shape
        self._like = [np.broadcast_to(np.zeros((), dtype), shape) for shape, dtype in specs]
        self.started_in = time.monotonic() - started

    def _request(self, request: tuple, deadline: float | None, what: str) -> Any:
        if not self.alive:
            self.close()
            self._start()  # a fresh child: same model bytes, same data
        if deadline is None:
            deadline, bound = time.time() + self.limits.cpu_seconds, f"{self.limits.cpu_seconds:g} s of {what}"
        else:
            bound = "the round deadline"
        cap = time.time() + self.limits.cpu_seconds
        if not deadline <= cap:  # a far (or NaN) round deadline from the owner: the CPU budget bounds the wait
            deadline, bound = cap, f"{self.limits.cpu_seconds:g} s of {what}"
        try:
            self._conn.send(request)
        except BaseException:  # a half-sent request: the child's reply would answer the next one
            self._kill()
            raise
        return self._answer(deadline + GRACE_SECONDS, what, bound)

    def _answer(self, deadline: float, what: str, bound: str) -> Any:
        """The child's answer to the pending request; TrainerDied when it is gone or past `deadline`."""
        try:
            ready = self._conn.poll(max(0.0, deadline - time.time()))
            status, value = self._conn.recv() if ready else (None, None)
        except (EOFError, OSError):
            raise TrainerDied(self._death()) from None
        except BaseException:  # e.g. KeyboardInterrupt: an answer left in the pipe would answer the next request
            self._kill()
            raise
        if not ready:
            self._kill()
            raise TrainerDied(f"killed by SIGKILL after exceeding {bound} while {what}")
        if status == "ok":
            return value
        if status == "memory":
            self._kill()
            raise TrainerDied(f"ran out of memory ({self.limits.memory_mb} MB) while {what}: {value}")
        if status == "payload":  # the model failed its checks (vetting, archive): what the parent would say
            from .payloads import PayloadError

            self.close()
            raise PayloadError(self.source, value)
        raise TrainerFailed(f"{what} failed: {value}")

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self.close()

    def _death(self) -> str:
        """Why the child ended, from its exit status, in words an operator can act on."""
        process = self._process
        process.join(10)
        code = process.exitcode
        self.close()
        if code is None:
            return "stopped answering"
        if code >= 0:
            return f"exited with code {code}"
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        if -code == signal.SIGXCPU:
            return f"killed by SIGXCPU after exceeding {self.limits.cpu_seconds:g} CPU seconds"
        if -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            return f"crashed ({name}; memory limit {self.limits.memory_mb} MB)"
        return f"killed by {name}"


def add_arguments(parser, steps: str) -> None:
    """The `--isolate` options of a role's command line (worker: "load, evaluation or round")."""
    group = parser.add_argument_group("isolation", "run each job's model in its own child process with "
                                      "rlimits, so a model that gets past vetting costs one job, not the process")
    group.add_argument("--isolate", action="store_true", help="load and run every job's model in a child process")
    group.add_argument("--job-memory", type=int, default=Limits.memory_mb, metavar="MB",
                       help=f"memory per isolated job (RLIMIT_DATA; default {Limits.memory_mb})")
    group.add_argument("--job-cpu-seconds", type=float, default=Limits.cpu_seconds, metavar="S",
                       help=f"CPU seconds per {steps} (default {Limits.cpu_seconds:g})")
    group.add_argument("--isolated-jobs", type=int, default=4, metavar="N",
                       help="most isolated jobs at a time (each child holds a TensorFlow runtime, ~0.6 GB; "
                            "default 4)")


def limits_from_args(args) -> Limits | None:
    """The limits `add_arguments`' options ask for (None without `--isolate`); ValueError on a bad value."""
    if not args.isolate:
        return None
    if args.isolated_jobs < 1:
        raise ValueError(f"--isolated-jobs must be >= 1, got {args.isolated_jobs}")
    return Limits(memory_mb=args.job_memory, cpu_seconds=args.job_cpu_seconds)


def _to_bytes(weights: list[np.ndarray] | None) -> bytes | None:
    from .payloads import weights_to_bytes

    return None if weights is None else weights_to_bytes(weights)


# -- the child's side ------------------------------------------------------------------------------------


def apply_limits(limits: Limits) -> None:
    """Limit this process (call before importing TensorFlow): see the module docstring."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    os.environ["JOBLIB_MULTIPROCESSING"] = "0"  # Keras imports scikit-learn; joblib's probe would warn
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails (EFBIG), not a kill
    tempfile.gettempdir()  # found (by writing a probe file) and cached now: TensorFlow's import asks for it
    memory = int(limits.memory_mb) * 1024 * 1024
    _lower(resource.RLIMIT_DATA, memory, memory)
    _lower(resource.RLIMIT_FSIZE, 0, 0)
    _lower(resource.RLIMIT_CORE, 0, 0)  # SIGXCPU and crashes would otherwise dump core
    _lower(resource.RLIMIT_NOFILE, int(limits.open_files), int(limits.open_files))
    tasks = _user_tasks() + int(limits.threads)
    _lower(resource.RLIMIT_NPROC, tasks, tasks)
    _cpu_budget(STARTUP_CPU_SECONDS)


def _child_main(conn, limits: Limits, model_bytes: bytes, source: str, load_kwargs: dict,
                x_train, y_train, x_val, y_val) -> None:
    """Load the model, answer with its input shape and weight specs, then serve requests until the
    parent closes the pipe."""
    apply_limits(limits)
    try:
        import keras  # noqa: F401  (under the limits, with STARTUP_CPU_SECONDS)
    except Exception as exc:  # noqa: BLE001  (e.g. a memory limit below what TensorFlow needs)
        text = f"cannot start Keras: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        conn.send(("memory" if _out_of_memory(exc) else "error", text))
        return
    _cpu_budget(limits.cpu_seconds)  # a fresh budget for the load itself
    loaded = _serve_one(conn, partial(_load, model_bytes, source, load_kwargs), reply=itemgetter(1))
    del model_bytes  # the parent keeps the bytes for a restart; the child needs only the model
    if loaded is None:
        return
    model = loaded[0]
    while True:
        try:
            op, weights, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe (or died): nothing left to do
        _cpu_budget(limits.cpu_seconds)
        if op == "evaluate":
            _serve_one(conn, partial(_evaluate, model, weights, x_val, y_val))
        elif op == "fit":
            _serve_one(conn, partial(_fit, model, weights, x_train, y_train, kwargs))
        else:
            conn.send(("error", f"unknown request {op!r}"))


def _serve_one(conn, work, reply=lambda result: result) -> Any:
    """Run `work()` and send its outcome (`reply(result)` when it succeeds); the result, None after an
    error."""
    from .payloads import PayloadError

    try:
        result = work()
    except Exception as exc:  # noqa: BLE001  (everything goes back to the parent as one line)
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if _out_of_memory(exc):  # also inside a PayloadError: a load that ran out
            conn.send(("memory", text))
        elif isinstance(exc, PayloadError):
            conn.send(("payload", str(exc).removeprefix(f"{exc.source}: ")))
        else:
            conn.send(("error", text))
        if isinstance(exc, MemoryError):
            os._exit(1)
        return None
    conn.send(("ok", reply(result)))
    return result


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, is of an out-of-memory type.
    By type, not by text: a message can quote a peer's layer names, and "MemoryError" is a fine name."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ in _MEMORY_ERRORS for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load(model_bytes: bytes, source: str, load_kwargs: dict) -> tuple:
    from .payloads import model_from_bytes

    model = model_from_bytes(model_bytes, source=source, **load_kwargs)
    specs = [(tuple(w.shape), np.dtype(w.dtype).str) for w in model.get_weights()]
    return model, (tuple(model.input_shape), specs)


def _evaluate(model, weights: bytes | None, x, y) -> dict[str, float]:
    from .training import evaluate

    return evaluate(model, _from_bytes(model, weights), x, y)


def _fit(model, weights: bytes | None, x, y, kwargs: dict) -> tuple[bytes, dict[str, float]]:
    from .payloads import weights_to_bytes
    from .training import fit

    new_weights, metrics = fit(model, _from_bytes(model, weights), x, y, **kwargs)
    return weights_to_bytes(new_weights), metrics


def _from_bytes(model, data: bytes | None):
    from .payloads import weights_from_bytes

    return None if data is None else weights_from_bytes(data, source="weights from the parent",
                                                        like=model.get_weights())


def _cpu_budget(seconds: float) -> None:
    """Allow `seconds` more CPU from now: RLIMIT_CPU's soft limit moves up (the hard one stays put)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _lower(kind: int, soft: int, hard: int) -> None:
    """setrlimit, never above the limits this process already has."""
    old_soft, old_hard = resource.getrlimit(kind)
    cap = lambda value, old: value if old == resource.RLIM_INFINITY else min(value, old)  # noqa: E731
    hard = cap(hard, old_hard)
    resource.setrlimit(kind, (min(cap(soft, old_soft), hard), hard))


def _user_tasks() -> int:
    """Tasks (processes and threads) of this user right now: what RLIMIT_NPROC counts."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


__all__ = ["GRACE_SECONDS", "IsolatedModel", "Limits", "TrainerDied", "TrainerFailed", "add_arguments",
           "apply_limits", "limits_from_args"]
