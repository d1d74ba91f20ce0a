import io
import json
import math
import os
import warnings
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcgrad as fg
from funcgrad import checkpoint


def state():
    model = fg.nn.mlp([4, 3], output="softmax")
    params = model.init(jax.random.key(0), (2,))
    tx = fg.optim.adam(0.1)
    return fg.train.init(params, tx, jax.random.key(7))


def test_round_trip_of_a_train_state_with_its_key():
    s = state()
    data = checkpoint.to_bytes(s, {"step": 3})
    back = checkpoint.from_bytes(data, like=state())
    assert checkpoint.metadata(data) == {"step": 3}
    chex.assert_trees_all_equal(back.params, s.params)
    chex.assert_trees_all_equal_dtypes(back.opt_state, s.opt_state)
    assert jnp.array_equal(jax.random.key_data(back.key), jax.random.key_data(s.key))
    assert back.step.dtype == jnp.int32
    np.testing.assert_array_equal(jax.random.normal(back.key, (3,)), jax.random.normal(s.key, (3,)))


@pytest.mark.parametrize("shape", [(4,), (2, 64), (2, 3, 4), ()])
def test_bfloat16_leaves(shape):
    # Bit for bit, in any number of dimensions (2-D and 3-D leaves could not be read back).
    tree = {"w": (jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape) / 3).astype(jnp.bfloat16),
            "h": jnp.full(shape, -0.0, jnp.float16)}
    data = checkpoint.to_bytes(tree)
    for back in (checkpoint.from_bytes(data, like=tree), checkpoint.load_flat(data)):
        w = back["w"] if "w" in back else back["['w']"]
        assert w.dtype == jnp.bfloat16 and w.shape == shape
        np.testing.assert_array_equal(np.asarray(w).view(np.uint16), np.asarray(tree["w"]).view(np.uint16))


def test_a_bfloat16_leaf_stored_with_its_leading_dimensions_is_read():
    # Files written before raw bytes were stored flat hold a bfloat16[2, 3] leaf as uint8[2, 6].
    w = (jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7).astype(jnp.bfloat16)
    header = {"format": checkpoint.FORMAT, "leaves": [{"path": "['w']", "name": "leaf0", "dtype": "bfloat16",
                                                       "shape": [2, 3]}], "meta": {}}
    buf = io.BytesIO()
    np.savez(buf, leaf0=np.asarray(w).view(np.uint8),
             **{checkpoint._META: np.frombuffer(json.dumps(header).encode(), np.uint8)})
    back = checkpoint.from_bytes(buf.getvalue(), like={"w": w})
    np.testing.assert_array_equal(np.asarray(back["w"]).view(np.uint16), np.asarray(w).view(np.uint16))


def test_a_64_bit_leaf_is_not_narrowed_where_64_bit_types_are_off():
    with jax.enable_x64(True):
        tree = {"w": jnp.array([1 / 3, 1e-300]), "count": jnp.array([2**40])}
        data = checkpoint.to_bytes(tree)
        back = checkpoint.from_bytes(data, like=tree)
        assert back["w"].dtype == jnp.float64 and back["count"].tolist() == [2**40]
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf \['count'\] is int64, .*64-bit types are off"):
        checkpoint.from_bytes(data, like=tree)
    assert checkpoint.load_flat(data)["['count']"].tolist() == [2**40]


def test_mismatches_name_the_leaf():
    data = checkpoint.to_bytes(state())
    other = fg.train.init(
        fg.nn.mlp([5, 3], output="softmax").init(jax.random.key(0), (2,)), fg.optim.adam(), jax.random.key(0)
    )
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"\.params\['dense1'\]\['W'\]: stored float32\[2, 4\], expected float32\[2, 5\]",
    ):
        checkpoint.from_bytes(data, like=other)
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.from_bytes(checkpoint.to_bytes({"a": jnp.ones(2)}), like={"a": jnp.ones(2), "b": jnp.ones(1)})


def test_loading_never_unpickles():
    buf = io.BytesIO()
    np.savez(buf, __funcgrad__=np.array([{"evil": 1}], dtype=object))  # an object array needs pickle
    with pytest.raises(checkpoint.CheckpointError, match="not a readable funcgrad checkpoint"):
        checkpoint.from_bytes(buf.getvalue(), like={})
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        checkpoint.metadata(b"not a zip file")


