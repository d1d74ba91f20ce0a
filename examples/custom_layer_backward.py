"""Checking the hand-written backward pass of a custom layer.

A Swish activation, y = x·σ(x), with its derivative worked out by hand:
    dy/dx = σ(x) + x·σ(x)(1 − σ(x)) = σ(x)·(1 + x(1 − σ(x))).
check_vjp compares the hand VJP with jax.vjp and finite differences; then the layer goes into a model, whose
hand-derived gradient (the book's backward pass, composed by the chain rule) is checked against jax.grad.
"""

import jax

import funcgrad as fg
from funcgrad import rules, verify


def swish(x):
    return x * jax.nn.sigmoid(x)


def swish_backward(x, dvalues):
    s = jax.nn.sigmoid(x)
    return dvalues * s * (1 + x * (1 - s))


SWISH = rules.Rule("swish", swish, swish_backward, "swish' = σ(x)(1 + x(1 − σ(x)))",
                   example=lambda key: (jax.random.normal(key, (8, 5)),))


def main():
    x = jax.random.normal(jax.random.key(0), (8, 5))
    print("1) The rule alone: hand VJP vs jax.vjp vs finite differences")
    print(verify.check_vjp(swish, swish_backward, x))

    print("\n2) In a model: hand-derived gradient of the whole objective vs jax.grad")
    model = fg.nn.serial(fg.nn.dense(32), fg.nn.elementwise(SWISH), fg.nn.dense(3), fg.nn.softmax())
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(1), (2,))
    X, y = fg.data.spiral(50, 3, key=2)
    report = verify.check_grad(obj.value, params, X, y, hand=obj.hand_grad)
    print(report)
    return report


if __name__ == "__main__":
    main()
