"""A kink explained: where a function is not differentiable, autodiff and the hand formula may legitimately
disagree, and funcgrad says so instead of failing.

max(x, y) at x = y: the one-sided derivatives with respect to x are 0 (x just below y) and 1 (just above).
JAX returns 0.5; the book's rule returns 1. Both lie between the one-sided derivatives: verdict "kink".

The book's model at initialisation sits on kinks too: its biases are zero and the spiral data has exact
(0, 0) rows, so those samples reach every ReLU at exactly 0.
"""

import jax
import jax.numpy as jnp

import funcgrad as fg
from funcgrad import rules, verify


def one_sided(f, x, h=1e-6):
    return (f(x) - f(x - h)) / h, (f(x + h) - f(x)) / h


def main():
    x = y = 2.0
    left, right = one_sided(lambda t: max(t, y), x)
    print(f"max(x, y) at x = y = {x}: one-sided ∂/∂x from the left {left:.3f}, from the right {right:.3f}")
    print(f"  JAX: {float(jax.grad(rules.maximum.forward)(jnp.float32(x), jnp.float32(y))):.3f}, "
          f"hand rule: {float(rules.maximum.backward(jnp.float32(x), jnp.float32(y), 1.0)[0]):.3f}")
    report = verify.check_vjp(
        rules.maximum.forward, rules.maximum.backward, jnp.array([2.0, 1.0]), jnp.array([2.0, 3.0])
    )
    print(report)

    print("\nThe book's model at initialisation (zero biases, spiral rows at exactly (0, 0)):")
    model = fg.nn.mlp([64, 3], activation="relu", output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy", l2={"dense1/*": 5e-4})
    params = model.init(jax.random.key(0), (2,))
    X, y_ = fg.data.spiral(100, 3, key=0)
    model_report = verify.check_grad(obj.value, params, X, y_, hand=obj.hand_grad)
    print(model_report)
    print(f"\nok = {model_report.ok}: the disagreements are kinks, not bugs.")
    return report, model_report


if __name__ == "__main__":
    main()
