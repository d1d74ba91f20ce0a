"""A planted bug, caught: the table names the leaf and the element, and the chain check names the layer.

Bug 1: one wrong element in a hand-derived weight gradient (dW2[5, 1] off by 1%).
Bug 2: the classic slip in the book's combined softmax + cross-entropy backward: forgetting to divide by the
number of samples. Every parameter gradient is then wrong; check_chain traces it to the loss link.
"""

import jax

import funcgrad as fg
from funcgrad import rules, verify


def main():
    model = fg.nn.mlp([64, 3], activation="relu", output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    params = model.init(jax.random.key(0), (2,))
    X, y = fg.data.spiral(100, 3, key=0)

    def hand_with_one_wrong_element(p, X, y):
        g = obj.hand_grad(p, X, y)
        return {**g, "dense2": {**g["dense2"], "W": g["dense2"]["W"].at[5, 1].multiply(1.01)}}

    print("Bug 1: dW2[5, 1] off by 1%")
    report1 = verify.check_grad(obj.value, params, X, y, hand=hand_with_one_wrong_element)
    print(report1)

    print("\nBug 2: softmax + cross-entropy backward without the division by N")
    stages = obj.stages(params, X, y)
    name, fwd, _ = stages[-1]
    stages[-1] = (name, fwd, lambda probs, d: d * rules.categorical_crossentropy.backward(probs, y, 1.0) * len(X))
    report2 = verify.check_chain(stages, X)
    print(report2)
    return report1, report2


if __name__ == "__main__":
    main()
