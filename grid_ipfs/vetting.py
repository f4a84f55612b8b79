"""Model vetting: read a `.keras` archive's config ourselves and refuse it before Keras builds anything.

Keras' `safe_mode=True` only refuses bytecode lambdas. A config can still name any public Keras function
(a `Lambda` whose function is `{"class_name": "function", "module": "keras.config", ...}`) and feed it
arguments through `inbound_nodes`, or declare layers whose build allocates gigabytes before a single
weight is read. So nothing from a peer reaches Keras until this module has:

* parsed `config.json` and `metadata.json` (bounded size, bounded nesting, no recursion of our own);
* checked every object against an allow-list of standard building blocks (layer classes, activations,
  initializers, regularizers, constraints, losses, metrics, optimizers, learning-rate schedules, dtype
  policies), every config key against the class's schema and every value by type and range;
* checked that `inbound_nodes` pass nothing but references to other layers' outputs and plain flags;
* computed the parameter count and the largest per-example activation from the layer configs and input
  shapes, refusing above the `Policy` caps;
* opened `model.weights.h5` with h5py (a zip member, never extracted) and bounded every dataset by its
  declared shape and dtype, refusing links, external storage, virtual datasets and unknown filters.

Operators widen the vocabulary only by naming more Keras building blocks in a JSON file of their own
(`load_policy`); there is no "trust everything". docs/models.md lists the vocabulary.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from .limits import json_too_deep
from .payloads import MAX_MODEL_BYTES, MAX_WEIGHTS_BYTES, PayloadError, _check_keras_archive, _check_size

MiB = 1024 * 1024
MAX_CONFIG_BYTES = 4 * MiB
"""Largest `config.json` accepted: ~2 KB per layer, so room for ~2000 layers."""
MAX_METADATA_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 64
"""Deepest JSON nesting accepted in config.json (a real model nests about 10 deep); not limits.MAX_JSON_DEPTH,
which bounds pubsub messages."""
MAX_LAYERS = 2000
MAX_NODES = 10_000
"""Most layer calls vetted in one config, counting each call of a shared layer or nested model."""
MAX_NESTED_MODELS = 4
MAX_NODES_PER_LAYER = 64
MAX_RANK = 8
MAX_DIM = 2 ** 31 - 1
DEFAULT_MAX_PARAMS = MAX_WEIGHTS_BYTES // 4
"""64 Mi parameters: the most whose float32 weights fit a MAX_WEIGHTS_BYTES safetensors update, so a
larger model could never take part in a round anyway."""
DEFAULT_MAX_ACTIVATION = 4 * MiB
"""Most values one layer may output per example (16 MiB of float32): a 224x224x64 feature map fits."""
MAX_TOTAL_ACTIVATION_FACTOR = 4
"""All layers together may output at most this many times `Policy.max_activation` values per example."""
MAX_H5_LINKS = 100_000
MAX_H5_ATTRIBUTES = 32
MAX_H5_ATTRIBUTE_BYTES = 64 * 1024
H5_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
"""HDF5 filters accepted; any other id would make HDF5 look for a plugin library on this machine."""
OPTIMIZER_SLOTS = 4
"""The optimizer's variables may hold at most this many values per parameter (Adam with amsgrad and EMA)."""
_WEIGHTS_MEMBER = "model.weights.h5"
_MEMBERS = {"config.json", "metadata.json", _WEIGHTS_MEMBER}


class ModelRefused(PayloadError):
    """A model archive is well-formed but outside what this peer agreed to build (vocabulary or size)."""


# -- vocabulary -----------------------------------------------------------------------------------------

ACTIVATIONS = frozenset("""celu elu exponential gelu glu hard_shrink hard_sigmoid hard_silu hard_swish hard_tanh
    leaky_relu linear log_sigmoid log_softmax mish relu relu6 selu sigmoid silu soft_shrink softmax softplus
    softsign sparse_plus squareplus swish tanh tanh_shrink threshold""".split())
INITIALIZERS = frozenset("""Constant GlorotNormal GlorotUniform HeNormal HeUniform Identity LecunNormal
    LecunUniform Ones RandomNormal RandomUniform TruncatedNormal VarianceScaling Zeros""".split())
"""Not Orthogonal (nor OrthogonalRegularizer below): a QR decomposition of an 8000x8000 kernel, inside the
parameter cap, is minutes of CPU at build time. An operator may widen to them."""
REGULARIZERS = frozenset("L1 L2 L1L2".split())
CONSTRAINTS = frozenset("MaxNorm MinMaxNorm NonNeg UnitNorm".split())
LOSSES = frozenset("""BinaryCrossentropy BinaryFocalCrossentropy CategoricalCrossentropy
    CategoricalFocalCrossentropy CategoricalHinge CosineSimilarity Hinge Huber KLDivergence LogCosh
    MeanAbsoluteError MeanAbsolutePercentageError MeanSquaredError MeanSquaredLogarithmicError Poisson
    SparseCategoricalCrossentropy SquaredHinge""".split())
LOSS_NAMES = frozenset("""binary_crossentropy binary_focal_crossentropy categorical_crossentropy
    categorical_focal_crossentropy categorical_hinge cosine_similarity hinge huber kl_divergence kld log_cosh
    logcosh mae mape mean_absolute_error mean_absolute_percentage_error mean_squared_error
    mean_squared_logarithmic_error mse msle poisson sparse_categorical_crossentropy squared_hinge""".split())
METRICS = frozenset("""AUC Accuracy BinaryAccuracy BinaryCrossentropy CategoricalAccuracy CategoricalCrossentropy
    CategoricalHinge CosineSimilarity F1Score FBetaScore Hinge KLDivergence LogCoshError Mean MeanAbsoluteError
    MeanAbsolutePercentageError MeanSquaredError MeanSquaredLogarithmicError Poisson Precision R2Score Recall
    RootMeanSquaredError SparseCategoricalAccuracy SparseCategoricalCrossentropy SparseTopKCategoricalAccuracy
    SquaredHinge Sum TopKCategoricalAccuracy""".split())
METRIC_NAMES = LOSS_NAMES | frozenset("""acc accuracy binary_accuracy categorical_accuracy
    sparse_categorical_accuracy sparse_top_k_categorical_accuracy top_k_categorical_accuracy""".split())
OPTIMIZERS = frozenset("Adadelta Adafactor Adagrad Adam AdamW Adamax Ftrl Lamb Lion Nadam RMSprop SGD".split())
OPTIMIZER_NAMES = frozenset(name.lower() for name in OPTIMIZERS)
SCHEDULES = frozenset("""CosineDecay CosineDecayRestarts ExponentialDecay InverseTimeDecay PiecewiseConstantDecay
    PolynomialDecay""".split())
DTYPES = frozenset("bfloat16 bool float16 float32 float64 int32 int64 int8 uint8".split())
POLICY_DTYPES = frozenset("bfloat16 float16 float32 float64 mixed_bfloat16 mixed_float16".split())
DENIED_LAYERS = frozenset({"Lambda", "TFSMLayer", "JaxLayer", "FlaxLayer", "TorchModuleWrapper"})
"""Never accepted, even from an operator's file: they wrap code or load models from paths."""

_KIND_MODULES = {
    "initializers": "keras.initializers", "regularizers": "keras.regularizers",
    "constraints": "keras.constraints", "losses": "keras.losses", "metrics": "keras.metrics",
    "optimizers": "keras.optimizers", "schedules": "keras.optimizers.schedules",
}
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{0,64}")


@dataclass(frozen=True)
class Policy:
    """What this peer agrees to build: caps and the vocabulary (kind -> names) beyond the defaults."""

    max_params: int = DEFAULT_MAX_PARAMS
    max_activation: int = DEFAULT_MAX_ACTIVATION
    extra: dict[str, frozenset[str]] = field(default_factory=dict)

    def allows(self, kind: str, name: str, default: frozenset[str]) -> bool:
        return name in default or name in self.extra.get(kind, ())


DEFAULT_POLICY = Policy()
_WIDENABLE = ("layers", "activations", "initializers", "regularizers", "constraints", "losses", "metrics",
              "optimizers", "schedules")


