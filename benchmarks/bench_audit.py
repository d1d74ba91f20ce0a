"""verify.audit vs jax.test_util.check_grads on an attention-like block with five custom rules.

The block (tests/test_verify_audit.py's ``make_block``: custom-VJP dense ×4 call sites, softmax and RMS norm,
custom-JVP swish and softplus) is checked correct, then with one wrong element planted in each rule's derivative
in turn. For each checker and case it reports wall time (fresh interpreter, compilation included), whether it
raised an alarm, and what it names: check_grads can only say that the whole function's gradient is off; audit
names the rule, the input and the element. "again": the same check repeated in the same process.

Usage: python benchmarks/bench_audit.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [None, "dense", "softmax", "rmsnorm", "swish"]  # softplus's rule has no plant switch


def worker(checker: str, wrong: str | None) -> dict:
    import jax

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from test_verify_audit import PARAMS, X, make_block  # the block the tests pin

    from funcgrad import verify

    fn = jax.jit(make_block(wrong))

    def run() -> dict:
        if checker == "check_grads":
            from jax.test_util import check_grads
            try:
                check_grads(fn, (PARAMS, X), order=1, modes=("rev",))
                return {"alarm": False, "names": ""}
            except AssertionError:
                return {"alarm": True, "names": "the whole gradient"}
        report = verify.audit(fn, PARAMS, X)
        return {"alarm": not report.ok,
                "names": ", ".join(f"{r.rule}{list(r.worst_index or ())}" for r in report.failing),
                "rules": len(report.rows), "calls": sum(r.calls for r in report.rows)}

    t = time.perf_counter()
    out = run()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    again = run()  # the same check repeated in the same process (compilations shared)
    warm = time.perf_counter() - t
    assert again == out, (again, out)
    return {**out, "seconds": cold, "warm": warm}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], None if sys.argv[3] == "-" else sys.argv[3])))
        return
    import jax

    print(f"audit vs check_grads: five-rule block; JAX {jax.__version__}, backend {jax.default_backend()}")
    env = {**os.environ, "FUNCGRAD_COMPILATION_CACHE": "0", "JAX_NUMPY_RANK_PROMOTION": "allow"}
    for wrong in CASES:
        line = []
        for checker in ("check_grads", "audit"):
            proc = subprocess.run([sys.executable, __file__, "--worker", checker, wrong or "-"], capture_output=True,
                                  text=True, env=env, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"worker {checker} {wrong} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            line.append(f"{checker} {r['seconds']:5.2f}s (again {r['warm']:5.2f}s) alarm={str(r['alarm']):5s} {r['names']}")
        print(f"  planted in {wrong or '(none)':8s}: " + " | ".join(line))


if __name__ == "__main__":
    main()
