"""What a checkpoint can hold (leaves that are not arrays name their path), load_flat, and orbax kept optional."""

import io
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from funcgrad import checkpoint
from funcgrad.checkpoint import CheckpointError


def _not_storable(tree, *parts):
    with pytest.raises(CheckpointError) as info:
        checkpoint.to_bytes(tree)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    return str(info.value)


def test_a_leaf_that_is_not_an_array_names_its_path_and_type():
    message = _not_storable({"a": {"b": "text"}}, "['a']['b']", "str")
    assert "arrays of numbers" in message and "PRNG keys" in message
    _not_storable({"fn": [len]}, "['fn'][0]", "builtin_function_or_method")
    _not_storable({"x": object()}, "['x']", "object")

    class Opaque(dict):  # a dict subclass JAX does not know: a leaf, not a node
        pass

    _not_storable({"o": Opaque(a=1)}, "['o']", "Opaque")
    _not_storable({"big": 2**70}, "['big']", "too large")


def test_object_and_string_arrays_are_refused():
    _not_storable({"w": np.array([{"evil": 1}], dtype=object)}, "['w']", "dtype object")
    _not_storable({"names": np.array(["a", "b"])}, "['names']", "<U1")
    _not_storable({"when": np.datetime64("2024-01-01")}, "['when']", "datetime64")


def test_the_template_is_checked_the_same_way():
    data = checkpoint.to_bytes({"a": jnp.ones(2)})
    with pytest.raises(CheckpointError, match=r"template leaf \['a'\] is a str"):
        checkpoint.from_bytes(data, like={"a": "ones"})
    with pytest.raises(CheckpointError, match=r"template leaf \['a'\] is a NumPy array of dtype object"):
        checkpoint.size_bound({"a": np.array([None])})


def test_numbers_are_stored_as_jax_holds_them_and_round_trip():
    tree = {"i": 3, "f": 0.5, "b": True, "n64": np.float64(2.5), "i64": np.arange(3), "c": 1 + 2j}
    back = checkpoint.from_bytes(checkpoint.to_bytes(tree), like=tree)
    for name, value in tree.items():
        assert back[name].dtype == jnp.asarray(value).dtype, name
        np.testing.assert_array_equal(back[name], np.asarray(value))
    _not_storable({"i": np.array([2**40])}, "['i']", "int64 values that int32 cannot")


def test_a_float_that_narrowing_would_make_inf_or_zero_is_an_error_at_save_time():
    # Without x64, float64 is stored as float32 (rounded, as JAX holds it); 1e300 became inf and 1e-50 became 0
    # with no error (a NumPy RuntimeWarning at most), so a checkpoint silently changed the data.
    if jax.config.jax_enable_x64:
        pytest.skip("with x64 float64 is stored as it is")
    _not_storable({"x": np.array([1.0, 1e300])}, "['x']", "float64 values that float32 cannot",
                  "1e+300 at [1] would be stored as inf")
    _not_storable({"x": np.array([[0.1, 1e-50]])}, "['x']", "float32 cannot: 1e-50 at [0, 1] would be stored as 0.0")
    _not_storable({"z": np.array([1e300 + 0j])}, "['z']", "complex128 values that complex64 cannot")
    _not_storable({"z": np.array([1e-50 + 1j])}, "['z']", "complex128 values that complex64 cannot")  # a part lost
    tree = {"x": np.array([0.1, -2.5e38, 1e-40, 0.0, np.inf, np.nan])}  # rounded, subnormal, zero, inf and NaN: kept
    back = checkpoint.from_bytes(checkpoint.to_bytes(tree), like=tree)
    np.testing.assert_array_equal(back["x"], tree["x"].astype(np.float32))


def _tree():
    return {
        "params": {"W": jnp.arange(6.0).reshape(2, 3), "b": (jnp.arange(3) / 7).astype(jnp.bfloat16)},
        "opt": [jnp.int32(4), np.float32(0.5)],
        "key": jax.random.key(3),
    }


def test_load_flat_returns_the_leaves_by_path():
    tree = _tree()
    flat = checkpoint.load_flat(checkpoint.to_bytes(tree))
    paths, leaves = zip(*[(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]],
                        strict=True)
    assert list(flat) == list(paths)
    for (path, arr), leaf in zip(flat.items(), leaves, strict=True):
        assert isinstance(arr, np.ndarray), path
        want = np.asarray(jax.random.key_data(leaf) if path == "['key']" else leaf)
        assert arr.dtype == want.dtype and arr.shape == want.shape, path
        np.testing.assert_array_equal(arr, want)
    assert flat["['params']['b']"].dtype == jnp.bfloat16
    assert flat["['key']"].dtype == np.uint32
    key = jax.random.wrap_key_data(flat["['key']"])
    np.testing.assert_array_equal(jax.random.normal(key, (2,)), jax.random.normal(tree["key"], (2,)))
    assert checkpoint.load_flat(io.BytesIO(checkpoint.to_bytes(tree))).keys() == flat.keys()  # a file works too


