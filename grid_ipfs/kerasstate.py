"""Keep process-wide Keras state from leaking out of untrusted work: `with keras_state_guard(): ...`.

Keras keeps configuration in globals: `keras.config` floatx / epsilon / image data format / backend /
max epochs, the default dtype policy, flags such as unsafe deserialization, traceback filtering,
interactive logging and flash attention (all in Keras' thread-local global state), and the registry of
custom objects. A model that reaches any public Keras function while it is rebuilt, or a callback run
while it trains, can change them, and every later job in the process would then train differently
(float16 everywhere, a huge epsilon, unsafe deserialization switched on for the next model). The guard
snapshots all of it on entry and puts it back on exit, also when the body raises.

It also undoes `keras.config.set_backend`, which rewrites `KERAS_BACKEND` in the environment and
re-imports Keras: the environment and the `keras*` entries of `sys.modules` come back as they were.
TensorFlow's run-eagerly and soft-placement flags are restored too when TensorFlow is loaded.

Left alone on purpose: Keras' global random seed and seed generator (`training.fit` reseeds every
round, and restoring them would make the guard change results).

One guarded step runs at a time in a process (`KERAS_LOCK`, re-entrant): the snapshot and the restore
cover process-wide state (the environment, `sys.modules`, the seeds `training.fit` sets), so workers
hosted as threads of one process (`grid_ipfs.pool`) take turns at Keras while their fetches and adds
overlap.

Cost: microseconds plus one scan of `sys.modules`, so it wraps every load, fit and evaluate.
Lower layer than payloads/training: imports nothing of grid_ipfs, and Keras only when already loaded.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

KERAS_LOCK = threading.RLock()
"""Held for the whole of every `keras_state_guard` block: one Keras step at a time per process."""

_LEAVE = frozenset({"global_random_seed", "global_seed_generator"})
"""Keras global-state attributes the guard does not restore (see the module docstring)."""

_CONFIG_NAMES = ("_FLOATX", "_EPSILON", "_IMAGE_DATA_FORMAT", "_BACKEND", "_NNX_ENABLED", "_MAX_EPOCHS",
                 "_MAX_STEPS_PER_EPOCH")
"""The module globals of `keras.src.backend.config` behind `keras.config.*`."""


@contextmanager
def keras_state_guard() -> Iterator[list[str]]:
    """Restore Keras' process-wide state on exit; yields a list that then names what had changed.

    The list lets a caller log "the model changed floatx, epsilon" for an operator; it is filled only
    after the block ends, from the public settings (`keras_settings`), the custom-object registry, the
    environment and the Keras modules, so lazily created defaults do not count as changes.
    """
    with KERAS_LOCK:
        changed: list[str] = []
        snapshot = _snapshot()
        before = keras_settings()
        try:
            yield changed
        finally:
            try:
                after = keras_settings()
            except Exception:  # noqa: BLE001  (Keras half re-imported, say: restoring below still works)
                after = {"settings": "unreadable"}
            changed.extend(f"keras {name}" for name in after if after[name] != before.get(name))
            changed.extend(_restore(snapshot))


def keras_settings() -> dict[str, Any]:
    """The process-wide Keras settings a job could change, read through Keras' own getters
    ({} before Keras is imported)."""
    if "keras" not in sys.modules:
        return {}
    import keras
    from keras.src.backend.common import global_state

    config = keras.config
    return {
        "floatx": config.floatx(), "epsilon": config.epsilon(), "image_data_format": config.image_data_format(),
        "backend": config.backend(), "max_epochs": config.max_epochs(),
        "max_steps_per_epoch": config.max_steps_per_epoch(),
        "dtype_policy": config.dtype_policy().name,
        "unsafe_deserialization": global_state.get_global_attribute("safe_mode_saving") is False,
        "traceback_filtering": config.is_traceback_filtering_enabled(),
        "interactive_logging": config.is_interactive_logging_enabled(),
        "flash_attention": config.is_flash_attention_enabled(),
        "nnx": config.is_nnx_enabled(),
        "distribution": repr(global_state.get_global_attribute("distribution")),
    }


def _snapshot() -> dict[str, Any]:
    state: dict[str, Any] = {
        "environ": dict(os.environ),
        "modules": {name: module for name, module in sys.modules.items() if _is_keras(name)},
    }
    if "keras" not in sys.modules:
        return state  # nothing of Keras exists yet: only the environment and a later import to undo
    from keras.src.backend import config
    from keras.src.backend.common import global_state
    from keras.src.saving import object_registration

    tracker = global_state.GLOBAL_STATE_TRACKER
    state["config"] = {name: getattr(config, name) for name in _CONFIG_NAMES if hasattr(config, name)}
    state["tracker"] = tracker
    state["settings"] = global_state.GLOBAL_SETTINGS_TRACKER
    state["attributes"] = {name: (value, _contents(value)) for name, value in vars(tracker).items()
                           if name not in _LEAVE}
    state["custom_objects"] = dict(object_registration.GLOBAL_CUSTOM_OBJECTS)
    state["custom_names"] = dict(object_registration.GLOBAL_CUSTOM_NAMES)
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        state["tf"] = (tf.config.functions_run_eagerly(), tf.config.get_soft_device_placement())
    return state


def _restore(state: dict[str, Any]) -> list[str]:
    changed = _restore_modules(state["modules"]) + _restore_environ(state["environ"])
    if "config" not in state:
        return changed
    from keras.src.backend import config
    from keras.src.backend.common import global_state
    from keras.src.saving import object_registration

    for name, value in state["config"].items():
        setattr(config, name, value)
    global_state.GLOBAL_STATE_TRACKER = state["tracker"]  # keras.utils.clear_session() swaps these
    global_state.GLOBAL_SETTINGS_TRACKER = state["settings"]
    _restore_attributes(state["tracker"], state["attributes"])
    for name, live, saved in (("custom objects", object_registration.GLOBAL_CUSTOM_OBJECTS, state["custom_objects"]),
                              ("custom names", object_registration.GLOBAL_CUSTOM_NAMES, state["custom_names"])):
        if live != saved or set(live) != set(saved):
            changed.append(f"keras {name}")
            live.clear()
            live.update(saved)  # in place: keras.saving.get_custom_objects() hands out this very dict
    if "tf" in state:
        changed += _restore_tf(*state["tf"])
    return changed


def _restore_attributes(tracker: Any, saved: dict[str, tuple[Any, Any]]) -> None:
    """Put the thread's Keras global-state attributes back: values, and the contents of lists/dicts
    (scope stacks, the custom-object scope) changed in place. Attributes first set inside the block
    are removed (Keras creates its defaults again on demand)."""
    for name in [n for n in vars(tracker) if n not in saved and n not in _LEAVE]:
        delattr(tracker, name)
    for name, (value, contents) in saved.items():
        if isinstance(value, list):
            value[:] = contents
        elif isinstance(value, dict):
            value.clear()
            value.update(contents)
        setattr(tracker, name, value)


def _restore_tf(eager: bool, soft_placement: bool) -> list[str]:
    import tensorflow as tf

    changed = []
    if tf.config.functions_run_eagerly() != eager:
        changed.append("tf run_functions_eagerly")
        tf.config.run_functions_eagerly(eager)
    if tf.config.get_soft_device_placement() != soft_placement:
        changed.append("tf soft_device_placement")
        tf.config.set_soft_device_placement(soft_placement)
    return changed


def _restore_modules(saved: dict[str, Any]) -> list[str]:
    """Undo a re-import of Keras (`keras.config.set_backend` drops every `keras*` module and imports
    them again): the modules every live object was built with go back into `sys.modules`."""
    changed = False  # modules first imported inside the block stay: they may be honest lazy imports
    for name, module in saved.items():
        if sys.modules.get(name) is not module:
            changed = True
            sys.modules[name] = module
    return ["keras modules (re-imported)"] if changed else []


def _restore_environ(saved: dict[str, str]) -> list[str]:
    changed = []
    for name in [n for n in os.environ if n not in saved]:
        changed.append(f"environment {name}")
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            changed.append(f"environment {name}")
            os.environ[name] = value
    return changed


def _is_keras(name: str) -> bool:
    return name == "keras" or name.startswith("keras.")


def _contents(value: Any) -> Any:
    """A shallow copy of a mutable container's contents (None for anything else)."""
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return None


__all__ = ["KERAS_LOCK", "keras_state_guard"]
