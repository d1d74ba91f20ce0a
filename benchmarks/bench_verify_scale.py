"""check_grad at scale: wall time and peak memory on a large MLP, and the cost of closed-over constants.

Each case runs in a fresh interpreter (cold: compilation included), with the persistent compilation cache off:

- ``scale``: an MLP 1024 → H → H → 10 tanh (H chosen for the requested parameter count), float32, 256 samples,
  softmax cross-entropy, with a hand-derived gradient. Reports wall time, peak resident memory above what the
  model and data take before the check (``ru_maxrss`` minus the resident size just before), and that extra as a
  multiple of the model's bytes. The anchor is ``jax.test_util.check_grads`` on the same loss in the same run.
- ``scale_warm``: the same check in a process that has already checked a small model (200k parameters, so every
  program of the large one is still compiled afresh): the peak above the resident size just before, with the
  peak reset there (``/proc/self/clear_refs``). The difference from ``scale`` is JAX's and XLA's one-time start-up
  in a process (compiler, modules, thread pools), which does not grow with the model.
- ``constants``: a loss that closes over a 64 MB float32 constant against the same loss taking it as an
  argument, first calls in fresh processes, alternately, ``--repeats`` times each; the ratio of the medians is
  the closure's price (issue 11's target: at most 1.3).

Usage: python benchmarks/bench_verify_scale.py [--params 18e6] [--skip-anchor] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

D_IN, C, N = 1024, 10, 256


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vm_hwm_mb() -> float:
    """The peak resident size since it was last reset (``/proc/self/clear_refs``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mlp(n_params: float):
    import jax
    import jax.numpy as jnp
    import numpy as np

    # 1024·H + H·H + 10·H ≈ n_params
    H = int((-(D_IN + C) + np.sqrt((D_IN + C) ** 2 + 4 * n_params)) / 2)
    rs = np.random.RandomState(0)
    params = {"W1": jnp.asarray(rs.randn(D_IN, H) / np.sqrt(D_IN), jnp.float32), "b1": jnp.zeros(H, jnp.float32),
              "W2": jnp.asarray(rs.randn(H, H) / np.sqrt(H), jnp.float32), "b2": jnp.zeros(H, jnp.float32),
              "W3": jnp.asarray(rs.randn(H, C) / np.sqrt(H), jnp.float32), "b3": jnp.zeros(C, jnp.float32)}
    X = jnp.asarray(rs.randn(N, D_IN), jnp.float32)
    y = jnp.asarray(rs.randint(0, C, N))

    def loss(p, X, y):
        h1 = jnp.tanh(X @ p["W1"] + p["b1"][None, :])
        h2 = jnp.tanh(h1 @ p["W2"] + p["b2"][None, :])
        z = h2 @ p["W3"] + p["b3"][None, :]
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(N), y])

    def hand(p, X, y):
        h1 = jnp.tanh(X @ p["W1"] + p["b1"][None, :])
        h2 = jnp.tanh(h1 @ p["W2"] + p["b2"][None, :])
        z = h2 @ p["W3"] + p["b3"][None, :]
        dz = (jax.nn.softmax(z) - jax.nn.one_hot(y, C, dtype=z.dtype)) / N
        dh2 = (dz @ p["W3"].T) * (1 - h2**2)
        dh1 = (dh2 @ p["W2"].T) * (1 - h1**2)
        return {"W1": X.T @ dh1, "b1": dh1.sum(0), "W2": h1.T @ dh2, "b2": dh2.sum(0), "W3": h2.T @ dz,
                "b3": dz.sum(0)}

    jax.block_until_ready(params)
    return params, X, y, loss, hand