def load_policy(path: str | Path | None = None, *, max_params: int | None = None,
                max_activation: int | None = None) -> Policy:
    """The policy from an operator's allow-list file (JSON: {"layers": [...], "activations": [...], ...,
    "max_params": N}) plus command-line caps. Every name must be a real public Keras building block of
    that kind: a typo or a made-up name is an error at start-up, not a silent no-op. ValueError on any
    problem, naming the file."""
    extra: dict[str, frozenset[str]] = {}
    caps: dict[str, int] = {}
    if path is not None:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"model vocabulary {path}: cannot read it as JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"model vocabulary {path}: expected a JSON object")
        for key, value in doc.items():
            if key in ("max_params", "max_activation"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"model vocabulary {path}: {key} must be a positive integer")
                caps[key] = value
            elif key in _WIDENABLE:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"model vocabulary {path}: {key} must be a list of names")
                for name in value:
                    _check_widening(path, key, name)
                extra[key] = frozenset(value)
            else:
                raise ValueError(f"model vocabulary {path}: unknown key {key!r} (expected one of "
                                 f"{', '.join(_WIDENABLE)}, max_params, max_activation)")
    for key, value in (("max_params", max_params), ("max_activation", max_activation)):
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be positive")
            caps[key] = value
    return Policy(extra=extra, **caps)


def _check_widening(path, kind: str, name: str) -> None:
    """Refuse a name that is not a public Keras object of `kind`, or is on the deny list."""
    import keras

    if kind == "layers" and name in DENIED_LAYERS:
        raise ValueError(f"model vocabulary {path}: layer {name!r} wraps code or external files and is "
                         f"never accepted")
    module = {"layers": keras.layers, "activations": keras.activations, "initializers": keras.initializers,
              "regularizers": keras.regularizers, "constraints": keras.constraints, "losses": keras.losses,
              "metrics": keras.metrics, "optimizers": keras.optimizers,
              "schedules": keras.optimizers.schedules}[kind]
    target = getattr(module, name, None) if name.isidentifier() and not name.startswith("_") else None
    ok = target is not None and (callable(target) if kind == "activations" else isinstance(target, type))
    if ok and kind == "layers":
        ok = issubclass(target, keras.layers.Layer) and not issubclass(target, keras.Model)
    if not ok:
        raise ValueError(f"model vocabulary {path}: {name!r} is not a public keras.{kind} "
                         f"{'function' if kind == 'activations' else 'class'}")


# -- entry point ----------------------------------------------------------------------------------------


@dataclass
class Report:
    """What vetting found: the parameter count, the largest per-example activation, the layer count."""

    params: int = 0
    max_activation: int = 0
    total_activation: int = 0
    layers: int = 0
    weight_values: int = 0
    input_shape: tuple | None = None
    """The model's input shape, batch dimension first (`model.input_shape` before Keras loads it): a
    worker fits its data to it (images are loaded at that size) before any model code runs; None for
    a model with several inputs."""


def vet_model(data: bytes, *, source: str = "model", policy: Policy | None = None,
              max_bytes: int = MAX_MODEL_BYTES) -> Report:
    """Check an untrusted `.keras` archive against `policy`, without importing Keras for the built-in
    vocabulary: first payloads' structural checks (size, member count, zip bomb), then everything in
    the module docstring. Returns a `Report`; raises `ModelRefused` (naming the layer and the reason)
    or `PayloadError` (malformed)."""
    policy = policy or DEFAULT_POLICY
    _check_size(data, max_bytes, source, "a .keras archive")
    _check_keras_archive(data, max_bytes, source)
    try:
        with zipfile.ZipFile(BytesIO(data)) as archive:
            names = set(archive.namelist())
            unexpected = sorted(names - _MEMBERS)
            if unexpected:
                raise ModelRefused(source, f"unexpected archive member {unexpected[0]!r} (a model holds only "
                                           f"{', '.join(sorted(_MEMBERS))})")
            missing = sorted(_MEMBERS - names)
            if missing:
                raise PayloadError(source, f"expected a .keras archive with {missing[0]}")
            _read_json(archive, "metadata.json", MAX_METADATA_BYTES, source, _check_metadata)
            config = _read_json(archive, "config.json", MAX_CONFIG_BYTES, source, None)
            reason = _shared_objects(config)  # before the vetter: it must vet what Keras will use
            if reason:
                raise ModelRefused(source, f"config.json: {reason}")
            report = Report()
            try:
                _Vetter(policy, source, report).model(config)
            except PayloadError:
                raise
            except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError) as exc:
                # a shape of config this vetter did not foresee: refuse it rather than let Keras try
                raise ModelRefused(source, f"config.json not understood ({type(exc).__name__}: "
                                           f"{' '.join(str(exc).split())[:200]})") from None
            reason = _anywhere(config)  # after the schema, whose refusals name the layer
            if reason:
                raise ModelRefused(source, f"config.json: {reason}")
            with archive.open(_WEIGHTS_MEMBER) as weights:
                report.weight_values = _check_h5(weights, report.params, policy, source)
            return report
    except zipfile.BadZipFile as exc:
        raise PayloadError(source, f"expected a .keras archive (not a zip file: {exc})") from exc


