"""check_grad's finite differences in runs (issue 11): what each of fn's operations depends on, how the leaves are
grouped into runs, and that evaluating in runs (one program, or a program per run) gives the same readings and
verdicts as one run over every leaf."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funcgrad import verify
from funcgrad.verify import _compiled, _fd, _grad
from funcgrad.verify._inputs import _Layout

N, D, H, C = 5, 4, 6, 3


def mlp_loss(p, X):
    """sum(tanh(X W1 + b1) W2): what depends on W2 is its product and the sum; on W1 everything from X W1 on."""
    return jnp.sum(jnp.tanh(X @ p["W1"] + p["b1"][None, :]) @ p["W2"])


def dependence_of(fn, params, *args):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed = jax.make_jaxpr(lambda ls: fn(jax.tree_util.tree_unflatten(treedef, ls), *args))(leaves)
    return dict(_compiled._dependence(closed.jaxpr, len(leaves)))


def union_cost(dep, leaves):
    bits = sum(1 << i for i in leaves)
    return sum(c for m, c in dep.items() if m & bits)


PARAMS = {"W1": jnp.ones((D, H)), "W2": jnp.ones((H, C)), "b1": jnp.ones(H)}  # leaves: W1 0, W2 1, b1 2
X = jnp.ones((N, D))


def test_dependence_counts_each_operation_once_under_the_leaves_it_reads():
    dep = dependence_of(mlp_loss, PARAMS, X)
    # W2: its product (2·N·H·C flops) and the final sum (one output).
    assert union_cost(dep, [1]) == 2 * N * H * C + 1
    # W1: its product with X, the bias add, tanh (a transcendental: 16 per element), then W2's part.
    assert union_cost(dep, [0]) == 2 * N * D * H + N * H + 16 * N * H + 2 * N * H * C + 1
    # Everything is counted exactly once: the total is the jaxpr's weighted count.
    closed = jax.make_jaxpr(lambda p: mlp_loss(p, X))(PARAMS)
    assert math.isclose(sum(dep.values()), _compiled._jaxpr_flops(closed.jaxpr, weighted=True))
    # Nothing reads W2 before its product: the part before it depends on W1 and b1 only.
    assert union_cost(dep, [0, 2]) - union_cost(dep, [1]) == union_cost(dep, [0, 2]) - 2 * N * H * C - 1


def test_dependence_follows_calls_into_jitted_functions_and_custom_rules():
    @jax.custom_jvp
    def act(z):
        return jnp.tanh(z)

    act.defjvps(lambda t, ans, z: t * (1 - ans**2))

    @jax.jit
    def layer(W, b, x):
        return act(x @ W + b[None, :])

    def wrapped(p, X):
        return jnp.sum(layer(p["W1"], p["b1"], X) @ p["W2"])

    plain, inner = dependence_of(mlp_loss, PARAMS, X), dependence_of(wrapped, PARAMS, X)
    for leaves in ([0], [1], [2], [0, 1, 2]):
        assert union_cost(inner, leaves) == union_cost(plain, leaves), leaves


def test_dependence_counts_a_loop_as_a_whole():
    def looped(p, X):
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["W"]), X)
        return jnp.sum(h * p["v"])

    p = {"W": jnp.ones((D, D)), "v": jnp.ones((N, D))}
    dep = dependence_of(looped, p, X)
    # v: the product with the loop's result and the sum; W: the whole loop besides.
    assert union_cost(dep, [1]) == N * D + 1
    assert union_cost(dep, [0]) >= union_cost(dep, [1]) + 2 * N * D * D + 16 * N * D


def layout_of(shapes):
    sizes = [math.prod(s) for s in shapes]
    offsets = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
    return _Layout(jax.tree_util.tree_structure(list(range(len(shapes)))), tuple(shapes), offsets,
                   tuple(f"[{i}]" for i in range(len(shapes))))


def test_costly_leaves_get_runs_of_their_own_and_cheap_ones_share_one():
    # A deep first layer (leaf 0: 1e12 flops from it on), a middle one (leaf 1: 1e11 from it on), cheap last ones.
    dep = ((0b1, 1e11), (0b11, 9e11), (0b111, 1e6), (0b1111, 1e6), (0b11111, 1e3))
    items = (2, 2, 2, 2, 11)
    runs = _compiled._runs(dep, items, (1,) * 5, 5)
    assert (0,) in runs and (1,) in runs and (2, 3, 4) in runs, runs
    # A cheap function: one run (the plan says () then).
    assert len(_compiled._runs(((0b11111, 1e4),), items, (1,) * 5, 5)) == 1
    layout = layout_of([(10, 10), (10,), (3,), (2,), (1,)])
    plan, _ = _compiled._make_plan("auto", layout, 1e4, True, dependence=((0b11111, 1e4),))
    assert plan.groups == ()
    plan, _ = _compiled._make_plan("auto", layout, 2e12, True, dependence=dep)
    assert set(plan.groups) == set(runs) and plan.pad_min == 1


def three_layer(seed=0, n=16, d=5, h=12, c=3, act=jax.nn.relu):
    rs = np.random.RandomState(seed)
    p = {"W1": jnp.asarray(rs.randn(d, h) / np.sqrt(d), jnp.float32), "b1": jnp.asarray(rs.randn(h) * 0.1, jnp.float32),
         "W2": jnp.asarray(rs.randn(h, h) / np.sqrt(h), jnp.float32), "b2": jnp.asarray(rs.randn(h) * 0.1, jnp.float32),
         "W3": jnp.asarray(rs.randn(h, c) / np.sqrt(h), jnp.float32), "b3": jnp.zeros(c, jnp.float32)}
    X = jnp.asarray(rs.randn(n, d), jnp.float32)
    y = jnp.asarray(rs.randint(0, c, n))

    def loss(p, X, y):
        h1 = jnp.tanh(X @ p["W1"] + p["b1"][None, :])
        h2 = act(h1 @ p["W2"] + p["b2"][None, :])
        z = h2 @ p["W3"] + p["b3"][None, :]
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(n), y])

    def hand(p, X, y):
        h1 = jnp.tanh(X @ p["W1"] + p["b1"][None, :])
        z2 = h1 @ p["W2"] + p["b2"][None, :]
        h2 = jnp.maximum(z2, 0.0)
        z = h2 @ p["W3"] + p["b3"][None, :]
        dz = (jax.nn.softmax(z) - jax.nn.one_hot(y, c, dtype=z.dtype)) / n
        dh2 = (dz @ p["W3"].T) * (z2 > 0)
        dh1 = (dh2 @ p["W2"].T) * (1 - h1**2)
        return {"W1": X.T @ dh1, "b1": dh1.sum(0), "W2": h1.T @ dh2, "b2": dh2.sum(0), "W3": h2.T @ dz,
                "b3": dz.sum(0)}

    return p, X, y, loss, hand


@pytest.fixture
def spy(monkeypatch):
    """Records the runs of every finite-difference program, and the forward-mode values and projections."""
    seen = {"groups": [], "jv": [], "P": []}
    items_jit, rows = _grad._items_jit, _grad._rows

    def items(*a, **k):
        seen["groups"].append(k["groups"])
        F, JV = items_jit(*a, **k)
        seen["jv"].append(np.asarray(JV))
        return F, JV

    def rows_spy(items_, P, *a, **k):
        seen["P"].append(np.asarray(P))
        return rows(items_, P, *a, **k)

    monkeypatch.setattr(_grad, "_items_jit", items)
    monkeypatch.setattr(_grad, "_rows", rows_spy)
    return seen


@pytest.fixture(autouse=True)
def _fresh_plans():
    """The planned runs are cached per function; tests here change the planner's constants."""
    _compiled._runs.cache_clear()
    yield
    _compiled._runs.cache_clear()


