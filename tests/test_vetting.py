"""Model vetting (grid_ipfs.vetting): hostile `.keras` archives are refused before Keras builds anything.

Every hostile archive is a real saved model whose config.json (or weights file) was edited, as an
attacker would. No network, no daemons.
"""

from __future__ import annotations

import copy
import io
import json
import os
import resource
import tracemalloc
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from grid_ipfs import zoo  # noqa: E402
from grid_ipfs.payloads import PayloadError, model_from_bytes, model_to_bytes  # noqa: E402
from grid_ipfs.vetting import DEFAULT_MAX_PARAMS, ModelRefused, load_policy, vet_model  # noqa: E402

# -- helpers --------------------------------------------------------------------------------------------


def members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def edited(blob: bytes, edit) -> bytes:
    """`blob` with its config.json passed through `edit(config)` (which edits in place)."""
    files = members(blob)
    config = json.loads(files["config.json"])
    edit(config)
    files["config.json"] = json.dumps(config).encode()
    return rezip(files)


def layers(config: dict) -> list[dict]:
    return config["config"]["layers"]


@pytest.fixture(scope="module")
def functional_blob() -> bytes:
    inputs = keras.Input((2,), name="x")
    return model_to_bytes(keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs)))


@pytest.fixture(scope="module")
def digits_blob() -> bytes:
    return model_to_bytes(zoo.digits_mlp(seed=0))


def named_function_lambda(module: str, function: str, kwargs: dict) -> dict:
    """The issue's attack: a Lambda naming a public Keras function (no bytecode), its arguments smuggled
    in through inbound_nodes kwargs, so Keras calls `module.function(**kwargs)` while rebuilding."""
    return {"module": "keras.layers", "class_name": "Lambda", "registered_name": None, "name": "lambda",
            "config": {"name": "lambda", "trainable": True, "dtype": "float32", "arguments": {},
                       "function": {"module": module, "class_name": "function", "config": function,
                                    "registered_name": "function"}},
            "inbound_nodes": [{"args": [], "kwargs": kwargs}]}


# -- the Lambda attack ----------------------------------------------------------------------------------


def test_named_function_lambda_changes_keras_config_under_safe_mode_but_is_refused_here(functional_blob, tmp_path):
    hostile = edited(functional_blob, lambda c: layers(c).append(
        named_function_lambda("keras.config", "set_floatx", {"inputs": "float16"})))
    assert keras.config.floatx() == "float32"
    path = tmp_path / "hostile.keras"
    path.write_bytes(hostile)
    try:  # first show the attack works against plain Keras safe mode (the load itself may succeed)
        try:
            keras.saving.load_model(path, safe_mode=True)
        except Exception:  # noqa: S110 - what matters is the side effect
            pass
        assert keras.config.floatx() == "float16"
    finally:
        keras.config.set_floatx("float32")

    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ModelRefused, match=r"bafyLAMBDA: layer 'lambda' \(Lambda\): not an allowed layer class"):
        model_from_bytes(hostile, source="bafyLAMBDA")
    assert keras.config.floatx() == "float32"
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_lambda_stays_refused_even_if_an_operator_lists_it(tmp_path):
    allow = tmp_path / "vocabulary.json"
    allow.write_text(json.dumps({"layers": ["Lambda"]}))
    with pytest.raises(ValueError, match="'Lambda' wraps code"):
        load_policy(allow)


@pytest.mark.parametrize("module", ["os", "builtins", "keras.src.utils", "keras"])
def test_a_layer_from_another_module_is_refused(digits_blob, module):
    def edit(config):
        layers(config)[1]["module"] = module
    with pytest.raises(ModelRefused, match=rf"layer 'dense(_\d+)?' \(Dense\): module \"{module}\" is not keras.layers"):
        vet_model(edited(digits_blob, edit), source="bafyMOD")


def test_a_custom_registered_object_is_refused(digits_blob):
    def edit(config):
        layers(config)[1]["registered_name"] = "evil>Dense"
    with pytest.raises(ModelRefused, match="custom objects are not accepted"):
        vet_model(edited(digits_blob, edit))


