"""verify.audit on models nobody here wrote: custom rules under jit, scan, vmap, remat and cond, inside Equinox
and Flax NNX modules. Each planted bug is one wrong element (or one wrong iteration); the expected rule, input
and element come from where the bug was planted, never from running the audit."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from funcgrad import testing, verify

# Models written as people write them: biases broadcast implicitly.
pytestmark = pytest.mark.usefixtures("implicit_broadcasting")
RS = np.random.RandomState(3)


def rows(report):
    return {r.rule: r for r in report.rows}


# ---- five rules in one block, one of them wrong at one element ----------------------------------------------


def make_block(wrong=None):
    """An attention-like block with five custom rules; ``wrong`` names the one whose derivative is off by
    1.5× at one element of its first input."""

    def plant(name, d, at):
        return d.at[at].multiply(1.5) if wrong == name else d

    @jax.custom_vjp
    def dense(x, W, b):
        return x @ W + b

    def dense_bwd(res, g):
        x, W = res
        return plant("dense", g @ W.T, (2, 1)), x.T @ g, g.sum(0)

    dense.defvjp(lambda x, W, b: (x @ W + b, (x, W)), dense_bwd)

    @jax.custom_vjp
    def softmax(z):
        return jax.nn.softmax(z, axis=-1)

    def softmax_bwd(s, g):
        return (plant("softmax", s * (g - jnp.sum(g * s, axis=-1, keepdims=True)), (1, 3)),)

    softmax.defvjp(lambda z: (jax.nn.softmax(z, axis=-1),) * 2, softmax_bwd)

    @jax.custom_vjp
    def rmsnorm(x, gamma):
        return x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * gamma

    def rmsnorm_fwd(x, gamma):
        r = 1 / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
        return x * r * gamma, (x, r, gamma)

    def rmsnorm_bwd(res, g):
        x, r, gamma = res
        gx = g * gamma
        dx = r * gx - x * r**3 * jnp.mean(gx * x, -1, keepdims=True)
        return plant("rmsnorm", dx, (3, 0)), jnp.sum(g * x * r, 0)

    rmsnorm.defvjp(rmsnorm_fwd, rmsnorm_bwd)

    @jax.custom_jvp
    def swish(x):
        return x * jax.nn.sigmoid(x)

    @swish.defjvp
    def swish_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        s = jax.nn.sigmoid(x)
        d = s + x * s * (1 - s)
        return swish(x), plant("swish", d, (0, 2)) * t

    @jax.custom_jvp
    def softplus(x):
        return jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(x, 0.0)

    softplus.defjvps(lambda t, ans, x: t * jax.nn.sigmoid(x))

    def block(p, x):
        a = softmax(dense(x, p["Wq"], p["bq"]) @ dense(x, p["Wk"], p["bk"]).T)
        h = rmsnorm(x + a @ x, p["g"])
        h = swish(dense(h, p["W1"], p["b1"]))
        return jnp.mean(softplus(dense(h, p["W2"], p["b2"])))

    return block


def block_params(d=4, hidden=6):
    shapes = {"Wq": (d, d), "bq": (d,), "Wk": (d, d), "bk": (d,), "g": (d,), "W1": (d, hidden), "b1": (hidden,),
              "W2": (hidden, 1), "b2": (1,)}
    return {k: jnp.asarray(RS.randn(*s) * 0.6, jnp.float32) for k, s in shapes.items()}


PARAMS, X = block_params(), jnp.asarray(RS.randn(5, 4), jnp.float32)
NAMES = {"dense", "softmax", "rmsnorm", "swish", "softplus"}


@pytest.mark.slow  # the planted test below also checks that the other four rules pass
def test_a_correct_block_passes_and_lists_each_rule_with_its_source():
    report = verify.audit(jax.jit(make_block()), PARAMS, X)
    assert report.ok, report
    r = rows(report)
    assert set(r) == NAMES
    assert r["dense"].calls == 4 and r["dense"].kind == "custom_vjp" and r["swish"].kind == "custom_jvp"
    assert all(row.source.startswith("tests/test_verify_audit.py:") or "test_verify_audit.py:" in row.source
               for row in report.rows)
    assert all(row.on_path for row in report.rows)
    text = str(report)
    assert "rmsnorm" in text and "custom_jvp" in text
    d = json.loads(report.to_json())
    assert d["ok"] and {row["rule"] for row in d["rows"]} == NAMES
    assert "| `dense` |" in report.to_markdown()


# Each case audits the whole five-rule block (~20 s on 2 cores): all run in `make test-slow`; the default suite
# finds a planted rule in test_a_rule_wrong_only_in_late_scan_iterations_is_found_at_its_iteration.
@pytest.mark.parametrize(("wrong", "index"), [
    pytest.param("rmsnorm", (0, 3, 0), marks=pytest.mark.slow),
    pytest.param("swish", (0, 0, 2), marks=pytest.mark.slow),
    pytest.param("dense", (0, 2, 1), marks=pytest.mark.slow),
])
def test_one_wrong_element_in_one_rule_is_found_and_only_there(wrong, index):
    report = verify.audit(jax.jit(make_block(wrong)), PARAMS, X)
    assert not report.ok
    r = rows(report)
    assert [row.rule for row in report.failing] == [wrong], report
    assert r[wrong].verdict == "autodiff_wrong", report
    assert r[wrong].worst_index == index, report
    assert r[wrong].rule_value == pytest.approx(1.5 * r[wrong].primal, rel=1e-4)
    assert all(r[n].ok for n in NAMES - {wrong}), report
    assert wrong in report.summary()
    with pytest.raises(AssertionError, match=wrong):
        testing.assert_rules_ok(jax.jit(make_block(wrong)), PARAMS, X)


# ---- the values each call receives: scan iterations, vmap examples --------------------------------------


def wrong_above(threshold):
    """x³ whose rule is wrong (2x² instead of 3x²) where x > threshold, right elsewhere."""

    @jax.custom_vjp
    def cube(x):
        return x**3

    def bwd(x, g):
        return (g * jnp.where(x > threshold, 2.0, 3.0) * x**2,)

    cube.defvjp(lambda x: (x**3, x), bwd)
    return cube


def test_a_rule_wrong_only_in_late_scan_iterations_is_found_at_its_iteration():
    cube = wrong_above(1.95)

    def fn(w, xs):
        def step(c, x):
            c = c + 0.1 * w  # c grows from 0.1 to 2.0 over 20 iterations: past 1.95 only at the last one
            return c, cube(c * x)
        return jax.lax.scan(step, jnp.zeros_like(w), xs)[1].sum()

    report = verify.audit(fn, jnp.ones(3), jnp.ones((20, 3)))
    r = rows(report)["cube"]
    assert r.verdict == "autodiff_wrong" and (r.calls, r.seen) == (8, 20), report
    assert "scan iteration 19" in r.where
    # Every iteration is checked when asked; without the last one, nothing is wrong.
    assert rows(verify.audit(fn, jnp.ones(3), jnp.ones((20, 3)), max_calls=20))["cube"].calls == 20
    assert verify.audit(fn, jnp.ones(3), jnp.ones((19, 3))).ok


def test_a_rule_wrong_for_one_vmapped_example_names_that_example():
    cube = wrong_above(2.5)
    x = jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.float32).at[2, 1].set(3.0)
    report = verify.audit(lambda w, x: jax.vmap(lambda xi: cube(w * xi))(x).sum(), jnp.ones(3), x)
    r = rows(report)["cube"]
    assert r.verdict == "autodiff_wrong" and r.worst_index == (0, 2, 1), report


def test_rules_under_remat_cond_and_nested_jit_are_found():
    cube = wrong_above(0.5)

    @jax.jit
    def inner(x):
        return jax.checkpoint(lambda y: cube(y).sum())(x)

    def fn(w, flag):
        return jax.lax.cond(flag, inner, jnp.sum, w)

    report = verify.audit(fn, jnp.array([0.2, 0.9]), True)
    r = rows(report)["cube"]
    assert r.verdict == "autodiff_wrong" and r.worst_index == (0, 1), report
    assert "cond branch 1" in r.where and "remat" in r.where
    # The branch not taken calls no rule.
    assert verify.audit(fn, jnp.array([0.2, 0.9]), False).rows == ()


# ---- what counts as the rule's fault ---------------------------------------------------------------------


def test_a_stable_rule_passes_where_plain_autodiff_of_its_primal_gives_nan():
    # sqrt(x) for x > 0 else 0: plain autodiff through jnp.where gives NaN at x < 0 (0 · ∞); the rule gives 0.
    @jax.custom_jvp
    def safe_sqrt(x):
        return jnp.where(x > 0, jnp.sqrt(x), 0.0)

    safe_sqrt.defjvps(lambda t, ans, x: t * jnp.where(x > 0, 0.5 / jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0))
    report = verify.audit(lambda x: safe_sqrt(x).sum(), jnp.array([-1.0, 4.0]))
    r = rows(report)["safe_sqrt"]
    assert r.verdict == "ok" and "plain autodiff of its primal does not" in r.note, report


def test_a_rule_that_copies_a_stop_gradient_of_its_primal_is_both_wrong():
    @jax.custom_vjp
    def f(x):
        return x * jax.lax.stop_gradient(x)  # x², whose derivative is 2x; plain autodiff says x

    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * x,))
    report = verify.audit(lambda x: f(x).sum(), jnp.array([1.0, 2.0, -3.0]))
    assert rows(report)["f"].verdict == "both_wrong", report


def test_excluded_and_library_rules_are_listed_not_checked():
    cube = wrong_above(0.0)
    fn = lambda x: (cube(x) + jax.nn.relu(x)).sum()  # noqa: E731 - relu is a custom_jvp of JAX's own
    report = verify.audit(fn, jnp.array([0.5, -0.5]), exclude=["cube"])
    assert report.ok and report.rows == ()
    assert any("excluded: cube" in n for n in report.notes) and any("relu" in n for n in report.notes)
    with_lib = verify.audit(fn, jnp.array([0.5, -0.5]), library=True, exclude=["cube"])
    assert {r.rule for r in with_lib.rows} == {"relu"} and with_lib.ok


def test_rules_off_the_gradient_path_are_checked_and_marked():
    cube = wrong_above(10.0)
    report = verify.audit(lambda p, x: (p["w"] * cube(x)).sum(), {"w": jnp.ones(2)}, jnp.array([1.0, 2.0]))
    r = rows(report)["cube"]
    assert r.ok and not r.on_path and "not on the gradient path" in str(report)
    assert rows(verify.audit(lambda p, x: cube(p["w"] * x).sum(), {"w": jnp.ones(2)}, jnp.array([1.0, 2.0])))[
        "cube"].on_path


# ---- frameworks ------------------------------------------------------------------------------------------------


def test_equinox_filter_custom_vjp_inside_a_module_is_named_after_the_users_function():
    @eqx.filter_custom_vjp
    def scaled_tanh(w, x):
        return jnp.tanh(w * x)

    @scaled_tanh.def_fwd
    def _fwd(perturbed, w, x):
        y = jnp.tanh(w * x)
        return y, y

    @scaled_tanh.def_bwd
    def _bwd(y, g, perturbed, w, x):
        return (g * (1 - y**2) * x).at[1].multiply(1.5)  # wrong at element 1

    class Layer(eqx.Module):
        w: jax.Array
        act: object = eqx.field(static=True)

        def __call__(self, x):
            return self.act(scaled_tanh(self.w, x))

    model = Layer(jnp.array([0.5, -1.0, 2.0]), jax.nn.softplus)
    report = verify.audit(eqx.filter_jit(lambda m, x: m(x).sum()), model, jnp.array([0.3, 0.4, -0.2]))
    r = rows(report)["scaled_tanh"]
    assert r.verdict == "autodiff_wrong" and r.worst_index == (0, 1), report
    assert "test_verify_audit.py" in r.source


def test_flax_nnx_module_with_a_custom_rule():
    cube = wrong_above(0.7)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return cube(self.lin(x))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jnp.asarray(RS.randn(4, 3), jnp.float32)
    fn = lambda state, x: nnx.merge(graphdef, state)(x).sum()  # noqa: E731
    report = verify.audit(fn, state, x)
    r = rows(report)["cube"]
    out = nnx.merge(graphdef, state).lin(x)
    assert r.verdict == ("autodiff_wrong" if bool((out > 0.7).any()) else "ok"), report
    if r.verdict == "autodiff_wrong":
        assert float(out[r.worst_index[1:]]) > 0.7


# ---- bad input -------------------------------------------------------------------------------------------------


def test_no_rules_is_ok_and_says_so():
    report = verify.audit(lambda x: jnp.sum(x**2), jnp.ones(3))
    assert report.ok and report.rows == () and "nothing to check" in " ".join(report.notes)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_calls": 0}, "max_calls must be an int >= 1"),
    ({"exclude": "cube"}, "exclude must be a sequence"),
    ({"mode": "fast"}, "mode must be"),
    ({"library": 1}, "library must be True or False"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        verify.audit(lambda x: x.sum(), jnp.ones(2), **kwargs)


def test_fn_not_callable_and_fn_that_fails_to_trace():
    with pytest.raises(TypeError, match="fn must be callable"):
        verify.audit("model", jnp.ones(2))
    with pytest.raises(TypeError) as e:
        verify.audit(lambda x: x @ jnp.ones(3), jnp.ones(2))
    assert any("verify.audit traces fn" in n for n in e.value.__notes__)
