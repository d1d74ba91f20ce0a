"""check_grad traces afresh at every call and shares compilations between identical traces: a repeated check of
an unchanged function compiles nothing, and a function whose globals changed is checked as it is now."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cube_root, twice_primitive

from funcgrad import verify
from funcgrad.verify import _compiled

SCALE = 2.0
TABLE = jnp.asarray(np.linspace(0.5, 1.5, 6), jnp.float32)
BWD_FACTOR = 1.0


def loss(w, x):
    return jnp.sum(jnp.tanh(w * x) * TABLE) * SCALE


def hand(w, x):
    return (1 - jnp.tanh(w * x) ** 2) * x * TABLE * SCALE


W, X = jnp.linspace(-1.0, 1.0, 6), jnp.linspace(0.5, 2.0, 6)


def sin_reading_bwd_factor():
    """sin with a custom VJP whose backward reads the global BWD_FACTOR when it runs (right while it is 1)."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x) * BWD_FACTOR,))
    return f


def test_a_repeated_check_compiles_nothing():
    assert verify.check_grad(loss, W, X, hand=hand).ok
    before = _compiled._probe._cache_size()
    for _ in range(2):
        assert verify.check_grad(loss, W, X, hand=hand).ok
    assert _compiled._probe._cache_size() == before
    # A new function object with the same trace shares the compilation too.
    assert verify.check_grad(lambda w, x: loss(w, x), W, X, hand=lambda w, x: hand(w, x)).ok  # noqa: PLW0108
    assert _compiled._probe._cache_size() == before


def test_the_second_check_compiles_only_its_finite_differences_in_runs():
    # A function of a few leaves: the second check plans its finite differences in runs that skip the layers before
    # the leaves they move (a program of their own); the float64 probe, which does not run them, is not compiled
    # again (it was, for the plan it was handed held the runs), and the third check compiles nothing.
    rs = np.random.RandomState(0)
    x, y = jnp.asarray(rs.randn(64, 32), jnp.float32), jnp.asarray(rs.randn(64, 8), jnp.float32)
    p = {"W1": jnp.asarray(0.2 * rs.randn(32, 64), jnp.float32), "b1": jnp.full(64, 0.1, jnp.float32),
         "W2": jnp.asarray(0.2 * rs.randn(64, 8), jnp.float32)}

    def mlp_loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["W1"] + p["b1"][None, :]) @ p["W2"] - y) ** 2)

    def sizes():
        return _compiled._probe._cache_size(), _compiled._items_jit._cache_size()

    assert verify.check_grad(mlp_loss, p, x, y).ok
    probe0, items0 = sizes()
    assert verify.check_grad(mlp_loss, p, x, y).ok
    probe1, items1 = sizes()
    assert probe1 == probe0 and items1 > items0, (probe0, items0, probe1, items1)  # (runs planned: compiled once)
    assert verify.check_grad(mlp_loss, p, x, y).ok
    assert sizes() == (probe1, items1)


def test_changed_globals_are_checked_as_they_are_now():
    global SCALE, TABLE  # noqa: PLW0603 - changed globals are what this test is about
    frozen_scale, frozen_table = SCALE, TABLE
    stale = lambda w, x: (1 - jnp.tanh(w * x) ** 2) * x * frozen_table * frozen_scale  # noqa: E731
    assert verify.check_grad(loss, W, X, hand=stale).ok
    try:
        TABLE = TABLE.at[4].set(3.0)  # a closed-over array: same shape, new values
        report = verify.check_grad(loss, W, X, hand=stale)
        assert report.verdict == "hand_wrong" and report.rows[0].worst_index == (4,), report
        assert verify.check_grad(loss, W, X, hand=hand).ok
        TABLE = frozen_table
        SCALE = 3.0  # a Python number: a literal of the trace
        assert verify.check_grad(loss, W, X, hand=stale).verdict == "hand_wrong"
        assert verify.check_grad(loss, W, X, hand=hand).ok
    finally:
        SCALE, TABLE = frozen_scale, frozen_table


