"""funcgrad.verify.check_grad vs jax.test_util.check_grads on a 393k-parameter MLP loss.

The model: 8 → 32768 tanh → 3, 64 samples, softmax cross-entropy, with a hand-derived gradient.
For float64 and float32 it measures, in one run:

- wall time of each checker, cold (first call in a fresh interpreter, compilation included: what a user
  running a check experiences) and warm (median of repeated calls in the same process); and the repeated call
  with check_grad and check_grads taking turns in one process (the ratio: the median of each pair's), with the
  minor page faults of each call; on glibc, again with malloc tuned to reuse freed memory (GLIBC_TUNABLES), as a
  user can run any JAX program on the CPU (see README, Performance on Linux);
- whether each raises a false alarm on the correct gradient;
- the floor under check_grad's time: the computations it cannot do without, each timed alone as a plain jitted
  JAX program on the same model (autodiff and hand gradients in float64, again at the parameters' own precision,
  one float64 evaluation of the loss), next to check_grads;
- whether each catches one wrong element planted in autodiff (a jax.custom_vjp rule off at one element),
  and where funcgrad locates it; and a wrong element planted in the hand gradient (check_grads has no notion
  of a hand gradient).

Usage: python benchmarks/bench_verify.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

D, H, C, N = 8, 32768, 3, 64
PLANT = (3, 12345)  # the wrong element of W1
# glibc's malloc keeping freed memory for reuse up to these sizes (see README, Performance on Linux)
GLIBC_REUSE = ("glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912:"
               "glibc.malloc.arena_max=1")
CASES = ["checkgrads_correct", "funcgrad_correct", "checkgrads_planted_autodiff", "funcgrad_planted_autodiff",
         "funcgrad_planted_hand"]


def setup(dtype_name: str, planted_autodiff: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    rs = np.random.RandomState(0)
    params = {
        "W1": jnp.asarray(rs.randn(D, H) / np.sqrt(D), dtype),
        "b1": jnp.asarray(rs.randn(H) * 0.1, dtype),
        "W2": jnp.asarray(rs.randn(H, C) / np.sqrt(H), dtype),
        "b2": jnp.zeros(C, dtype),
    }
    X = jnp.asarray(rs.randn(N, D), dtype)
    y = jnp.asarray(rs.randint(0, C, N))

    @jax.custom_vjp
    def first_layer(W1, b1, X):
        return X @ W1 + b1

    def fl_fwd(W1, b1, X):
        return X @ W1 + b1, (W1, X)

    def fl_bwd(res, dz):
        W1, X = res
        dW1 = X.T @ dz
        if planted_autodiff:
            dW1 = dW1.at[PLANT].multiply(1.5)
        return dW1, dz.sum(0), dz @ W1.T

    first_layer.defvjp(fl_fwd, fl_bwd)

    def loss(p, X, y):
        z1 = first_layer(p["W1"], p["b1"], X) if planted_autodiff else X @ p["W1"] + p["b1"]
        h = jnp.tanh(z1)
        z = h @ p["W2"] + p["b2"]
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(N), y])

    def hand(p, X, y):
        """The hand-derived gradient: (softmax − onehot)/N, then the chain rule through tanh and dense."""
        h = jnp.tanh(X @ p["W1"] + p["b1"])
        z = h @ p["W2"] + p["b2"]
        dz = (jax.nn.softmax(z) - jax.nn.one_hot(y, C, dtype=z.dtype)) / N
        dh = (dz @ p["W2"].T) * (1 - h**2)
        return {"W1": X.T @ dh, "b1": dh.sum(0), "W2": h.T @ dz, "b2": dz.sum(0)}

    return params, X, y, loss, hand


def floor(dtype_name: str, repeats: int) -> dict:
    """Plain jitted JAX programs for the parts of a check that it cannot do without, timed alone (best of
    ``repeats``, at least 10), and check_grads (median, as the other cases)."""
    import jax
    from jax.test_util import check_grads

    params, X, y, loss, hand = setup(dtype_name, False)

    def best(f, *a) -> float:
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(max(repeats, 10)):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        return min(ts)

    out = {}
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: x.astype("float64"), params)
        X64 = X.astype("float64")
        out["grad_float64"] = best(jax.jit(jax.value_and_grad(loss)), p64, X64, y)
        out["hand_float64"] = best(jax.jit(hand), p64, X64, y)
        out["loss_float64"] = best(jax.jit(loss), p64, X64, y)
    if dtype_name != "float64":
        out["grad_own"] = best(jax.jit(jax.value_and_grad(loss)), params, X, y)
        out["hand_own"] = best(jax.jit(hand), params, X, y)
    ts = []
    for _ in range(max(repeats, 3)):
        t = time.perf_counter()
        with contextlib.suppress(AssertionError):  # its false alarm in float64 (above) still took the time
            check_grads(lambda p: loss(p, X, y), (params,), order=1, modes=("rev",))
        ts.append(time.perf_counter() - t)
    out["check_grads"] = statistics.median(ts)
    out["leaves"] = len(jax.tree.leaves(params))
    return out


def interleaved(dtype_name: str, repeats: int) -> dict:
    """The repeated call, check_grad (with the hand) and check_grads taking turns in one process (after a call of
    each; two of check_grad), at least 9 times: the median of each, and of the ratios of each pair, less exposed to
    a shared machine's drift than medians taken in different processes minutes apart."""
    from jax.test_util import check_grads

    from funcgrad import verify

    params, X, y, loss, hand = setup(dtype_name, False)

    def reference():
        with contextlib.suppress(AssertionError):  # (its float64 false alarm still took the time)
            check_grads(lambda p: loss(p, X, y), (params,), order=1, modes=("rev",))

    def ours():
        verify.check_grad(loss, params, X, y, hand=hand)

    ours(), ours(), reference()  # (a function checked before gets its repeated-call plan, compiled at its second check)
    ts: dict[str, list[float]] = {"check_grad": [], "check_grads": []}
    faults: dict[str, list[int]] = {"check_grad": [], "check_grads": []}
    for _ in range(max(repeats, 9)):
        for name, f in (("check_grad", ours), ("check_grads", reference)):
            f0 = _minor_faults()
            t = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t)
            faults[name].append(_minor_faults() - f0)
    pairs = [a / b for a, b in zip(ts["check_grad"], ts["check_grads"], strict=True)]
    return {"check_grad": statistics.median(ts["check_grad"]), "check_grads": statistics.median(ts["check_grads"]),
            "pair_ratio": statistics.median(pairs), "pair_range": [min(pairs), max(pairs)], "n": len(pairs),
            "faults": {k: statistics.median(v) for k, v in faults.items()}}


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where the platform does not count them)."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(case: str, dtype_name: str, repeats: int) -> dict:
    import jax

    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    if case == "floor":
        return floor(dtype_name, repeats)
    if case == "interleaved":
        return interleaved(dtype_name, repeats)
    from jax.test_util import check_grads

    from funcgrad import verify

    planted_autodiff = "planted_autodiff" in case
    params, X, y, loss, hand = setup(dtype_name, planted_autodiff)
    if case == "funcgrad_planted_hand":
        good = hand

        def hand(p, X, y):  # noqa: F811
            g = good(p, X, y)
            return {**g, "W1": g["W1"].at[PLANT].multiply(1.5)}

    def run():
        if case.startswith("checkgrads"):
            try:
                check_grads(lambda p: loss(p, X, y), (params,), order=1, modes=("rev",))
                return {"alarm": False}
            except AssertionError as e:
                return {"alarm": True, "message": str(e).strip().splitlines()[0][:120]}
        report = verify.check_grad(loss, params, X, y, hand=None if planted_autodiff else hand)
        bad = [r for r in report.rows if not r.ok]
        return {"alarm": not report.ok, "verdict": report.verdict,
                "where": [f"{r.path}{list(r.worst_index) if r.worst_index else ''}: {r.verdict}" for r in bad]}

    t = time.perf_counter()
    out = run()
    cold = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        warm.append(time.perf_counter() - t)
    return {**out, "cold": cold, "warm": statistics.median(warm) if warm else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return

    import jax

    env = {**os.environ, "FUNCGRAD_COMPILATION_CACHE": "0"}
    print(f"check_grad vs check_grads: MLP {D}→{H} tanh→{C}, {N} samples, {D * H + H + H * C + C} parameters")
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}; cold = first call in a fresh interpreter, "
          f"warm = median of {args.repeats}")
    results = {}
    for dtype in ("float64", "float32"):
        for case in CASES:
            proc = subprocess.run([sys.executable, __file__, "--worker", case, dtype, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"worker {case} {dtype} failed:\n{proc.stderr}")
            results[(dtype, case)] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            detail = r.get("verdict", "") + (" " + "; ".join(r["where"]) if r.get("where") else "")
            print(f"  {dtype}  {case:28s} cold {r['cold']:6.2f}s  warm {r['warm']:6.2f}s  "
                  f"alarm={str(r['alarm']):5s} {detail or r.get('message', '')}")
    print()
    for dtype in ("float64", "float32"):
        cg, fg = results[(dtype, "checkgrads_correct")], results[(dtype, "funcgrad_correct")]
        print(f"{dtype}: time ratio check_grads / check_grad: cold {cg['cold'] / fg['cold']:.2f}x, "
              f"warm {cg['warm'] / fg['warm']:.2f}x (> 1 means funcgrad is faster)")
        print(f"{dtype}: false alarm on the correct gradient: check_grads {cg['alarm']}, check_grad {fg['alarm']}")
        pa, pf = results[(dtype, "checkgrads_planted_autodiff")], results[(dtype, "funcgrad_planted_autodiff")]
        ph = results[(dtype, "funcgrad_planted_hand")]
        print(f"{dtype}: planted wrong autodiff element W1{list(PLANT)}: check_grads alarm {pa['alarm']}, "
              f"check_grad {pf.get('where')}")
        print(f"{dtype}: planted wrong hand element W1{list(PLANT)}: check_grad {ph.get('where')}")
    print()
    print("The repeated call, check_grad and check_grads taking turns in one process (medians; the ratio is the median "
          "of each pair's; page faults: the median call's minor faults):")
    settings = [("float64", env, ""), ("float32", env, "")]
    if platform.libc_ver()[0] == "glibc":
        # glibc's malloc gives an allocation over 32 MB (a compiled program's temporaries) fresh pages from the
        # kernel at every call, each faulted in as it is first written; with these tunables it reuses freed memory.
        settings.append(("float32", {**env, "GLIBC_TUNABLES": GLIBC_REUSE}, f" (GLIBC_TUNABLES={GLIBC_REUSE})"))
    for dtype, wenv, label in settings:
        proc = subprocess.run([sys.executable, __file__, "--worker", "interleaved", dtype, "--repeats",
                               str(args.repeats)], capture_output=True, text=True, env=wenv, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker interleaved {dtype} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {dtype}{label}: check_grad {1e3 * r['check_grad']:.0f} ms, check_grads {1e3 * r['check_grads']:.0f} "
              f"ms; check_grad / check_grads {r['pair_ratio']:.2f}x (pairs {r['pair_range'][0]:.2f}-"
              f"{r['pair_range'][1]:.2f}x over {r['n']}; issue 11's target: at most 2); page faults "
              f"{r['faults']['check_grad']:.0f} and {r['faults']['check_grads']:.0f}")
    print()
    print("The floor: what a check cannot do without, each part a plain jitted JAX program timed alone (best of "
          "several), against check_grads (its median). A check computes both float64 gradients, both again at the "
          "parameters' own precision when that is not float64, and finite differences (2 float64 evaluations per "
          "item where a central difference settles it (a costly function with a hand, as here), 4 or more "
          "elsewhere; at least one item per leaf; each run of them computes the loss at least once).")
    for dtype in ("float64", "float32"):
        proc = subprocess.run([sys.executable, __file__, "--worker", "floor", dtype, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker floor {dtype} failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        grads = sum(v for k, v in r.items() if k.startswith(("grad_", "hand_")))
        parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r.items() if k not in ("check_grads", "leaves"))
        print(f"  {dtype}: {parts}; check_grads {1e3 * r['check_grads']:.1f} ms")
        print(f"  {dtype}: the gradients alone take {grads / r['check_grads']:.2f}x check_grads; with one evaluation "
              f"of the loss per leaf, {(grads + r['leaves'] * r['loss_float64']) / r['check_grads']:.2f}x (check_grad, warm, "
              f"above: {results[(dtype, 'funcgrad_correct')]['warm'] / r['check_grads']:.2f}x this check_grads)")


if __name__ == "__main__":
    main()