def _with_header(data, change):
    import json
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = json.loads(np.load(io.BytesIO(members["__funcgrad__.npy"])).tobytes())
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(change(header)).encode(), np.uint8))
    members["__funcgrad__.npy"] = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return out.getvalue()


def test_a_header_is_checked_before_it_is_used():
    tree = {"w": jnp.arange(4.0)}
    data = checkpoint.to_bytes(tree, {"step": 1})

    def leaf(**kw):
        return lambda h: {**h, "leaves": [{**h["leaves"][0], **kw}]}

    cases = [
        (lambda h: [h], "header is a JSON list"),
        (lambda h: {k: v for k, v in h.items() if k != "leaves"}, "lacks the list of leaves"),
        (lambda h: {**h, "meta": [1]}, "meta is not an object"),
        (leaf(dtype="float12"), "unknown dtype 'float12'"),
        (leaf(dtype="object"), "not a number type"),
        (leaf(shape=[-1]), "is not a list of sizes"),
        (leaf(shape=[2]), r"is float32\[4\]; its header says float32\[2\]"),
        (leaf(shape=[4000]), r"is float32\[4\]; its header says float32\[4000\]"),
    ]
    for change, message in cases:
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load_flat(_with_header(data, change))
        # with a template, a header that disagrees with it is refused before any leaf is read
        with pytest.raises(checkpoint.CheckpointError, match=message if "its header says" not in message else
                           r"does not match the template: \['w'\]: stored float32\[\d+\], expected float32\[4\]"):
            checkpoint.from_bytes(_with_header(data, change), like=tree)
    with pytest.raises(checkpoint.CheckpointError, match="the file is empty"):
        checkpoint.metadata(b"")
    assert len(data) <= checkpoint.size_bound(tree) < len(data) + 2 * 1024 * 1024


def test_size_bound_allows_the_data_4_kib_per_leaf_and_1_mib_of_metadata():
    """The documented allowance, computed from shapes alone (ShapeDtypeStruct leaves need no memory)."""
    tree = {"w": jax.ShapeDtypeStruct((300, 7), jnp.float32), "b": np.zeros(7, np.float64), "n": 3,
            "key": jax.random.key(0)}
    # with x64 off, leaves are stored as JAX holds them: float64 as float32, a Python int as int32; a threefry
    # key as its 2 uint32
    data = 300 * 7 * 4 + 7 * 4 + 4 + 2 * 4
    assert checkpoint.size_bound(tree) == data + 4096 * (4 + 1) + 1024 * 1024
    assert checkpoint.size_bound({}) == 4096 + 1024 * 1024


def _bomb(shape, header_shape=None):
    """A small archive whose leaf (or header member) declares a huge array: only the .npy header is written."""
    import json
    import zipfile

    def npy(shape, dtype):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                   "shape": tuple(shape)})
        return buf.getvalue()

    header = {"format": checkpoint.FORMAT, "meta": {},
              "leaves": [{"path": "['w']", "name": "leaf_0", "dtype": "float32", "shape": list(shape)}]}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        if header_shape is None:
            raw = io.BytesIO()
            np.save(raw, np.frombuffer(json.dumps(header).encode(), np.uint8))
            z.writestr("__funcgrad__.npy", raw.getvalue())
        else:
            z.writestr("__funcgrad__.npy", npy(header_shape, np.uint8))
        z.writestr("leaf_0.npy", npy(shape, np.float32))
    return out.getvalue()


@pytest.mark.parametrize(("data", "message"), [
    (_bomb([10**12]), r"leaf \['w'\] declares float32\[1000000000000\], 4000000000000 bytes, more than this file"),
    (_bomb([10**30]), r"declares float32\[10{30}\]"),  # np.prod would overflow int64
    (_bomb([4], header_shape=[10**13]), r"a header member of uint8\[10000000000000\], not the bytes of a header"),
])
def test_a_small_file_declaring_a_huge_array_is_refused_before_allocating_it(data, message):
    assert len(data) < 10_000
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_flat(data)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.from_bytes(data, like={"w": jnp.zeros(4)})