@pytest.mark.parametrize("slot,value,reason", [
    ("kernel_initializer", {"module": "keras.src.saving.serialization_lib", "class_name": "GlorotUniform",
                            "config": {}, "registered_name": None}, "is not an allowed initializer"),
    ("kernel_initializer", {"module": "keras.config", "class_name": "function", "config": "set_floatx",
                            "registered_name": "function"}, "is not an allowed initializer"),
    ("kernel_regularizer", {"module": "keras.regularizers", "class_name": "L2",
                            "config": {"l2": {"module": "keras.config", "class_name": "function",
                                              "config": "set_floatx"}}, "registered_name": None},
     "is not a plain value"),
    ("kernel_regularizer", {"module": "builtins", "class_name": "function", "config": "exec"},
     "is not an allowed regularizer"),
    ("activation", {"module": "keras.config", "class_name": "function", "config": "set_floatx",
                    "registered_name": "function"}, "is not an allowed activation"),
    ("activation", {"class_name": "__lambda__", "config": {"code": "AAAA"}}, "is not an allowed activation"),
    ("activation", "set_floatx", "is not an allowed activation"),
    ("units", "64", "expected an integer"),
    ("units", 1e9, "expected an integer"),
])
def test_class_and_function_references_in_slots_are_refused(digits_blob, slot, value, reason):
    def edit(config):
        layers(config)[1]["config"][slot] = value
    with pytest.raises(ModelRefused, match=rf"layer 'dense(_\d+)?' \(Dense\): {slot}: .*{reason}"):
        vet_model(edited(digits_blob, edit))


def test_a_shared_object_id_is_only_ever_an_integer(digits_blob):
    def edit(config):
        config["config"]["dtype"]["shared_object_id"] = [1, 2]
    with pytest.raises(ModelRefused, match=r"shared_object_id a list is not an integer"):
        vet_model(edited(digits_blob, edit))


def test_an_unknown_config_key_is_refused(digits_blob):
    def edit(config):
        layers(config)[1]["config"]["function"] = "set_floatx"
    with pytest.raises(ModelRefused, match="unexpected config key 'function'"):
        vet_model(edited(digits_blob, edit))


@pytest.mark.parametrize("compile_edit,reason", [
    (lambda cc: cc.update(loss={"module": "keras.config", "class_name": "function", "config": "set_floatx"}),
     "is not an allowed loss"),
    (lambda cc: cc.update(metrics=[{"module": "keras.src.metrics", "class_name": "AUC", "config": {}}]),
     "is not an allowed metric"),
    (lambda cc: cc["optimizer"].update(module="keras.src.optimizers"), "is not an allowed optimizer"),
    (lambda cc: cc.update(metrics=[{"module": "keras.metrics", "class_name": "AUC",
                                    "config": {"num_thresholds": 10 ** 9}, "registered_name": None}]),
     "num_thresholds"),
])
def test_compile_config_references_are_checked(digits_blob, compile_edit, reason):
    with pytest.raises(ModelRefused, match=f"compile_config: .*{reason}"):
        vet_model(edited(digits_blob, lambda c: compile_edit(c["compile_config"])))


@pytest.mark.parametrize("node,reason", [
    ({"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, 2], "dtype": "float32",
                                                            "keras_history": ["x", 0, 0]}}],
      "kwargs": {"training": {"module": "keras.config", "class_name": "function", "config": "set_floatx"}}},
     "kwarg 'training' is an object"),
    ({"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, 2], "dtype": "float32",
                                                            "keras_history": ["x", 0, 0]}}],
      "kwargs": {"path": "/tmp/x"}}, "kwarg 'path'"),
    ({"args": ["float16"], "kwargs": {}}, "is not a reference to another layer's output"),
    ({"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, 2], "dtype": "float32",
                                                            "keras_history": ["nowhere", 0, 0]}}],
      "kwargs": {}}, "reference to a layer of this model"),
])
def test_inbound_nodes_pass_only_references_and_flags(functional_blob, node, reason):
    def edit(config):
        layers(config)[1]["inbound_nodes"] = [node]
    with pytest.raises(ModelRefused, match=rf"layer 'out' \(Dense\).*{reason}"):
        vet_model(edited(functional_blob, edit))