def test_checks_with_numpy_float64_data_see_each_hand_as_it_is():
    # NumPy float64 data, as the book passes it, is float32 in a float32 check. Its trace was recorded as float64, so
    # the check at the parameters' own precision called the function itself, inside a program shared by traces with
    # the same key: a second hand (its constants hoisted, the same trace) was checked as the first one (h97). A right
    # hand after a wrong one read hand_wrong with the first one's values; a hand not finite at float32 after a right
    # one read ok.
    p = jnp.asarray([0.3, -0.7, 1.1, 0.5], jnp.float32)
    data = np.ones(4)  # float64

    def fn(w, x):
        return jnp.sum(x * w**2)

    def make_hand(scale, over=1.0):
        k, d = np.full(4, scale * over), np.full(4, over)  # closed over: hoisted, the same trace for every value
        return lambda w, x: (k * x * w) / d

    truth = 2 * data * np.asarray(p, np.float64)  # the independent reference
    assert np.allclose(np.asarray(make_hand(2.0)(p, data)), truth)
    assert verify.check_grad(fn, p, data, hand=make_hand(2.2)).verdict == "hand_wrong"
    right = verify.check_grad(fn, p, data, hand=make_hand(2.0))
    assert right.ok and np.isclose(right.rows[0].hand, truth[right.rows[0].worst_index or 0], rtol=1e-5), right
    # 2e39·x·w / 1e39: right in float64, inf / inf = NaN at float32, as the user's float32 program computes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (NumPy's overflow casting 2e39 to float32: the point)
        assert np.all(np.isnan(np.asarray(jax.jit(make_hand(2.0, 1e39))(p, jnp.asarray(data, jnp.float32)))))
        assert verify.check_grad(fn, p, data, hand=make_hand(2.0, 1e39)).verdict == "hand_wrong"


def test_a_custom_rule_whose_backward_reads_a_changed_global_is_checked_again():
    global BWD_FACTOR  # noqa: PLW0603 - as above

    f = sin_reading_bwd_factor()
    fn = lambda w: jnp.sum(f(w))  # noqa: E731
    assert verify.check_grad(fn, W).ok
    try:
        BWD_FACTOR = 1.5
        assert verify.check_grad(fn, W).verdict == "autodiff_wrong"
    finally:
        BWD_FACTOR = 1.0
    assert verify.check_grad(fn, W).ok


def test_closed_over_and_passed_constants_give_the_same_verdicts():
    A = jnp.asarray(np.random.RandomState(0).randn(40, 6), jnp.float32)
    closed = verify.check_grad(lambda w: jnp.sum(jnp.log(jnp.cosh(A @ w))), W,
                               hand=lambda w: A.T @ jnp.tanh(A @ w))
    passed = verify.check_grad(lambda w, A: jnp.sum(jnp.log(jnp.cosh(A @ w))), W, A,
                               hand=lambda w, A: A.T @ jnp.tanh(A @ w))
    assert closed.ok and passed.ok
    assert closed.rows[0].autodiff == passed.rows[0].autodiff
    wrong = verify.check_grad(lambda w: jnp.sum(jnp.log(jnp.cosh(A @ w))), W,
                              hand=lambda w: (A.T @ jnp.tanh(A @ w)).at[2].add(0.5))
    assert wrong.verdict == "hand_wrong" and wrong.rows[0].worst_index == (2,)


JVP_FACTOR = 1.0


def test_a_repeated_check_of_a_function_with_custom_rules_compiles_nothing():
    # The rules' derivative functions are traced for the key: unchanged, the compilations are shared, also for a
    # rule inside a jitted scan body.
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))

    @jax.custom_jvp
    def g(x):
        return jnp.tanh(x)

    g.defjvps(lambda t, ans, x: t * (1 - ans**2))

    @jax.jit
    def fn(w):
        h, _ = jax.lax.scan(lambda h, _: (g(f(h) * w), None), w, None, length=3)
        return jnp.sum(h)

    assert verify.check_grad(fn, W).ok
    before = (_compiled._probe._cache_size(), _compiled._items_jit._cache_size())
    for _ in range(2):
        assert verify.check_grad(fn, W).ok
    assert (_compiled._probe._cache_size(), _compiled._items_jit._cache_size()) == before


