"""The gradient of f(x, y, z) = 3x³z − y² + 5z + 2yz: the vector of partial derivatives,
∇f = [9x²z, −2y + 2z, 3x³ + 5 + 2y], by hand and by jax.grad."""

import jax
import jax.numpy as jnp

from funcgrad import rules


def main(x=1.0, y=2.0, z=3.0):
    point = tuple(jnp.float32(v) for v in (x, y, z))
    jax_grad = jax.grad(rules.polynomial.forward, argnums=(0, 1, 2))(*point)
    hand_grad = rules.polynomial.backward(*point, jnp.float32(1.0))
    print(f"f(x, y, z) = 3x³z − y² + 5z + 2yz at (x, y, z) = ({x}, {y}, {z})")
    print(f"  hand ∇f = [9x²z, −2y + 2z, 3x³ + 5 + 2y] = {[float(g) for g in hand_grad]}")
    print(f"  jax.grad                                = {[float(g) for g in jax_grad]}")
    return jax_grad, hand_grad


if __name__ == "__main__":
    main()