def test_training_flags_in_inbound_nodes_are_accepted(functional_blob):
    def edit(config):
        layers(config)[1]["inbound_nodes"][0]["kwargs"] = {"training": False, "mask": None}
    assert vet_model(edited(functional_blob, edit)).params == 3


# -- memory bombs ---------------------------------------------------------------------------------------


def test_a_wide_dense_on_a_big_input_is_refused_by_parameter_count_before_any_allocation(digits_blob):
    def edit(config):
        model = layers(config)
        model[0]["config"]["batch_shape"] = [None, 16384]
        for layer in model[1:]:
            layer["config"]["units"] = 16384
            layer["build_config"]["input_shape"] = [None, 16384]
        config["config"]["build_input_shape"] = config["build_config"]["input_shape"] = [None, 16384]
    hostile = edited(digits_blob, edit)
    assert len(hostile) < 64 * 1024
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with pytest.raises(ModelRefused, match=rf"layer 'dense(_\d+)?' \(Dense\): the model would hold more than "
                                               rf"{DEFAULT_MAX_PARAMS} parameters \(at least 268451840\)"):
            model_from_bytes(hostile, source="bafyWIDE")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB: < 64 MiB


def test_the_operator_sets_the_parameter_cap(digits_blob):
    assert vet_model(digits_blob).params == 4810
    with pytest.raises(ModelRefused, match="more than 1000 parameters"):
        vet_model(digits_blob, policy=load_policy(max_params=1000))


def test_a_huge_activation_is_refused():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same")])

    def edit(config):
        config["config"]["layers"][0]["config"]["batch_shape"] = [None, 8192, 8192, 3]
        config["config"]["layers"][1]["build_config"]["input_shape"] = [None, 8192, 8192, 3]
        config["config"]["build_input_shape"] = config["build_config"]["input_shape"] = [None, 8192, 8192, 3]
    with pytest.raises(ModelRefused, match=r"layer 'input_layer.*' \(InputLayer\): outputs 201326592 values "
                                           r"per example"):
        vet_model(edited(model_to_bytes(model), edit))


def test_an_unknown_input_shape_is_refused_rather_than_guessed(digits_blob):
    def edit(config):
        layers(config)[0]["config"]["batch_shape"] = [None, None]
        for layer in layers(config)[1:]:
            layer.pop("build_config")
        config["config"].pop("build_input_shape")
        config["build_config"]["input_shape"] = None
    with pytest.raises(ModelRefused, match=r"layer 'input_layer(_\d+)?' \(InputLayer\): output shape \[None, None\] "
                                           r"has an unknown dimension"):
        vet_model(edited(digits_blob, edit))


def test_a_build_config_that_disagrees_with_the_graph_is_refused(digits_blob):
    def edit(config):  # Keras builds each layer from its own build_config: a bigger one would allocate more
        layers(config)[1]["build_config"]["input_shape"] = [None, 10 ** 6]
    with pytest.raises(ModelRefused, match=r"layer 'dense(_\d+)?' \(Dense\): build_config input_shape .* differs"):
        vet_model(edited(digits_blob, edit))


def h5_bytes(build) -> bytes:
    out = io.BytesIO()
    with h5py.File(out, "w") as handle:
        build(handle)
    return out.getvalue()


def test_an_hdf5_dataset_declaring_a_huge_shape_is_refused(digits_blob):
    def build(handle):  # all fill value and gzip: a few KB on the wire, 4 GiB when read
        handle.create_dataset("layers/dense/vars/0", shape=(2 ** 30,), dtype="float32", chunks=(2 ** 20,),
                              compression="gzip")
    files = members(digits_blob)
    files["model.weights.h5"] = h5_bytes(build)
    assert len(files["model.weights.h5"]) < 64 * 1024
    with pytest.raises(ModelRefused, match=r"bafyH5: model.weights.h5 declares 1073741824 layer values, the "
                                           r"config implies 4810 parameters"):
        model_from_bytes(rezip(files), source="bafyH5")