def test_a_custom_jvp_rule_that_reads_a_changed_global_is_checked_again():
    global JVP_FACTOR  # noqa: PLW0603 - changed globals are what this test is about

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvps(lambda t, ans, x: t * jnp.cos(x) * JVP_FACTOR)
    fn = lambda w: jnp.sum(f(w))  # noqa: E731
    _compiled._RETAINED.clear()  # (other tests' functions do not fill the register, which clears the caches, meanwhile)
    assert verify.check_grad(fn, W).ok
    before = _compiled._probe._cache_size()
    try:
        JVP_FACTOR = 1.5
        assert verify.check_grad(fn, W).verdict == "autodiff_wrong"
        assert _compiled._probe._cache_size() == before + 1  # compiled afresh for the changed rule
    finally:
        JVP_FACTOR = 1.0
    assert verify.check_grad(fn, W).ok



def test_a_repeated_check_jacobian_compiles_nothing_and_sees_changed_globals():
    # check_jacobian wraps fn per output row; the wrappers are traced like any fn, so a second call of the same
    # check shares the first one's compilations (it used to compile four programs again: seconds for a 3×3
    # Jacobian), and a global that changed in between is still read as it is now.
    global SCALE  # noqa: PLW0603 - as above

    def f(x):
        return jnp.tanh(x) * SCALE

    def jac_of(scale):
        return lambda x: jnp.diag((1 - jnp.tanh(x) ** 2) * scale)

    x = jnp.asarray([0.3, -0.7, 1.1])
    assert verify.check_jacobian(f, x, jac_of(SCALE)).ok
    before = (_compiled._probe._cache_size(), _compiled._items_jit._cache_size())
    assert verify.check_jacobian(f, x, jac_of(SCALE)).ok
    assert (_compiled._probe._cache_size(), _compiled._items_jit._cache_size()) == before
    frozen = SCALE
    try:
        SCALE = 3.0
        assert verify.check_jacobian(f, x, jac_of(frozen)).verdict == "hand_wrong"
        assert verify.check_jacobian(f, x, jac_of(SCALE)).ok
    finally:
        SCALE = frozen


def test_a_repeated_audit_compiles_nothing_and_sees_a_changed_backward():
    # audit checks each rule call as a check_grad of the rule against its primal; those checks are traced like
    # any fn, so auditing an unchanged model again shares every compilation (it used to compile them all again:
    # 20 s for the five-rule block of bench_audit, now under a second), and a backward that reads a global that
    # changed in between is checked as it is now.
    global BWD_FACTOR  # noqa: PLW0603 - as above

    f = sin_reading_bwd_factor()

    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0]))

    def fn(w, x):
        return jnp.sum(softplus(f(w * x)))

    assert verify.audit(fn, W, X).ok
    before = (_compiled._probe._cache_size(), _compiled._items_jit._cache_size())
    assert verify.audit(fn, W, X).ok
    assert (_compiled._probe._cache_size(), _compiled._items_jit._cache_size()) == before
    frozen = BWD_FACTOR
    try:
        BWD_FACTOR = 1.5
        report = verify.audit(fn, W, X)
        assert [r.rule for r in report.failing] == ["f"], report
    finally:
        BWD_FACTOR = frozen


def test_primitives_of_the_same_name_with_other_rules_are_not_shared():
    # The jaxpr names a primitive, not its rules: two of the user's primitives named alike are not one function.
    assert verify.check_grad(twice_primitive(2.0), W).ok
    assert verify.check_grad(twice_primitive(2.5), W).verdict == "autodiff_wrong"


def test_custom_roots_with_other_tangent_solves_are_not_shared():
    # lax.custom_root's rule is JAX's, but its derivative is the user's tangent_solve, which the jaxpr does not show.
    assert verify.check_grad(cube_root(offset=2.0), W).ok
    assert verify.check_grad(cube_root(offset=2.0, slip=1.1), W).verdict == "autodiff_wrong"


def dropout_loss(w, x, key):
    mask = jax.random.bernoulli(key, 0.8, x.shape)
    return jnp.sum(jnp.tanh(w * x) * mask) / 0.8


