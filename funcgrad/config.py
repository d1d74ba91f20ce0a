"""Training configurations: TOML files loaded into frozen, validated dataclasses, and built into a run.

Every key is checked: an unknown key, a value of the wrong type or outside its range is an error that names
the key, the bad value and what is allowed. ``overrides`` (``"optimizer.learning_rate=0.02"``) apply on top
of a file, as ``funcgrad train --set`` does.

Example:
    >>> from funcgrad import config
    >>> cfg = config.loads('''
    ... name = "demo"
    ... [optimizer]
    ... kind = "adam"
    ... learning_rate = 0.05
    ... ''', overrides=["train.epochs=200"])
    >>> cfg.optimizer.learning_rate, cfg.train.epochs
    (0.05, 200)
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from funcgrad import initializers, nn, optim
from funcgrad._checks import in_range, is_strength
from funcgrad._io import FileError, read_regular
from funcgrad.objective import LOSS_RULES

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimizerConfig",
    "TrainConfig",
    "CheckpointConfig",
    "ParallelConfig",
    "load",
    "loads",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "MemoryEstimate",
    "memory_estimate",
    "packaged",
    "locate",
    "Setup",  # noqa: F822 - from funcgrad.experiment, through the module's __getattr__
    "build",  # noqa: F822
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# ----------------------------------------------------------------------------------------------------------
# Field checks: each returns the normalised value or raises ConfigError naming the key.


def _int(low: int | None = None, *, high: int | None = None, none_ok: bool = False) -> Callable[[str, Any], Any]:
    def check(key, v):
        if v is None and none_ok:
            return None
        if (isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low)
                or (high is not None and v >= high)):
            bounds = (f" >= {low}" if low is not None else "") + (f" and < {high}" if high is not None else "")
            raise ConfigError(f"{key}: expected an integer{bounds}, got {v!r}")
        return v

    return check


def _float(low: float = 0.0, high: float | None = None, *, low_open: bool = False) -> Callable[[str, Any], Any]:
    def check(key, v):
        expected = in_range(v, low, high, low_open=low_open)
        if expected:
            raise ConfigError(f"{key}: expected {expected}, got {v!r}")
        return float(v)

    return check


def _path(key, v):
    if not isinstance(v, str) or not v.strip() or "\0" in v:
        raise ConfigError(f"{key}: expected a folder path (a non-empty string), got {v!r}")
    return v


def _bool(key, v):
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _choice(*allowed: str) -> Callable[[str, Any], Any]:
    def check(key, v):
        if v not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {v!r}")
        return v

    return check


def _name(key, v):
    if not isinstance(v, str) or not v or any(c in v for c in "/\\\0") or v in (".", ".."):
        raise ConfigError(f"{key}: expected a non-empty name without slashes, got {v!r}")
    return v


def _sizes(key, v):
    if not isinstance(v, (list, tuple)) or not v or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in v):
        raise ConfigError(f"{key}: expected a non-empty list of positive integers (layer widths), got {v!r}")
    return tuple(v)


def _penalties(key, v):
    if not isinstance(v, Mapping):
        raise ConfigError(f"{key}: expected a table of leaf patterns to strengths, e.g. {{\"dense1/*\" = 5e-4}}, got {v!r}")
    out = {}
    for pattern, lam in v.items():
        if not is_strength(lam):
            raise ConfigError(f"{key}.{pattern}: expected a finite number >= 0, got {lam!r}")
        out[pattern] = float(lam)
    return out


def _field(default: Any, check: Callable[[str, Any], Any], doc: str) -> Any:
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"check": check, "doc": doc})
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


# The choices of each key come from the module that owns them; the config only restricts where it must.
_NORMALISING = ("softmax", "log_softmax")  # over a whole row: an output, never a hidden activation
ACTIVATIONS = tuple(k for k in nn.ACTIVATIONS if k not in _NORMALISING)
OUTPUTS = ("softmax", "sigmoid", "linear", "log_softmax", "none")  # those a loss can take; "none": logits
LOSSES = tuple(LOSS_RULES)
INITS = tuple(initializers.INITIALIZERS)
OPTIMIZER_KEYS = optim.HYPERPARAMETERS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = _field("spiral", _choice("spiral", "vertical", "sine", "fashion_mnist"), "the book's data set")
    samples: int = _field(100, _int(1), "points per class (spiral, vertical) or in all (sine); fashion_mnist: unused")
    classes: int = _field(3, _int(2), "classes (spiral, vertical; fashion_mnist: 10)")
    path: str = _field("fashion_mnist_images", _path, "fashion_mnist: the folder of its files (IDX or the book's "
                       "PNG folders; relative to the working folder), read and never downloaded; an error for a "
                       "kind that is drawn, not read")
    exact: bool = _field(False, _bool, "draw data and weights from the nnfs package's NumPy stream, as the book")
    validation_samples: int | None = _field(None, _int(1, none_ok=True), "fresh validation data (default: samples)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    sizes: tuple[int, ...] = _field((64, 3), _sizes, "width of each dense layer; the last is the output")
    activation: str = _field("relu", _choice(*ACTIVATIONS), "hidden activation")
    output: str = _field("softmax", _choice(*OUTPUTS), "output activation")
    dropout: float = _field(0.0, _float(0.0, 1.0), "dropout rate after each hidden activation")
    init: str = _field("book", _choice(*INITS), "weight initialiser")
    init_scale: float = _field(0.01, _float(0.0, 1e3, low_open=True), "scale of the book's initialiser, "
                               "scale·N(0, 1) (the book: 0.01); below 1000, so float32 weights and activations stay "
                               "finite")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = _field("categorical_crossentropy", _choice(*LOSSES), "data loss")
    l1: dict = _field({}, _penalties, "L1 strengths by leaf pattern")
    l2: dict = _field({}, _penalties, "L2 strengths by leaf pattern")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    kind: str = _field("adam", _choice(*OPTIMIZER_KEYS), "the book's optimizer")
    learning_rate: float = _field(0.001, _float(0.0, low_open=True), "initial learning rate")
    decay: float = _field(0.0, _float(0.0), "inverse-time decay: lr / (1 + decay·t)")
    momentum: float = _field(0.0, _float(0.0, 1.0), "SGD momentum (the book's form)")
    rho: float = _field(0.9, _float(0.0, 1.0), "RMSprop cache decay")
    beta1: float = _field(0.9, _float(0.0, 1.0), "Adam first-moment decay")
    beta2: float = _field(0.999, _float(0.0, 1.0), "Adam second-moment decay")
    eps: float = _field(1e-7, _float(0.0, low_open=True), "the book's epsilon")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = _field(10001, _int(1), "passes over the training data (full batch: optimizer steps)")
    batch_size: int | None = _field(None, _int(1, none_ok=True), "minibatch size; absent or 0 for full batch")
    fuse: int = _field(1000, _int(1), "steps fused into one compiled dispatch (lax.scan)")
    log_every: int = _field(100, _int(1), "steps between lines of metrics.jsonl")
    checkpoint_every: int = _field(1000, _int(1), "steps between checkpoints (rounded up to a multiple of fuse)")
    eval_every: int = _field(1000, _int(1), "steps between validation rows of metrics.jsonl (rounded up to a "
                             "multiple of fuse); the last step is always evaluated")
    verify: bool = _field(True, _bool, "cross-check the hand-derived gradient against JAX before training")
    tensorboard: bool = _field(False, _bool, "also write TensorBoard scalars to <run>/tensorboard (needs "
                               "tensorboardX: pip install 'funcgrad[tensorboard]')")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    backend: str = _field("npz", _choice("npz", "orbax"), "npz: one checkpoint.npz, written by process 0; orbax: "
                          "<run>/orbax/<step>/, sharded, asynchronous, every process writes its part (needs "
                          "pip install 'funcgrad[orbax]')")
    max_to_keep: int = _field(3, _int(1), "orbax: the latest checkpoints kept (npz keeps the latest only)")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    mode: str = _field("auto", _choice("auto", "none", "data"), "data parallelism over the visible devices")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = _field("run", _name, "the run's name (default output folder runs/<name>)")
    seed: int = _field(0, _int(0, high=2**32), "seed of data, weights and dropout")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optimizer": OptimizerConfig,
             "train": TrainConfig, "checkpoint": CheckpointConfig, "parallel": ParallelConfig}


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else key
        if key in _SECTIONS and not prefix:
            values[key] = _build_section(_SECTIONS[key], value, key)
            continue
        if key not in fields or (prefix and key in _SECTIONS):
            allowed = sorted(fields)
            raise ConfigError(f"{path}: unknown key; allowed keys{' in [' + prefix + ']' if prefix else ''}: {allowed}")
        values[key] = fields[key].metadata["check"](path, value)
    return cls(**values)


def from_dict(raw: Mapping[str, Any]) -> Config:
    """A validated Config from plain data (e.g. parsed TOML); cross-field rules checked too."""
    raw = dict(raw)
    train = raw.get("train")
    if isinstance(train, Mapping) and train.get("batch_size") == 0:
        raw["train"] = {**train, "batch_size": None}  # 0 means full batch
    cfg = _build_section(Config, raw, "")
    _cross_checks(cfg, raw)
    return cfg


def _file_data_checks(d: DataConfig, raw: Mapping[str, Any]) -> None:
    data_raw = raw.get("data", {}) if isinstance(raw.get("data", {}), Mapping) else {}
    if "path" in data_raw and d.kind not in FILE_DATA:
        raise ConfigError(f"data.path: not a setting of data.kind {d.kind!r}, whose data is drawn, not read from files; "
                          f"only data.kind {', '.join(map(repr, FILE_DATA))} reads a path")
    if d.kind == "fashion_mnist":
        if d.classes != 10:
            raise ConfigError(f"data.classes: Fashion-MNIST has 10 classes; got {d.classes}")
        if d.exact:
            raise ConfigError("data.exact: fashion_mnist is read from files, not drawn from the nnfs stream; set it false")


def _cross_checks(cfg: Config, raw: Mapping[str, Any]) -> None:
    opt_raw = raw.get("optimizer", {}) if isinstance(raw.get("optimizer", {}), Mapping) else {}
    allowed = OPTIMIZER_KEYS[cfg.optimizer.kind]
    for key in opt_raw:
        if key != "kind" and key not in allowed:
            raise ConfigError(f"optimizer.{key}: not a setting of {cfg.optimizer.kind!r}; its settings are {list(allowed)}")
    loss, out, m = cfg.loss.kind, cfg.model.output, cfg.model
    needs = {"categorical_crossentropy": ("softmax",), "binary_crossentropy": ("sigmoid",),
             "categorical_crossentropy_with_logits": ("none", "linear")}
    if loss in needs and out not in needs[loss]:
        raise ConfigError(f"model.output: loss {loss!r} takes {'logits' if 'none' in needs[loss] else 'probabilities'}; "
                          f"expected model.output in {list(needs[loss])}, got {out!r}")
    classification = cfg.data.kind in CLASSIFICATION
    _file_data_checks(cfg.data, raw)
    if loss in ("categorical_crossentropy", "categorical_crossentropy_with_logits"):
        if not classification:
            raise ConfigError(f"loss.kind: {loss!r} needs class labels; data.kind {cfg.data.kind!r} is regression")
        if m.sizes[-1] != cfg.data.classes:
            raise ConfigError(f"model.sizes: the last layer must have data.classes = {cfg.data.classes} units; "
                              f"got {list(m.sizes)}")
    if loss == "binary_crossentropy" and (not classification or cfg.data.classes != 2 or m.sizes[-1] != 1):
        raise ConfigError("loss.kind: 'binary_crossentropy' needs data.classes = 2 and one output unit "
                          f"(model.sizes ending in 1); got classes {cfg.data.classes}, sizes {list(m.sizes)}")
    if loss in ("mse", "mae") and cfg.data.kind != "sine":
        raise ConfigError(f"loss.kind: {loss!r} is a regression loss; data.kind must be 'sine', got {cfg.data.kind!r}")
    if cfg.data.kind == "sine" and m.sizes[-1] != 1:
        raise ConfigError(f"model.sizes: sine data has one target; the last layer must have 1 unit, got {list(m.sizes)}")
    if cfg.data.exact and m.init != "book":
        raise ConfigError("data.exact: drawing weights the book's way needs model.init = 'book'")
    if cfg.data.kind in FILE_DATA:  # sizes known once the files are read (funcgrad.experiment.build checks them)
        return
    n = cfg.data.samples * (cfg.data.classes if classification else 1)
    if cfg.train.batch_size is not None and cfg.train.batch_size > n:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is more than the {n} training samples")
    steps = cfg.train.epochs * (1 if cfg.train.batch_size is None else n // cfg.train.batch_size)
    if steps >= 2**31:
        raise ConfigError(f"train.epochs: {cfg.train.epochs} epochs make {steps} steps; at most {2**31 - 1} are counted")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string
    except ValueError as e:  # an integer of more digits than Python converts
        raise ConfigError(f"--set value {text[:40]}...: {e}") from None
    except RecursionError:
        raise ConfigError(f"--set value {text[:40]}...: nested too deeply to be a setting") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``"section.key=value"`` settings applied to raw config data; values are TOML (bare words are strings)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optimizer.learning_rate=0.02")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: bad key {key!r}")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a table")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(text.strip())
    return out


def loads(text: str, *, name: str | None = None, overrides: Sequence[str] = (), source: str = "<string>") -> Config:
    """A Config from TOML text."""
    try:
        # A byte-order mark (some Windows editors write one) is not part of the TOML.
        raw = tomllib.loads(text[1:] if text[:1] == "\ufeff" else text)
    except ValueError as e:  # TOMLDecodeError, or an integer of more digits than Python converts
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    if name is not None:
        raw.setdefault("name", name)
    raw_keys = set(raw)  # (the file's own sections)
    raw = apply_overrides(raw, overrides)
    try:
        return from_dict(raw)
    except ConfigError as e:
        msg = str(e)
        # (a value a --set gave is that argument's mistake, not the file's)
        # (an unknown section, "nonexistent: unknown key", is that of --set nonexistent.key=1)
        where = msg.split(":", 1)[0]
        given = [item for item in overrides if (key := item.split("=", 1)[0].strip()) == where
                 or key.startswith(where + ".") and where not in raw_keys]
        raise ConfigError(f"--set {given[-1]}: {msg}" if given else f"{source}: {msg}") from None


MAX_CONFIG_BYTES = 1024 * 1024


def packaged() -> list[str]:
    """The names of the configs that ship with funcgrad (the repository's ``configs/``, installed as the
    package ``funcgrad.configs``): ``["binary", "sine", "spiral", ...]``."""
    try:
        root = resources.files("funcgrad.configs")
    except ModuleNotFoundError:
        return []
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def locate(spec: str | Path) -> Path:
    """The config file ``spec`` names: a path as given, or the name of a packaged config (``"spiral"``)."""
    path = Path(spec)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    if str(spec) in packaged():
        return Path(str(resources.files("funcgrad.configs") / f"{spec}.toml"))
    raise ConfigError(f"config {spec}: no such file, nor a config that ships with funcgrad ({', '.join(packaged())})")


def load(path: str | Path, *, overrides: Sequence[str] = ()) -> Config:
    """A Config from a TOML file; the run's name defaults to the file's stem."""
    path = Path(path)
    try:
        data = read_regular(path, MAX_CONFIG_BYTES)  # never a FIFO (no hang) or a device, never unbounded
    except FileError as e:
        raise ConfigError(f"cannot read config {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path}: not a text file (byte {e.start} is not UTF-8); a TOML config is expected") from None
    return loads(text, name=path.stem, overrides=overrides, source=str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (JSON- and TOML-able): the resolved configuration."""
    out = dataclasses.asdict(cfg)
    out["model"]["sizes"] = list(cfg.model.sizes)
    keep = ("kind",) + OPTIMIZER_KEYS[cfg.optimizer.kind]
    out["optimizer"] = {k: v for k, v in out["optimizer"].items() if k in keep}
    if out["train"]["batch_size"] is None:
        del out["train"]["batch_size"]  # TOML has no null: absent means full batch
    if out["data"]["validation_samples"] is None:
        del out["data"]["validation_samples"]
    if cfg.data.kind not in FILE_DATA:
        del out["data"]["path"]  # read by no other kind, and refused for them
    return out


