"""Tokens/s of one config under the megatron and deepspeed engines, side by side.

    python tools/bench_engines.py --config configs/demo.yaml --nproc 2 --iters 30 --warmup 5

Each engine trains the config for real (`torchrun -m megatron_t2i.train`, the same data,
no checkpoints, no validation) in its own run directory under `--run-root`; the figure is the
median of the `tokens_per_sec` it logged per iteration after `warmup` iterations, and the last
loss shows both engines trained the same model. One table goes to stdout, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# label -> overrides; DeepSpeed runs at TP = PP = 1, so the config's data parallel is the world
ENGINES: dict[str, list[str]] = {
    "megatron": ["train.engine=megatron"],
    "deepspeed-zero1": ["train.engine=deepspeed", "deepspeed.zero_stage=1"],
    "deepspeed-zero2": ["train.engine=deepspeed", "deepspeed.zero_stage=2"],
    "deepspeed-zero3": ["train.engine=deepspeed", "deepspeed.zero_stage=3"],
}


def engine_throughput(config: str, overrides: list[str], nproc: int, iters: int, warmup: int,
                      run_dir: Path) -> dict[str, Any]:
    """Train `iters` iterations; the median tokens/s after `warmup`, and the last loss."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = ["--config", config, f"train.run_dir={run_dir}", f"train.train_iters={iters}",
            "train.log_interval=1", "train.eval_interval=null", "checkpoint.save_interval=null",
            "checkpoint.save_at_end=false", "logging.tensorboard=false", *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "megatron_t2i.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("split", "train") == "train"]
    timed = [r["tokens_per_sec"] for r in records if r["iteration"] > warmup]
    return {"tokens_per_sec": statistics.median(timed), "iterations_timed": len(timed),
            "last_loss": records[-1]["loss"]}


def compare_engines(config: str, overrides: list[str], nproc: int, iters: int, warmup: int,
                    run_root: Path, engines: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in engines:
        result = engine_throughput(config, [*overrides, *ENGINES[name]], nproc, iters, warmup,
                                   run_root / name)
        rows.append({"engine": name, "nproc": nproc, **result})
        print(f"[bench] {name}: {result['tokens_per_sec']:,.0f} tok/s", file=sys.stderr,
              flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["tokens_per_sec"]
    out = [f"{'engine':<18} {'procs':>5} {'tokens/s':>10} {'vs first':>9} {'last loss':>10}"]
    for r in rows:
        out.append(f"{r['engine']:<18} {r['nproc']:>5} {r['tokens_per_sec']:>10,.0f} "
                   f"{r['tokens_per_sec'] / base:>8.2f}x {r['last_loss']:>10.4f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_engines", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="processes (= data parallel)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the median")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--run-root", default="runs/bench_engines")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for all")
    args = parser.parse_args(argv)
    if args.iters <= args.warmup:
        parser.error("--iters must exceed --warmup")
    rows = compare_engines(args.config, args.overrides, args.nproc, args.iters, args.warmup,
                           Path(args.run_root), args.engines)
    print(format_table(rows))
    print(json.dumps({"config": args.config, "overrides": args.overrides, "rows": rows}))
    return 0
