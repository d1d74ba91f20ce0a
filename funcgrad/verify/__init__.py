"""Three-way gradient checks: autodiff, hand-derived formulas and finite differences, compared per element.

:func:`check_grad` computes JAX's gradient (reverse mode, cross-checked with forward mode where ``fn`` meets a
derivative rule that is not JAX's own: a ``custom_jvp`` of the user's or a framework's, a custom linear solve's
transpose), the user's hand-derived gradient and a finite-difference reference, and says, per parameter leaf,
which side disagrees with the other two, at which element, and whether the disagreement is only a kink. (JAX's
reverse mode is the transpose of forward mode's linear map and its own rules are linear in the tangents: made of
them alone, the two agree by construction, and comparing them would cost an evaluation and a half per leaf.)

How it decides (see also :class:`GradReport`):

- **Finite differences** are computed in float64 (even for float32 models), along a direction ``u`` (a
  coordinate, or a random unit vector within one leaf) at steps ±h and ±h/2: two central differences give a
  Richardson-extrapolated derivative and an estimate of its own error; rounding error is bounded from the
  dtype of ``fn``'s output. One-sided differences at both steps test smoothness: for a smooth function
  ``(D₊ − D₋)(h) ≈ 2·(D₊ − D₋)(h/2)``; at or near a kink (ReLU at 0, max at a tie, |x| at 0) this fails.
  Steps form a ladder h, h/10, ..., h/10⁴, read from the top: the pair of consecutive steps that agree with
  the least uncertainty decides (a kink within the larger step only makes them disagree), and finer steps are
  evaluated only for items not yet decided.
- **Kinks.** At a kink every value between the one-sided derivatives D₋ and D₊ is a valid subgradient,
  D₋ and D₊ included. Each one-sided derivative is estimated with its own Richardson extrapolation
  (``2·D₊(h/2) − D₊(h)``: the O(h·f'') bias of a one-sided quotient cancels) and its own error (the change
  between two steps of the ladder); a value inside ``[min(D₋, D₊), max(D₋, D₊)]`` within that error passes
  with verdict ``"kink"``; a value outside fails, blamed on the side that holds it when the other is inside.
  Both outside: several kinks may meet at the point (per-kink conventions then need not lie in the
  interval), so it passes as ``"kink"`` while hand is no farther from autodiff than autodiff is from D₋ and
  D₊ together, with a note.
- **Singular points** (``sqrt``/``log`` at 0, ``|x|^p`` with p < 1 at 0): the difference quotients grow
  without bound as the step shrinks, or the function is undefined on one side. The derivative does not exist
  there: verdict ``"singular"`` (passing) when autodiff and hand describe it alike (both infinite, or the
  same convention), ``"mismatch"`` when they differ; neither side is blamed.
- **Autodiff and hand** are compared element by element over every leaf (both are full vectors, so a single
  wrong element among millions is located exactly). Elements that disagree, and elements where either side
  is not finite, are arbitrated by finite differences at that element: the side that disagrees with the other
  two is wrong. When autodiff and hand agree with each other and finite differences are confident (their
  error estimate far below the disagreement) and say otherwise, both share a mistake: ``"both_wrong"``
  (a ``stop_gradient`` in the wrong place, a wrong ``custom_vjp`` copied into the hand formula).
  ``"fd_unreliable"`` is kept for when finite differences truly cannot decide; the row's note says why.
- **Large leaves** are checked against finite differences by random projections plus the largest-gradient
  element, compiled with ``jit`` (batched with ``vmap`` on accelerators, a ``lax`` loop on CPU); a projection
  that disagrees is bisected down to the element responsible. No Jacobian is ever materialised. Projections
  skip elements where either side is not finite (those are checked one by one).
- **Memory.** The two float64 gradients are the only arrays of the parameters' size the check holds at once
  (4× a float32 model's bytes), read in chunks and freed before the finite differences run; a check takes a
  few times the model's memory, whatever its size.
- **What is differentiated.** By default every inexact-array leaf of ``params``; every other leaf (integer
  arrays, RNG keys and counters, functions, strings) is held fixed and listed in the report's notes; ``wrt``
  chooses otherwise. ``has_aux=True`` takes ``fn`` returning ``(loss, aux)`` as `jax.grad` does.
- **Hand gradients** may be in any float dtype (compared in float64) and may be written in NumPy, as the book
  writes every backward pass: a ``hand`` that JAX cannot trace is called eagerly on NumPy arrays (float64
  for the float64 check, the parameters' own dtypes for the user-precision check). Functions JAX cannot
  reverse-differentiate (``lax.while_loop``) get their autodiff gradient from forward mode.
- Every call traces ``fn`` and ``hand`` afresh: a function may read globals that changed since an earlier
  check, and a cached trace would check the old function.
- **Tolerances** come from the dtypes (``rtol = max(1e-7, 3·√eps)``, at most 5%, of the lowest precision fn
  computes in with float64 inputs, a final cast of its output aside; finite differences carry that rounding too,
  ``atol`` from each leaf's gradient scale and the finite-difference noise floor) and from the measured
  finite-difference error; ``rtol``/``atol`` override the analytic part. The user's own precision (e.g.
  float32) is checked separately: a side that becomes non-finite or loses far more precision than the other
  is reported.

Example:
    >>> import jax.numpy as jnp
    >>> from funcgrad import verify
    >>> f = lambda p: jnp.sum(p["w"] ** 3)
    >>> report = verify.check_grad(f, {"w": jnp.array([1.0, -2.0])}, hand=lambda p: {"w": 3 * p["w"] ** 2})
    >>> report.verdict
    <Verdict.OK: 'ok'>
    >>> report.verdict == "ok"
    True
"""

from funcgrad.verify._audit import audit
from funcgrad.verify._composite import check_chain, check_jacobian, check_vjp
from funcgrad.verify._grad import check_grad
from funcgrad.verify._report import PASSING, VERDICTS, AuditReport, AuditRow, ChainReport, GradReport, Row

# Importable, not in __all__ (tests/test_api.py pins the public names): the verdicts' type, the suite behind
# ``funcgrad verify``, and the combination rule that tests pin.
from funcgrad.verify._report import Verdict as Verdict
from funcgrad.verify._report import _combine_verdicts as _combine_verdicts
from funcgrad.verify._suite import verify_suite as verify_suite

__all__ = [
    "VERDICTS",
    "PASSING",
    "Row",
    "GradReport",
    "ChainReport",
    "check_grad",
    "check_vjp",
    "check_jacobian",
    "check_chain",
    "audit",
    "AuditReport",
    "AuditRow",
]
