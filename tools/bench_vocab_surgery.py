"""Benchmark: streaming vocabulary surgery vs the naive route (load all, resize, save all).

    python tools/bench_vocab_surgery.py [--workdir /tmp/bench_surgery] [--layers 24]
        [--dtype bf16]

Writes a checkpoint of OpenLM-1B shapes (24 layers, hidden 2048, 16 heads, SwiGLU 5632,
50,432 text ids padded for TP=2, untied; random weights, model only) in the trainer's format,
then grows it to 50,432 + 16,384 + 2 ids for TP=2 both ways, each in its own process, and
prints wall time and peak RSS. The goal: streaming peak RSS <= 1/3 of the naive route's, and
no slower.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

OPENLM_1B = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, num_query_groups=16,
                 ffn_hidden_size=5632, vocab_size=50432, normalization="LayerNorm",
                 norm_epsilon=1e-5, rotary_base=10000, tied=False, max_position_embeddings=2048,
                 bos_id=0, eod_id=0, pad_id=1)


def make_source(folder: Path, layers: int, dtype: torch.dtype) -> None:
    """A 1B-shaped trainer checkpoint (random weights), written tensor by tensor."""
    from megatron_t2i.checkpoint import convert
    from megatron_t2i.checkpoint.convert import ModelSpec
    from megatron_t2i.checkpoint.io import write_checkpoint, write_latest

    spec = ModelSpec(**dict(OPENLM_1B, num_layers=layers))
    layout = convert.text_layout(spec)
    padded = layout.padded_size(128, 2)
    cfg = convert.trainer_config(spec, 2, 1, 128)
    entries = convert.trainer_entries(spec, padded, dtype)
    gen = torch.Generator().manual_seed(0)

    def produce(key: str) -> torch.Tensor:
        return (torch.randn(entries[key].shape, generator=gen) * 0.02).to(dtype)

    meta = {"config": cfg.to_dict(), "vocab": layout.to_dict(), "padded_vocab_size": padded,
            "iteration": 0, "consumed_samples": 0, "parallel": {}, "has_optimizer": False}
    write_checkpoint(folder / "iter_0000000", entries, produce,
                     {"iteration": 0, "consumed_samples": 0}, meta, desc="make source")
    write_latest(folder, 0)


def naive(source: Path, output: Path) -> None:
    """Load every tensor, resize the tables, save everything (one DCP save)."""
    import torch.distributed.checkpoint as dcp

    from megatron_t2i.checkpoint.io import VOCAB_KEYS, CheckpointReader
    from megatron_t2i.checkpoint.surgery import (
        RowInit,
        grow_table,
        padded_size,
        plan_rows,
        target_layout,
    )
    from megatron_t2i.vocab import VocabLayout

    reader = CheckpointReader(source)
    old = VocabLayout.from_dict(reader.meta["vocab"])
    new = target_layout(old, 16384)
    plan = plan_rows(old, new, padded_size(new, 2, 128))
    state = {k: reader.read(k) for k in reader.tensor_keys()}
    for key in VOCAB_KEYS:
        state[key] = grow_table(state[key], plan, key, RowInit())
    dcp.save(state, checkpoint_id=str(output / "iter_0000000"), no_dist=True)


def streaming(source: Path, output: Path) -> None:
    from megatron_t2i.checkpoint.surgery import resize_vocab

    resize_vocab(source, output, image_size=16384, tensor_parallel=2)


def _child(route: str, source: Path, output: Path) -> tuple[float, float]:
    """Run one route in a fresh process: (wall seconds, peak RSS GiB). The peak is the child's
    own VmHWM (ru_maxrss would carry the parent's high-water mark across fork)."""
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--route", route, str(source), str(output)],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{route} route failed ({proc.returncode})")
    peak_kib = int(proc.stdout.split("VmHWM:")[1].split()[0])
    return time.perf_counter() - start, peak_kib / 2**20


def _peak_rss_line() -> str:
    return next(line for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/bench_vocab_surgery")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--route", choices=("naive", "streaming"), help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.route:
        {"naive": naive, "streaming": streaming}[args.route](*map(Path, args.paths))
        print(_peak_rss_line(), flush=True)
        return 0
    work = Path(args.workdir)
    source = work / "source"
    if not (source / "latest").exists():
        shutil.rmtree(source, ignore_errors=True)
        make_source(source, args.layers, torch.bfloat16 if args.dtype == "bf16" else
                    torch.float32)
    size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) / 2**30
    print(f"source: {source} ({size:.2f} GiB, OpenLM-1B shapes, {args.layers} layers, "
          f"{args.dtype})")
    results = {}
    for route in ("naive", "streaming"):
        results[route] = _child(route, source, work / route)
        print(f"{route:>9}: wall {results[route][0]:6.1f} s   peak RSS {results[route][1]:5.2f} GiB",
              flush=True)
    (tn, rn), (ts, rs) = results["naive"], results["streaming"]
    print(f"streaming / naive: time {ts / tn:.2f}x, peak RSS {rs / rn:.2f}x "
          f"(goal: RSS <= 0.33x, time <= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
