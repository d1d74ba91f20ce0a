"""Steps per second of data-parallel training on 1, 2, 4 and 8 devices, for a 784 → 256 → 256 → 10 MLP at
batch 256 (the book's Adam), fused 100 steps per dispatch.

On a CPU-only machine the devices are simulated (``JAX_NUM_CPU_DEVICES``): they share the machine's cores,
so the numbers show the cost of partitioning and of the gradient all-reduce rather than a speed-up. On a
machine with accelerators, ``--real`` measures over the real devices instead.

Usage: python benchmarks/bench_parallel.py [--devices 1 2 4 8] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

STEPS = 100


def worker(n: int, rounds: int) -> dict:
    import jax
    import numpy as np

    import funcgrad as fg
    from funcgrad import parallel

    rs = np.random.RandomState(0)
    X = jax.numpy.asarray(rs.randn(256, 784).astype(np.float32))
    y = jax.numpy.asarray(rs.randint(0, 10, 256))
    model = fg.nn.mlp([256, 256, 10], activation="relu", output="softmax")
    obj = fg.Objective(model, "categorical_crossentropy")
    tx = fg.optim.adam(0.001)
    mesh = parallel.data_mesh(n) if n > 1 else None
    state = fg.train.init(model.init(jax.random.key(0), (784,)), tx, jax.random.key(1))
    state, data, shard = parallel.place(mesh, state, (X, y))
    run = fg.train.make_steps(obj.train_loss, tx, STEPS, shard_batch=shard)
    state, m = run(state, data)  # compile
    jax.block_until_ready(m.table)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        state, m = run(state, data)
        jax.block_until_ready(m.table)
        rates.append(STEPS / (time.perf_counter() - t))
    return {"devices": n, "steps_per_s": statistics.median(rates), "platform": jax.devices()[0].platform,
            "describe": parallel.describe_mesh(mesh)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--real", action="store_true", help="use the machine's real devices (e.g. GPUs)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds)))
        return
    results = []
    for n in args.devices:
        env = dict(os.environ)
        if not args.real:
            env.update(JAX_NUM_CPU_DEVICES=str(n), XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                       JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, __file__, "--worker", str(n), "--rounds", str(args.rounds)],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise SystemExit(f"{n} devices failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]["steps_per_s"]
    print(f"784→256→256→10 MLP, batch 256, Adam, {STEPS} fused steps per dispatch "
          f"({'real' if args.real else 'simulated'} {results[0]['platform']} devices; median of {args.rounds})")
    for r in results:
        print(f"  {r['devices']} device(s): {r['steps_per_s']:8.1f} steps/s  ({r['steps_per_s'] / base:.2f}x)  "
              f"{r['describe']}")


if __name__ == "__main__":
    main()
