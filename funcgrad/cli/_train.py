"""funcgrad train / funcgrad evaluate."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from funcgrad import checkpoint
from funcgrad.cli import _files as files
from funcgrad.cli._progress import Progress

DEFAULT_CONFIG = Path("configs") / "spiral.toml"
# Keys that may change when a run is resumed: they do not change the computation already done.
RESUMABLE = {("train", "epochs"), ("train", "verify"), ("train", "log_every"), ("train", "checkpoint_every"),
             ("optimizer", "learning_rate"), ("optimizer", "decay")}  # e.g. a lower rate after a divergence


class UsageError(Exception):
    """A user mistake the CLI reports in one line, exiting with status 2."""


def _default_config() -> Path:
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    import funcgrad

    repo = Path(funcgrad.__file__).resolve().parents[1] / DEFAULT_CONFIG  # an editable install's checkout
    if repo.exists():
        return repo
    raise UsageError(f"no --config given and {DEFAULT_CONFIG} not found here; pass --config FILE")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        path = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("l1", "l2"):
            out += _config_diff(va, vb, path + ".")
        elif va != vb and tuple(path.split(".")) not in RESUMABLE:
            out.append(f"{path}: run has {vb!r}, now {va!r}")
    return out


def _summary_line(metrics: dict[str, Any]) -> str:
    keys = [("loss", "loss", ".4f"), ("data_loss", "data", ".4f"), ("reg_loss", "reg", ".4f"), ("accuracy", "acc", ".4f")]
    parts = [f"{label} {float(metrics[k]):{fmt}}" for k, label, fmt in keys if k in metrics]
    if "reg_loss" in metrics and float(metrics["reg_loss"]) == 0:
        parts = [p for p in parts if not p.startswith(("data ", "reg "))]
    return ", ".join(parts)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    import funcgrad as fg
    from funcgrad import config as fgconfig
    from funcgrad import parallel

    t_start = time.perf_counter()
    try:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)  # before any computation
    except parallel.ParallelError as e:
        raise UsageError(str(e)) from None
    writer = parallel.is_writer()  # only process 0 prints progress and writes files
    say = print if writer else (lambda *a, **k: None)
    cfg_path = Path(args.config) if args.config else _default_config()
    try:
        cfg = fgconfig.load(cfg_path, overrides=args.set or ())
    except fgconfig.ConfigError as e:
        raise UsageError(str(e)) from None
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    ckpt = out / files.CHECKPOINT
    resolved = fgconfig.to_dict(cfg)
    saved = None  # the configuration the run in `out` was started with, when resuming it
    if args.resume:
        if not ckpt.exists():
            raise UsageError(f"--resume: no checkpoint in {out}; train without --resume to start the run")
        try:
            saved = files.json_load(out / files.CONFIG)
        except ValueError as e:
            raise UsageError(f"--resume: {e}") from None
        diff = _config_diff(resolved, saved)
        if diff:
            raise UsageError(f"--resume: the configuration differs from the run's in {out}:\n  " + "\n  ".join(diff))
    elif ckpt.exists():
        raise UsageError(f"{out} already holds a run ({files.CHECKPOINT}); pass --resume to continue it, or --out "
                         "to train into another folder")
    if writer:
        try:
            out.mkdir(parents=True, exist_ok=True)
            files.write_json(out / files.CONFIG, resolved)
        except OSError as e:
            raise UsageError(f"cannot write the run's files into {out}: {e.strerror or e}") from None
        if not args.resume:
            kept = files.set_aside(out / files.METRICS)  # an earlier attempt that never reached a checkpoint
            if kept:
                print(f"  (the metrics of an earlier attempt here are kept as {kept})")

    try:
        setup = fgconfig.build(cfg)
    except fgconfig.ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        mesh = parallel.setup_for(cfg.parallel.mode, setup.train_data, setup.batch_size)
    except parallel.ParallelError as e:
        raise UsageError(f"parallel.mode {cfg.parallel.mode!r}: {e}") from None
    n_params = fg.nn.param_count(setup.params)
    say(f"funcgrad train: {cfg.name} ({cfg_path}) → {out}")
    say(f"  data   {cfg.data.kind} {tuple(setup.train_data[0].shape)}{' (nnfs exact)' if cfg.data.exact else ''}, "
          f"validation {tuple(setup.validation_data[0].shape)}")
    say(f"  model  {' → '.join(n for n, _ in setup.model.layers)}, {n_params} parameters")
    say(f"  train  {cfg.optimizer.kind} lr {cfg.optimizer.learning_rate} decay {cfg.optimizer.decay}, {setup.steps} steps"
          f"{'' if setup.batch_size is None else f' of batch {setup.batch_size}'}, {parallel.describe(mesh)}")

    if cfg.train.verify and not args.resume and writer:
        report = _verify(setup)
        say("  check  hand-derived gradient vs JAX vs finite differences at the initial parameters:")
        say("         " + report.summary())
        if not report.ok:
            say(report)
            say("  (training continues with JAX's gradients; the hand-derived formulas above disagree with them)")

    key = jax.random.key(cfg.seed)
    state = fg.train.init(setup.params, setup.optimizer, key)
    if args.resume:
        try:
            state, meta = files.load_checkpoint(out, like=state)
        except checkpoint.CheckpointError as e:
            raise UsageError(f"--resume: {ckpt}: {e}") from None
        say(f"  resume from step {int(state.step)} ({ckpt})")
    start = int(state.step)
    fuse = cfg.train.fuse
    every = math.ceil(cfg.train.checkpoint_every / fuse) * fuse
    next_checkpoint = (start // every + 1) * every
    last_logged = _metrics_to_continue(out, start, resolved, saved) if writer else -1
    state, data, shard_batch = parallel.place(mesh, state, setup.train_data)

    progress = Progress(setup.steps, start=start, enabled=writer)
    last_good = start if args.resume else None
    status = 0
    try:
        for state, m in fg.train.chunks(setup.objective.train_loss, setup.optimizer, state, data, steps=setup.steps,
                                        fuse=fuse, batch_size=setup.batch_size, schedule=setup.schedule,
                                        shard_batch=shard_batch):
            step = int(m["step"][-1]) + 1
            bad = np.nonzero(~np.isfinite(m["loss"]))[0]
            good = bad[0] if len(bad) else len(m["step"])
            records = [{"step": int(s), **{k: float(v[i]) for k, v in m.items() if k != "step"}}
                       for i, s in enumerate(m["step"][:good])
                       if (s % cfg.train.log_every == 0 or s == setup.steps - 1) and s > last_logged]
            if writer:
                files.append_lines(out / files.METRICS, records)
            if len(bad):
                progress.close()
                at = int(m["step"][bad[0]])
                if last_good is not None:
                    where = (f"The last good checkpoint is step {last_good} in {ckpt}; lower optimizer.learning_rate "
                             "and continue from it with --resume")
                else:
                    where = "No checkpoint was written yet; try a lower optimizer.learning_rate"
                print(f"training stopped at step {at}: the loss is {m['loss'][bad[0]]}. {where}", file=sys.stderr)
                status = 1
                break
            progress.update(step, {k: float(v[-1]) for k, v in m.items()})
            if step >= next_checkpoint or step == setup.steps:
                next_checkpoint = (step // every + 1) * every
                snapshot = parallel.gather(state)  # a collective when the state is split: every process joins
                if writer:
                    files.save_checkpoint(out, snapshot, {"step": step, "config": cfg.name})
                last_good = step
    finally:
        progress.close()
    if status:
        return status

    params = parallel.gather(state).params
    evaluate = jax.jit(setup.objective.metrics)
    train_m = _floats(evaluate(params, *setup.train_data))
    val_m = _floats(evaluate(params, *setup.validation_data))
    records = files.read_metrics(out / files.METRICS) if writer else []
    last_step = dict(records[-1]) if records else {}
    wall = time.perf_counter() - t_start
    say(f"  final  training:   {_summary_line(train_m)}")
    say(f"         validation: {_summary_line(val_m)}")
    if writer:
        files.write_json(out / files.SUMMARY, {
            "name": cfg.name, "steps": setup.steps, "train": train_m, "validation": val_m, "last_step": last_step,
            "wall_seconds": wall, "config": resolved, "devices": parallel.describe(mesh),
        })
        _plots(out, setup, params, records, cfg.name)
    say(f"  wrote  {out}/{{{files.METRICS}, {files.SUMMARY}, {files.CHECKPOINT}, *.png}} ({wall:.1f}s)")
    return 0


def _metrics_to_continue(out: Path, start: int, resolved: dict, saved: dict | None) -> int:
    """The last step already logged in ``metrics.jsonl``, which training continues. Lines past the resumed
    checkpoint were computed by the same steps, unless the learning rate or its decay changed: then the file
    is set aside whole (nothing saved is lost) and a copy of its lines up to the checkpoint continues."""
    path = out / files.METRICS
    records = files.read_metrics(path)
    if saved is not None and saved.get("optimizer") != resolved.get("optimizer"):
        if any(r["step"] > start for r in records):
            kept = files.set_aside(path)
            files.append_lines(path, [r for r in records if r["step"] <= start])
            print(f"  (the optimizer changed: metrics past step {start} are kept in {kept})")
            records = [r for r in records if r["step"] <= start]
    return max((r["step"] for r in records), default=-1)


def _verify(setup: Any) -> Any:
    """The model's hand-derived gradient against JAX at the initial parameters."""
    import jax

    from funcgrad import verify

    obj = setup.objective
    X, y = setup.train_data
    if setup.config.model.dropout:
        key = jax.random.key(setup.config.seed)
        return verify.check_grad(lambda p, X, y, k: obj.value(p, X, y, key=k, train=True), setup.params, X, y, key,
                                 hand=lambda p, X, y, k: obj.hand_grad(p, X, y, key=k, train=True))
    return verify.check_grad(obj.value, setup.params, X, y, hand=obj.hand_grad)