def _runs_of(monkeypatch, how, repeated=True):
    """Forces the plan: "one" run over every leaf, "runs" in one program, or "separate" programs; runs in one program
    also on a first check unless ``repeated`` is False."""
    _compiled._runs.cache_clear()
    if repeated:
        monkeypatch.setattr(_grad, "_checked_before", lambda key: True)
    monkeypatch.setattr(_compiled, "_RUN_FLOPS", 1e30 if how == "one" else 0.0)
    monkeypatch.setattr(_compiled, "_PROGRAM_FLOPS", 1e30 if how == "one" else 0.0)
    monkeypatch.setattr(_compiled, "_SEPARATE_ELEMENTS", 0 if how == "separate" else 1 << 62)


# (the "separate" programs, used above 4M parameters, compile as long again: in the slow target)
@pytest.mark.parametrize("how", ["runs", pytest.param("separate", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_runs_give_the_readings_and_verdicts_of_one_run(monkeypatch, spy, how):
    p, X, y, loss, hand = three_layer()
    _runs_of(monkeypatch, "one")
    one = verify.check_grad(loss, p, X, y, hand=hand, mode="projection")
    assert all(len(g) == 1 for g in spy["groups"])
    spy["groups"].clear()
    _runs_of(monkeypatch, how)
    runs = verify.check_grad(loss, p, X, y, hand=hand, mode="projection")
    groups = spy["groups"]
    assert any(len(g) > 1 for g in groups) if how == "runs" else all(len(g) == 1 for g in groups) and len(groups) > 1
    assert one.ok and runs.ok, (one, runs)
    for a, b in zip(one.rows, runs.rows, strict=True):
        assert (a.path, a.verdict, a.worst_index) == (b.path, b.verdict, b.worst_index)
        np.testing.assert_allclose([b.autodiff, b.hand, b.numeric], [a.autodiff, a.hand, a.numeric], rtol=1e-9)


def user_relu():
    """A ReLU with a JVP rule of the user's: forward mode is then compared with reverse mode (see
    _compiled._modes_may_differ)."""
    @jax.custom_jvp
    def relu(z):
        return jnp.maximum(z, 0.0)

    relu.defjvps(lambda t, ans, z: t * (z > 0))
    return relu


def test_forward_mode_in_runs_is_taken_along_each_leafs_first_direction(monkeypatch, spy):
    # Forward mode along a direction equals the reverse-mode gradient dotted with it (the probe's projection):
    # a jvp taken along another direction, or stored at another item, would not.
    p, X, y, loss, hand = three_layer(seed=1, act=user_relu())
    _runs_of(monkeypatch, "runs")
    report = verify.check_grad(loss, p, X, y, hand=hand, mode="projection")
    assert report.ok, report
    assert len(spy["groups"][0]) > 1, spy["groups"]
    (P,), jv = spy["P"], spy["jv"][0]
    n_leaves = 6
    # Items: each leaf's largest element, then its direction(s); the first direction of leaf i is item n_leaves + i
    # with one direction per leaf (a hand is given), in the leaves' order.
    wanted = jv[np.isfinite(jv)]
    assert len(wanted) == n_leaves
    np.testing.assert_allclose(np.sort(wanted), np.sort(P[:, 0]), rtol=1e-9, atol=1e-15)


# (the "separate" programs, used above 4M parameters, take as long again: in the slow target)
@pytest.mark.parametrize("how", ["runs", pytest.param("separate", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_runs_still_find_a_planted_element_and_a_kink(monkeypatch, how):
    _runs_of(monkeypatch, how)
    finds_a_planted_hand_element_and_reads_a_kink()


def finds_a_planted_hand_element_and_reads_a_kink():
    """A hand 0.05 off at W2[3, 4] is blamed there and nowhere else; a ReLU exactly at 0 (b2 shifted so that
    z2[0, 0] == 0) passes."""
    p, X, y, loss, hand = three_layer(seed=2)
    bad = lambda p, X, y: {**hand(p, X, y), "W2": hand(p, X, y)["W2"].at[3, 4].add(0.05)}  # noqa: E731
    report = verify.check_grad(loss, p, X, y, hand=bad)
    rows = {r.path: r for r in report.rows}
    assert report.verdict == "hand_wrong" and rows["['W2']"].verdict == "hand_wrong", report
    assert rows["['W2']"].worst_index == (3, 4)
    assert all(r.ok for k, r in rows.items() if k != "['W2']"), report
    h1 = jnp.tanh(X @ p["W1"] + p["b1"][None, :])
    z2 = h1 @ p["W2"] + p["b2"][None, :]
    kinked = {**p, "b2": p["b2"].at[0].add(-z2[0, 0])}
    assert float((h1 @ kinked["W2"] + kinked["b2"][None, :])[0, 0]) == 0.0
    report = verify.check_grad(loss, kinked, X, y, hand=hand)
    assert report.ok, report


def reference_runs(dependence, items, jvps, n, fixed):
    """The planner's rule written plainly (every pair tried afresh at every step, costs as Python sums)."""
    total = sum(c for _, c in dependence)

    def cost(run):
        bits = sum(1 << i for i in run)
        u = sum(c for m, c in dependence if m & bits)
        return (4 * sum(items[i] for i in run) + 2 * sum(jvps[i] for i in run)) * u + (total - u) + fixed

    runs = [(i,) for i in range(n) if items[i]]
    while len(runs) > 1:
        best, pair = 0.0, None
        for x in range(len(runs)):
            for y in range(x + 1, len(runs)):
                saved = cost(runs[x]) + cost(runs[y]) - cost(tuple(sorted(runs[x] + runs[y])))
                if saved > best:
                    best, pair = saved, (x, y)
        if pair is None:
            break
        runs = [r for k, r in enumerate(runs) if k not in pair] + [tuple(sorted(runs[pair[0]] + runs[pair[1]]))]
    return tuple(sorted(runs))


@pytest.mark.parametrize("seed", range(6))
def test_the_planner_merges_as_the_plain_rule_does(seed):
    # Random layered functions: leaf i enters at a random depth; everything after it depends on it.
    rs = np.random.RandomState(seed)
    n = int(rs.randint(3, 12))
    depth = rs.permutation(n)
    dependence = {}
    for d in range(n):
        mask = sum(1 << i for i in range(n) if depth[i] <= d)
        dependence[mask] = dependence.get(mask, 0.0) + float(10 ** rs.uniform(6, 11))
    dependence = tuple(sorted(dependence.items()))
    items = tuple(int(x) for x in rs.randint(0, 5, n))
    jvps = tuple(int(x > 0) for x in items)
    for fixed in (1e8, 2e10):
        got = _compiled._runs(dependence, items, jvps, n, fixed)
        assert got == reference_runs(dependence, items, jvps, n, fixed), (seed, fixed)
        assert sorted(i for run in got for i in run) == [i for i in range(n) if items[i]]


@pytest.mark.slow  # ~16 s: when runs are planned (a cost trade-off); what they compute is tested above by default
def test_runs_sharing_a_program_are_planned_once_the_function_is_checked_again(monkeypatch, spy):
    # A first check compiles one run (cheaper to compile); a repeated check of the same trace gets the runs.
    p, X, y, loss, hand = three_layer(seed=3)
    _runs_of(monkeypatch, "runs", repeated=False)
    monkeypatch.setattr(_grad, "_CHECKED", type(_grad._CHECKED)())
    assert verify.check_grad(loss, p, X, y, hand=hand).ok
    assert all(len(g) == 1 and len(g[0].moved) == 6 for g in spy["groups"]), spy["groups"]
    spy["groups"].clear()
    assert verify.check_grad(loss, p, X, y, hand=hand).ok
    assert len(spy["groups"][0]) > 1, spy["groups"]
    # Another trace (here: another hand; a mere wrapper would trace the same) is a first check again.
    spy["groups"].clear()
    assert verify.check_grad(loss, p, X, y, hand=lambda p, X, y: jax.tree.map(lambda g: 2 * g / 2, hand(p, X, y))).ok
    assert all(len(g) == 1 for g in spy["groups"]), spy["groups"]


@pytest.fixture
def costly(monkeypatch):
    """Every check reads its finite differences as a costly function's do: a central difference first, the ladder
    only where it does not settle an item."""
    monkeypatch.setattr(_compiled, "_SCALES_FLOP_BUDGET", -1.0)


def first_layer_rule(planted):
    """X W1 + b1 as a custom_vjp rule, its W1 cotangent 1.5 times too large at [2, 3] when ``planted``."""

    @jax.custom_vjp
    def dense(W1, b1, X):
        return X @ W1 + b1[None, :]

    def fwd(W1, b1, X):
        return dense(W1, b1, X), (W1, X)

    def bwd(res, dz):
        W1, X = res
        dW1 = X.T @ dz
        return dW1.at[2, 3].multiply(1.5) if planted else dW1, dz.sum(0), dz @ W1.T

    dense.defvjp(fwd, bwd)
    return dense


def test_a_costly_function_settles_agreeing_items_from_a_central_difference(monkeypatch):
    p, X, y, loss, hand = three_layer(seed=0)
    four = verify.check_grad(loss, p, X, y, hand=hand)
    monkeypatch.setattr(_compiled, "_SCALES_FLOP_BUDGET", -1.0)
    calls = []
    items_jit = _grad._items_jit

    def spy(*a, **k):
        calls.append(k.get("cols"))
        return items_jit(*a, **k)

    monkeypatch.setattr(_grad, "_items_jit", spy)
    report = verify.check_grad(loss, p, X, y, hand=hand)
    assert report.ok and four.ok, (report, four)
    # One program at the outer offsets, nothing after it: half the evaluations of four offsets.
    assert calls == [_fd._OUTER], calls
    # Readings as precise as the four-scale ones: within a millionth of the gradient at each row's worst element.
    for r, q in zip(report.rows, four.rows, strict=True):
        assert (r.path, r.method, r.verdict) == (q.path, q.method, q.verdict)
        assert r.numeric == pytest.approx(r.autodiff, rel=1e-6, abs=1e-9), r
        assert q.numeric == pytest.approx(q.autodiff, rel=1e-6, abs=1e-9), q


@pytest.mark.parametrize("with_hand", [pytest.param(True, marks=pytest.mark.slow), False])
def test_a_costly_function_still_finds_a_planted_rule_element(costly, with_hand):
    p, X, y, loss, hand = three_layer(seed=1)
    dense = first_layer_rule(planted=True)

    def ruled(p, X, y):
        h1 = jnp.tanh(dense(p["W1"], p["b1"], X))
        h2 = jax.nn.relu(h1 @ p["W2"] + p["b2"][None, :])
        z = h2 @ p["W3"] + p["b3"][None, :]
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(X.shape[0]), y])

    report = verify.check_grad(ruled, p, X, y, hand=hand if with_hand else None)
    rows = {r.path: r for r in report.rows}
    assert rows["['W1']"].verdict == "autodiff_wrong" and rows["['W1']"].worst_index == (2, 3), report
    assert all(r.ok for k, r in rows.items() if k != "['W1']"), report


@pytest.mark.slow  # ~25 s (a bisection and a kink on the costly path)
def test_a_costly_function_still_blames_a_planted_hand_element_and_reads_a_kink(costly):
    # (at the ReLU's kink the central difference is the mean of the two sides, which neither autodiff nor hand,
    # both 0, matches: the ladder reads the kink)
    finds_a_planted_hand_element_and_reads_a_kink()


@pytest.mark.parametrize(("w", "rel"), [(3.0, 3e-7), (10.0, -1e-6), (100.0, None)])
def test_a_costly_function_without_a_hand_fails_a_rule_off_by_a_few_tolerances(costly, x64, w, rel):
    """No hand: autodiff against finite differences alone. A custom rule for sin(w·x) off by a few times float64's
    rtol (1e-7), or computed by a central difference of step 3.7e-4 (off by 2e-4 at w = 100), must fail as it does
    on the cheap path: a reading settles only once its error bars are within the tolerance (the first pair of
    scales' were as wide as the error, and the rule passed)."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(w * x)

    def bwd(x, ct):
        if rel is None:
            h = 3.7e-4
            return (ct * (jnp.sin(w * (x + h)) - jnp.sin(w * (x - h))) / (2 * h),)
        return (ct * w * jnp.cos(w * x) * (1 + rel),)

    f.defvjp(lambda x: (f(x), x), bwd)
    x = jnp.asarray([0.3, -0.2, 0.1, 0.05])
    report = verify.check_grad(lambda x: jnp.sum(f(x)), x)
    assert report.verdict == "autodiff_wrong", report


def test_a_costly_function_without_a_hand_fails_a_rule_off_by_the_central_differences_truncation(costly, x64):
    """The first reading's central difference (a quarter of the first step) is off by -w²h²/6 of sin(w·x)'s
    derivative, 5.7e-7 relative at w = 10: a rule off by just that much settled there as ok (review h55). Without a
    hand, nothing independent of autodiff vouches for it: the four offsets and the ladder read it."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(10.0 * x)

    f.defvjp(lambda x: (f(x), x), lambda x, ct: (ct * 10.0 * jnp.cos(10.0 * x) * (1 - 5e-7),))
    report = verify.check_grad(lambda x: jnp.sum(f(x)), jnp.asarray([0.3]))
    assert report.verdict == "autodiff_wrong", report


# ---- the pieces of a check dispatched together (small parameters) ----


def _sqrt_loss(p, x):
    """sqrt at a zero weight: its gradient is not finite there, which changes the directions' support."""
    return jnp.sum(jnp.sqrt(p["w"]) * x) + jnp.sum(jnp.tanh(p["v"]) ** 2)


def _sqrt_hand(p, x):
    return {"w": 0.5 / jnp.sqrt(p["w"]) * x, "v": 2 * jnp.tanh(p["v"]) * (1 - jnp.tanh(p["v"]) ** 2)}


_W = {"w": jnp.asarray(np.r_[0.0, np.linspace(0.5, 2.0, 39)], jnp.float32),
      "v": jnp.asarray(np.linspace(-1, 1, 40), jnp.float32)}


@pytest.mark.parametrize("case", ["three_layer", "three_layer planted", "non-finite gradient", "NumPy hand"])
def test_dispatching_the_pieces_together_gives_the_report_of_one_at_a_time(monkeypatch, case):
    # Below _OVERLAP_ELEMENTS the gradients at the parameters' own precision and the first finite differences are
    # dispatched before the float64 gradients are analysed; the analysis may then change the directions' support
    # (a gradient not finite somewhere), and the reading dispatched early must not be used.
    if case.startswith("three_layer"):
        p, X, y, loss, hand = three_layer(seed=2)
        if case.endswith("planted"):
            good = hand
            hand = lambda p, X, y: {**good(p, X, y), "W2": good(p, X, y)["W2"].at[3, 4].multiply(1.02)}  # noqa: E731
        call = (loss, p, X, y)
    else:
        x = jnp.linspace(0.5, 1.5, 40, dtype=jnp.float32)
        loss, hand, call = _sqrt_loss, _sqrt_hand, (_sqrt_loss, _W, x)
        if case == "NumPy hand":
            hand = lambda p, x: {k: np.asarray(v) for k, v in _sqrt_hand(p, x).items()}  # noqa: E731
    reports, early = [], []
    real = _grad._first_reading

    def first_reading(*a, later=False, **k):
        early[-1].append(later)
        return real(*a, later=later, **k)

    monkeypatch.setattr(_grad, "_first_reading", first_reading)
    for limit in (0, 1 << 62):
        monkeypatch.setattr(_grad, "_OVERLAP_ELEMENTS", limit)
        early.append([])
        reports.append(verify.check_grad(*call, hand=hand, mode="projection"))
    one, together = reports
    # (a float64 pass per check: the second dispatched each first reading early, and read it afresh where the
    # support changed)
    assert not any(early[0]) and early[1] and early[1][0], early
    afresh = [later for later in early[1] if not later]
    assert len(afresh) == (early[1].count(True) if case in ("non-finite gradient", "NumPy hand") else 0), early
    assert one.verdict == together.verdict, (one, together)
    if case.endswith("planted"):
        row = next(r for r in together.rows if r.path == "['W2']")
        assert (together.verdict, row.worst_index) == ("hand_wrong", (3, 4)), together
    else:
        assert together.ok, together
    for a, b in zip(one.rows, together.rows, strict=True):
        assert (a.path, a.verdict, a.worst_index, a.method) == (b.path, b.verdict, b.worst_index, b.method)
        np.testing.assert_array_equal([a.autodiff, a.hand, a.numeric], [b.autodiff, b.hand, b.numeric])


def _float64_only(x):
    if x.dtype != np.float64:
        raise RuntimeError("this routine takes float64 only")
    return np.exp(x)


@pytest.mark.parametrize("limit", [0, 1 << 62])
def test_the_checks_own_diagnosis_comes_before_a_hand_failing_at_the_parameters_precision(monkeypatch, limit):
    # Dispatched early or not, fn overflowing at float32 is what the check says first, not that the hand (a float64
    # routine behind a callback) fails at float32, where it is not run at all on its own.
    monkeypatch.setattr(_grad, "_OVERLAP_ELEMENTS", limit)
    hand = lambda p: jax.pure_callback(_float64_only, jax.ShapeDtypeStruct(p.shape, p.dtype), p)  # noqa: E731
    with pytest.raises(ValueError, match=r"= inf at the parameters' own precision \(float32\), though .* in float64"):
        verify.check_grad(lambda p: jnp.sum(jnp.exp(p)), jnp.asarray([100.0, 1.0, 2.0], jnp.float32), hand=hand)
