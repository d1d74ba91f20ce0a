"""Each script in examples/ runs and prints JAX's answer next to the hand formula's."""

import pytest

from conftest import ROOT, run_python

EXPECTED = {
    "partial_derivatives.py": ["(0.50, 0.50)   hand = (1.00, 0.00)", "(3.00, 2.00)   hand = (3.00, 2.00)"],
    "gradient.py": ["= [27.0, 2.0, 12.0]", "jax.grad                                = [27.0, 2.0, 12.0]"],
    "chain_rule.py": ["hand dy/dx = g'(f(x))·f'(x) = 1.875000", "jax.grad                    = 1.875000"],
    "single_neuron.py": ["output = ReLU(w·x + b) = 6.0", "∂/∂w: hand [1.0, -2.0, 3.0]   JAX [1.0, -2.0, 3.0]", "output = 5.985"],
    "custom_layer_backward.py": ["check_vjp(swish): verdict ok (ok)", "check_grad: verdict ok (ok) — 4 leaves"],
    "planted_bug.py": [
        "check_grad: verdict hand_wrong (NOT OK)",
        "['dense2']['W']  hand_wrong     exact 192/192      [5, 1]",
        "first broken link: loss (categorical_crossentropy)",
    ],
    "kink_explained.py": ["from the left 0.000, from the right 1.000", "JAX: 0.500, hand rule: 1.000",
                          "verdict kink (ok)", "ok = True"],
}


def test_every_example_is_covered():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert set(EXPECTED) <= scripts
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_prints_both_answers(script):
    out = run_python([str(ROOT / "examples" / script)], timeout=120).stdout
    for line in EXPECTED[script]:
        assert line in out, f"{script}: {line!r} not in\n{out}"