@pytest.mark.parametrize("build,reason", [
    (lambda h: h.__setitem__("layers/x", h5py.ExternalLink("/etc/passwd", "/")), "is a ExternalLink"),
    (lambda h: h.__setitem__("layers/x", h5py.SoftLink("/layers")), "is a SoftLink"),
    (lambda h: h.create_dataset("layers/s", data=np.array([b"abc"], dtype="S3")), "not a plain number type"),
    (lambda h: h.create_dataset("elsewhere/x", data=np.zeros(3, "float32")), "outside layers/"),
    (lambda h: h.create_dataset("layers/e", shape=(4,), dtype="float32", external=[("/etc/passwd", 0, 16)]),
     "external files"),
])
def test_hdf5_links_external_storage_and_odd_datasets_are_refused(digits_blob, build, reason):
    files = members(digits_blob)
    files["model.weights.h5"] = h5_bytes(build)
    with pytest.raises(ModelRefused, match=f"model.weights.h5: .*{reason}"):
        vet_model(rezip(files))


def test_a_virtual_dataset_is_refused(digits_blob):
    def build(handle):
        handle.create_dataset("layers/src", data=np.zeros(4, "float32"))
        layout = h5py.VirtualLayout(shape=(4,), dtype="float32")
        layout[:] = h5py.VirtualSource(".", "layers/src", shape=(4,))
        handle.create_virtual_dataset("layers/v", layout)
    files = members(digits_blob)
    files["model.weights.h5"] = h5_bytes(build)
    with pytest.raises(ModelRefused, match="virtual dataset"):
        vet_model(rezip(files))


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "{\"a\":" * 200 + "1" + "}" * 200])
def test_deep_json_nesting_is_refused_without_recursion_errors(digits_blob, text):
    files = members(digits_blob)
    files["config.json"] = text.encode()
    with pytest.raises(ModelRefused, match="config.json nests"):
        model_from_bytes(rezip(files), source="bafyDEEP")


def test_extra_archive_members_are_refused(digits_blob):
    files = members(digits_blob)
    files["assets/vocabulary.txt"] = b"/etc/passwd"
    with pytest.raises(ModelRefused, match="unexpected archive member 'assets/vocabulary.txt'"):
        vet_model(rezip(files))


def test_a_refusal_is_a_payload_error(digits_blob):
    assert issubclass(ModelRefused, PayloadError)
    with pytest.raises(PayloadError):
        vet_model(edited(digits_blob, lambda c: layers(c)[1].update(class_name="TFSMLayer")))


def test_a_mangled_config_is_refused_not_a_crash(digits_blob):
    originals = json.loads(members(digits_blob)["config.json"])
    for path in (["config", "layers", 1, "config"], ["config", "layers", 1], ["config", "layers"],
                 ["compile_config"], ["config", "layers", 0, "config", "batch_shape"]):
        for junk in (None, 7, "x", [], {}, [[1]], {"a": {"b": []}}):
            config = copy.deepcopy(originals)
            target = config
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = junk
            files = members(digits_blob)
            files["config.json"] = json.dumps(config).encode()
            try:
                vet_model(rezip(files))
            except PayloadError:
                pass


def _paths(doc) -> list[list]:
    """Every path (list of keys/indexes) into a JSON document."""
    found, stack = [], [([], doc)]
    while stack:
        path, value = stack.pop()
        found.append(path)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((path + [key], child) for key, child in items)
    return found


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                     | st.text(max_size=20) | st.sampled_from(["function", "__lambda__", "keras.config", "Lambda"]),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                         st.sampled_from(["class_name", "module", "config", "registered_name", "units", "x"]),
                         inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_anywhere_in_a_real_config_is_accepted_or_refused_cleanly(digits_blob, data):
    original = json.loads(members(digits_blob)["config.json"])
    paths = [p for p in _paths(original) if p]
    config = copy.deepcopy(original)
    path = data.draw(st.sampled_from(paths))
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(_JSON)
    files = members(digits_blob)
    files["config.json"] = json.dumps(config).encode()
    try:
        vet_model(rezip(files))
    except PayloadError as exc:
        assert "\n" not in str(exc)


