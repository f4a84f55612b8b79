"""Defence in depth: Keras' process-wide state survives untrusted loads and training steps, and an
isolated job's child process dies alone (memory, CPU, deadline) while its parent carries on.

The guard tests run in-process. The child tests start real spawn children (~6 s each: TensorFlow's
import); the last test runs a digits job on real daemons with `--isolate` workers and verifies its chain.
"""

from __future__ import annotations

import os
import sys
import time

import keras
import numpy as np
import pytest

from grid_ipfs import data, training, zoo
from grid_ipfs.kerasstate import keras_settings, keras_state_guard
from grid_ipfs.payloads import PayloadError, model_from_bytes, model_to_bytes
from grid_ipfs.sandbox import GRACE_SECONDS, IsolatedModel, Limits, TrainerDied

DEFAULTS = {"floatx": "float32", "epsilon": 1e-7, "image_data_format": "channels_last", "dtype_policy": "float32",
            "unsafe_deserialization": False, "traceback_filtering": True, "interactive_logging": True,
            "max_epochs": None}


def flip_everything() -> None:
    """What a hostile config or callback can reach through public Keras functions."""
    keras.config.set_floatx("float16")
    keras.config.set_epsilon(0.5)
    keras.config.set_image_data_format("channels_first")
    keras.config.set_dtype_policy("mixed_float16")
    keras.config.enable_unsafe_deserialization()
    keras.config.disable_traceback_filtering()
    keras.config.disable_interactive_logging()
    keras.config.set_max_epochs(1)
    keras.saving.get_custom_objects()["Evil>thing"] = len
    keras.saving.register_keras_serializable("Evil")(type("Registered", (), {"get_config": lambda self: {}}))
    keras.saving.custom_object_scope({"scoped": len}).__enter__()  # entered, never left


def assert_clean() -> None:
    settings = keras_settings()
    assert keras.config.floatx() == "float32"
    assert keras.config.epsilon() == 1e-7
    assert keras.config.image_data_format() == "channels_last"
    assert keras.config.dtype_policy().name == "float32"
    assert settings["unsafe_deserialization"] is False
    assert keras.config.is_traceback_filtering_enabled() is True
    assert keras.config.is_interactive_logging_enabled() is True
    assert keras.config.max_epochs() is None
    assert "Evil>thing" not in keras.saving.get_custom_objects()
    assert "Evil>Registered" not in keras.saving.get_custom_objects()
    assert keras.saving.get_registered_object("scoped") is None
    assert {k: settings[k] for k in DEFAULTS} == DEFAULTS


@pytest.fixture(autouse=True)
def clean_state():
    """Each test starts from (and must end in) Keras' defaults."""
    assert_clean()
    yield


# -- the guard ------------------------------------------------------------------------------------------


def test_guard_restores_every_global_and_names_what_changed():
    with keras_state_guard() as changed:
        flip_everything()
        assert keras.config.floatx() == "float16"  # the flips are real inside the block
    assert_clean()
    for name in ("floatx", "epsilon", "image_data_format", "dtype_policy", "unsafe_deserialization",
                 "traceback_filtering", "interactive_logging", "max_epochs", "custom objects"):
        assert f"keras {name}" in changed, changed


def test_guard_restores_when_the_block_raises_and_after_clear_session():
    with pytest.raises(RuntimeError, match="boom"), keras_state_guard():
        flip_everything()
        keras.utils.clear_session()  # swaps Keras' global state for a fresh one
        keras.config.set_floatx("float64")
        raise RuntimeError("boom")
    assert_clean()


def test_guard_is_silent_for_honest_work():
    model = zoo.digits_mlp(seed=0)
    x, y, _, _ = data.digits()
    with keras_state_guard() as changed:
        training.fit(model, None, x[:64], y[:64], epochs=1, seed=0)
    assert changed == []


