"""Partial derivatives of x + y, x·y and max(x, y): JAX's answer next to the hand formula's.

At x = y, max(x, y) is not differentiable: the one-sided derivatives with respect to x are 0 (from below)
and 1 (from above). JAX returns the convention 0.5 to each side; the hand rule gives the whole gradient to x.
Both lie between the one-sided derivatives, which is why funcgrad's checker calls such a point a "kink".
"""

import jax
import jax.numpy as jnp

from funcgrad import rules


def compare(rule, x, y):
    jax_dx, jax_dy = jax.grad(rule.forward, argnums=(0, 1))(x, y)
    hand_dx, hand_dy = rule.backward(x, y, jnp.ones_like(x))
    print(
        f"  {rule.name:9s} at x={float(x):5.2f}, y={float(y):5.2f}:  "
        f"JAX (∂/∂x, ∂/∂y) = ({float(jax_dx):4.2f}, {float(jax_dy):4.2f})   "
        f"hand = ({float(hand_dx):4.2f}, {float(hand_dy):4.2f})"
    )
    return (jax_dx, jax_dy), (hand_dx, hand_dy)


def main():
    print("∂(x+y)/∂x = 1, ∂(x+y)/∂y = 1;  ∂(xy)/∂x = y, ∂(xy)/∂y = x;  ∂max(x,y)/∂x = 1(x > y)")
    for rule in (rules.add, rules.multiply):
        compare(rule, jnp.float32(2.0), jnp.float32(3.0))
    for x, y in ((3.0, 1.0), (1.0, 3.0), (2.0, 2.0)):
        compare(rules.maximum, jnp.float32(x), jnp.float32(y))
    print("  at x = y, max is not differentiable: one-sided derivatives are 0 and 1; JAX's 0.5 and the")
    print("  hand rule's 1 both lie between them.")


if __name__ == "__main__":
    main()
