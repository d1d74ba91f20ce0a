"""Auditing every custom derivative rule inside a model, and finding the one that is wrong.

A small transformer-like block, scanned over 2 layers with jax.lax.scan, calls four rules written by hand:
    dense     (custom VJP)   y = x·W + b
    softmax   (custom VJP)   dz = s ⊙ (g − Σ g ⊙ s)
    rmsnorm   (custom VJP)   y = x / rms(x) ⊙ γ
    swish     (custom JVP)   y' = σ(x)·(1 + x(1 − σ(x)))
verify.audit traces the model once, finds each call of each rule (inside jit and every scan iteration) and
checks the rule there, in isolation, against JAX's plain autodiff of the rule's own forward formula and finite
differences. The correct block passes; then one element of rmsnorm's backward is planted wrong (dx[3, 0]
off by 1.5×) and the audit names that rule, the element and the call.

Run it with a rule's name (python examples/audit_custom_rules.py dense) to plant the mistake there instead.
Exits non-zero unless the audit finds exactly the planted rule.
"""

import sys

import jax
import jax.numpy as jnp

from funcgrad import verify

RULES = ("dense", "softmax", "rmsnorm", "swish")


def make_block(wrong=None):
    """The model's loss; ``wrong`` names the rule whose backward is off by 1.5× at one element of its first
    input's derivative."""

    def plant(name, d, at):
        return d.at[at].multiply(1.5) if wrong == name else d

    @jax.custom_vjp
    def dense(x, W, b):
        return x @ W + b[None, :]

    def dense_bwd(res, g):
        x, W = res
        return plant("dense", g @ W.T, (2, 1)), x.T @ g, g.sum(0)

    dense.defvjp(lambda x, W, b: (x @ W + b[None, :], (x, W)), dense_bwd)

    @jax.custom_vjp
    def softmax(z):
        return jax.nn.softmax(z, axis=-1)

    def softmax_bwd(s, g):
        return (plant("softmax", s * (g - jnp.sum(g * s, axis=-1, keepdims=True)), (1, 3)),)

    softmax.defvjp(lambda z: (jax.nn.softmax(z, axis=-1),) * 2, softmax_bwd)

    @jax.custom_vjp
    def rmsnorm(x, gamma):
        return x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * gamma[None, :]

    def rmsnorm_fwd(x, gamma):
        r = 1 / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
        return x * r * gamma[None, :], (x, r, gamma)

    def rmsnorm_bwd(res, g):
        x, r, gamma = res
        gx = g * gamma[None, :]
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
        return swish(x), plant("swish", s * (1 + x * (1 - s)), (0, 2)) * t

    def layer(x, p):
        d = x.shape[-1]
        q, k, v = jnp.split(dense(x, p["Wqkv"], p["bqkv"]), 3, axis=-1)
        attention = softmax(q @ k.T / jnp.sqrt(d)) @ v
        h = rmsnorm(x + attention, p["gamma"])
        return h + dense(swish(dense(h, p["W1"], p["b1"])), p["W2"], p["b2"]), None

    @jax.jit
    def loss(params, x):
        out, _ = jax.lax.scan(layer, x, params)  # params hold a leading axis: one slice per layer
        return jnp.mean(out**2)

    return loss


def init(key, layers=2, d=4, hidden=8):
    shapes = {"Wqkv": (d, 3 * d), "bqkv": (3 * d,), "gamma": (d,), "W1": (d, hidden), "b1": (hidden,),
              "W2": (hidden, d), "b2": (d,)}
    keys = jax.random.split(key, len(shapes))
    params = {k: 0.5 * jax.random.normal(kk, (layers, *s)) for kk, (k, s) in zip(keys, shapes.items(), strict=True)}
    params["gamma"] = params["gamma"] + 1.0
    return params


def main(wrong="rmsnorm"):
    if wrong not in RULES:
        sys.exit(f"no rule named {wrong!r}; choose one of {', '.join(RULES)}")
    params = init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))  # 5 tokens of width 4

    print("1) The correct block: every rule, at every call the forward pass makes")
    report = verify.audit(make_block(), params, x)
    print(report)

    print(f"\n2) One element of {wrong}'s backward planted wrong")
    planted = verify.audit(make_block(wrong), params, x)
    print(planted)

    found = [r.rule for r in planted.failing]
    print(f"\ncorrect block ok = {report.ok}; failing rules in the planted block: {found}")
    if not report.ok or found != [wrong]:
        print(f"expected exactly [{wrong!r}] to fail", file=sys.stderr)
        sys.exit(1)
    return report, planted


if __name__ == "__main__":
    main(*sys.argv[1:2])
