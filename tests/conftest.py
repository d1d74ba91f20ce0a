import os
import subprocess
import sys
from pathlib import Path

# Implicit rank promotion (a (3,) bias silently broadcast against (N, 3)) is an error in every test, and in
# every subprocess the tests start (they inherit the environment), as equinox's test suite does.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402
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
