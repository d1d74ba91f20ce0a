"""The book's single neuron (chapter 9): x = [1, −2, 3], w = [−3, −1, 2], b = 1, ReLU.

z = w·x + b = 6 and the output is 6. With an upstream gradient of 1:
∂/∂x = w = [−3, −1, 2], ∂/∂w = x = [1, −2, 3], ∂/∂b = 1. One step of w −= 0.001·dw, b −= 0.001·db
brings the output down to 5.985."""

import jax
import jax.numpy as jnp

from funcgrad import rules


def main():
    x = jnp.array([1.0, -2.0, 3.0])
    w = jnp.array([-3.0, -1.0, 2.0])
    b = jnp.float32(1.0)
    out = rules.neuron.forward(x, w, b)
    dx, dw, db = rules.neuron.backward(x, w, b, jnp.float32(1.0))
    jdx, jdw, jdb = jax.grad(rules.neuron.forward, argnums=(0, 1, 2))(x, w, b)
    print(f"output = ReLU(w·x + b) = {float(out)}")
    print(f"  ∂/∂x: hand {dx.tolist()}   JAX {jdx.tolist()}")
    print(f"  ∂/∂w: hand {dw.tolist()}   JAX {jdw.tolist()}")
    print(f"  ∂/∂b: hand {float(db)}              JAX {float(jdb)}")
    w2, b2 = w - 0.001 * dw, b - 0.001 * db
    after = rules.neuron.forward(x, w2, b2)
    print(f"after w -= 0.001·dw, b -= 0.001·db: output = {float(after):.3f}")
    return out, (dx, dw, db), (jdx, jdw, jdb), after


if __name__ == "__main__":
    main()