# ----------------------------------------------------------------------------------------------------------
# Memory a run needs, estimated from the configuration alone (before anything is allocated)

OPTIMIZER_SLOTS = {"sgd": 1, "adagrad": 1, "rmsprop": 1, "adam": 2}  # parameter-sized buffers of its state
CLASSIFICATION = ("spiral", "vertical", "fashion_mnist")  # data sets of class labels (the others: regression)
INPUT_SIZE = {"sine": 1, "fashion_mnist": 784}  # features per sample (spiral, vertical: 2)
FILE_DATA = {"fashion_mnist": (60000, 10000)}  # data read from files: (training, validation) samples in full
PLOT_POINTS = 300  # the decision-boundary plot predicts one grid row of 300 points at a time


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run of a config needs at its peak, by part; :attr:`total` is what is compared with the memory
    available. An upper estimate in float32 (the float64 gradient check counts double)."""

    parameters: int  # parameter count
    state: int  # params, gradient, update and optimizer slots, with one host copy for a checkpoint
    activations: int  # forward values and their gradients for one (mini)batch, or the plot grid
    data: int  # training and validation arrays
    check: int  # the float64 gradient check at the initial parameters

    @property
    def total(self) -> int:
        return self.state + self.activations + self.data + self.check

    def on(self, devices: int, *, shared: bool) -> int:
        """The peak over ``devices`` data-parallel devices: each holds the state and its share of the batch
        and data; ``shared`` memory (CPU devices of one host) holds them all, else the figure is per device."""
        if devices <= 1:
            return self.total
        if shared:
            return self.state * devices + self.activations + self.data + self.check
        return self.state + -(-self.activations // devices) + -(-self.data // devices) + self.check

    def describe(self) -> str:
        return (f"{_gb(self.total)} ({self.parameters} parameters: {_gb(self.state)} for them, their gradient and "
                f"optimizer state; activations {_gb(self.activations)}; data {_gb(self.data)}"
                + (f"; gradient check {_gb(self.check)}" if self.check else "") + ")")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def memory_estimate(cfg: Config) -> MemoryEstimate:
    """The memory a run of ``cfg`` needs, from layer widths, sample counts and the optimizer (see
    :class:`MemoryEstimate`): lets ``funcgrad train`` refuse a model that cannot fit, naming both numbers,
    before it allocates a byte of it."""
    d, m = cfg.data, cfg.model
    classification = d.kind in CLASSIFICATION
    n_in = INPUT_SIZE.get(d.kind, 2)
    widths = (n_in, *m.sizes)
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    units = sum(m.sizes)
    if d.kind in FILE_DATA:  # the full data set's sizes (a smaller copy needs less)
        n, n_val = FILE_DATA[d.kind]
    else:
        n = d.samples * (d.classes if classification else 1)
        n_val = (d.validation_samples or d.samples) * (d.classes if classification else 1)
    batch = cfg.train.batch_size or n
    f32 = 4
    slots = OPTIMIZER_SLOTS[cfg.optimizer.kind]
    # On the device: params, gradient, update, new params and the optimizer's slots (old and new); on the host:
    # one gathered copy of params and slots, and its bytes for the checkpoint file.
    state = params * f32 * ((4 + 2 * slots) + 2 * (1 + slots))
    # Forward values, pre-activations and their gradients (and a dropout mask) per sample and unit.
    per_sample = units * f32 * (4 + (1 if m.dropout else 0))
    activations = max(batch * per_sample, max(n, n_val) * units * f32 * 2,
                      PLOT_POINTS * units * f32 * 2 if classification and n_in == 2 else 0)
    data = (n + n_val) * (n_in + 1) * f32 * 2
    check = 2 * (params * 8 * 6 + n * units * 8 * 4) if cfg.train.verify else 0
    return MemoryEstimate(params, state, activations, data, check)


def __getattr__(name: str) -> Any:
    """``config.build`` and ``config.Setup`` moved to :mod:`funcgrad.experiment`; still importable here."""
    if name in ("build", "Setup"):
        from funcgrad import experiment  # noqa: PLC0415 - experiment imports this module

        return getattr(experiment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
