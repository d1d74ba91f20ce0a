"""Backpropagation by hand (micrograd's lesson, in the book's notation): dense → ReLU → dense → softmax +
cross-entropy on a spiral batch. The forward pass keeps each layer's input; the backward pass applies the
hand-derived rules in reverse order, each turning the gradient from the layer above (``dvalues``) into the
gradients of that layer's inputs and parameters by the chain rule, ∂L/∂x = ∂L/∂y · ∂y/∂x. The result is then
compared with jax.grad of the same loss and checked by funcgrad.verify.check_grad.
"""

import jax
import jax.numpy as jnp

import funcgrad as fg
from funcgrad import rules, verify

# Biases drawn nonzero keep the spiral's exact (0, 0) rows off ReLU's kink at 0, where the book's rule (0)
# and JAX (0.5) legitimately differ (see kink_explained.py); He weights give gradients of a readable size.
MODEL = fg.nn.mlp([16, 3], activation="relu", W_init=fg.initializers.he_normal(), b_init=fg.initializers.normal(0.1))


def loss(params, X, y):
    """The same loss through the library's model: what jax.grad differentiates."""
    return rules.softmax_crossentropy.forward(MODEL.apply(params, X), y)


def forward(params, X, y):
    """The forward pass, keeping each layer's input for the backward pass."""
    W1, b1, W2, b2 = params["dense1"]["W"], params["dense1"]["b"], params["dense2"]["W"], params["dense2"]["b"]
    z1 = rules.dense.forward(X, W1, b1)                 # dense1: z1 = X·W1 + b1        (input X)
    a1 = rules.relu.forward(z1)                          # relu1:  a1 = max(z1, 0)        (input z1)
    z2 = rules.dense.forward(a1, W2, b2)                 # dense2: z2 = a1·W2 + b2       (input a1)
    L = rules.softmax_crossentropy.forward(z2, y)        # L = −mean log softmax(z2)_y  (input z2)
    return L, (X, z1, a1, z2)


def backward(params, X, y, show=False):
    """The backward pass, rule by rule in reverse order; returns grads shaped like params."""
    W1, b1, W2, b2 = params["dense1"]["W"], params["dense1"]["b"], params["dense2"]["W"], params["dense2"]["b"]
    _, (X, z1, a1, z2) = forward(params, X, y)
    # ∂L/∂L = 1 enters the last rule; each line multiplies what came down by that layer's local derivative.
    dvalues = rules.softmax_crossentropy.backward(z2, y, 1.0)      # ∂L/∂z2 = (softmax(z2) − y_onehot)/N
    dinputs, dW2, db2 = rules.dense.backward(a1, W2, b2, dvalues)  # ∂L/∂a1 = dvalues·W2ᵀ, ∂L/∂W2 = a1ᵀ·dvalues,
    #                                                                ∂L/∂b2 = Σ_samples dvalues
    drelu = rules.relu.backward(z1, dinputs)                       # ∂L/∂z1 = ∂L/∂a1 ⊙ 1(z1 > 0)
    dX, dW1, db1 = rules.dense.backward(X, W1, b1, drelu)          # ∂L/∂W1 = Xᵀ·drelu, ∂L/∂b1 = Σ drelu,
    #                                                                ∂L/∂X = drelu·W1ᵀ (unused: X is data)
    if show:
        for name, g, formula in [("dvalues", dvalues, "∂L/∂z2 = (ŷ − y)/N"), ("dW2", dW2, "∂L/∂W2 = a1ᵀ·dvalues"),
                                 ("db2", db2, "∂L/∂b2 = Σ dvalues"), ("dinputs", dinputs, "∂L/∂a1 = dvalues·W2ᵀ"),
                                 ("drelu", drelu, "∂L/∂z1 = dinputs ⊙ 1(z1 > 0)"),
                                 ("dW1", dW1, "∂L/∂W1 = Xᵀ·drelu"), ("db1", db1, "∂L/∂b1 = Σ drelu"),
                                 ("dX", dX, "∂L/∂X = drelu·W1ᵀ")]:
            print(f"  {name:8s} {str(g.shape):9s} {formula}")
    return {"dense1": {"W": dW1, "b": db1}, "dense2": {"W": dW2, "b": db2}}


def main():
    X, y = fg.data.spiral(20, 3, key=0)                 # 60 samples, 2 features, 3 classes
    params = MODEL.init(jax.random.key(0), (2,))        # params['dense1']['W']: (2, 16), as fg.nn.mlp names them
    L, (_, z1, a1, z2) = forward(params, X, y)
    print(f"forward: X {X.shape} → dense1 {z1.shape} → relu1 {a1.shape} → dense2 {z2.shape} → loss {float(L):.4f}")
    print("backward, rule by rule in reverse (each gradient has the shape of what it differentiates):")
    hand = backward(params, X, y, show=True)

    auto = jax.grad(loss)(params, X, y)
    diffs = {f"d{b}{k[-1]}": float(jnp.max(jnp.abs(hand[k][b] - auto[k][b]))) for k in hand for b in hand[k]}
    print(f"jax.grad of the same loss: max abs difference {max(diffs.values()):.2e} "
          f"({', '.join(f'{n} {d:.1e}' for n, d in diffs.items())})")

    report = verify.check_grad(loss, params, X, y, hand=backward)
    print(report.summary())
    return hand, auto, report


if __name__ == "__main__":
    main()
