"""Each script in examples/ runs and prints JAX's answer next to the hand formula's."""

import pytest

from conftest import ROOT, run_python

EXPECTED = {
    "partial_derivatives.py": ["(0.50, 0.50)   hand = (1.00, 0.00)", "(3.00, 2.00)   hand = (3.00, 2.00)"],
    "gradient.py": ["= [27.0, 2.0, 12.0]", "jax.grad                                = [27.0, 2.0, 12.0]"],
    "chain_rule.py": ["hand dy/dx = g'(f(x))·f'(x) = 1.875000", "jax.grad                    = 1.875000"],
    "single_neuron.py": ["output = ReLU(w·x + b) = 6.0", "∂/∂w: hand [1.0, -2.0, 3.0]   JAX [1.0, -2.0, 3.0]", "output = 5.985"],
}


def test_every_example_is_covered():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert set(EXPECTED) <= scripts
    assert scripts <= set(EXPECTED) | set(globals().get("MORE_EXAMPLES", {}))


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_prints_both_answers(script):
    out = run_python([str(ROOT / "examples" / script)], timeout=120).stdout
    for line in EXPECTED[script]:
        assert line in out, f"{script}: {line!r} not in\n{out}"