def _rewrite(data, change):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return out.getvalue()


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_load_flat_of_a_damaged_file():
    data = checkpoint.to_bytes(_tree())
    with pytest.raises(CheckpointError, match="not a readable"):
        checkpoint.load_flat(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="the file is empty"):
        checkpoint.load_flat(b"")
    w, b = "leaf3.npy", "leaf4.npy"  # the members of ['params']['W'] and ['params']['b'] (dict keys in sorted order)
    assert list(checkpoint.load_flat(data))[3:] == ["['params']['W']", "['params']['b']"]
    cases = [
        (lambda m: m.pop(w), r"no array for \['params'\]\['W'\]"),
        (lambda m: m.update({w: _npy(np.zeros(5, np.float32))}), r"\['W'\] is float32\[5\]; its header says float32\[2, 3\]"),
        (lambda m: m.update({w: _npy(np.array([None] * 6, dtype=object).reshape(2, 3))}), "Object arrays cannot be loaded"),
        (lambda m: m.update({b: _npy(np.zeros(2, np.uint8))}), r"\['b'\] holds 2 bytes; bfloat16\[3\] needs 6"),
        (lambda m: m.update({w: b"\x93NUMPY garbage"}), r"\['W'\] cannot be read"),
    ]
    for change, message in cases:
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load_flat(_rewrite(data, change))


def test_check_finite_is_opt_in_for_npz():
    tree = {"w": jnp.array([1.0, jnp.nan, jnp.inf]), "h": jnp.array([jnp.nan], jnp.bfloat16), "n": jnp.arange(2)}
    data = checkpoint.to_bytes(tree)
    assert jnp.isnan(checkpoint.from_bytes(data, like=tree)["w"][1])  # off by default: restored as saved
    for read in (lambda: checkpoint.from_bytes(data, like=tree, check_finite=True),
                 lambda: checkpoint.load_flat(data, check_finite=True)):
        with pytest.raises(CheckpointError, match=r"\['h'\] has 1 of 1 values NaN or inf; \['w'\] has 2 of 3"):
            read()
    fine = {"w": jnp.ones(2), "key": jax.random.key(0)}
    checkpoint.from_bytes(checkpoint.to_bytes(fine), like=fine, check_finite=True)


def test_from_bytes_accepts_shape_dtype_structs_and_names_a_key_of_another_kind():
    tree = {"w": jnp.ones((2, 2)), "key": jax.random.key(0)}
    data = checkpoint.to_bytes(tree)
    back = checkpoint.from_bytes(data, like=jax.eval_shape(lambda: tree))
    assert back["w"].shape == (2, 2) and jax.random.key_impl(back["key"]) == jax.random.key_impl(tree["key"])
    other = {"w": jnp.ones((2, 2)), "key": jax.random.key(0, impl="rbg")}
    with pytest.raises(CheckpointError, match=r"\['key'\]: stored a threefry2x32 PRNG key .* expected a rbg PRNG key"):
        checkpoint.from_bytes(data, like=other)
    with pytest.raises(CheckpointError, match=r"\['key'\]: stored a threefry2x32 PRNG key .*, expected uint32\[2\]"):
        checkpoint.from_bytes(data, like={"w": jnp.ones((2, 2)), "key": jax.random.key_data(tree["key"])})


def test_importing_funcgrad_does_not_import_orbax():
    code = "import sys, funcgrad; assert not [m for m in sys.modules if m.startswith('orbax')], 'orbax imported'"
    run_python(["-c", code], timeout=120)


def test_orbax_missing_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # `import orbax.checkpoint` fails as if not installed
    monkeypatch.delitem(sys.modules, "funcgrad._orbax", raising=False)
    with pytest.raises(ImportError, match=r'pip install "funcgrad\[orbax\]"'):
        checkpoint.orbax_manager(tmp_path)


def test_a_header_naming_a_leaf_twice_is_damaged():
    import json

    data = checkpoint.to_bytes({"a": jnp.ones(2), "b": jnp.ones(2)})

    def twice(members):
        header = json.loads(np.load(io.BytesIO(members["__funcgrad__.npy"])).tobytes())
        header["leaves"][1]["path"] = header["leaves"][0]["path"]
        members["__funcgrad__.npy"] = _npy(np.frombuffer(json.dumps(header).encode(), np.uint8))

    with pytest.raises(CheckpointError, match=r"leaf \['a'\]: its path \"\['a'\]\" appears twice"):
        checkpoint.load_flat(_rewrite(data, twice))


def test_a_tree_jax_cannot_flatten_is_a_checkpoint_error():
    # A dict with keys 1 and "a" failed inside JAX ("Comparator raised exception while sorting pytree dictionary
    # keys"), not with funcgrad's error.
    _not_storable({1: jnp.ones(2), "a": jnp.ones(1)}, "the tree cannot be flattened as a pytree",
                  "must be sortable together")
    with pytest.raises(CheckpointError, match="the template cannot be flattened"):
        checkpoint.from_bytes(checkpoint.to_bytes({"a": jnp.ones(1)}), like={1: jnp.ones(1), "a": jnp.ones(1)})
