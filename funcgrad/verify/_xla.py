"""How a check's gradient programs are compiled: :func:`gradient_jit` is ``jax.jit`` with, where it helps,
:func:`compiler_options`.

jaxlib 0.10's CPU backend hands matrix products, convolutions and reductions to YNNPACK ("ynn fusions"), with the
elementwise operations around them. Its sum over a leading axis (a bias gradient's sum over the batch, in autodiff's
backward pass and in most hand-derived ones) runs 10-25 times as long as XLA's own loop there: 12 ms against 0.8 ms
for a 64×32768 float64 array, 5.5 ms against 0.2 ms in float32; and a float64 tanh fused into a matrix product's
YNNPACK program took 14 ms where XLA's loop takes 2 (with a 64×32768 array of ones materialised for ``1 - h²``).
jaxlib 0.11 and later sum as fast as XLA does. On jaxlib 0.10 with the CPU backend, a check's gradient programs (the
float64 probe, the gradients at the parameters' own precision) therefore keep YNNPACK for each matrix product and
each convolution alone, the operations around them left to XLA (XLA's ``xla_cpu_experimental_ynn_fusion_type``
option), for parameters of fewer than :data:`_MAX_ELEMENTS` elements. Measured on this 2-core machine
(``jax.value_and_grad``, ms, JAX's defaults / matrix products with their elementwise operations in YNNPACK, the
previous choice / each product and convolution alone): benchmarks/bench_verify.py's 393k-parameter MLP 35 / 24 / 19
in float64 and 11 / 6.7 / 5.3 in float32; a small CNN 8.7 / 22 / 8.5 in float64 (products alone also took
convolutions from YNNPACK) and 2.5 / 2.7 / 2.5 in float32; an attention block alike (3.3, 2-2.5); a small RNN's scan
2.8 / 2.7 / 3.3 and 1.2 / 1.5 / 1.6, a little slower. Not beyond that size, where matrix products dominate and the
100M-parameter check of benchmarks/bench_verify_scale.py took more time and memory so (5.8× the model against
5.3×); not for the finite differences' programs, which took longer so (their loops of forward evaluations hold no
such sums); and nowhere else, where programs are compiled as JAX compiles any program. The user's own programs are
never touched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jaxlib
import numpy as np

_YNN_ALONE = {"xla_cpu_experimental_ynn_fusion_type":
              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
_MAX_ELEMENTS = 1 << 22  # parameters at least this many: JAX's defaults


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", jaxlib.__version__)[:3])


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """The options for a check's gradient programs in this process (None: JAX's defaults). Decided once, at the
    first such compilation, when JAX's backend is known: on jaxlib 0.10 with the CPU backend, where a tiny program
    compiles with them, YNNPACK for each matrix product and convolution alone (see the module's docstring)."""
    if _jaxlib_version()[:2] != (0, 10):
        return None
    try:
        if jax.default_backend() != "cpu":
            return None
        jax.jit(lambda x: x.sum(0), compiler_options=_YNN_ALONE).lower(np.zeros((2, 2), np.float32)).compile()
    except Exception:  # noqa: BLE001 - an option this jaxlib does not know: JAX's defaults, as anywhere else
        return None
    return dict(_YNN_ALONE)


class _GradientJit:
    """``jax.jit(fun, **kwargs)``, and the same with :func:`compiler_options` for parameters (the first argument,
    a sequence of arrays) of fewer than :data:`_MAX_ELEMENTS` elements. Both are made at the first call that needs
    them (importing funcgrad starts no JAX backend)."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]) -> None:
        functools.update_wrapper(self, fun)
        self._fun, self._kwargs = fun, kwargs
        self._plain: Any = None
        self._tuned: Any = None
        self._refused = False  # XLA refused the options for one of its programs: JAX's defaults for all

    def _pick(self, params: Any) -> Any:
        options = compiler_options()
        if options is not None and not self._refused and sum(int(np.size(x)) for x in params) < _MAX_ELEMENTS:
            if self._tuned is None:
                self._tuned = jax.jit(self._fun, compiler_options=options, **self._kwargs)
            return self._tuned
        return self._defaults()

    def _defaults(self) -> Any:
        if self._plain is None:
            self._plain = jax.jit(self._fun, **self._kwargs)
        return self._plain

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        jitted = self._pick(params)
        if jitted is self._plain:
            return jitted(params, *args, **kwargs)
        try:
            return jitted(params, *args, **kwargs)
        except jax.errors.JaxRuntimeError:
            if _compiles(jitted, params, args, kwargs):
                raise  # the program's own error as it ran (a callback's, say): as without the options, not run again
        # XLA refusing the options for this program: JAX's defaults, from now on (outside the handler: an error of
        # the program's own there reads as it would without the options)
        self._refused = True
        return self._defaults()(params, *args, **kwargs)

    def _cache_size(self) -> int:
        """How many compilations both hold (as ``jax.jit``'s own ``_cache_size``)."""
        return sum(j._cache_size() for j in (self._plain, self._tuned) if j is not None)

    def clear_cache(self) -> None:
        """Lets go of both's compilations (as ``jax.jit``'s own ``clear_cache``)."""
        for j in (self._plain, self._tuned):
            if j is not None:
                j.clear_cache()


def _compiles(jitted: Any, params: Any, args: tuple, kwargs: dict) -> bool:
    """Whether XLA compiles ``jitted`` (with its options) for these arguments."""
    try:
        jitted.lower(params, *args, **kwargs).compile()
    except Exception:  # noqa: BLE001 - any refusal: the caller runs JAX's defaults instead
        return False
    return True


def gradient_jit(fun: Callable | None = None, **kwargs: Any) -> Any:
    """``jax.jit`` for a check's gradient programs, whose first argument is the parameters' leaves: the same
    arguments (``static_argnames``, ...), compiled with :func:`compiler_options` where the module's docstring says.
    Usable as ``@functools.partial(gradient_jit, static_argnames=...)``."""
    if fun is None:
        return functools.partial(gradient_jit, **kwargs)
    return _GradientJit(fun, kwargs)