def test_meta_must_be_a_json_object():
    with pytest.raises(checkpoint.CheckpointError, match="meta must be a dict"):
        checkpoint.to_bytes({"w": jnp.ones(2)}, [1, 2])
    with pytest.raises(checkpoint.CheckpointError, match="meta must hold only JSON values"):
        checkpoint.to_bytes({"w": jnp.ones(2)}, {"a": object()})


def test_members_compressed_otherwise_than_numpy_writes_them_are_refused():
    # bzip2 expands far more than deflate: a few kilobytes could declare gigabytes within the per-member bound.
    data = checkpoint.to_bytes({"w": jnp.zeros(1000)})
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_BZIP2) as z:
        for name in src.namelist():
            z.writestr(name, src.read(name))
    with pytest.raises(checkpoint.CheckpointError, match="compressed with method 12; checkpoints hold stored or deflated"):
        checkpoint.load_flat(out.getvalue())
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:  # np.savez_compressed's: read
        for name in src.namelist():
            z.writestr(name, src.read(name))
    assert checkpoint.load_flat(deflated.getvalue())["['w']"].shape == (1000,)


def test_a_member_named_twice_is_refused():
    # zipfile reads the last of two members of one name: a crafted file's second leaf0.npy was loaded silently.
    data = checkpoint.to_bytes({"w": jnp.ones((2, 3))})
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (zipfile warns of the duplicate name)
        for name in src.namelist():
            z.writestr(name, src.read(name))
        leaf = [n for n in src.namelist() if n != "__funcgrad__.npy" and n.endswith(".npy")][0]
        nines = io.BytesIO()
        np.lib.format.write_array(nines, np.full((2, 3), 9.0, np.float32))
        z.writestr(leaf, nines.getvalue())
    with pytest.raises(checkpoint.CheckpointError, match=f"member '{leaf}' appears 2 times"):
        checkpoint.load_flat(out.getvalue())


def test_a_leaf_declared_in_fortran_order_is_refused():
    # The same bytes read in Fortran order are another array: a crafted header flag loaded W transposed (h83).
    tree = {"w": jnp.arange(6.0).reshape(2, 3)}
    src, out = zipfile.ZipFile(io.BytesIO(checkpoint.to_bytes(tree))), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            data = src.read(name)
            if name != "__funcgrad__.npy":
                data = data.replace(b"'fortran_order': False", b"'fortran_order': True ")
            z.writestr(name, data)
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf \['w'\] cannot be read .*Fortran order"):
        checkpoint.from_bytes(out.getvalue(), tree)


def test_data_that_is_not_bytes_or_a_seekable_binary_file_is_a_type_error_naming_the_argument(tmp_path):
    tree = {"w": jnp.ones((2, 3))}
    data = checkpoint.to_bytes(tree, {"step": 1})
    path = tmp_path / "t.npz"
    path.write_bytes(data)
    for fn in (lambda d: checkpoint.from_bytes(d, tree), checkpoint.load_flat, checkpoint.metadata):
        for given in (str(path), path):  # a path, the obvious mistake: the message says how to read the file
            with pytest.raises(TypeError, match=r"^data must be bytes or a seekable binary file object; got "
                               rf"(str|pathlib\.PosixPath) '{tmp_path}/t.npz', a path: .*open\(path, 'rb'\)"):
                fn(given)
        with pytest.raises(TypeError, match=r"got a NumPy array \(if it holds the file's bytes, pass data.tobytes"):
            fn(np.frombuffer(data, np.uint8))
        with pytest.raises(TypeError, match="got None$"):
            fn(None)
        with path.open() as text, pytest.raises(TypeError, match="got a text-mode file .*open it with mode 'rb'"):
            fn(text)
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        with os.fdopen(r, "rb") as pipe, pytest.raises(TypeError, match=r"got a file that cannot seek .*into bytes"):
            fn(pipe)
    with path.open("rb") as f:  # what is accepted: a seekable binary file, and bytes
        assert checkpoint.metadata(f) == checkpoint.metadata(data) == {"step": 1}
