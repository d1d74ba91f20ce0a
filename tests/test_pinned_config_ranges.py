"""Range checks of every bounded configuration key, at each bound (issue 13, class 6).

Each numeric key of funcgrad.config is found from the dataclass fields' metadata (its check), so a key added
later is covered without editing this file: its error message's stated range is tested at the bound itself,
just inside and just outside, through both ``from_dict`` and ``apply_overrides`` (``--set``). The ranges the
keys must have are also listed here explicitly, and a numeric key missing from that list fails, so a new key's
range is decided by a person, not inherited from whatever the code says.
"""

import dataclasses
import math
import re

import numpy as np
import pytest

from funcgrad import config, nn, optim
from funcgrad.config import ConfigError

INF = math.inf
# (kind, low, low_open, high): accepted values are low <= v (low < v when low_open) and v < high.
EXPECTED = {
    "seed": ("int", 0, False, 2**32),
    "data.samples": ("int", 1, False, INF),
    "data.classes": ("int", 2, False, INF),
    "data.validation_samples": ("int", 1, False, INF),
    "model.dropout": ("float", 0.0, False, 1.0),
    "model.init_scale": ("float", 0.0, True, 1e3),  # weights of 1e308·N(0, 1) overflow float32
    "optimizer.learning_rate": ("float", 0.0, True, INF),
    "optimizer.decay": ("float", 0.0, False, INF),
    "optimizer.momentum": ("float", 0.0, False, 1.0),
    "optimizer.rho": ("float", 0.0, False, 1.0),
    "optimizer.beta1": ("float", 0.0, False, 1.0),
    "optimizer.beta2": ("float", 0.0, False, 1.0),
    "optimizer.eps": ("float", 0.0, True, INF),
    "train.epochs": ("int", 1, False, INF),
    "train.batch_size": ("int", 1, False, INF),  # and 0, which means full batch
    "train.fuse": ("int", 1, False, INF),
    "train.log_every": ("int", 1, False, INF),
    "train.checkpoint_every": ("int", 1, False, INF),
    "train.eval_every": ("int", 1, False, INF),
    "checkpoint.max_to_keep": ("int", 1, False, INF),
}


def numeric_keys():
    """Every key whose check takes numbers, from the fields' metadata, with the range its message states."""
    out = {}
    sections = [("", config.Config)] + [(name, cls) for name, cls in config._SECTIONS.items()]
    for prefix, cls in sections:
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check is None:
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            try:
                check(key, "not a number")
            except ConfigError as e:
                msg = str(e)
            else:
                continue
            m = re.search(r"expected an integer(?: >= (-?\d+))?(?: and < (\d+))?", msg)
            if m:
                out[key] = ("int", int(m[1]) if m[1] else -INF, False, int(m[2]) if m[2] else INF)
                continue
            m = re.search(r"expected a finite number (>=|>) ([-\d.e+]+)(?: and < ([-\d.e+]+))?", msg)
            if m:
                out[key] = ("float", float(m[2]), m[1] == ">", float(m[3]) if m[3] else INF)
    return out


def test_every_numeric_key_has_its_expected_range():
    found = numeric_keys()
    assert set(found) == set(EXPECTED), (
        f"numeric config keys changed: new {sorted(set(found) - set(EXPECTED))}, "
        f"gone {sorted(set(EXPECTED) - set(found))}; add the expected range of each to EXPECTED")
    for key, spec in EXPECTED.items():
        assert found[key] == spec, (key, found[key], spec)


def raw_for(key, value):
    """Raw config data setting ``key`` to ``value``, with whatever else it needs to be valid."""
    section, _, name = key.rpartition(".")
    if not section:
        return {name: value}
    raw = {section: {name: value}}
    if section == "optimizer":
        kind = next(k for k, names in config.OPTIMIZER_KEYS.items() if name in names)
        raw[section]["kind"] = kind
    if key == "data.classes" and isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        raw["model"] = {"sizes": [4, value]}
    return raw


def get(cfg, key):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def boundary_values(spec):
    """(value, accepted) at and around each bound of a range."""
    kind, low, low_open, high = spec
    cases = []
    if kind == "int":
        if low > -INF:
            cases += [(low - 1, False), (low, True), (low + 1, True)]
        if high < INF:
            cases += [(high - 1, True), (high, False), (high + 1, False)]
        cases += [(float(low + 1), False), (True, False)]  # a float or a bool is not an integer
        return cases
    tiny = 5e-324  # the smallest positive float: just inside or just outside a bound at 0
    assert low == 0.0
    cases += [(0.0, not low_open), (-tiny, False), (tiny, True), (-1.0, False)]
    if high < INF:
        cases += [(float(np.nextafter(high, 0)), True), (high, False), (float(np.nextafter(high, 2 * high)), False)]
    else:
        cases += [(1e300, True)]
    cases += [(INF, False), (math.nan, False), (True, False), ("0.5", False)]
    return cases


CASES = [(key, value, ok) for key, spec in EXPECTED.items() for value, ok in boundary_values(spec)]
# 0 is train.batch_size's way of saying "full batch": accepted, as None
CASES = [(k, v, True if (k, v) == ("train.batch_size", 0) else ok) for k, v, ok in CASES]


