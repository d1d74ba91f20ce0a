"""pytest helpers: assertions that fail with the verification report's table.

Example (in a test)::

    from funcgrad.testing import assert_grads_match

    def test_my_layer_backward():
        assert_grads_match(loss, params, x, y, hand=my_hand_gradient)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from funcgrad import verify

__all__ = ["assert_grads_match", "assert_vjp_matches", "assert_chain_ok", "assert_rules_ok"]


def assert_grads_match(fn: Callable, params: Any, *args: Any, hand: Callable | None = None, **kwargs: Any) -> verify.GradReport:
    """:func:`funcgrad.verify.check_grad`, raising an AssertionError with the report's table unless ok."""
    __tracebackhide__ = True  # pytest: show the table, not this frame
    return verify.check_grad(fn, params, *args, hand=hand, **kwargs).assert_ok()


def assert_vjp_matches(fn: Callable, hand_vjp: Callable, *primals: Any, **kwargs: Any) -> verify.GradReport:
    """:func:`funcgrad.verify.check_vjp`, raising an AssertionError with the report's table unless ok."""
    __tracebackhide__ = True
    return verify.check_vjp(fn, hand_vjp, *primals, **kwargs).assert_ok()


def assert_chain_ok(stages: Any, x: Any, **kwargs: Any) -> verify.ChainReport:
    """:func:`funcgrad.verify.check_chain`, raising an AssertionError naming the first broken link unless ok."""
    __tracebackhide__ = True
    return verify.check_chain(stages, x, **kwargs).assert_ok()


def assert_rules_ok(fn: Callable, params: Any, *args: Any, **kwargs: Any) -> verify.AuditReport:
    """:func:`funcgrad.verify.audit`, raising an AssertionError with the audit's table unless every custom rule
    that ``fn(params, *args)`` calls passes."""
    __tracebackhide__ = True
    return verify.audit(fn, params, *args, **kwargs).assert_ok()