def worker(case: str, n_params: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from funcgrad import verify

    if case in ("scale", "scale_anchor", "scale_warm"):
        params, X, y, loss, hand = mlp(n_params)
        model_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**20
        if case == "scale_warm":
            small = mlp(2e5)
            verify.check_grad(small[3], small[0], small[1], small[2], hand=small[4])
            del small
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak resident size (VmHWM)
            except OSError:
                return {"skip": "cannot reset the peak resident size here"}
        before = rss_mb()
        t = time.perf_counter()
        if case in ("scale", "scale_warm"):
            report = verify.check_grad(loss, params, X, y, hand=hand)
            out = {"verdict": str(report.verdict), "ok": report.ok}
        else:
            from jax.test_util import check_grads
            try:
                check_grads(lambda p: loss(p, X, y), (params,), order=1, modes=("rev",))
                out = {"verdict": "ok", "ok": True}
            except AssertionError:
                out = {"verdict": "alarm", "ok": False}
        seconds = time.perf_counter() - t
        extra = (vm_hwm_mb() if case == "scale_warm" else peak_mb()) - before
        return {**out, "seconds": seconds, "model_mb": model_mb, "extra_mb": extra, "extra_x": extra / model_mb,
                "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params)))}
    # constants: 64 MB of float32 data, closed over or passed
    rs = np.random.RandomState(1)
    A = jnp.asarray(rs.randn(1 << 14, 1 << 10), jnp.float32)  # 64 MB
    w = jnp.asarray(rs.randn(1 << 10) * 0.01, jnp.float32)
    hand = lambda w, A: A.T @ jnp.tanh(A @ w) / A.shape[0]  # noqa: E731 - d/dw mean(log cosh(A w))
    t = time.perf_counter()
    if case == "closure":
        report = verify.check_grad(lambda w: jnp.mean(jnp.log(jnp.cosh(A @ w))), w, hand=lambda w: hand(w, A))
    else:
        report = verify.check_grad(lambda w, A: jnp.mean(jnp.log(jnp.cosh(A @ w))), w, A, hand=hand)
    first = time.perf_counter() - t
    t = time.perf_counter()
    verify.check_grad(lambda w: jnp.mean(jnp.log(jnp.cosh(A @ w))), w, hand=lambda w: hand(w, A)) if case == "closure" \
        else verify.check_grad(lambda w, A: jnp.mean(jnp.log(jnp.cosh(A @ w))), w, A, hand=hand)
    return {"verdict": str(report.verdict), "ok": report.ok, "seconds": first, "again": time.perf_counter() - t}


def run(case: str, n_params: float) -> dict:
    env = {**os.environ, "FUNCGRAD_COMPILATION_CACHE": "0"}
    proc = subprocess.run([sys.executable, __file__, "--worker", case, "--params", str(n_params)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=18e6, help="parameter count of the scale case")
    ap.add_argument("--skip-anchor", action="store_true", help="do not run check_grads at scale")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of fresh processes for the constants' ratio")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.params)))
        return
    import jax

    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
    s = run("scale", args.params)
    print(f"scale: {s['params']:,} float32 parameters ({s['model_mb']:.0f} MB): check_grad {s['verdict']} in "
          f"{s['seconds']:.1f}s, peak extra memory {s['extra_mb']:.0f} MB = {s['extra_x']:.1f}× the model")
    w = run("scale_warm", args.params)
    if "skip" in w:
        print(f"scale, after JAX's start-up: {w['skip']}")
    else:
        print(f"scale, in a process that has checked a small model before (JAX's start-up done): check_grad "
              f"{w['verdict']} in {w['seconds']:.1f}s, peak extra memory {w['extra_mb']:.0f} MB = {w['extra_x']:.1f}× "
              "the model")
    if not args.skip_anchor:
        a = run("scale_anchor", args.params)
        print(f"scale: check_grads {a['verdict']} in {a['seconds']:.1f}s, peak extra {a['extra_mb']:.0f} MB = "
              f"{a['extra_x']:.1f}× the model; time ratio check_grad / check_grads = {s['seconds'] / a['seconds']:.2f}")
    # (alternately, in fresh processes: one pair of first calls varies by a third on a shared machine)
    pairs = [(run("closure", 0), run("argument", 0)) for _ in range(args.repeats)]
    c, g = (statistics.median(p[k]["seconds"] for p in pairs) for k in (0, 1))
    again = [statistics.median(p[k]["again"] for p in pairs) for k in (0, 1)]
    verdicts = sorted({p[k]["verdict"] for p in pairs for k in (0, 1)})
    print(f"constants (64 MB), medians of {args.repeats}: closed over {c:.2f}s (again {again[0]:.2f}s), as an argument "
          f"{g:.2f}s (again {again[1]:.2f}s); ratio {c / g:.2f} (target ≤ 1.3; each pair: "
          + ", ".join(f"{a['seconds'] / b['seconds']:.2f}" for a, b in pairs) + f"); verdicts {', '.join(verdicts)}")


if __name__ == "__main__":
    main()