@pytest.mark.parametrize("key,value,ok", CASES, ids=[f"{k}={v!r}" for k, v, _ in CASES])
def test_bounds_through_from_dict(key, value, ok):
    if ok:
        cfg = config.from_dict(raw_for(key, value))
        got = get(cfg, key)
        if (key, value) == ("train.batch_size", 0):
            assert got is None
        else:
            assert got == value and type(got) is type(value)
    else:
        with pytest.raises(ConfigError, match=re.escape(key)) as err:
            config.from_dict(raw_for(key, value))
        assert "expected" in str(err.value)


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


OVERRIDE_CASES = [(k, v, ok) for k, v, ok in CASES if not isinstance(v, (bool, str))]


@pytest.mark.parametrize("key,value,ok", OVERRIDE_CASES, ids=[f"{k}={v!r}" for k, v, _ in OVERRIDE_CASES])
def test_bounds_through_overrides(key, value, ok):
    base = raw_for(key, value)
    section, _, name = key.rpartition(".")
    if section:
        del base[section][name]  # set by the override instead
    raw = config.apply_overrides(base, [f"{key}={_toml(value)}"])
    if ok:
        got = get(config.from_dict(raw), key)
        assert got == value or ((key, value) == ("train.batch_size", 0) and got is None)
    else:
        with pytest.raises(ConfigError, match=re.escape(key)):
            config.from_dict(raw)


@pytest.mark.parametrize("key", sorted(numeric_keys()))
def test_every_discovered_key_enforces_the_range_its_message_states(key):
    """For keys added after this file: whatever range a key's message states is the one it enforces."""
    spec = numeric_keys()[key]
    for value, ok in boundary_values(spec):
        if (key, value) == ("train.batch_size", 0):
            continue
        if ok:
            config.from_dict(raw_for(key, value))
        else:
            with pytest.raises(ConfigError, match=re.escape(key)):
                config.from_dict(raw_for(key, value))


def test_the_listed_bounds_explicitly():
    """The boundary behaviour issue 13 lists, spelled out."""
    def rejects(key, value):
        with pytest.raises(ConfigError, match=re.escape(key)):
            config.from_dict(raw_for(key, value))

    rejects("model.dropout", 1.0)
    assert config.from_dict(raw_for("model.dropout", 0.0)).model.dropout == 0.0
    for key in ("optimizer.momentum", "optimizer.rho", "optimizer.beta1", "optimizer.beta2"):
        rejects(key, 1.0)
        rejects(key, 1)
        assert get(config.from_dict(raw_for(key, 0.0)), key) == 0.0
        assert get(config.from_dict(raw_for(key, 0.999999)), key) == 0.999999
    for key in ("optimizer.learning_rate", "optimizer.eps", "model.init_scale"):
        rejects(key, 0.0)
        rejects(key, 0)
        assert get(config.from_dict(raw_for(key, 1e-12)), key) == 1e-12
    assert config.from_dict(raw_for("optimizer.decay", 0.0)).optimizer.decay == 0.0
    rejects("optimizer.decay", -1e-12)
    for key in ("train.epochs", "train.fuse", "train.log_every", "train.checkpoint_every", "train.eval_every",
                "checkpoint.max_to_keep", "data.samples"):
        rejects(key, 0)
        assert get(config.from_dict(raw_for(key, 1)), key) == 1
    rejects("data.classes", 1)
    rejects("seed", -1)
    rejects("seed", 2**32)
    assert config.from_dict(raw_for("seed", 2**32 - 1)).seed == 2**32 - 1
    assert config.from_dict(raw_for("train.batch_size", 0)).train.batch_size is None
    rejects("train.batch_size", -1)


# ---- the same ranges where the objects are built directly ----


@pytest.mark.parametrize("build,bad,good", [
    (lambda v: optim.sgd(0.1, momentum=v), [1.0, 1, 1.5, -1e-12], [0.0, 0.999]),
    (lambda v: optim.rmsprop(0.1, rho=v), [1.0, -1e-12], [0.0, 0.999]),
    (lambda v: optim.adam(0.1, beta1=v), [1.0, -1e-12], [0.0, 0.999]),
    (lambda v: optim.adam(0.1, beta2=v), [1.0, -1e-12], [0.0, 0.999]),
    (optim.adam, [0.0, -1.0], [1e-12]),
    (optim.sgd, [0.0], [1e-12]),
    (lambda v: optim.adagrad(0.1, eps=v), [0.0, -1e-12], [1e-12]),
    (lambda v: optim.rmsprop(0.1, eps=v), [0.0], [1e-12]),
    (lambda v: optim.adam(0.1, eps=v), [0.0], [1e-12]),
    (lambda v: optim.adam(0.1, decay=v), [-1e-12], [0.0, 1.0]),
    (nn.dropout, [1.0, -1e-12], [0.0, 0.999]),
    (nn.leaky_relu, [1.0, -1e-12], [0.0, 0.999]),
], ids=["momentum", "rho", "beta1", "beta2", "adam_lr", "sgd_lr", "adagrad_eps", "rmsprop_eps", "adam_eps", "decay",
        "dropout", "leaky_alpha"])
def test_direct_constructors_enforce_the_same_ranges(build, bad, good):
    for v in bad:
        with pytest.raises(ValueError):
            build(v)
    for v in good:
        build(v)