# -- honest models --------------------------------------------------------------------------------------


def _functional() -> keras.Model:
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = keras.layers.Dense(4, name="shared")
    x, y = shared(a), shared(b)
    merged = keras.layers.Concatenate()([keras.layers.Add()([x, y]), keras.layers.Multiply()([x, y])])
    out = keras.layers.Dropout(0.1)(keras.layers.Dense(1)(keras.layers.BatchNormalization()(merged)))
    model = keras.Model([a, b], out)
    model.compile(optimizer="adam", loss=keras.losses.mean_squared_error,
                  metrics=[keras.metrics.MeanAbsoluteError(), "mae"])
    return model


def _sequence() -> keras.Model:
    model = keras.Sequential([
        keras.Input((20,), dtype="int32"), keras.layers.Embedding(100, 16),
        keras.layers.Conv1D(8, 3, padding="same", kernel_regularizer="l2"), keras.layers.LayerNormalization(),
        keras.layers.MaxPooling1D(), keras.layers.GlobalAveragePooling1D(), keras.layers.Reshape((2, 4)),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _nested() -> keras.Model:
    inputs = keras.Input((8,))
    inner_f = keras.Model(inputs, keras.layers.Dense(4)(inputs), name="inner_f")
    inner_s = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="inner_s")
    outer = keras.Input((8,))
    model = keras.Model(outer, inner_s(inner_f(outer)))
    model.compile(optimizer="adam", loss="mse")
    return model


def _repo_test_models() -> list[keras.Model]:
    """The models tests/test_training.py, test_beyond.py and test_payloads.py build by hand."""
    mlp = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(10, activation="softmax")])
    mlp.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    linear = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    linear.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    small = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    small.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    uncompiled = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    return [mlp, linear, small, uncompiled]


HONEST = {
    "digits_mlp": lambda: zoo.digits_mlp(seed=0), "digits_mlp(hidden=16384)": lambda: zoo.digits_mlp(hidden=16384),
    "fashion_cnn": lambda: zoo.fashion_cnn(seed=0), "xor_mlp": lambda: zoo.xor_mlp(seed=0),
    "diabetes_linear": lambda: zoo.diabetes_linear(seed=0), "functional": _functional, "sequence": _sequence,
    "nested": _nested,
    **{f"tests model {i}": (lambda i=i: _repo_test_models()[i]) for i in range(4)},
}


@pytest.mark.parametrize("name", sorted(HONEST))
def test_every_model_the_repo_builds_round_trips(name):
    model = HONEST[name]()
    blob = model_to_bytes(model)
    report = vet_model(blob)
    assert report.params == model.count_params()
    loaded = model_from_bytes(blob, source=name)
    assert [w.shape for w in loaded.get_weights()] == [w.shape for w in model.get_weights()]
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_a_trained_model_with_optimizer_state_round_trips():
    model = _functional()
    model.fit([np.zeros((4, 8)), np.ones((4, 8))], np.zeros((4, 1)), verbose=0)
    report = vet_model(model_to_bytes(model))
    assert report.params == model.count_params() and report.weight_values > report.params


# -- widening -------------------------------------------------------------------------------------------


def test_an_operator_allow_list_widens_one_layer(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.GRU(4), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    blob = model_to_bytes(model)
    with pytest.raises(ModelRefused, match=r"layer 'gru' \(GRU\): not an allowed layer class"):
        model_from_bytes(blob, source="bafyGRU")
    allow = tmp_path / "vocabulary.json"
    allow.write_text(json.dumps({"layers": ["GRU"], "initializers": ["Orthogonal"]}))
    policy = load_policy(allow)
    assert vet_model(blob, policy=policy).params == model.count_params()
    assert model_from_bytes(blob, policy=policy).count_params() == model.count_params()


def test_a_widened_layer_is_still_sized_before_allocation(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.GRU(4)])
    allow = tmp_path / "vocabulary.json"
    allow.write_text(json.dumps({"layers": ["GRU"], "initializers": ["Orthogonal"]}))

    def edit(config):
        layers(config)[1]["config"]["units"] = 16384  # 3 * 16384 * (3 + 16384 + 2) ~ 805M parameters
    with pytest.raises(ModelRefused, match=r"layer 'gru.*' \(GRU\): the model would hold more than"):
        vet_model(edited(model_to_bytes(model), edit), policy=load_policy(allow))


