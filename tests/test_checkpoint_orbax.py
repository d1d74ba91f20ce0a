"""funcgrad.checkpoint.orbax_manager: train states by step in a directory, restored with the checks of the npz format."""

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

import funcgrad as fg
from funcgrad import checkpoint
from funcgrad.checkpoint import CheckpointError

pytest.importorskip("orbax.checkpoint")


def state(width=3, seed=0):
    model = fg.nn.mlp([4, width], output="softmax")
    params = model.init(jax.random.key(seed), (2,))
    return fg.train.init(params, fg.optim.adam(0.1), jax.random.key(7 + seed))


def assert_same(a, b):
    """Leaf by leaf: equal values and dtypes (PRNG keys by their implementation and key data)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for leaf_a, leaf_b in zip(la, lb, strict=True):
        x, y = leaf_a, leaf_b
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_a_train_state(tmp_path):
    s = state()
    tree = {"state": s, "epoch": 2, "lr": np.float32(0.1), "half": jnp.arange(3, dtype=jnp.bfloat16) / 3}
    with checkpoint.orbax_manager(tmp_path / "ckpt", async_save=False) as mngr:
        assert mngr.latest_step() is None and mngr.all_steps() == []
        assert mngr.save(3, tree, {"step": 3, "note": "after epoch 2"})
        back, meta = mngr.restore(like={**tree, "state": state(seed=1)})
    assert meta == {"step": 3, "note": "after epoch 2"}
    assert_same(back, jax.tree.map(jnp.asarray, tree))
    assert back["state"].step.dtype == jnp.int32 and back["half"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(jax.random.normal(back["state"].key, (3,)), jax.random.normal(s.key, (3,)))
    chex.assert_trees_all_equal(back["state"].opt_state, s.opt_state)
    # a fresh manager on the same directory finds the step (as a resumed run does)
    with checkpoint.orbax_manager(tmp_path / "ckpt") as again:
        assert again.latest_step() == 3
        assert_same(again.restore(like=tree)[0], back)


def test_async_saves_keep_the_last_max_to_keep(tmp_path):
    s = state()
    with checkpoint.orbax_manager(tmp_path, max_to_keep=2, async_save=True) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, s._replace(step=jnp.int32(step)), {"step": step})
        mngr.wait()
        assert mngr.all_steps() == [2, 3] and mngr.latest_step() == 3
        back, meta = mngr.restore(like=s)
        assert meta == {"step": 3} and int(back.step) == 3
        back2, meta2 = mngr.restore(like=s, step=2)
        assert meta2 == {"step": 2} and int(back2.step) == 2
        with pytest.raises(CheckpointError, match=r"no checkpoint of step 1; it has steps \[2, 3\]"):
            mngr.restore(like=s, step=1)
        with pytest.raises(CheckpointError, match="cannot save step 3: steps are saved in increasing order"):
            mngr.save(3, s)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]


def test_a_template_that_does_not_match_is_named_by_path(tmp_path):
    with checkpoint.orbax_manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, state())
        with pytest.raises(CheckpointError,
                           match=r"\.params\['dense2'\]\['W'\]: stored float32\[4, 3\], expected float32\[4, 5\]"):
            mngr.restore(like=state(width=5))
        tree = {"w": jnp.ones(2), "n": jnp.int32(1)}
        mngr.save(2, tree)
        with pytest.raises(CheckpointError, match=r"missing \[\"\['b'\]\"\]$"):
            mngr.restore(like={**tree, "b": jnp.ones(1)})
        with pytest.raises(CheckpointError, match=r"template: unexpected \[\"\['n'\]\"\]"):
            mngr.restore(like={"w": jnp.ones(2)})
        with pytest.raises(CheckpointError, match=r"\['n'\]: stored int32\[\], expected float32\[\]"):
            mngr.restore(like={"w": jnp.ones(2), "n": jnp.float32(1)})
        with pytest.raises(CheckpointError, match=r"\['n'\]: stored int32\[\], expected a threefry2x32 PRNG key"):
            mngr.restore(like={"w": jnp.ones(2), "n": jax.random.key(0)})
        with pytest.raises(CheckpointError, match=r"template leaf \['w'\] is a str"):
            mngr.restore(like={"w": "ones", "n": 1})
        with pytest.raises(CheckpointError, match=r"leaf \['f'\] is a function"):
            mngr.save(3, {"f": lambda x: x})
    with checkpoint.orbax_manager(tmp_path / "empty") as empty, pytest.raises(CheckpointError, match="no checkpoint"):
        empty.restore(like=tree)


def test_non_finite_values_are_caught_when_asked(tmp_path):
    tree = {"params": {"w": jnp.array([1.0, jnp.nan]), "h": jnp.array([jnp.inf], jnp.bfloat16)}, "step": jnp.int32(1),
            "key": jax.random.key(0)}
    with checkpoint.orbax_manager(tmp_path) as mngr:
        mngr.save(1, tree)
        back, _ = mngr.restore(like=tree)  # off by default, as in from_bytes
        assert jnp.isnan(back["params"]["w"][1])
        with pytest.raises(CheckpointError, match=r"non-finite values: \['params'\]\['h'\] has 1 of 1 values NaN or inf; "
                                                  r"\['params'\]\['w'\] has 1 of 2"):
            mngr.restore(like=tree, check_finite=True)


def test_damaged_layout_is_a_checkpoint_error(tmp_path):
    with checkpoint.orbax_manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, {"w": jnp.ones(2)})
    layout = tmp_path / "1" / "layout" / "metadata"
    assert layout.is_file()
    layout.write_text('{"format": "funcgrad-orbax-1", "leaves": [{"path": "[\'w\']", "name": "leaf0", "dtype": "float64", '
                      '"shape": [2]}]}')
    damaged = r"damaged: leaf \['w'\] is float32\[2\]; its layout says float64\[2\]"
    with checkpoint.orbax_manager(tmp_path) as mngr, pytest.raises(CheckpointError, match=damaged):
        mngr.restore(like={"w": jnp.ones(2, jnp.float32)})
    layout.write_text("[1]")
    with checkpoint.orbax_manager(tmp_path) as mngr, pytest.raises(CheckpointError, match="header is a JSON list"):
        mngr.restore(like={"w": jnp.ones(2)})


def test_damaged_array_files_are_one_line_naming_the_step_once(tmp_path):
    # tensorstore's message ends in kilobytes of its spec as JSON, and the step's folder was named twice.
    with checkpoint.orbax_manager(tmp_path, async_save=False) as mngr:
        mngr.save(1, {"w": jnp.ones(2)})
    manifests = list((tmp_path / "1" / "state").glob("manifest.ocdbt"))
    assert manifests
    manifests[0].write_bytes(b"garbage\n")
    with checkpoint.orbax_manager(tmp_path) as mngr, pytest.raises(CheckpointError) as info:
        mngr.restore(like={"w": jnp.ones(2)})
    msg = str(info.value)
    where = str((tmp_path / "1").absolute())
    assert msg.startswith(where + ": not a readable funcgrad orbax checkpoint") and msg.count(where + ":") == 1, msg
    assert "\n" not in msg and "tensorstore_spec" not in msg and len(msg) < 1000, msg
    chained, e = [], info.value.__context__
    while e is not None:
        chained.append(e)
        e = e.__context__
    assert all(isinstance(e, CheckpointError) for e in chained), chained  # orbax's (and its futures) not kept alive


SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from funcgrad import checkpoint

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    everywhere = NamedSharding(mesh, P())
    x = jax.device_put(jnp.arange(64.0).reshape(16, 4), rows)
    tree = {"x": x, "b": jax.device_put(jnp.ones(4), everywhere), "key": jax.random.key(1), "step": 5}
    with checkpoint.orbax_manager(sys.argv[1], async_save=True) as mngr:
        mngr.save(5, tree, {"step": 5})
        mngr.wait()
    like = {**tree, "x": jax.device_put(jnp.zeros((16, 4)), rows), "b": jax.device_put(jnp.zeros(4), everywhere)}
    with checkpoint.orbax_manager(sys.argv[1]) as mngr:
        back, meta = mngr.restore(like=like, check_finite=True)
    assert meta == {"step": 5}, meta
    assert back["x"].sharding == x.sharding, back["x"].sharding
    assert back["b"].sharding == everywhere, back["b"].sharding
    assert len(back["x"].addressable_shards) == 8
    assert all(s.data.shape == (2, 4) for s in back["x"].addressable_shards)
    np.testing.assert_array_equal(np.asarray(back["x"]), np.arange(64.0).reshape(16, 4))
    assert (jax.random.key_data(back["key"]) == jax.random.key_data(tree["key"])).all()
    print("ok")
""")


@pytest.mark.slow
def test_sharded_save_and_restore_onto_the_same_sharding(tmp_path):
    env = {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}  # read when JAX starts: a fresh interpreter
    proc = run_python(["-c", SHARDED, str(tmp_path / "ckpt")], env=env, timeout=240)
    assert proc.stdout.strip().endswith("ok")
