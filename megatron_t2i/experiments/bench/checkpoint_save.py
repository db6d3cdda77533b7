"""The training stall per checkpoint save, synchronous vs asynchronous (checkpoint.async_save).

    python tools/bench_checkpoint_save.py --config configs/demo.yaml --saves 3 --steps 3 \\
        model.num_layers=8 model.hidden_size=1536 model.num_attention_heads=12

Each mode runs in a process of its own (the trainer owns the process groups): the trainer
itself (`Trainer.setup()` over random tokens of the config's shapes, bench/throughput.py),
one warm-up step and `--steps` steps for the median step time, then `--saves` rounds of one save followed by `--steps` timed steps
(with the trainer's poll of pending saves after each). Figures per save:

- `blocking_s`: the time the save call holds the training loop (a synchronous save: all of
  it; an asynchronous one: the folder, the common part and forking the writer);
- `stall_s`: the round's wall time minus `--steps` steps at the median step time of the
  untimed ones, i.e. all the time training lost to the save, the writer's competition for
  the CPU and the publication included;
- `published_after_s` (asynchronous): from the start of the save to its publication.
The median over the rounds is reported. One JSON line per mode, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from megatron_t2i.config import ConfigError, load_config

MODES = ("sync", "async")


def bench_mode(config: str, overrides: list[str], mode: str, saves: int, steps: int,
               run_dir: Path) -> dict[str, Any]:
    """One mode, in this process: the per-save figures (rank 0's)."""
    from megatron_t2i.experiments.bench.throughput import build_synthetic_pipeline
    from megatron_t2i.training.trainer import Trainer

    cfg = load_config(config, overrides + [
        f"train.run_dir={run_dir / mode}", f"checkpoint.dir={run_dir / mode / 'checkpoints'}",
        "checkpoint.resume=false", f"checkpoint.async_save={str(mode == 'async').lower()}",
        "logging.tensorboard=false", "logging.wandb=false", "train.eval_interval=null",
        "train.sample_at_end=false", "train.sample_interval=null"])
    trainer = Trainer(cfg)
    trainer.setup(build_data=build_synthetic_pipeline)
    try:
        _step(trainer)  # warm-up: the first step pays for lazy set-up
        baseline = statistics.median(_step(trainer) for _ in range(steps))
        rounds = [_round(trainer, steps, baseline) for _ in range(saves)]
        trainer.publish_finished_saves(wait=True)
        counts = trainer.engine.parameter_counts()
        return {"mode": mode, "parameters": counts["total"], "step_s": baseline,
                "checkpoint_bytes": _folder_bytes(cfg.checkpoint_dir),
                **{k: statistics.median(r[k] for r in rounds) for k in rounds[0]}}
    finally:
        trainer.close()


def _step(trainer: Any) -> float:
    start = time.perf_counter()
    trainer.train_step()
    trainer.iteration += 1
    trainer.consumed_samples += trainer.cfg.train.global_batch_size
    trainer.publish_finished_saves(wait=False)  # the trainer's poll, as in its loop
    return time.perf_counter() - start


def _round(trainer: Any, steps: int, baseline: float) -> dict[str, float]:
    start = time.perf_counter()
    trainer.save()
    blocking = time.perf_counter() - start
    published = None
    for _ in range(steps):
        _step(trainer)
        if published is None and not trainer.pending_saves.pending():
            published = time.perf_counter() - start
    if trainer.pending_saves.pending():  # not yet done: the rest of the wait is a stall too
        trainer.publish_finished_saves(wait=True)
        published = time.perf_counter() - start
    out = {"blocking_s": blocking,
           "stall_s": time.perf_counter() - start - steps * baseline}
    if trainer.cfg.checkpoint.async_save:
        out["published_after_s"] = published
    return out


def _folder_bytes(root: Path) -> int:
    folders = sorted(root.glob("iter_*"))
    return sum(f.stat().st_size for f in folders[-1].rglob("*") if f.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_checkpoint_save",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("--saves", type=int, default=3, help="timed saves per mode")
    parser.add_argument("--steps", type=int, default=3, help="training steps after each save")
    parser.add_argument("--mode", choices=("both", *MODES), default="both")
    parser.add_argument("--run-dir", default="runs/bench_checkpoint_save",
                        help="where the checkpoints are written")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.saves < 1 or args.steps < 1:
        print("bench_checkpoint_save: --saves and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        load_config(args.config, args.overrides)  # a bad config fails here, in one line
    except ConfigError as e:
        print(f"bench_checkpoint_save: {e}", file=sys.stderr)
        return 2
    if args.mode != "both":
        result = bench_mode(args.config, args.overrides, args.mode, args.saves, args.steps,
                            Path(args.run_dir))
        print(json.dumps(result), flush=True)
        return 0
    results = {}
    for mode in MODES:  # one process per mode: each sets up (and tears down) its own groups
        proc = subprocess.run([sys.executable, sys.argv[0], "--mode", mode,
                               *_passed_on(args)], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(proc.stdout.strip().splitlines()[-1], flush=True)
    print(json.dumps(summary(results)), flush=True)
    return 0


def _passed_on(args: argparse.Namespace) -> list[str]:
    return ["--config", args.config, "--saves", str(args.saves), "--steps", str(args.steps),
            "--run-dir", args.run_dir, *args.overrides]


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sync, asyn = results["sync"], results["async"]
    return {"parameters": sync["parameters"], "checkpoint_bytes": sync["checkpoint_bytes"],
            "step_s": sync["step_s"],
            "stall_per_save_s": {"sync": sync["stall_s"], "async": asyn["stall_s"]},
            "blocking_per_save_s": {"sync": sync["blocking_s"], "async": asyn["blocking_s"]},
            "async_published_after_s": asyn["published_after_s"]}
