"""funcgrad.verify._sides: autodiff's gradient with each kink on a side of its own. The values each draw may take
come from the calculus: at a tie every side's one-sided derivative, and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np

from funcgrad.verify._sides import has_kinks, kink_sides


def draws(f, *leaves, n=32, mixed=False):
    """The n draws (from one end to the other), or with ``mixed`` the mixed ones after them."""
    out = [[np.asarray(g) for g in d] for d in kink_sides(lambda dl: f(*dl), [jnp.asarray(x) for x in leaves], n, 0)]
    assert len(out) == n + n // 4
    return out[n:] if mixed else out[:n]


def test_relu_of_a_and_of_minus_a_at_zero_take_every_pair_of_sides_and_the_extremes():
    # d/dx [relu(x) + relu(−x)] at 0: relu'(±0) ∈ {0, 1} each, chosen independently: −1, 0 or 1; JAX gives 0.
    got = {float(d[0][0]) for d in draws(lambda x: jnp.sum(jax.nn.relu(x) + jax.nn.relu(-x)), np.zeros(1, np.float32))}
    assert got <= {-1.0, 0.0, 1.0} and {-1.0, 1.0} <= got, got
    # every ReLU off (the first draws) and every one on (the last): relu'(0) = 0 at each of 8 kinks, and 1 at each
    x = np.zeros(8, np.float32)
    sides = draws(lambda x: jnp.sum(jax.nn.relu(x)), x)
    assert np.all(sides[0][0] == 0) and np.all(sides[-1][0] == 1), (sides[0], sides[-1])


def test_a_tie_of_a_max_over_axes_goes_to_one_tied_element_first_or_last_at_the_extremes_never_to_a_smaller_one():
    x = np.array([[1.0, 1.0, 0.5], [2.0, 2.0 - 2**-20, 2.0]], np.float32)  # ties; 2 − 2⁻²⁰ is no tie
    sides = draws(lambda x: jnp.sum(jnp.max(x, axis=1)), x)
    for d in sides:
        g = d[0]
        assert g.sum() == 2 and np.all(g[:, 2][:1] == 0) and g[1, 1] == 0 and g[0, :2].sum() == 1, g
    assert sides[-1][0][0, 0] == 1 and sides[-1][0][1, 0] == 1  # first tied element at one end of the draws
    assert sides[0][0][0, 1] == 1 and sides[0][0][1, 2] == 1  # last at the other


def test_a_reduce_window_max_pool_and_a_users_rule_take_sides_through_moved_inputs():
    pool = lambda z: jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (2,), (2,), "VALID")  # noqa: E731
    sides = draws(lambda z: jnp.sum(pool(z)), np.ones(4, np.float32))
    assert all(sorted(d[0].tolist()) in ([0, 0, 1, 1],) and d[0][0] + d[0][1] == 1 for d in sides), sides
    assert sides[-1][0].tolist() == [1, 0, 1, 0] and sides[0][0].tolist() == [0, 1, 0, 1]

    @jax.custom_jvp
    def relu5(z):  # relu'(0) = 5: the rule's own value at its kink is never sampled
        return jnp.maximum(z, 0.0)

    relu5.defjvp(lambda p, t: (relu5(p[0]), t[0] * jnp.where(p[0] > 0, 1.0, jnp.where(p[0] == 0, 5.0, 0.0))))
    got = {float(v) for d in draws(lambda z: jnp.sum(relu5(z)), np.zeros(3, np.float32)) for v in d[0]}
    assert got <= {0.0, 1.0} and got == {0.0, 1.0}, got
    # (1110.0 in float32: half a unit of its precision at the leaf's size rounds back; a unit at least is taken)
    got = {float(d[0][0]) for d in draws(lambda z: jnp.sum(relu5(z - 1110.0)), np.array([1110.0], np.float32))}
    assert got <= {0.0, 1.0}, got


def test_values_away_from_ties_are_left_alone_and_smooth_functions_have_no_kinks():
    x = np.array([0.3, -1.2, 2.0], np.float32)
    f = lambda x: jnp.sum(jnp.maximum(x, 0.0) * jnp.abs(x) + jnp.where(x > 0, x, 0.1 * x))  # noqa: E731
    exact = np.asarray(jax.grad(f)(jnp.asarray(x)))
    assert all(np.array_equal(d[0], exact) for d in draws(f, x))
    assert has_kinks(lambda dl: f(dl[0]), [jnp.asarray(x)])
    assert not has_kinks(lambda dl: jnp.sum(jnp.tanh(dl[0]) ** 2), [jnp.asarray(x)])


def test_a_users_rule_wrong_only_at_ties_is_sampled_off_its_ties_every_time():
    # A max-pool backward sending the gradient to every tied maximum (g·(x == max)) is right wherever no two inputs
    # tie. Its inputs, moved by random units of their precision alone, stayed tied about as often as their moves
    # rounded alike: the draws then gave its wrong value. Equal inputs are moved apart.
    @jax.custom_vjp
    def pool(h):
        return jnp.max(h, 0)

    pool.defvjp(lambda h: (jnp.max(h, 0), h), lambda h, g: (g[None] * (h == jnp.max(h, 0)[None]),))
    h = np.array([[0.5, 1.0], [0.5, 1.0], [0.2, 1.0], [0.5, -1.0]], np.float32)  # three ties, then four
    for d in draws(lambda h: jnp.sum(pool(h) * jnp.array([2.0, 3.0])), h):
        g = d[0]
        assert g[:, 0].sum() == 2 and g[:, 1].sum() == 3 and np.count_nonzero(g) == 2, g


def test_points_beside_move_equal_elements_apart_and_every_other_one_by_a_unit_or_so():
    from funcgrad.verify._grad import _equal_groups, _untied

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x0 = np.array([0.0, 0.0, 0.0, 1.5, 1.5, -2.0, 3.0, 1.5, 0.0], np.float64)
        eps = float(np.finfo(dtype).eps)
        for _ in range(20):
            noise = rng.standard_normal(x0.shape) * eps * np.maximum(np.abs(x0), 1.5)
            y = _untied(x0, (x0 + noise).astype(dtype), rng, dtype, _equal_groups(x0))
            assert len(set(y.tolist())) == len(y), y  # every tie broken
            assert np.all(np.abs(y.astype(np.float64) - x0) <= 16 * eps * np.maximum(np.abs(x0), 1.5)), y - x0
            assert y[5] == np.asarray(x0[5] + noise[5], dtype) and y[6] == np.asarray(x0[6] + noise[6], dtype)
    assert _equal_groups(np.array([1.0, 2.0, 3.0])) == ()


def test_mixed_draws_put_each_equation_s_kinks_at_either_end_independently():
    # relu of 4 values at 0 (one equation) and |w| of 3 weights at 0 (another): the sum of one-sided choices runs over
    # {0..4} + {-3, ..., 3}; the ends of the draws give only 4 + 3 (every kink +) and 0 - 3 (every kink -), while a
    # mixed draw gives 4 - 3 or 0 + 3 too (h74: an L1 penalty at w = 0 beside ReLUs at 0, whose correct hand lay
    # outside the range the draws gave).
    def f(z, w):
        return jnp.sum(jax.nn.relu(z)) + jnp.sum(jnp.abs(w))

    z, w = np.zeros(4, np.float32), np.zeros(3, np.float32)
    ends = {(float(d[0].sum()), float(d[1].sum())) for d in draws(f, z, w)}
    mixed = [(float(d[0].sum()), float(d[1].sum())) for d in draws(f, z, w, mixed=True)]
    assert (4.0, -3.0) not in ends and (0.0, 3.0) not in ends
    assert set(mixed) <= {(0.0, -3.0), (0.0, 3.0), (4.0, -3.0), (4.0, 3.0)}, mixed  # (an equation's kinks together)
    assert {(4.0, -3.0), (0.0, 3.0)} & set(mixed), mixed