@pytest.mark.parametrize("doc,reason", [
    ({"layers": ["NoSuchLayer"]}, "not a public keras.layers class"),
    ({"layers": ["Sequential"]}, "not a public keras.layers class"),
    ({"activations": ["os.system"]}, "not a public keras.activations function"),
    ({"everything": True}, "unknown key 'everything'"),
    ({"max_params": -1}, "positive integer"),
])
def test_an_allow_list_file_names_only_real_building_blocks(tmp_path, doc, reason):
    allow = tmp_path / "vocabulary.json"
    allow.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=reason):
        load_policy(allow)


def test_worker_and_miner_take_the_vetting_options(tmp_path):
    from grid_ipfs import miner, worker
    from grid_ipfs.vetting import policy_from_args

    allow = tmp_path / "vocabulary.json"
    allow.write_text(json.dumps({"layers": ["GRU"], "initializers": ["Orthogonal"]}))
    args = worker.build_parser().parse_args(["--api", "A", "--data", "d.npz", "--max-params", "123",
                                             "--model-vocabulary", str(allow)])
    policy = policy_from_args(args)
    assert policy.max_params == 123 and "GRU" in policy.extra["layers"]
    args = miner.build_parser().parse_args(["--api", "A", "--eval-data", "d.npz", "--max-params", "7"])
    assert policy_from_args(args).max_params == 7


# -- review fixes: shared objects, metric bombs, graph CPU, chunk bombs, total activations, JSON -----------


def test_objects_sharing_an_id_must_be_identical(digits_blob):
    def edit(config):  # Keras builds the first object with an id and reuses it for every later one
        first, second = layers(config)[1], layers(config)[2]
        first["shared_object_id"] = second["shared_object_id"] = 7
    with pytest.raises(ModelRefused, match=r"objects sharing shared_object_id 7 differ"):
        vet_model(edited(digits_blob, edit))


def test_identical_objects_may_share_an_id(digits_blob):
    def edit(config):
        for layer in layers(config)[1:]:
            layer["config"]["kernel_initializer"] = {"module": "keras.initializers", "class_name": "Zeros",
                                                     "config": {}, "registered_name": None, "shared_object_id": 3}
    assert vet_model(edited(digits_blob, edit)).params == 4810


def _auc(**config) -> dict:
    return {"module": "keras.metrics", "class_name": "AUC", "registered_name": None,
            "config": {"name": "auc", "multi_label": True, **config}}


@pytest.mark.parametrize("metric,reason", [
    (_auc(num_thresholds=200, num_labels=10 ** 9), r"num_labels: 1000000000 is not a plain value"),
    (_auc(num_thresholds=1000, num_labels=5000), r"AUC with 1000 thresholds and 5000 labels allocates 20000000"),
    (_auc(thresholds=[0.5] * 1000, num_labels=5000), r"AUC with 1002 thresholds and 5000 labels"),
])
def test_a_metric_that_allocates_at_compile_time_is_refused(digits_blob, metric, reason):
    def edit(config):
        config["compile_config"]["metrics"] = [metric]
    with pytest.raises(ModelRefused, match=f"compile_config: {reason}"):
        vet_model(edited(digits_blob, edit))


def test_a_modest_multi_label_auc_is_accepted(digits_blob):
    def edit(config):
        config["compile_config"]["metrics"] = [_auc(num_thresholds=200, num_labels=100)]
    assert vet_model(edited(digits_blob, edit)).params == 4810


