"""Time per training step: funcgrad vs a hand-written raw-JAX step vs NumPy (the book's hand-derived backward)
vs PyTorch eager (when installed), in one run.

Two models, both with the book's Adam:
- the book's chapter-11 model: spiral 300 × 2, 2 → 64 ReLU → 3 softmax + cross-entropy, full batch;
- an MLP 784 → 256 → 256 → 10 (ReLU, softmax + cross-entropy) on random data, batch 256.

funcgrad is timed as a step per dispatch (``make_step``; like for like with the raw-JAX step, the loss only,
and with the metrics ``funcgrad train`` logs) and fused (``make_steps``, 1000 steps per dispatch, with the
metrics, as ``funcgrad train`` runs). Timings interleave the contenders in
rounds and report medians, since the machine is shared and noisy.

Usage: python benchmarks/bench_train.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import funcgrad as fg

FUSE = 1000


def problem(kind: str):
    if kind == "ch11":
        X, y = fg.data.spiral(100, 3, key=0)
        sizes, lr, decay = [64, 3], 0.05, 5e-7
    else:
        rs = np.random.RandomState(0)
        X = jnp.asarray(rs.randn(256, 784).astype(np.float32))
        y = jnp.asarray(rs.randint(0, 10, 256))
        sizes, lr, decay = [256, 256, 10], 0.001, 0.0
    model = fg.nn.mlp(sizes, activation="relu", output="softmax")
    params = model.init(jax.random.key(0), (X.shape[1],))
    return X, y, model, params, lr, decay


# ---- contenders -------------------------------------------------------------------------------------------


def funcgrad_step(X, y, model, params, lr, decay, metrics=False):
    """funcgrad's step: like for like with the raw step (the loss only), or with the training metrics
    (data/regularisation loss, accuracy, learning rate) that funcgrad train logs."""
    obj = fg.Objective(model, "categorical_crossentropy")
    tx = fg.optim.adam(lr, decay=decay)
    if metrics:
        step = fg.train.make_step(obj.train_loss, tx, schedule=fg.optim.inverse_time_decay(lr, decay))
    else:
        step = fg.train.make_step(lambda p, X, y, key: obj.value(p, X, y), tx)
    state = fg.train.init(params, tx, jax.random.key(0))

    def run(n):
        nonlocal state
        for _ in range(n):
            state, m = step(state, (X, y))
        jax.block_until_ready(m["loss"])

    return run


def funcgrad_fused(X, y, model, params, lr, decay):
    obj = fg.Objective(model, "categorical_crossentropy")
    tx = fg.optim.adam(lr, decay=decay)
    steps = fg.train.make_steps(obj.train_loss, tx, FUSE, schedule=fg.optim.inverse_time_decay(lr, decay))
    state = fg.train.init(params, tx, jax.random.key(0))

    def run(n):
        nonlocal state
        assert n % FUSE == 0
        for _ in range(n // FUSE):
            state, m = steps(state, (X, y))
        jax.block_until_ready(m["loss"])

    return run


def raw_jax_step(X, y, model, params, lr, decay):
    """What a JAX user writes by hand: plain jnp layers, jit(value_and_grad) + an optax update, donated."""
    tx = optax.chain(optax.scale_by_adam(eps=1e-7), optax.scale_by_learning_rate(lambda t: lr / (1 + decay * t)))
    layers = [(p["W"], p["b"]) for _, p in sorted(params.items())]

    def loss_fn(layers, X, y):
        h = X
        for i, (W, b) in enumerate(layers):
            h = h @ W + b
            if i < len(layers) - 1:
                h = jnp.maximum(h, 0.0)
        e = jnp.exp(h - h.max(axis=1, keepdims=True))
        probs = jnp.clip(e / e.sum(axis=1, keepdims=True), 1e-7, 1 - 1e-7)
        return -jnp.mean(jnp.log(probs[jnp.arange(X.shape[0]), y]))

    def step(layers, opt_state, X, y):
        loss, grads = jax.value_and_grad(loss_fn)(layers, X, y)
        updates, opt_state = tx.update(grads, opt_state, layers)
        return optax.apply_updates(layers, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = [jax.tree.map(jnp.copy, layers), tx.init(layers)]

    def run(n):
        for _ in range(n):
            state[0], state[1], loss = step(state[0], state[1], X, y)
        jax.block_until_ready(loss)

    return run


def numpy_book(X, y, model, params, lr, decay):
    """The book's code path: NumPy forward, the hand-derived backward of chapter 9 onward, the book's Adam."""
    X = np.asarray(X)
    y = np.asarray(y)
    Ws = [np.asarray(p["W"]).copy() for _, p in sorted(params.items())]
    bs = [np.asarray(p["b"]).copy().reshape(1, -1) for _, p in sorted(params.items())]
    m = [np.zeros_like(a) for a in Ws + bs]
    v = [np.zeros_like(a) for a in Ws + bs]
    it = [0]

    def step():
        acts, zs = [X], []
        for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            z = acts[-1] @ W + b
            zs.append(z)
            acts.append(np.maximum(0, z) if i < len(Ws) - 1 else z)
        e = np.exp(acts[-1] - acts[-1].max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        n = len(X)
        np.mean(-np.log(np.clip(probs[range(n), y], 1e-7, 1 - 1e-7)))  # the loss the book prints
        d = probs.copy()
        d[range(n), y] -= 1
        d /= n
        grads_W, grads_b = [None] * len(Ws), [None] * len(Ws)
        for i in reversed(range(len(Ws))):
            grads_W[i] = acts[i].T @ d
            grads_b[i] = d.sum(axis=0, keepdims=True)
            if i:
                d = d @ Ws[i].T
                d[zs[i - 1] <= 0] = 0
        lr_t = lr / (1 + decay * it[0])
        for k, (p, g) in enumerate(zip(Ws + bs, grads_W + grads_b, strict=True)):
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g**2
            mh = m[k] / (1 - 0.9 ** (it[0] + 1))
            vh = v[k] / (1 - 0.999 ** (it[0] + 1))
            p[...] -= lr_t * mh / (np.sqrt(vh) + 1e-7)  # in place: p is the array in Ws or bs
        it[0] += 1

    def run(n):
        for _ in range(n):
            step()

    return run


def torch_eager(X, y, model, params, lr, decay):
    import torch

    Xt = torch.from_numpy(np.array(X))
    yt = torch.from_numpy(np.array(y)).long()
    layers = [
        (torch.tensor(np.asarray(p["W"]), requires_grad=True), torch.tensor(np.asarray(p["b"]), requires_grad=True))
        for _, p in sorted(params.items())
    ]
    flat = [t for pair in layers for t in pair]
    opt = torch.optim.Adam(flat, lr=lr, eps=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + decay * t))

    def step():
        h = Xt
        for i, (W, b) in enumerate(layers):
            h = h @ W + b
            if i < len(layers) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    def run(n):
        for _ in range(n):
            step()

    return run


# ---- measurement ------------------------------------------------------------------------------------------


def measure(contenders: dict, steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds per step of each contender, timed in interleaved rounds after a warm-up."""
    for name, run in contenders.items():
        run(steps[name])  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            t = time.perf_counter()
            run(steps[name])
            times[name].append((time.perf_counter() - t) / steps[name])
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    try:
        import torch

        has_torch = True
        torch_version = torch.__version__
    except ImportError:
        has_torch, torch_version = False, "not installed (pip install torch)"
    print(f"JAX {jax.__version__} on {jax.default_backend()}, NumPy {np.__version__}, PyTorch {torch_version}")
    for kind, label in (
        ("ch11", "chapter-11 model, 300 samples, full batch"),
        ("mlp", "784→256→256→10 MLP, batch 256"),
    ):
        prob = problem(kind)
        contenders = {"funcgrad step": funcgrad_step(*prob), "raw JAX step": raw_jax_step(*prob),
                      "+ metrics": funcgrad_step(*prob, metrics=True),
                      "funcgrad fused": funcgrad_fused(*prob), "NumPy (book)": numpy_book(*prob)}
        if has_torch:
            contenders["PyTorch eager"] = torch_eager(*prob)
        small = kind == "ch11"
        steps = {"funcgrad step": 500 if small else 100, "raw JAX step": 500 if small else 100,
                 "+ metrics": 500 if small else 100,
                 "funcgrad fused": FUSE * (5 if small else 1), "NumPy (book)": 500 if small else 30,
                 "PyTorch eager": 500 if small else 60}
        res = measure(contenders, steps, args.rounds)
        print(f"\n{label}: median time per step over {args.rounds} interleaved rounds")
        for name, t in res.items():
            print(f"  {name:15s} {t * 1e6:10.1f} µs")
        print(f"  funcgrad step / raw JAX step:  {res['funcgrad step'] / res['raw JAX step']:.3f}  (target <= 1.05; "
              f"with the logged metrics {res['+ metrics'] / res['raw JAX step']:.3f})")
        print(f"  NumPy / funcgrad fused:        {res['NumPy (book)'] / res['funcgrad fused']:.1f}x faster"
              + ("  (target >= 4x)" if small else ""))
        if has_torch:
            print(f"  PyTorch eager / funcgrad fused: {res['PyTorch eager'] / res['funcgrad fused']:.1f}x faster"
                  + ("  (target >= 10x)" if small else ""))


if __name__ == "__main__":
    main()