def dropout_hand(w, x, key, slip=1.0):
    mask = jax.random.bernoulli(key, 0.8, x.shape)
    return slip * (1 - jnp.tanh(w * x) ** 2) * x * mask / 0.8


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw key", "typed key"])
def test_a_repeated_check_of_a_function_drawing_random_numbers_compiles_nothing(make_key):
    # jax.random's PRNG implementation (threefry_split, ...) is a parameter of the trace: JAX's own functions, the
    # same at every trace, so shared (they made every trace unique: a dropout model compiled at every check). A typed
    # key's dtype (key<fry>) is no NumPy dtype: such a trace was not kept at all.
    key = make_key(3)
    assert verify.check_grad(dropout_loss, W, X, key, hand=dropout_hand).ok
    before = _compiled._probe._cache_size()
    assert verify.check_grad(dropout_loss, W, X, key, hand=dropout_hand).ok
    assert _compiled._probe._cache_size() == before
    slipped = lambda w, x, key: dropout_hand(w, x, key, 1.02)  # noqa: E731
    assert verify.check_grad(dropout_loss, W, X, key, hand=slipped).verdict == "hand_wrong"
    # Another key is another argument's value, not another trace: the same draws as fn's, checked as they are now.
    other = make_key(4)
    stale = lambda w, x, key: dropout_hand(w, x, make_key(3))  # noqa: E731
    assert verify.check_grad(dropout_loss, W, X, other, hand=stale).verdict == "hand_wrong"


def test_a_sweep_over_closed_over_constants_keeps_a_bounded_number_of_compilations(monkeypatch):
    # Each constant is a literal in its trace, so each check compiles its own programs; jax.jit keeps up to 8192 of
    # them per program, and a notebook sweeping a hyperparameter grew by ~9 MiB a check (h102). Past _RETAIN distinct
    # functions they are let go; verdicts after that are as before.
    monkeypatch.setattr(_compiled, "_RETAIN", 3)
    monkeypatch.setattr(_compiled, "_RETAINED", {})
    _compiled._probe.clear_cache()  # (what earlier tests in this process compiled)
    verdicts = []
    for i in range(12):
        c = 1.0 + 0.125 * i

        def fn(w, x, c=c):
            return jnp.sum(jnp.tanh(c * w * x))

        def right(w, x, c=c):
            return c * x * (1 - jnp.tanh(c * w * x) ** 2)

        def wrong(w, x, c=c):
            return right(w, x, c).at[2].multiply(1.25)

        verdicts.append(verify.check_grad(fn, W, X, hand=wrong if i % 4 == 3 else right).verdict)
        assert _compiled._probe._cache_size() <= 2 * (3 + 1), (i, _compiled._probe._cache_size())
    assert verdicts == ["hand_wrong" if i % 4 == 3 else "ok" for i in range(12)]


def test_autodiff_and_a_traced_hand_at_the_parameters_precision_run_in_one_program_and_a_failing_hand_still_reads_so():
    # Small parameters: the float32 gradients of autodiff and of the hand are one compiled program (XLA computes their
    # shared forward pass once), compiled at the first check and reused after; a hand that fails only at float32 still
    # fails with its own error, where it is read.
    w32, x32 = W.astype(jnp.float32), X.astype(jnp.float32)
    _compiled._RETAINED.clear()
    assert verify.check_grad(loss, w32, x32, hand=hand).ok
    before = (_compiled._user_both._cache_size(), _compiled._user_grad._cache_size(), _compiled._user_hand._cache_size())
    assert before[0] >= 1
    assert verify.check_grad(loss, w32, x32, hand=hand).ok
    assert (_compiled._user_both._cache_size(), _compiled._user_grad._cache_size(),
            _compiled._user_hand._cache_size()) == before

    def hand_refusing_float32(w, x):
        if w.dtype == jnp.float32:
            raise ValueError("this hand refuses float32")
        return hand(w, x)

    with pytest.raises(ValueError, match="refuses float32"):
        verify.check_grad(loss, w32, x32, hand=hand_refusing_float32)