def _chain(functional_blob: bytes, layer_count: int) -> bytes:
    """A chain of `layer_count` * 64 calls of shared Dense(2) layers, listed backwards: call n is layer
    n % layer_count, node n // layer_count, and consumes call n - 1."""
    def edit(config):
        model = layers(config)
        template = next(layer for layer in model if layer["class_name"] == "Dense")
        names = [f"d{k}" for k in range(layer_count)]

        def ref(n):
            history = ["x", 0, 0] if n < 0 else [names[n % layer_count], n // layer_count, 0]
            return {"class_name": "__keras_tensor__",
                    "config": {"shape": [None, 2], "dtype": "float32", "keras_history": history}}
        chain = []
        for k in reversed(range(layer_count)):
            layer = copy.deepcopy(template)
            layer["name"] = layer["config"]["name"] = names[k]
            layer["config"]["units"] = 2
            layer["build_config"] = {"input_shape": [None, 2]}
            layer["inbound_nodes"] = [{"args": [ref(i * layer_count + k - 1)], "kwargs": {}} for i in range(64)]
            chain.append(layer)
        config["config"]["layers"] = [model[0]] + chain
        config["config"]["output_layers"] = [[names[-1], 63, 0]]
    return edited(functional_blob, edit)


def test_a_long_graph_listed_backwards_is_vetted_in_linear_time(functional_blob):
    import time
    hostile = _chain(functional_blob, 64)  # 4096 calls
    start = time.process_time()
    with pytest.raises(ModelRefused, match=r"model.weights.h5 declares 3 layer values, the config implies 384 "):
        vet_model(hostile)  # the whole graph vets; only the (unedited) weights disagree
    assert time.process_time() - start < 1.0


def test_too_many_layer_calls_are_refused(functional_blob):
    with pytest.raises(ModelRefused, match=r"more than 10000 layer calls"):
        vet_model(_chain(functional_blob, 160))


def test_a_resizable_hdf5_dataset_with_a_huge_chunk_is_refused(digits_blob):
    files = members(digits_blob)
    out = io.BytesIO(files["model.weights.h5"])
    with h5py.File(out, "r+") as handle:
        found = []
        handle.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
        name = next(n for n in found if handle[n].ndim == 1)
        values = handle[name][()]
        del handle[name]  # the same values, but reading one inflates a 4 MiB chunk
        handle.create_dataset(name, data=values, maxshape=(None,), chunks=(2 ** 20,), compression="gzip")
    files["model.weights.h5"] = out.getvalue()
    assert len(files["model.weights.h5"]) < 64 * 1024
    with pytest.raises(ModelRefused, match=r"model.weights.h5: .* is resizable"):
        vet_model(rezip(files))


def test_the_sum_of_activations_is_capped():
    model = keras.Sequential([keras.Input((8,))] + [keras.layers.ReLU() for _ in range(4)])
    wide = [None, 4 * 1024 * 1024]  # each layer at the per-layer cap; training keeps all five

    def edit(config):
        layers(config)[0]["config"]["batch_shape"] = wide
        for layer in layers(config)[1:]:
            layer["build_config"] = {"input_shape": wide}
        config["config"]["build_input_shape"] = config["build_config"]["input_shape"] = wide
    with pytest.raises(ModelRefused, match=r"\(ReLU\): the layers output more than 4 x 4194304 values per example "
                                           r"in all \(at least 20971520\)"):
        vet_model(edited(model_to_bytes(model), edit))


def test_a_nested_model_called_twice_counts_its_parameters_once_against_the_cap():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)], name="inner")
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    model = keras.Model([a, b], keras.layers.Add()([inner(a), inner(b)]))
    assert model.count_params() == 36
    assert vet_model(model_to_bytes(model), policy=load_policy(max_params=36)).params == 36


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants_that_are_not_json_are_refused(digits_blob, constant):
    files = members(digits_blob)
    config = json.loads(files["config.json"])
    config["config"]["layers"][1]["config"]["units"] = "@@"
    files["config.json"] = json.dumps(config).replace('"@@"', constant).encode()
    with pytest.raises(ModelRefused, match=f"config.json: {constant} is not a JSON number"):
        vet_model(rezip(files))