def _plots(out: Path, setup: Any, params: Any, records: list[dict], name: str) -> None:
    import jax

    from funcgrad.cli import _plots as plots

    if records:
        plots.curves(out / "curves.png", records, f"{name}: training")
    predict = jax.jit(setup.objective.predict)
    X, y = (np.asarray(a) for a in setup.train_data)
    if setup.classification and X.shape[1] == 2:
        plots.decision_boundary(out / "decision_boundary.png", lambda g: predict(params, g), X, y,
                                f"{name}: decision boundary")
    elif not setup.classification:
        plots.regression(out / "regression.png", lambda g: predict(params, g), X, y, f"{name}: fit")


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    import jax

    import funcgrad as fg
    from funcgrad import config as fgconfig

    run = Path(args.run)
    if not (run / files.CHECKPOINT).exists() or not (run / files.CONFIG).exists():
        raise UsageError(f"--run {run}: no finished or checkpointed run there (need {files.CONFIG} and {files.CHECKPOINT})")
    try:
        cfg = fgconfig.from_dict(files.json_load(run / files.CONFIG))
        seed = args.seed if args.seed is not None else cfg.seed + 1
        setup = fgconfig.build(cfg, validation_seed=seed)
        state = fg.train.init(setup.params, setup.optimizer, jax.random.key(cfg.seed))
        state, meta = files.load_checkpoint(run, like=state)
    except (ValueError, checkpoint.CheckpointError) as e:  # ConfigError is a ValueError
        raise UsageError(f"--run {run}: {e}") from None
    metrics = _floats(jax.jit(setup.objective.metrics)(state.params, *setup.validation_data))
    if args.json:
        print(json.dumps({"run": str(run), "step": int(state.step), "seed": seed, "validation": metrics}))
    else:
        print(f"funcgrad evaluate: {run} at step {int(state.step)}, fresh {cfg.data.kind} data "
              f"{tuple(setup.validation_data[0].shape)} (seed {seed})")
        print(f"  validation: {_summary_line(metrics)}")
    return 0
