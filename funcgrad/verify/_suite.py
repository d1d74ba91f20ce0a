"""The suite behind ``funcgrad verify``: every rule of the catalog and the book's model through the checks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from funcgrad import data, nn, rules
from funcgrad.objective import Objective
from funcgrad.verify._composite import check_chain, check_jacobian, check_vjp
from funcgrad.verify._grad import check_grad


def verify_suite(seed: int = 0, only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs every rule of the catalog and the book's model through the checks; returns one record per check
    (name, kind, formula, report, seconds). Prints nothing."""
    checks: list[tuple[str, str, str, Any]] = []
    for name, rule in rules.CATALOG.items():
        checks.append((
            f"rule {name}",
            "check_vjp",
            rule.formula,
            lambda rule=rule: check_vjp(rule.forward, rule.backward, *rule.example(jax.random.key(seed)),
                                        argnums=rule.argnums, seed=seed),
        ))
    checks.append((
        "rule softmax_jacobian",
        "check_jacobian",
        "J = diag(s) − s·sᵀ",
        lambda: check_jacobian(rules.softmax.forward, jnp.array([1.0, 2.0, 0.5, -1.0]), rules.softmax_jacobian,
                               seed=seed),
    ))

    def book_model(l2=None, dropout=None):
        model = nn.mlp([64, 3], activation="relu", output="softmax", dropout=dropout)
        obj = Objective(model, "categorical_crossentropy", l2=l2)
        params = model.init(jax.random.key(seed), (2,))
        X, y = data.spiral(100, 3, key=seed)
        return obj, params, X, y

    def model_check():
        obj, params, X, y = book_model()
        return check_grad(obj.value, params, X, y, hand=obj.hand_grad, seed=seed)

    def regularised_check():
        obj, params, X, y = book_model(l2={"dense1/*": 5e-4}, dropout=0.1)
        key = jax.random.key(seed + 1)
        fn = lambda p, X, y, k: obj.value(p, X, y, key=k, train=True)  # noqa: E731
        hand = lambda p, X, y, k: obj.hand_grad(p, X, y, key=k, train=True)  # noqa: E731
        return check_grad(fn, params, X, y, key, hand=hand, seed=seed)

    def chain_check():
        obj, params, X, y = book_model()
        return check_chain(obj.stages(params, X, y), X, seed=seed)

    checks += [
        ("book model (ch. 11)", "check_grad", "spiral 100×3, 2→64 ReLU→3 softmax + CCE, at init", model_check),
        ("book model + L2 + dropout (ch. 14-15)", "check_grad", "as ch. 11, L2 5e-4 on dense1, dropout 0.1",
         regularised_check),
        ("book chain (ch. 11)", "check_chain", "dense1 → relu1 → dense2 → softmax1 → loss, link by link",
         chain_check),
    ]
    records = []
    for name, kind, formula, run in checks:
        if only and not any(o in name for o in only):
            continue
        start = time.perf_counter()
        report = run()
        records.append({"name": name, "kind": kind, "formula": formula, "report": report,
                        "seconds": time.perf_counter() - start})
    return records
