"""The chain rule for y = g(f(x)) with f(x) = 2x² and g(u) = 3u⁵:
dy/dx = g'(f(x)) · f'(x) = 15(2x²)⁴ · 4x, by hand and by jax.grad."""

import jax
import jax.numpy as jnp

from funcgrad import rules


def main(x=0.5):
    x = jnp.float32(x)
    f = 2 * x**2
    print(f"y = g(f(x)), f(x) = 2x², g(u) = 3u⁵, at x = {float(x)}")
    print(f"  f'(x) = 4x = {float(4 * x)},  g'(f(x)) = 15 f(x)⁴ = {float(15 * f**4)}")
    hand = rules.chain.backward(x, jnp.float32(1.0))
    auto = jax.grad(rules.chain.forward)(x)
    print(f"  hand dy/dx = g'(f(x))·f'(x) = {float(hand):.6f}")
    print(f"  jax.grad                    = {float(auto):.6f}")
    return auto, hand


if __name__ == "__main__":
    main()