@pytest.mark.filterwarnings("ignore:Using `keras.config.set_backend` is dangerous")
def test_guard_undoes_a_backend_reload():
    original, backend = sys.modules["keras"], os.environ.get("KERAS_BACKEND")
    with keras_state_guard() as changed:
        keras.config.set_backend("tensorflow")  # drops every keras module and imports them again
        assert sys.modules["keras"] is not original
    assert sys.modules["keras"] is original
    assert os.environ.get("KERAS_BACKEND") == backend
    assert "keras modules (re-imported)" in changed


def test_a_callback_that_flips_globals_during_fit_leaves_no_trace(caplog):
    class Hostile(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            flip_everything()

    x, y, _, _ = data.digits()
    training.fit(zoo.digits_mlp(seed=0), None, x[:64], y[:64], epochs=1, seed=0, callbacks=[Hostile()])
    assert_clean()
    assert "training changed process-wide Keras state (keras floatx" in caplog.text


def test_loading_a_model_that_flips_globals_leaves_no_trace(monkeypatch):
    """The load itself runs under the guard: whatever Keras calls while rebuilding the model (stood in
    for by a load that flips everything) is undone before model_from_bytes returns."""
    from keras.src.saving import saving_lib

    real = saving_lib.load_model

    def hostile_load(*args, **kwargs):
        model = real(*args, **kwargs)
        flip_everything()
        return model

    monkeypatch.setattr(saving_lib, "load_model", hostile_load)
    model = model_from_bytes(model_to_bytes(zoo.digits_mlp(seed=0)), source="hostile")
    assert model.input_shape == (None, 64)
    assert_clean()


def test_loading_writes_no_file(tmp_path, monkeypatch):
    """model_from_bytes loads from memory: an isolated child loads with RLIMIT_FSIZE 0."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model_from_bytes(model_to_bytes(zoo.digits_mlp(seed=0)), source="m")
    assert list(tmp_path.iterdir()) == []


# -- the isolated child ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    x, y, x_val, y_val = data.digits()
    return x, y, x_val, y_val, model_to_bytes(zoo.digits_mlp(seed=0))


def test_a_round_trip_gives_the_weights_of_in_process_training(digits):
    x, y, x_val, y_val, model_bytes = digits
    local = model_from_bytes(model_bytes, source="local")
    start = local.get_weights()
    expected, expected_metrics = training.fit(local, start, x, y, epochs=2, batch_size=32, seed=7)
    expected_eval = training.evaluate(local, start, x_val, y_val)
    with IsolatedModel(model_bytes, source="iso", x_train=x, y_train=y, x_val=x_val, y_val=y_val) as model:
        assert model.input_shape == (None, 64)
        assert [(w.shape, w.dtype) for w in model.get_weights()] == [(w.shape, w.dtype) for w in start]
        weights, metrics = model.fit(start, epochs=2, batch_size=32, seed=7, deadline=time.time() + 120)
        evaluated = model.evaluate(start)
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(expected_metrics, rel=1e-5)
    assert evaluated == pytest.approx(expected_eval, rel=1e-5)
    assert_clean()


def test_a_bad_model_is_a_payload_error_from_the_child(digits):
    with pytest.raises(PayloadError, match="bad: expected a .keras archive"):
        IsolatedModel(b"PK\x05\x06" + bytes(18), source="bad")


def test_a_child_past_its_memory_limit_dies_alone_and_the_next_request_gets_a_fresh_child(digits):
    """One batch of 20,000 examples through a 4096-wide layer needs > 300 MB per activation: far past
    a limit just above what TensorFlow itself takes."""
    x = np.random.default_rng(0).random((20_000, 64), np.float32)
    y = np.zeros(20_000, np.int64)
    model_bytes = model_to_bytes(zoo.digits_mlp(seed=0, hidden=4096))
    with IsolatedModel(model_bytes, source="bomb", x_train=x, y_train=y, x_val=x[:10], y_val=y[:10],
                       limits=Limits(memory_mb=1200, cpu_seconds=120)) as model:
        first = model._process.pid
        with pytest.raises(TrainerDied) as died:
            model.fit(None, epochs=1, batch_size=20_000, deadline=time.time() + 120)
        message = str(died.value)
        assert "\n" not in message
        assert ("ran out of memory (1200 MB) while training" in message or "crashed" in message
                or "killed by" in message), message
        assert not model.alive
        assert model.evaluate(None)["loss"] > 0  # a fresh child, same model, same data
        assert model._process.pid != first


def test_a_child_past_its_cpu_limit_or_deadline_is_killed_and_reported_in_one_line(digits):
    x, y, x_val, y_val, model_bytes = digits
    with IsolatedModel(model_bytes, source="spin", x_train=x, y_train=y, x_val=x_val, y_val=y_val,
                       limits=Limits(cpu_seconds=4)) as model:
        with pytest.raises(TrainerDied, match=r"^killed by SIGXCPU after exceeding 4 CPU seconds$"):
            model.fit(None, epochs=100_000, batch_size=8, deadline=time.time() + 300)
        assert model.evaluate(None)["loss"] > 0  # the next request gets a fresh child
    with IsolatedModel(model_bytes, source="slow", x_train=x, y_train=y, x_val=x_val, y_val=y_val) as model:
        started = time.monotonic()
        with pytest.raises(TrainerDied, match=r"^killed by SIGKILL after exceeding the round deadline while training$"):
            model.fit(None, epochs=100_000, batch_size=8, deadline=time.time() + 1)
        assert time.monotonic() - started < 1 + GRACE_SECONDS + 10
        assert model.evaluate(None)["loss"] > 0


class _FakeConn:
    """The parent's end of a pipe to a child that never answers: records what the parent waits for."""

    def __init__(self, poll_raises: BaseException | None = None):
        self.sent, self.waits, self.poll_raises, self.closed = [], [], poll_raises, False

    def send(self, request):
        self.sent.append(request)

    def poll(self, timeout):
        self.waits.append(timeout)
        if self.poll_raises is not None:
            raise self.poll_raises
        return False

    def close(self):
        self.closed = True


class _FakeProcess:
    def __init__(self):
        self.killed = False

    def is_alive(self):
        return not self.killed

    def kill(self):
        self.killed = True

    def join(self, timeout=None):
        pass

    def close(self):
        pass


def _unspawned(conn: _FakeConn) -> tuple[IsolatedModel, _FakeProcess]:
    """An IsolatedModel wired to fakes instead of a child process (no spawn, no TensorFlow import)."""
    model = IsolatedModel.__new__(IsolatedModel)
    process = _FakeProcess()
    model.source, model.limits, model._process, model._conn = "fake", Limits(cpu_seconds=2), process, conn
    return model, process


@pytest.mark.parametrize("deadline", [1e18, float("inf"), float("nan")])
def test_an_absurd_round_deadline_waits_at_most_the_cpu_budget(deadline):
    conn = _FakeConn()
    model, process = _unspawned(conn)
    with pytest.raises(TrainerDied, match=r"^killed by SIGKILL after exceeding 2 s of evaluation while evaluation$"):
        model._request(("evaluate", None, {}), deadline, "evaluation")  # on main: OverflowError, child left running
    assert conn.sent and 0 < conn.waits[0] <= 2 + GRACE_SECONDS and process.killed


def test_an_exception_while_waiting_kills_the_child_so_the_pipe_stays_in_step():
    conn = _FakeConn(poll_raises=KeyboardInterrupt())
    model, process = _unspawned(conn)
    with pytest.raises(KeyboardInterrupt):
        model._request(("evaluate", None, {}), time.time() + 1, "evaluation")
    assert process.killed and conn.closed and model._conn is None  # the next request starts a fresh child


class _Sent:
    def __init__(self):
        self.messages = []

    def send(self, message):
        self.messages.append(message)


class ResourceExhaustedError(Exception):
    """Named like TensorFlow's out-of-memory error."""


@pytest.mark.parametrize(("error", "status"), [
    (ValueError("layer 'MemoryError' has a bad_alloc shape"), "error"),  # on main: "memory", by the text
    (ResourceExhaustedError("OOM when allocating"), "memory"),
    (PayloadError("fake", "cannot load"), "payload"),
])
def test_the_child_classifies_failures_by_exception_type(error, status):
    from grid_ipfs.sandbox import _serve_one

    def work():
        raise error

    conn = _Sent()
    assert _serve_one(conn, work) is None
    assert conn.messages[0][0] == status, conn.messages


def test_a_load_that_ran_out_of_memory_inside_a_payload_error_is_memory():
    from grid_ipfs.sandbox import _out_of_memory

    try:
        try:
            raise ResourceExhaustedError("OOM")
        except ResourceExhaustedError as exc:
            raise PayloadError("fake", "cannot load") from exc
    except PayloadError as wrapped:
        assert _out_of_memory(wrapped)


# -- on real daemons ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_isolated_workers_refuse_a_model_that_kills_its_child_and_train_a_digits_job_end_to_end(tmp_path):
    """Two `--isolate --job-memory 800` workers: a signed job whose model (25M parameters, past model
    vetting) needs more than 800 MB to load costs each worker one log line; then an honest digits job
    trains end to end on the same workers and its chain verifies."""
    from grid_ipfs import messages
    from grid_ipfs.chain import verify_chain
    from grid_ipfs.client import Client, JobSpec
    from grid_ipfs.identity import Identity
    from grid_ipfs.localgrid import LocalGrid

    from .waiting import wait_for

    x, y, x_test, y_test = data.digits()
    shards = data.write_shards(tmp_path / "shards", data.split_iid(x, y, 2, seed=1))
    zoo.digits_mlp(seed=0).save(tmp_path / "digits.keras")
    wide = keras.Sequential([keras.Input((64,)), keras.layers.Dense(5000), keras.layers.Dense(5000),
                             keras.layers.Dense(10, activation="softmax")])
    wide.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    owner = Identity.generate()
    with LocalGrid(tmp_path / "grid", shards, nodes=2, worker_args=["--isolate", "--job-memory", "800"]) as local:
        for i in range(2):
            wait_for(lambda i=i: "listening on" in local.worker_log(i), timeout=90, what=f"worker{i} to listen")
        with local.client(0) as ipfs:
            bomb = messages.Job(job="bomb", model=str(ipfs.add(model_to_bytes(wide))), owner=owner.id,
                                config={"epochs": 1, "batch_size": 32, "rounds": 1})
            ipfs.pubsub_publish(messages.JOBS_TOPIC, messages.encode(bomb, owner))
            for i in range(2):
                log = wait_for(lambda i=i: "job bomb" in local.worker_log(i) and local.worker_log(i), timeout=180,
                               what=f"worker{i} to handle the job whose model kills its child")
                assert "job bomb: the isolated trainer died: " in log, log
            client = Client(ipfs, owner, head_dir=tmp_path / "heads")
            result = client.submit(JobSpec(model_path=tmp_path / "digits.keras", rounds=2, min_workers=2,
                                           round_timeout=120, epochs=1, job_id="honest"))
            assert [r.updates for r in result.rounds] == [2, 2]
            report = verify_chain(ipfs, result.head)
            assert report.ok, report.reason
        assert all(proc.poll() is None for proc in local.workers), "a worker died"
        for i in range(2):
            log = local.worker_log(i)
            died = [line for line in log.splitlines() if "isolated trainer died" in line]
            assert len(died) == 1 and "bomb" in died[0], log
            assert "Traceback" not in log, log
            assert "job honest round 2: " in log, log