def _read_json(archive: zipfile.ZipFile, name: str, limit: int, source: str,
               check: Callable[[Any, str], None] | None) -> Any:
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise ModelRefused(source, f"{name} is {info.file_size} bytes, more than {limit}")
    with archive.open(info) as member:
        raw = member.read(limit + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(source, f"{name} is not UTF-8 JSON ({' '.join(str(exc).split())[:200]})") from None
    depth = json_too_deep(text, MAX_CONFIG_DEPTH)  # measured before parsing: the parser recurses per level
    if depth is not None:
        raise ModelRefused(source, f"{name} nests {depth} levels deep, more than {MAX_CONFIG_DEPTH}")
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # not reachable within MAX_CONFIG_DEPTH; kept so vetting never raises past here
        raise ModelRefused(source, f"{name} nests deeper than {MAX_CONFIG_DEPTH} levels") from None
    except _Bad as exc:
        raise ModelRefused(source, f"{name}: {exc}") from None
    except ValueError as exc:
        raise PayloadError(source, f"{name} is not UTF-8 JSON ({' '.join(str(exc).split())[:200]})") from None
    if check is not None:
        check(doc, source)
    return doc


def _no_constant(name: str) -> Any:
    """json's parse_constant hook: NaN and Infinity are not JSON, and no Keras setting needs them."""
    raise _Bad(f"{name} is not a JSON number")


def _anywhere(doc: Any) -> str | None:
    """Rules that hold at every level whatever the schema says (a second line behind it): no bytecode
    lambda, and `shared_object_id` (which Keras uses as a dict key) only ever an integer."""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if value.get("class_name") == "__lambda__" or "__lambda__" in value:
                return "a __lambda__ (Python bytecode) object is never accepted"
            if "shared_object_id" in value and not _is_int(value["shared_object_id"]):
                return f"shared_object_id {_show(value['shared_object_id'])} is not an integer"
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


def _shared_objects(doc: Any) -> str | None:
    """Keras deserialises the first object carrying a `shared_object_id` and returns it for every later
    object with that id, ignoring their configs, so a small layer vetted in one place could stand for a
    big one built elsewhere. Every object sharing an id must therefore be identical (as canonical JSON,
    so 1, 1.0 and true differ): then whichever one Keras builds is one the vetter checked."""
    by_id: dict[int, list[dict]] = {}
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if _is_int(value.get("shared_object_id")):
                by_id.setdefault(value["shared_object_id"], []).append(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    budget = 2 * MAX_CONFIG_BYTES
    for ident, objects in by_id.items():
        if len(objects) < 2:
            continue
        first = json.dumps(objects[0], sort_keys=True)
        budget -= len(first) * len(objects)
        if budget < 0:
            return "shared objects too large to compare"
        for other in objects[1:]:
            if json.dumps(other, sort_keys=True) != first:
                return f"objects sharing shared_object_id {ident} differ (Keras would build only the first)"
    return None


def _check_metadata(doc: Any, source: str) -> None:
    if not isinstance(doc, dict) or not all(isinstance(v, str) and len(v) <= 200 for v in doc.values()):
        raise ModelRefused(source, "metadata.json must be a JSON object of short strings")


# -- value checks ---------------------------------------------------------------------------------------


class _Bad(Exception):
    """A config value outside its schema; the vetter adds the layer's name and class."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int = 0, hi: int = MAX_DIM) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not _is_int(v) or not lo <= v <= hi:
            raise _Bad(f"expected an integer in [{lo}, {hi}], got {_show(v)}")
    return check


def _num(lo: float = -1e30, hi: float = 1e30) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
            raise _Bad(f"expected a number in [{lo:g}, {hi:g}], got {_show(v)}")
    return check


def _bool(v: Any) -> None:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_show(v)}")


def _null(v: Any) -> None:
    if v is not None:
        raise _Bad(f"expected null, got {_show(v)}")


def _one_of(*choices: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if v not in choices:
            raise _Bad(f"expected one of {', '.join(choices)}, got {_show(v)}")
    return check


def _optional(inner: Callable[[Any], None]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if v is not None:
            inner(v)
    return check


def _ints(n: int | None = None, lo: int = 1, hi: int = MAX_DIM, scalar: bool = True) -> Callable[[Any], None]:
    """An int (if `scalar`) or a list of `n` (any count up to MAX_RANK if None) ints in [lo, hi]."""
    def check(v: Any) -> None:
        if scalar and _is_int(v) and lo <= v <= hi:
            return
        if (isinstance(v, list) and (len(v) == n if n else 0 < len(v) <= MAX_RANK)
                and all(_is_int(x) and lo <= x <= hi for x in v)):
            return
        raise _Bad(f"expected {'an integer or ' if scalar else ''}a list of {n or 'up to ' + str(MAX_RANK)} "
                   f"integers in [{lo}, {hi}], got {_show(v)}")
    return check


def _name(v: Any) -> None:
    if not isinstance(v, str) or not _NAME.fullmatch(v):
        raise _Bad(f"expected a name of letters, digits and _.- (1-128), got {_show(v)}")


def _show(v: Any) -> str:
    """A peer's value for an error message: short, escaped JSON (no control characters reach a log)."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


_REF_KEYS = {"module", "class_name", "config", "registered_name", "shared_object_id"}


# -- the vetter -----------------------------------------------------------------------------------------


Shape = tuple  # of int | None; index 0 is the batch


class _Vetter:
    """One pass over a config: schema checks, shape propagation, parameter and activation accounting."""

    def __init__(self, policy: Policy, source: str, report: Report):
        self.policy = policy
        self.source = source
        self.report = report
        self.nesting = 0
        self.nodes = 0
        self.shared = 0  # > 0 while re-vetting a nested model called again: its weights are counted already

    # -- errors

    def refuse(self, where: str, reason: str) -> ModelRefused:
        return ModelRefused(self.source, f"{where}: {reason}")

    # -- top level

    def model(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise self.refuse("config.json", "expected a JSON object")
        where = "model"
        extra = set(obj) - _REF_KEYS - {"build_config", "compile_config"}
        if extra:
            raise self.refuse(where, f"unexpected key {sorted(extra)[0]!r}")
        self.container(obj, None, where)
        compile_config = obj.get("compile_config")
        if compile_config is not None:
            self.compile_config(compile_config)

    def container(self, obj: dict, input_shapes: list[Shape] | None, where: str) -> list[Shape]:
        """A Sequential or Functional object (the model, or one nested as a layer): its output shapes."""
        kind = self.container_kind(obj, where)
        config = obj.get("config")
        if not isinstance(config, dict):
            raise self.refuse(where, "expected a config object")
        self.nesting += 1
        if self.nesting > MAX_NESTED_MODELS:
            raise self.refuse(where, f"models nested more than {MAX_NESTED_MODELS} deep")
        try:
            if kind == "Sequential":
                return [self.sequential(config, obj.get("build_config"), input_shapes, where)]
            build = obj.get("build_config")
            if build is not None and (not isinstance(build, dict) or set(build) - {"input_shape"}
                                      or build.get("input_shape") is not None):
                # Keras builds from it: the graph fixes a functional model's shapes, so nothing else may
                raise self.refuse(where, "a functional model's build_config input_shape must be null")
            return self.functional(config, input_shapes, where)
        finally:
            self.nesting -= 1

    def container_kind(self, obj: dict, where: str) -> str:
        module, name, registered = obj.get("module"), obj.get("class_name"), obj.get("registered_name")
        if name == "Sequential" and module == "keras" and registered in (None, "Sequential"):
            return "Sequential"
        if (name in ("Functional", "Model") and module in ("keras.src.models.functional", "keras")
                and registered in (None, "Functional", "Model")):
            return "Functional"
        raise self.refuse(where, f"class {_show(name)} of module {_show(module)} is not Sequential or "
                                 f"Functional (subclassed models carry code and are not accepted)")

    def sequential(self, config: dict, build_config: Any, input_shapes: list[Shape] | None, where: str) -> Shape:
        self.keys(config, {"name": _name, "trainable": _bool, "dtype": self.dtype, "layers": None,
                           "build_input_shape": None}, where)
        layers = config.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise self.refuse(where, f"expected a list of at most {MAX_LAYERS} layers")
        declared = [self.shape(config.get("build_input_shape"), f"{where} build_input_shape")]
        if isinstance(build_config, dict):
            self.keys(build_config, {"input_shape": None}, f"{where} build_config")
            declared.append(self.shape(build_config.get("input_shape"), f"{where} build_config"))
        if input_shapes is not None:
            declared.append(self.single(input_shapes, where))
        shape = None
        for known in declared:
            if known is not None and shape is not None and known != shape:
                raise self.refuse(where, f"declares input shape {list(known)} and {list(shape)}")
            shape = known if known is not None else shape
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise self.refuse(f"{where} layer {i}", "expected a layer object")
            label = self.label(layer, i)
            if self.nesting == 1 and layer.get("class_name") != "InputLayer" and self.report.input_shape is None:
                self.report.input_shape = shape  # the top-level model's input, once known
            if layer.get("class_name") == "InputLayer":
                if i != 0:
                    raise self.refuse(label, "an InputLayer may only come first")
                own = self.input_layer(layer, label)
                if shape is not None and own != shape:
                    raise self.refuse(label, f"input shape {list(own)} differs from the declared {list(shape)}")
                shape = own
                continue
            if shape is None:
                raise self.refuse(label, "the input shape is unknown (no InputLayer or build_input_shape): "
                                         "cannot bound the model's size")
            if layer.get("inbound_nodes"):
                raise self.refuse(label, "inbound_nodes are not expected inside a Sequential model")
            (shape,) = self.layer(layer, [shape], label, node=0)
        if shape is None:
            raise self.refuse(where, "the input shape is unknown: cannot bound the model's size")
        if self.nesting == 1 and self.report.input_shape is None:  # an InputLayer and nothing else
            self.report.input_shape = shape
        return shape

    def functional(self, config: dict, input_shapes: list[Shape] | None, where: str) -> list[Shape]:
        self.keys(config, {"name": _name, "trainable": _bool, "dtype": self.dtype, "layers": None,
                           "input_layers": None, "output_layers": None}, where)
        layers = config.get("layers")
        if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
            raise self.refuse(where, f"expected a list of 1 to {MAX_LAYERS} layers")
        by_name: dict[str, dict] = {}
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise self.refuse(f"{where} layer {i}", "expected a layer object")
            label = self.label(layer, i)
            own = layer.get("config") if isinstance(layer.get("config"), dict) else {}
            name = layer.get("name", own.get("name"))
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name in by_name:
                raise self.refuse(label, "expected a unique layer name")
            if layer.get("class_name") not in ("InputLayer", "Sequential", "Functional", "Model"):
                self.check_class(layer, label)  # the class first: it is the most telling reason
            by_name[name] = layer
        inputs = self.history_list(config.get("input_layers"), by_name, f"{where} input_layers")
        outputs = self.history_list(config.get("output_layers"), by_name, f"{where} output_layers")
        if input_shapes is not None and len(input_shapes) != len(inputs):
            raise self.refuse(where, f"called with {len(input_shapes)} inputs, it has {len(inputs)}")
        produced: dict[tuple[str, int], Shape] = {}
        for k, (name, node, _) in enumerate(inputs):
            layer = by_name[name]
            if layer.get("class_name") != "InputLayer" or node != 0:
                raise self.refuse(self.label(layer), "a model input must be an InputLayer")
            produced[(name, 0)] = self.input_layer(layer, self.label(layer))
            if input_shapes is not None and input_shapes[k] != produced[(name, 0)]:
                raise self.refuse(self.label(layer), f"called on shape {list(input_shapes[k])}, declares "
                                                     f"{list(produced[(name, 0)])}")
        if self.nesting == 1 and len(inputs) == 1:
            self.report.input_shape = produced[(inputs[0][0], 0)]
        pending = []
        for name, layer in by_name.items():
            nodes = layer.get("inbound_nodes", [])
            if layer.get("class_name") == "InputLayer":
                if (name, 0) not in produced or nodes:
                    raise self.refuse(self.label(layer), "an InputLayer must be a model input without inbound nodes")
                continue
            if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES_PER_LAYER:
                raise self.refuse(self.label(layer), f"expected 1 to {MAX_NODES_PER_LAYER} inbound nodes")
            for index, node in enumerate(nodes):
                pending.append((name, index, self.node_refs(node, by_name, self.label(layer))))
        self.resolve(pending, produced, by_name, where)
        result = []
        for name, node, _ in outputs:
            if (name, node) not in produced:
                raise self.refuse(where, f"output {name!r} node {node} is never produced")
            result.append(produced[(name, node)])
        return result

    def resolve(self, pending: list, produced: dict, by_name: dict, where: str) -> None:
        """Vet every node once its inputs are known (Kahn's algorithm: linear in nodes and references, so
        a graph listed backwards costs no more than one listed in order); refuse a cycle or dangling ref."""
        self.nodes += len(pending)
        if self.nodes > MAX_NODES:
            raise self.refuse(where, f"more than {MAX_NODES} layer calls (inbound nodes) in the model")
        waiters: dict[tuple[str, int], list[int]] = {}
        missing: list[int] = []
        ready: deque[int] = deque()
        for i, (_, _, (_, refs)) in enumerate(pending):
            keys = {(ref[0], ref[1]) for ref in refs} - produced.keys()
            missing.append(len(keys))
            for key in keys:
                waiters.setdefault(key, []).append(i)
            if not keys:
                ready.append(i)
        while ready:
            i = ready.popleft()
            name, index, (structure, refs) = pending[i]
            shapes = [produced[(ref[0], ref[1])] for ref in refs]
            (produced[(name, index)],) = self.layer(by_name[name], shapes, self.label(by_name[name]),
                                                    node=index, listed=structure)
            for j in waiters.pop((name, index), ()):
                missing[j] -= 1
                if not missing[j]:
                    ready.append(j)
        stuck = next((i for i, count in enumerate(missing) if count), None)
        if stuck is not None:
            name, index, _ = pending[stuck]
            raise self.refuse(self.label(by_name[name]), f"inbound node {index} refers to an output that "
                                                         f"is never produced")

    def history_list(self, value: Any, by_name: dict, where: str) -> list[tuple[str, int, int]]:
        """input_layers/output_layers: one [name, node, 0] triple, a list of them or a dict of them."""
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
            value = [value]
        if not isinstance(value, list) or not 0 < len(value) <= 256:
            raise self.refuse(where, "expected [layer, node, tensor] references")
        return [self.history(item, by_name, where) for item in value]

    def history(self, item: Any, by_name: dict, where: str) -> tuple[str, int, int]:
        if (not isinstance(item, list) or len(item) != 3 or not _member(item[0], by_name)
                or not _is_int(item[1]) or not 0 <= item[1] < MAX_NODES_PER_LAYER or item[2] != 0):
            raise self.refuse(where, f"expected a [layer, node, 0] reference to a layer of this model, got "
                                     f"{_show(item)}")
        return item[0], item[1], item[2]

    def node_refs(self, node: Any, by_name: dict, label: str) -> tuple[bool, list]:
        """The output references a node consumes; True if they are passed as one list (merge layers).

        Positional args may only be tensor references (or one list of them); kwargs only references or
        plain flags (`training`, `mask`: true/false/null). Anything else would be handed to the layer's
        call as an argument of the attacker's choosing."""
        if not isinstance(node, dict) or set(node) - {"args", "kwargs"}:
            raise self.refuse(label, "an inbound node holds only args and kwargs")
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise self.refuse(label, "inbound node args must be a list and kwargs an object")
        listed = len(args) == 1 and isinstance(args[0], list)
        items = args[0] if listed else args
        if not 0 < len(items) <= 256:
            raise self.refuse(label, "an inbound node must pass 1 to 256 tensors")
        refs = [self.tensor_ref(item, by_name, label) for item in items]
        for key, value in kwargs.items():
            if key in ("training", "mask") and (value is None or isinstance(value, bool)):
                continue
            raise self.refuse(label, f"inbound node kwarg {key!r} is {_show(value)}: only training/mask flags "
                                     f"(true, false, null) are accepted")
        return listed, refs

    def tensor_ref(self, item: Any, by_name: dict, label: str) -> tuple[str, int, int]:
        if (not isinstance(item, dict) or item.get("class_name") != "__keras_tensor__"
                or set(item) != {"class_name", "config"} or not isinstance(item["config"], dict)
                or set(item["config"]) - {"shape", "dtype", "keras_history"}):
            raise self.refuse(label, f"inbound node argument {_show(item)} is not a reference to another "
                                     f"layer's output")
        config = item["config"]
        if config.get("dtype") is not None and not _member(config["dtype"], DTYPES):
            raise self.refuse(label, f"inbound tensor dtype {_show(config['dtype'])} is not allowed")
        self.shape(config.get("shape"), label)
        return self.history(config.get("keras_history"), by_name, f"{label} inbound node")

    # -- layers

    def label(self, layer: dict, index: int | None = None) -> str:
        config = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        name = layer.get("name", config.get("name", f"#{index}"))
        return f"layer {str(name)[:64]!r} ({str(layer.get('class_name'))[:64]})"

    def layer(self, layer: dict, shapes: list[Shape], label: str, *, node: int,
              listed: bool = False) -> list[Shape]:
        """Vet one layer object called on `shapes`; account its parameters once and its outputs."""
        self.report.layers += node == 0 and not self.shared
        if self.report.layers > MAX_LAYERS:
            raise self.refuse(label, f"more than {MAX_LAYERS} layers")
        class_name = layer.get("class_name")
        nested = class_name in ("Sequential", "Functional", "Model")
        allowed = {"build_config", "name", "inbound_nodes"} | ({"compile_config"} if nested else set())
        extra = set(layer) - _REF_KEYS - allowed
        if extra:
            raise self.refuse(label, f"unexpected key {sorted(extra)[0]!r}")
        if nested:
            if layer.get("compile_config") is not None:
                self.compile_config(layer["compile_config"])
            self.shared += node > 0  # a shared nested model holds its weights once: vet only its shapes
            try:
                outputs = self.container(layer, shapes, label)
            finally:
                self.shared -= node > 0
            return self.account(outputs, 0, label, inner=True)
        rule = self.check_class(layer, label)
        config = layer.get("config")
        if not isinstance(config, dict):
            raise self.refuse(label, "expected a config object")
        merge = rule is not None and rule.merge
        if listed != merge or (not merge and len(shapes) != 1):
            raise self.refuse(label, "a merge layer takes one list of tensors, any other layer one tensor"
                              if rule else "widened layers take exactly one tensor")
        shape_in = shapes if merge else shapes[0]
        self.build_config(layer, shape_in, label)
        try:
            if rule is None:
                self.generic(config, label)
                out, params = _keras_shape_and_params(class_name, config, shape_in)
            else:
                self.keys(config, {**COMMON, **rule.keys}, label)
                out, params = rule.shape(config, shape_in)
        except _Bad as exc:
            raise self.refuse(label, str(exc)) from None
        return self.account([out], params if node == 0 else 0, label)

    def check_class(self, layer: dict, label: str) -> Rule | None:
        """The built-in rule for this layer's class (None: operator-widened); refuse any other class."""
        class_name, module = layer.get("class_name"), layer.get("module")
        rule = LAYERS.get(class_name) if isinstance(class_name, str) else None
        widened = (isinstance(class_name, str) and class_name in self.policy.extra.get("layers", ())
                   and class_name not in DENIED_LAYERS)
        if module != "keras.layers" or (rule is None and not widened):
            raise self.refuse(label, "not an allowed layer class" if module == "keras.layers"
                              else f"module {_show(module)} is not keras.layers")
        if layer.get("registered_name") is not None:
            raise self.refuse(label, f"registered_name {_show(layer.get('registered_name'))}: custom objects are "
                                     f"not accepted")
        return rule

    def account(self, outputs: list[Shape], params: int, label: str, *, inner: bool = False) -> list[Shape]:
        """Add a layer call's parameters and outputs; `inner`: a nested model's outputs, whose layers are
        counted already."""
        self.report.params += 0 if self.shared else params
        if self.report.params > self.policy.max_params:
            raise self.refuse(label, f"the model would hold more than {self.policy.max_params} parameters "
                                     f"(at least {self.report.params})")
        for out in outputs:
            if any(d is None for d in out[1:]):
                raise self.refuse(label, f"output shape {list(out)} has an unknown dimension: cannot bound "
                                         f"activations")
            size = math.prod(out[1:])
            if size > self.policy.max_activation:
                raise self.refuse(label, f"outputs {size} values per example, more than "
                                         f"{self.policy.max_activation}")
            self.report.max_activation = max(self.report.max_activation, size)
            if inner:
                continue
            self.report.total_activation += size  # training keeps every layer's outputs for the backward pass
            if self.report.total_activation > MAX_TOTAL_ACTIVATION_FACTOR * self.policy.max_activation:
                raise self.refuse(label, f"the layers output more than {MAX_TOTAL_ACTIVATION_FACTOR} x "
                                         f"{self.policy.max_activation} values per example in all "
                                         f"(at least {self.report.total_activation})")
        return outputs

    def build_config(self, layer: dict, shape_in, label: str) -> None:
        """Keras builds each layer from its own build_config: it must match the shape it is called on."""
        build = layer.get("build_config")
        if build is None:
            return
        if not isinstance(build, dict) or set(build) - {"input_shape"}:
            raise self.refuse(label, "build_config holds only input_shape")
        declared = build.get("input_shape")
        if declared is None:
            return
        if isinstance(shape_in, list):
            if not isinstance(declared, list) or len(declared) != len(shape_in):
                raise self.refuse(label, "build_config input_shape does not match its inputs")
            ok = all(self.shape(d, label) == s for d, s in zip(declared, shape_in))
        else:
            ok = self.shape(declared, label) == shape_in
        if not ok:
            raise self.refuse(label, f"build_config input_shape {_show(declared)} differs from the shape it "
                                     f"is called on")

    def input_layer(self, layer: dict, label: str) -> Shape:
        if layer.get("module") != "keras.layers" or layer.get("registered_name") is not None:
            raise self.refuse(label, "expected keras.layers.InputLayer")
        config = layer.get("config")
        if not isinstance(config, dict):
            raise self.refuse(label, "expected a config object")
        extra = set(layer) - _REF_KEYS - {"name", "inbound_nodes"}
        if extra:
            raise self.refuse(label, f"unexpected key {sorted(extra)[0]!r}")
        self.keys(config, {"name": _name, "dtype": self.dtype, "sparse": _one_of(False),
                           "ragged": _one_of(False), "optional": _one_of(False), "batch_shape": None,
                           "shape": None, "batch_size": _optional(_int(1)), "trainable": _bool}, label)
        if "batch_shape" in config:
            shape = self.shape(config["batch_shape"], label)
        elif config.get("shape") is not None:
            shape = self.shape([config.get("batch_size")] + list(config["shape"]), label) \
                if isinstance(config["shape"], list) else None
        else:
            shape = None
        if shape is None:
            raise self.refuse(label, "the input shape is unknown: cannot bound the model's size")
        self.account([shape], 0, label)
        return shape

    def shape(self, value: Any, where: str) -> Shape | None:
        """A declared shape: a list of 1 to MAX_RANK dimensions, each null or a positive integer."""
        if value is None:
            return None
        if (not isinstance(value, list) or not 0 < len(value) <= MAX_RANK
                or not all(d is None or (_is_int(d) and 0 < d <= MAX_DIM) for d in value)):
            raise self.refuse(where, f"expected a shape (list of null or positive integers), got {_show(value)}")
        return tuple(value)

    def single(self, shapes: list[Shape], where: str) -> Shape:
        if len(shapes) != 1:
            raise self.refuse(where, "a Sequential model takes one input")
        return shapes[0]

    def keys(self, config: dict, schema: dict, where: str) -> None:
        """Every key known, every value valid (`None` in the schema: checked by the caller)."""
        for key, value in config.items():
            if key not in schema:
                raise self.refuse(where, f"unexpected config key {key!r}")
            check = schema[key]
            if check is None:
                continue
            try:
                check(value) if not isinstance(check, str) else self.slot(check, value)
            except _Bad as exc:
                raise self.refuse(where, f"{key}: {exc}") from None

    # -- objects in slots (activation, initializer, ...)

    def slot(self, kind: str, value: Any) -> None:
        """Check `value` in a slot of `kind`: activation, dtype_, initializers, regularizers, constraints."""
        if kind == "dtype_":
            self.dtype(value)
            return
        if kind == "activation":
            if value is None or (isinstance(value, str) and self.policy.allows("activations", value, ACTIVATIONS)):
                return
            if isinstance(value, dict):
                self.function_ref(value, "activations", ACTIVATIONS, ("keras.activations", "builtins"))
                return
            raise _Bad(f"activation {_show(value)} is not an allowed activation")
        if value is None and kind in ("regularizers", "constraints"):
            return
        if kind == "initializers" and isinstance(value, str):
            if _camel(value) in INITIALIZERS or self.policy.allows("initializers", _camel(value), frozenset()):
                return
            raise _Bad(f"initializer {_show(value)} is not allowed")
        if kind == "regularizers" and value in ("l1", "l2", "l1_l2"):
            return
        self.object_ref(value, kind)

    def object_ref(self, value: Any, kind: str) -> None:
        """A serialised Keras object of `kind` from its module, allow-listed, with a scalar config."""
        defaults = {"initializers": INITIALIZERS, "regularizers": REGULARIZERS, "constraints": CONSTRAINTS,
                    "losses": LOSSES, "metrics": METRICS, "optimizers": OPTIMIZERS, "schedules": SCHEDULES}[kind]
        if isinstance(value, dict) and value.get("class_name") in ("function", "__lambda__"):
            raise _Bad(f"function reference {_show(value.get('module'))}.{_show(value.get('config'))} is not an "
                       f"allowed {kind[:-1]}")
        if not isinstance(value, dict) or set(value) - _REF_KEYS or not isinstance(value.get("config"), dict):
            raise _Bad(f"expected a {kind[:-1]} object, got {_show(value)}")
        name, module = value.get("class_name"), value.get("module")
        if module != _KIND_MODULES[kind] or not isinstance(name, str) or not self.policy.allows(kind, name, defaults):
            raise _Bad(f"{_show(module)}.{_show(name)} is not an allowed {kind[:-1]}")
        if value.get("registered_name") not in (None, name):
            raise _Bad(f"registered_name {_show(value.get('registered_name'))}: custom objects are not accepted")
        for key, item in value["config"].items():
            if kind == "optimizers" and key == "learning_rate" and isinstance(item, dict):
                self.object_ref(item, "schedules")
            elif kind in ("losses", "metrics") and key == "dtype" and isinstance(item, dict):
                self.dtype(item)
            else:
                _scalar_config(key, item)
        if kind == "metrics" and name == "AUC":
            config = value["config"]
            thresholds = config.get("thresholds")
            count = len(thresholds) + 2 if isinstance(thresholds, list) else config.get("num_thresholds") or 200
            labels = config.get("num_labels") or 1 if config.get("multi_label") else 1
            if 4 * count * labels > MAX_AUC_CELLS:
                raise _Bad(f"AUC with {count} thresholds and {labels} labels allocates {4 * count * labels} values, "
                           f"more than {MAX_AUC_CELLS}")

    def function_ref(self, value: dict, kind: str, names: frozenset[str], modules: tuple[str, ...]) -> None:
        """`{"class_name": "function", ...}` only where a loss/metric/activation goes, naming one of ours."""
        if (set(value) - _REF_KEYS or value.get("class_name") != "function" or value.get("module") not in modules
                or not isinstance(value.get("config"), str) or value.get("registered_name") not in (None, "function")
                or not self.policy.allows(kind, value["config"], names)):
            raise _Bad(f"function reference {_show(value.get('module'))}.{_show(value.get('config'))} is not an "
                       f"allowed {kind[:-1]}")

    def dtype(self, value: Any) -> None:
        if value is None or (isinstance(value, str) and (value in DTYPES or value in POLICY_DTYPES)):
            return
        if (isinstance(value, dict) and not set(value) - _REF_KEYS and value.get("class_name") == "DTypePolicy"
                and value.get("module") in ("keras", "keras.dtype_policies") and value.get("registered_name") is None
                and isinstance(value.get("config"), dict) and set(value["config"]) == {"name"}
                and _member(value["config"]["name"], POLICY_DTYPES)):
            return
        raise _Bad(f"dtype {_show(value)} is not an allowed dtype policy")

    def generic(self, config: dict, label: str) -> None:
        """An operator-widened layer's config: scalars, lists of scalars, and allow-listed objects."""
        for key, value in config.items():
            try:
                if key == "dtype":
                    self.dtype(value)
                elif "activation" in key:
                    self.slot("activation", value)
                elif isinstance(value, dict):
                    kind = next((k for k in ("initializers", "regularizers", "constraints")
                                 if key.endswith(k[:-1])), None)
                    if kind is None:
                        raise _Bad("nested objects are accepted only as initializers, regularizers, constraints")
                    self.object_ref(value, kind)
                else:
                    _scalar_config(key, value)
            except _Bad as exc:
                raise self.refuse(label, f"{key}: {exc}") from None

    # -- compile settings

    def compile_config(self, value: Any) -> None:
        where = "compile_config"
        if not isinstance(value, dict):
            raise self.refuse(where, "expected an object")
        schema = {"optimizer": None, "loss": None, "metrics": None, "weighted_metrics": None, "loss_weights": None,
                  "run_eagerly": _bool, "steps_per_execution": _int(1, 10_000),
                  "jit_compile": lambda v: _bool(v) if v != "auto" else None, "auto_scale_loss": _bool}
        self.keys(value, schema, where)
        try:
            optimizer = value.get("optimizer")
            if isinstance(optimizer, str):
                widened = {n.lower() for n in self.policy.extra.get("optimizers", ())}
                if optimizer.lower() not in OPTIMIZER_NAMES | widened:
                    raise _Bad(f"{_show(optimizer)} is not an allowed optimizer")
            elif optimizer is not None:
                self.object_ref(optimizer, "optimizers")
            self.nested(value.get("loss"), "losses", LOSSES, LOSS_NAMES)
            for key in ("metrics", "weighted_metrics"):
                self.nested(value.get(key), "metrics", METRICS, METRIC_NAMES)
            self.nested_numbers(value.get("loss_weights"))
        except _Bad as exc:
            raise self.refuse(where, str(exc)) from None

    def nested(self, value: Any, kind: str, classes: frozenset[str], names: frozenset[str]) -> None:
        """Losses or metrics: a name, an object, a function reference, or lists/dicts of them (per output)."""
        stack, seen = [(value, 0)], 0
        while stack:
            item, depth = stack.pop()
            seen += 1
            if seen > 1000 or depth > 3:
                raise _Bad(f"{kind} nest too deep or too many")
            if item is None:
                continue
            if isinstance(item, str):
                if not self.policy.allows(kind, item, names | classes):
                    raise _Bad(f"{_show(item)} is not an allowed {kind[:-1]}")
            elif isinstance(item, list):
                stack.extend((x, depth + 1) for x in item)
            elif isinstance(item, dict) and "class_name" in item:
                if item.get("class_name") == "function":
                    self.function_ref(item, kind, names, ("builtins", _KIND_MODULES[kind]))
                else:
                    self.object_ref(item, kind)
            elif isinstance(item, dict):  # per output name
                for key, child in item.items():
                    _name(key)
                    stack.append((child, depth + 1))
            else:
                raise _Bad(f"{_show(item)} is not a {kind[:-1]}")

    def nested_numbers(self, value: Any) -> None:
        items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for item in items:
            if item is not None:
                _num()(item)


def _member(value: Any, names) -> bool:
    """`value in names` for a value from JSON, which may be an unhashable list or object."""
    return isinstance(value, str) and value in names


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


_SCALAR_CAPS = {"num_thresholds": 10_000, "num_classes": 100_000, "k": 10_000, "gradient_accumulation_steps": 1024,
                "ema_overwrite_frequency": 1_000_000, "num_labels": 10_000}
MAX_AUC_CELLS = 10 ** 7
"""AUC(multi_label=True) allocates 4 * num_thresholds * num_labels floats at compile time: at most 160 MB."""
"""Integers that size an allocation or a loop inside an object: tighter bounds than the generic one."""


def _scalar_config(key: str, value: Any) -> None:
    """A value in an object's config: null, bool, bounded number, a short token, or a short list of those."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) > 1024:
        raise _Bad(f"{key}: a list of {len(value)} values, more than 1024")
    limit = _SCALAR_CAPS.get(key, 2 ** 53)
    for item in items:
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, (int, float)) and math.isfinite(item) and abs(item) <= limit:
            continue
        if isinstance(item, str) and _TOKEN.fullmatch(item) and not isinstance(value, list):
            continue
        raise _Bad(f"{key}: {_show(item)} is not a plain value (number up to {limit:g}, flag, short name)")


# -- shape rules of the built-in layers -----------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    keys: dict
    shape: Callable[[dict, Any], tuple[Shape, int]]
    merge: bool = False


COMMON = {"name": _name, "trainable": _bool, "dtype": "dtype_", "activity_regularizer": "regularizers"}
_WEIGHTED = {"kernel_initializer": "initializers", "bias_initializer": "initializers",
             "kernel_regularizer": "regularizers", "bias_regularizer": "regularizers",
             "kernel_constraint": "constraints", "bias_constraint": "constraints", "use_bias": _bool,
             "activation": "activation"}


def _known(shape: Shape, axis: int, what: str) -> int:
    d = shape[axis]
    if d is None:
        raise _Bad(f"{what} dimension of input {list(shape)} is unknown: cannot count parameters")
    return d


def _dense(cfg: dict, s: Shape) -> tuple[Shape, int]:
    if len(s) < 2:
        raise _Bad(f"needs an input of rank 2 or more, got {list(s)}")
    units, n = cfg.get("units"), _known(s, -1, "last")
    if units is None:
        raise _Bad("units is missing")
    lora = cfg.get("lora_rank") or 0
    return s[:-1] + (units,), n * units + units * cfg.get("use_bias", True) + lora * (n + units)


def _conv(rank: int, transpose: bool = False):
    def shape(cfg: dict, s: Shape) -> tuple[Shape, int]:
        if len(s) != rank + 2:
            raise _Bad(f"needs an input of rank {rank + 2}, got {list(s)}")
        first = cfg.get("data_format") == "channels_first"
        channels = _known(s, 1 if first else -1, "channel")
        spatial = s[2:] if first else s[1:-1]
        filters, groups = cfg.get("filters"), cfg.get("groups", 1)
        if filters is None:
            raise _Bad("filters is missing")
        if channels % groups or filters % groups:
            raise _Bad(f"groups {groups} must divide the {channels} input channels and {filters} filters")
        kernel = _tuple(cfg.get("kernel_size"), rank, "kernel_size")
        strides = _tuple(cfg.get("strides", 1), rank, "strides")
        dilation = _tuple(cfg.get("dilation_rate", 1), rank, "dilation_rate")
        padding = cfg.get("padding", "valid")
        out = tuple(_conv_len(length, k, st, dl, padding, transpose) for length, k, st, dl
                    in zip(spatial, kernel, strides, dilation))
        params = math.prod(kernel) * (channels // groups) * filters + filters * cfg.get("use_bias", True)
        out_shape = (s[0], filters) + out if first else (s[0],) + out + (filters,)
        return out_shape, params
    return shape


def _conv_len(length, k: int, stride: int, dilation: int, padding: str, transpose: bool):
    if length is None:
        return None
    effective = dilation * (k - 1) + 1
    if transpose:
        return length * stride + max(effective - stride, 0) if padding == "valid" else length * stride
    out = -(-length // stride) if padding in ("same", "causal") else (length - effective) // stride + 1
    if out < 1:
        raise _Bad(f"kernel {k} (dilation {dilation}) does not fit an input of length {length}")
    return out


def _tuple(value: Any, n: int, what: str) -> tuple[int, ...]:
    if _is_int(value):
        return (value,) * n
    if isinstance(value, list) and len(value) == n and all(_is_int(v) for v in value):
        return tuple(value)
    raise _Bad(f"{what}: expected an integer or {n} integers, got {_show(value)}")


def _pool(rank: int):
    def shape(cfg: dict, s: Shape) -> tuple[Shape, int]:
        if len(s) != rank + 2:
            raise _Bad(f"needs an input of rank {rank + 2}, got {list(s)}")
        first = cfg.get("data_format") == "channels_first"
        pool = _tuple(cfg.get("pool_size", 2), rank, "pool_size")
        strides = _tuple(cfg.get("strides") if cfg.get("strides") is not None else list(pool), rank, "strides")
        spatial = s[2:] if first else s[1:-1]
        out = tuple(_conv_len(length, p, st, 1, cfg.get("padding", "valid"), False)
                    for length, p, st in zip(spatial, pool, strides))
        return ((s[0], s[1]) + out if first else (s[0],) + out + (s[-1],)), 0
    return shape


def _global_pool(rank: int):
    def shape(cfg: dict, s: Shape) -> tuple[Shape, int]:
        if len(s) != rank + 2:
            raise _Bad(f"needs an input of rank {rank + 2}, got {list(s)}")
        first = cfg.get("data_format") == "channels_first"
        channels = s[1] if first else s[-1]
        if cfg.get("keepdims"):
            ones = (1,) * rank
            return ((s[0], channels) + ones if first else (s[0],) + ones + (channels,)), 0
        return (s[0], channels), 0
    return shape


def _same(cfg: dict, s: Shape) -> tuple[Shape, int]:
    return s, 0


def _flatten(cfg: dict, s: Shape) -> tuple[Shape, int]:
    if any(d is None for d in s[1:]):
        raise _Bad(f"cannot flatten input {list(s)} with an unknown dimension")
    return (s[0], math.prod(s[1:])), 0


def _reshape(cfg: dict, s: Shape) -> tuple[Shape, int]:
    target = cfg.get("target_shape")
    if not isinstance(target, list) or not 0 < len(target) < MAX_RANK or \
            not all(_is_int(d) and (d > 0 or d == -1) for d in target) or target.count(-1) > 1:
        raise _Bad(f"target_shape: expected positive integers (one may be -1), got {_show(target)}")
    if any(d is None for d in s[1:]):
        raise _Bad(f"cannot reshape input {list(s)} with an unknown dimension")
    size, known = math.prod(s[1:]), math.prod(d for d in target if d != -1)
    if -1 in target:
        if size % known:
            raise _Bad(f"cannot reshape {size} values to {target}")
        target = [size // known if d == -1 else d for d in target]
    elif known != size:
        raise _Bad(f"cannot reshape {size} values to {target}")
    return (s[0],) + tuple(target), 0


def _axes(cfg: dict, s: Shape, default) -> list[int]:
    axis = cfg.get("axis", default)
    axes = [axis] if _is_int(axis) else axis
    if not isinstance(axes, list) or not axes or not all(_is_int(a) and -len(s) <= a < len(s) for a in axes):
        raise _Bad(f"axis {_show(axis)} is not an axis of input {list(s)}")
    if any(a % len(s) == 0 for a in axes):
        raise _Bad("cannot normalise over the batch axis")
    return [a % len(s) for a in axes]


def _batch_norm(cfg: dict, s: Shape) -> tuple[Shape, int]:
    n = math.prod(_known(s, a, "normalised") for a in _axes(cfg, s, -1))
    return s, n * (2 + cfg.get("center", True) + cfg.get("scale", True))


def _layer_norm(cfg: dict, s: Shape) -> tuple[Shape, int]:
    n = math.prod(_known(s, a, "normalised") for a in _axes(cfg, s, -1))
    if cfg.get("rms_scaling"):
        return s, n
    return s, n * (cfg.get("center", True) + cfg.get("scale", True))


def _embedding(cfg: dict, s: Shape) -> tuple[Shape, int]:
    dim, out = cfg.get("input_dim"), cfg.get("output_dim")
    if dim is None or out is None:
        raise _Bad("input_dim and output_dim are required")
    lora = cfg.get("lora_rank") or 0
    return s + (out,), dim * out + lora * (dim + out)


def _broadcast(cfg: dict, shapes: list[Shape]) -> tuple[Shape, int]:
    if not 2 <= len(shapes) <= 256 or len({len(s) for s in shapes}) != 1:
        raise _Bad(f"expected 2 or more inputs of one rank, got {[list(s) for s in shapes]}")
    out = []
    for dims in zip(*shapes):
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            raise _Bad(f"inputs {[list(s) for s in shapes]} do not broadcast")
        out.append(known.pop() if known else (None if None in dims else 1))
    return tuple(out), 0


def _subtract(cfg: dict, shapes: list[Shape]) -> tuple[Shape, int]:
    if len(shapes) != 2:
        raise _Bad("Subtract takes exactly 2 inputs")
    return _broadcast(cfg, shapes)


def _concatenate(cfg: dict, shapes: list[Shape]) -> tuple[Shape, int]:
    if not 2 <= len(shapes) <= 256 or len({len(s) for s in shapes}) != 1:
        raise _Bad(f"expected 2 or more inputs of one rank, got {[list(s) for s in shapes]}")
    rank = len(shapes[0])
    axis = cfg.get("axis", -1)
    if not -rank < axis < rank or axis % rank == 0:
        raise _Bad(f"axis {axis} is not a feature axis of inputs of rank {rank}")
    axis %= rank
    out = []
    for i, dims in enumerate(zip(*shapes)):
        if i == axis:
            out.append(None if None in dims else sum(dims))
        elif len({d for d in dims if d is not None}) > 1:
            raise _Bad(f"inputs {[list(s) for s in shapes]} differ outside axis {axis}")
        else:
            out.append(next((d for d in dims if d is not None), None))
    return tuple(out), 0


_FORMAT = {"data_format": _one_of("channels_last", "channels_first")}
_PADDING = {"padding": _one_of("valid", "same")}


def _conv_keys(rank: int) -> dict:
    return {**_WEIGHTED, **_FORMAT, "filters": _int(1, 1 << 20), "kernel_size": _ints(rank, 1, 1024),
            "strides": _ints(rank, 1, 1024), "dilation_rate": _ints(rank, 1, 1024), "groups": _int(1, 1 << 20),
            "padding": _one_of("valid", "same", "causal") if rank == 1 else _one_of("valid", "same"),
            "lora_rank": _null, "lora_alpha": _null}


def _pool_keys(rank: int) -> dict:
    return {**_FORMAT, **_PADDING, "pool_size": _ints(rank, 1, 1024), "strides": _optional(_ints(rank, 1, 1024))}


_MERGE_KEYS: dict = {}
_DENSE_KEYS = {**_WEIGHTED, "units": _int(1, 1 << 24), "lora_rank": _optional(_int(1, 4096)),
               "lora_alpha": _optional(_num(0)), "quantization_config": _null}
_NORM_KEYS = {"axis": _ints(None, -MAX_RANK, MAX_RANK), "epsilon": _num(0, 1), "center": _bool, "scale": _bool,
              "beta_initializer": "initializers", "gamma_initializer": "initializers",
              "beta_regularizer": "regularizers", "gamma_regularizer": "regularizers",
              "beta_constraint": "constraints", "gamma_constraint": "constraints"}

LAYERS: dict[str, Rule] = {
    "Dense": Rule(_DENSE_KEYS, _dense),
    **{f"Conv{r}D": Rule(_conv_keys(r), _conv(r)) for r in (1, 2, 3)},
    **{f"Conv{r}DTranspose": Rule({**_conv_keys(r), "output_padding": _null}, _conv(r, transpose=True))
       for r in (1, 2)},
    **{f"{kind}Pooling{r}D": Rule(_pool_keys(r), _pool(r)) for kind in ("Max", "Average") for r in (1, 2, 3)},
    **{f"Global{kind}Pooling{r}D": Rule({**_FORMAT, "keepdims": _bool}, _global_pool(r))
       for kind in ("Max", "Average") for r in (1, 2, 3)},
    "Flatten": Rule(_FORMAT, _flatten),
    "Rescaling": Rule({"scale": _num(), "offset": _num()}, _same),
    "Reshape": Rule({"target_shape": None}, _reshape),
    "Dropout": Rule({"rate": _num(0, 1), "noise_shape": _null, "seed": _optional(_int(0, 2 ** 63))}, _same),
    "GaussianNoise": Rule({"stddev": _num(0), "seed": _optional(_int(0, 2 ** 63))}, _same),
    "Activation": Rule({"activation": "activation"}, _same),
    "ReLU": Rule({"max_value": _optional(_num(0)), "negative_slope": _num(0), "threshold": _num()}, _same),
    "LeakyReLU": Rule({"negative_slope": _num(0)}, _same),
    "Softmax": Rule({"axis": _ints(None, -MAX_RANK, MAX_RANK)}, _same),
    "BatchNormalization": Rule({**_NORM_KEYS, "momentum": _num(0, 1), "synchronized": _bool,
                                "renorm": _one_of(False), "renorm_clipping": _null, "renorm_momentum": _num(0, 1),
                                "moving_mean_initializer": "initializers",
                                "moving_variance_initializer": "initializers"}, _batch_norm),
    "LayerNormalization": Rule({**_NORM_KEYS, "rms_scaling": _bool}, _layer_norm),
    "Embedding": Rule({"input_dim": _int(1, 1 << 26), "output_dim": _int(1, 1 << 20), "mask_zero": _bool,
                       "embeddings_initializer": "initializers", "embeddings_regularizer": "regularizers",
                       "embeddings_constraint": "constraints", "lora_rank": _optional(_int(1, 4096)),
                       "lora_alpha": _optional(_num(0)), "input_length": _null, "quantization_config": _null,
                       "sparse": _one_of(False)},
                      _embedding),
    **{name: Rule(_MERGE_KEYS, _broadcast, merge=True)
       for name in ("Add", "Multiply", "Average", "Maximum", "Minimum")},
    "Subtract": Rule(_MERGE_KEYS, _subtract, merge=True),
    "Concatenate": Rule({"axis": _int(-MAX_RANK, MAX_RANK)}, _concatenate, merge=True),
}
"""The built-in layer vocabulary: each class's config keys with their checks, and its shape rule."""


def _keras_shape_and_params(class_name: str, config: dict, shape: Shape) -> tuple[Shape, int]:
    """An operator-widened layer: Keras computes its output shape and builds it in a stateless scope,
    where variables get shapes but no memory, so its parameters are counted before any allocation.
    The config reaching Keras has passed the generic checks (plain values, allow-listed objects)."""
    import keras
    from keras.src.backend.common import global_state
    from keras.src.backend.common.stateless_scope import StatelessScope

    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key, default=[]) or [])
    try:
        layer = getattr(keras.layers, class_name).from_config(dict(config))
        with StatelessScope(initialize_variables=False):
            layer.build(shape)
            out = layer.compute_output_shape(shape)
        params = sum(math.prod(v.shape) for v in layer.weights)
    except Exception as exc:  # a config Keras itself cannot build: refuse, naming why
        raise _Bad(f"Keras cannot size it: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    finally:
        global_state.set_global_attribute(key, before)
    if not isinstance(out, tuple) or not all(d is None or _is_int(d) for d in out):
        raise _Bad("it does not have a single output")
    return tuple(out), int(params)


# -- HDF5 weights ---------------------------------------------------------------------------------------


def _check_h5(fileobj, params: int, policy: Policy, source: str) -> int:
    """Bound model.weights.h5 by what it declares, before anything reads a dataset: only hard links,
    numeric datasets with known filters and contiguous/chunked local storage; values under `layers/` (and
    the model's own `vars/`) exactly the config's parameter count, the optimizer's at most
    OPTIMIZER_SLOTS per parameter. Returns the total number of values declared."""
    import h5py

    where = _WEIGHTS_MEMBER
    try:
        handle = h5py.File(fileobj, "r")
    except Exception as exc:  # h5py raises OSError and others for a non-HDF5 file
        raise PayloadError(source, f"{where} is not an HDF5 file ({type(exc).__name__})") from None
    totals = {"model": 0, "optimizer": 0}
    problems: list[str] = []
    count = [0]

    def visit(name: str, link) -> Any:
        count[0] += 1
        if count[0] > MAX_H5_LINKS:
            problems.append(f"more than {MAX_H5_LINKS} objects")
            return True
        if not isinstance(link, h5py.HardLink):
            problems.append(f"{name!r} is a {type(link).__name__} (only plain groups and datasets)")
            return True
        obj = handle[name]
        reason = _h5_object(obj, h5py)
        if reason:
            problems.append(f"{name!r} {reason}")
            return True
        if isinstance(obj, h5py.Dataset):
            top = name.split("/", 1)[0]
            if top not in ("layers", "vars", "optimizer"):
                problems.append(f"{name!r} is outside layers/, vars/ and optimizer/")
                return True
            totals["optimizer" if top == "optimizer" else "model"] += math.prod(obj.shape)
        return None

    try:
        with handle:
            reason = _h5_attributes(handle)
            if reason:
                raise ModelRefused(source, f"{where}: root {reason}")
            handle.visititems_links(visit)
    except ModelRefused:
        raise
    except Exception as exc:
        raise PayloadError(source, f"{where}: cannot walk it ({type(exc).__name__}: {str(exc)[:200]})") from None
    if problems:
        raise ModelRefused(source, f"{where}: {problems[0]}")
    if totals["model"] != params:
        raise ModelRefused(source, f"{where} declares {totals['model']} layer values, the config implies "
                                   f"{params} parameters")
    if totals["optimizer"] > OPTIMIZER_SLOTS * params + 1024:
        raise ModelRefused(source, f"{where} declares {totals['optimizer']} optimizer values for {params} "
                                   f"parameters")
    return totals["model"] + totals["optimizer"]


def _h5_object(obj, h5py) -> str | None:
    """Why this group or dataset is refused, or None."""
    reason = _h5_attributes(obj)
    if reason or not isinstance(obj, h5py.Dataset):
        return reason
    if obj.is_virtual:
        return "is a virtual dataset"
    if obj.external:
        return "stores its data in external files"
    dtype = obj.dtype
    if dtype.kind not in "biuf" or dtype.itemsize > 8 or dtype.subdtype is not None:
        return f"has dtype {dtype}, not a plain number type"
    if obj.shape is None or len(obj.shape) > MAX_RANK:
        return "has no shape or too many dimensions"
    if obj.maxshape != obj.shape:  # reading a value inflates a whole chunk: it may not outsize the data
        return f"is resizable (maxshape {obj.maxshape}, shape {obj.shape})"
    if obj.chunks is not None and any(c > max(d, 1) for c, d in zip(obj.chunks, obj.shape)):
        return f"has chunks {obj.chunks} larger than its shape {obj.shape}"
    plist = obj.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in H5_FILTERS:
            return f"uses HDF5 filter {code}, not one of {sorted(H5_FILTERS.values())}"
    return None


def _h5_attributes(obj) -> str | None:
    attrs = obj.attrs
    if len(attrs) > MAX_H5_ATTRIBUTES:
        return f"has {len(attrs)} attributes"
    for name in attrs:
        if attrs.get_id(name).get_storage_size() > MAX_H5_ATTRIBUTE_BYTES:
            return f"has an attribute of more than {MAX_H5_ATTRIBUTE_BYTES} bytes"
    return None




# -- command line ---------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The worker's and miner's options for what models they agree to build."""
    group = parser.add_argument_group("model vetting", "what a job's model may contain (docs/models.md)")
    group.add_argument("--max-params", type=int, default=None, metavar="N",
                       help=f"refuse models with more than N parameters (default {DEFAULT_MAX_PARAMS})")
    group.add_argument("--model-vocabulary", default=None, metavar="FILE",
                       help="a JSON allow-list of extra Keras building blocks to accept, e.g. "
                            '{"layers": ["GRU"], "activations": ["log_softmax"]}')


def policy_from_args(args) -> Policy:
    """The policy `add_arguments`' options ask for; ValueError (one line) on a bad file or value."""
    return load_policy(args.model_vocabulary, max_params=args.max_params)


__all__ = ["DEFAULT_MAX_ACTIVATION", "DEFAULT_MAX_PARAMS", "DEFAULT_POLICY", "LAYERS", "ModelRefused", "Policy",
           "Report", "add_arguments", "load_policy", "policy_from_args", "vet_model"]
