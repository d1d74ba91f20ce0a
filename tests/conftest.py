import os
import subprocess
import sys
from pathlib import Path

# Implicit rank promotion (a (3,) bias silently broadcast against (N, 3)) is an error in every test, and in
# every subprocess the tests start (they inherit the environment), as equinox's test suite does.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = Path(__file__).resolve().parents[1]

# Property-based tests (hypothesis): bounded and derandomized by default, so the suite's time and outcome do
# not vary between runs; HYPOTHESIS_PROFILE=explore searches many more, random, examples (make test-properties).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the run extras only: the property tests skip themselves
    pass
else:
    settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("explore", max_examples=500, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _single_scale_everywhere():
    """FUNCGRAD_TEST_SINGLE_SCALE=1: every check reads its finite differences as a costly function does (a central
    difference first, the ladder only where it does not settle an item), to run the verifier's tests on that path."""
    if os.environ.get("FUNCGRAD_TEST_SINGLE_SCALE") != "1":
        yield
        return
    from funcgrad.verify import _compiled

    before, _compiled._SCALES_FLOP_BUDGET = _compiled._SCALES_FLOP_BUDGET, -1.0
    yield
    _compiled._SCALES_FLOP_BUDGET = before


@pytest.fixture
def x64():
    """Runs a test with 64-bit JAX, only inside its scope (x64 is process-global)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def implicit_broadcasting():
    """For test-written user code that broadcasts a (n,) bias against (N, n) implicitly, as much code nobody here
    wrote does: the checker must handle it, so such tests run with rank promotion allowed."""
    with jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One XLA compilation cache for the CLI subprocesses of a test session (they compile the same programs)."""
    return str(tmp_path_factory.mktemp("xla-cache"))


def run_python(args, *, env=None, timeout=300, cwd=ROOT, check=True):
    """Runs `python args...` in a fresh interpreter (for the CLI, examples and multi-device settings)."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def book_mlp_numpy(W1, b1, W2, b2, X, y, *, lam=0.0, relu_at_zero=0.0):
    """The book's dense → ReLU → dense → softmax model with categorical cross-entropy and L2 (``lam``) on dense1
    (chapters 11-14), forward and combined backward transcribed in NumPy, float64. ReLU's backward takes
    ``relu_at_zero`` at exactly 0 (the book: ``dinputs[z <= 0] = 0``). Returns (loss, data_loss, reg, grads)."""
    W1, b1, W2, b2, X = (np.asarray(a, np.float64) for a in (W1, b1, W2, b2, X))
    z1 = X @ W1 + b1
    a1 = np.maximum(0, z1)
    z2 = a1 @ W2 + b2
    e = np.exp(z2 - z2.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    n = len(X)
    data_loss = -np.mean(np.log(np.clip(probs[range(n), y], 1e-7, 1 - 1e-7)))
    reg = lam * (np.sum(W1 * W1) + np.sum(b1 * b1))
    # Backward: combined softmax + CCE, dense2, ReLU, dense1, then the L2 terms.
    dz2 = probs.copy()
    dz2[range(n), y] -= 1
    dz2 /= n
    dW2, db2 = a1.T @ dz2, dz2.sum(0)
    da1 = dz2 @ W2.T
    dz1 = np.where(z1 > 0, da1, np.where(z1 == 0, relu_at_zero * da1, 0.0))
    grads = {"dense1": {"W": X.T @ dz1 + 2 * lam * W1, "b": dz1.sum(0) + 2 * lam * b1},
             "dense2": {"W": dW2, "b": db2}}
    return data_loss + reg, data_loss, reg, grads


def same_training_state(a, b):
    """Whether two checkpoint files hold the same training state bit for bit: every array, and every entry of the
    metadata but the run's name (each run folder draws its own; a resumed run keeps its folder's)."""
    import io

    from funcgrad import checkpoint

    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    ma, mb = ({k: v for k, v in checkpoint.metadata(d).items() if k != "run"} for d in (da, db))
    with np.load(io.BytesIO(da), allow_pickle=False) as za, np.load(io.BytesIO(db), allow_pickle=False) as zb:
        names = sorted(n for n in za.files if n != "__funcgrad__")
        same = names == sorted(n for n in zb.files if n != "__funcgrad__") and all(
            za[n].dtype == zb[n].dtype and za[n].tobytes() == zb[n].tobytes() for n in names)
    return same and ma == mb


def twice_primitive(factor=2.0, shift=0.0):
    """fn(w) = sum(sin(2w)) through a primitive of the user's, y = 2x (jax.extend.core.Primitive, as JAX's "How
    primitives work" defines one), named "twice" at every call: its JVP is ``factor·t + shift`` and its transpose
    ``factor·ct`` (right at factor 2, shift 0)."""
    import jax.numpy as jnp
    from jax.extend.core import Primitive
    from jax.interpreters import ad, mlir

    p = Primitive("twice")
    p.def_impl(lambda x: 2 * x)
    p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(p, mlir.lower_fun(lambda x: 2 * x, multiple_results=False))
    ad.primitive_jvps[p] = lambda primals, tangents: (p.bind(primals[0]), tangents[0] * factor + shift)
    ad.primitive_transposes[p] = lambda ct, x: [ct * factor]
    return lambda w: jnp.sum(jnp.sin(p.bind(w)))


def cube_root(offset=0.0, slip=1.0, shift=0.0):
    """fn(w) = sum(x²) for x³ = w + offset solved by lax.custom_root, whose derivative is the user's tangent_solve,
    ``slip·y/g(1) + shift`` (right at slip 1, shift 0)."""
    import jax.numpy as jnp

    def fn(w):
        def solve(g, y):
            x = jnp.ones_like(y)
            for _ in range(60):
                x = x - g(x) / (3 * x**2)
            return x

        tangent_solve = lambda g, y: slip * y / g(jnp.ones_like(y)) + shift  # noqa: E731
        root = jax.lax.custom_root(lambda x: x**3 - (w + offset), jnp.ones_like(w), solve, tangent_solve)
        return jnp.sum(root**2)

    return fn
