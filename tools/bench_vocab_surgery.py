"""Benchmark: streaming vocabulary surgery vs loading all, resizing and saving all.

    python tools/bench_vocab_surgery.py [--workdir /tmp/bench_vocab_surgery] [--layers 24]
        [--dtype bf16]

The source is a checkpoint of OpenLM-1B shapes (24 layers, hidden 2048, 16 heads, SwiGLU 5632,
50,432 text ids padded for TP=2, untied; random weights) saved by the trainer at TP=2: two
gloo processes build the trainer's model (model/gpt.py) and save it with the trainer's
save_checkpoint (megatron-core dist_checkpointing, torch_dist), without an optimizer, which
two ranks of fp32 Adam state at 1B would not fit in a small machine's memory. Then the
vocabulary grows to 50,432 + 16,384 + 2 ids for TP=2 three ways, each in its own process:
naive (torch DCP save of the whole state), megatron (the same state written by megatron-core's
dist_checkpointing.save) and streaming (checkpoint/surgery.py), and the bench prints wall time
and peak RSS. The goal: streaming peak RSS <= 1/3 of the naive route's, and no slower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

OPENLM_1B = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, num_query_groups=16,
                 ffn_hidden_size=5632, normalization="LayerNorm", norm_epsilon=1e-5,
                 rotary_base=10000, tied=False, max_position_embeddings=2048)
OPENLM_1B_VOCAB = dict(size=50432, bos_id=0, eod_id=0, pad_id=1)
TP = 2


class _NoScheduler:
    """save_checkpoint stores the LR scheduler's state; a model-only save has none."""

    def state_dict(self) -> dict:
        return {}


def save_trainer_source(folder: Path, layers: int, precision: str) -> None:
    """Under torchrun (TP ranks): the trainer's model at TP, saved by the trainer's code."""
    from megatron.core import tensor_parallel

    from megatron_t2i.checkpoint import convert
    from megatron_t2i.checkpoint.layout import TrainState
    from megatron_t2i.distributed import init_distributed
    from megatron_t2i.model.gpt import build_model_chunks
    from megatron_t2i.platform import select_platform
    from megatron_t2i.training import checkpointing

    model = convert_model(layers)
    layout = convert.text_vocab(**OPENLM_1B_VOCAB, where="bench")
    padded = layout.padded_size(128, TP)
    cfg = convert.trainer_config(model, layout, TP, 1, 128)
    cfg.train.precision, cfg.train.device = precision, "cpu"
    select_platform("cpu", "gloo")
    init_distributed(cfg.parallel, "cpu")
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    chunks = build_model_chunks(cfg, padded, on_cuda=False)
    meta = {"config": cfg.to_dict(), "vocab": layout.to_dict(), "padded_vocab_size": padded}
    checkpointing.save_checkpoint(folder, TrainState(0, 0), chunks, None,
                                  _NoScheduler(), meta, save_optimizer=False)


def convert_model(layers: int):
    from megatron_t2i.checkpoint import convert

    return convert.llama_model(**dict(OPENLM_1B, num_layers=layers))


def make_source(folder: Path, layers: int, precision: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={TP}", __file__, "--route", "source", "--layers", str(layers),
           "--dtype", precision, str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if subprocess.run(cmd, env=env).returncode:
        raise SystemExit("saving the source checkpoint failed")


def _load_and_resize(source: Path) -> dict:
    """Every tensor of the source in memory, the vocabulary tables grown."""
    from megatron_t2i.checkpoint.io import CheckpointReader
    from megatron_t2i.checkpoint.surgery import (
        RowInit,
        grow_table,
        padded_size,
        plan_rows,
        target_layout,
    )
    from megatron_t2i.model.keys import vocab_table_keys
    from megatron_t2i.vocab import VocabLayout

    reader = CheckpointReader(source)
    old = VocabLayout.from_dict(reader.meta["vocab"])
    new = target_layout(old, 16384)
    plan = plan_rows(old, new, padded_size(new, 2, 128))
    state = {k: reader.read(k) for k in reader.tensor_keys()}
    for key in vocab_table_keys():
        state[key] = grow_table(state[key], plan, key, RowInit())
    return state


def naive(source: Path, output: Path) -> None:
    """Load every tensor, resize the tables, save everything (one DCP save)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_load_and_resize(source), checkpoint_id=str(output / "iter_0000000"),
             no_dist=True)


def megatron(source: Path, output: Path) -> None:
    """As naive, but written by megatron-core's dist_checkpointing.save (a world of one):
    what import and surgery would do if they wrote through megatron-core. Its save takes a
    sharded state dict of materialised tensors (factories are applied before planning), so
    the whole model is in memory at once. The layers' extra-state objects are left out
    (a few bytes each; they do not change the figure)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_t2i.platform import select_platform

    state = _load_and_resize(source)
    sharded = {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in state.items()}
    select_platform("cpu", "gloo")  # megatron-core's writer calls torch.cuda.synchronize
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    (output / "iter_0000000").mkdir(parents=True)
    dist_checkpointing.save(sharded, str(output / "iter_0000000"))
    dist.destroy_process_group()


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
    p.add_argument("--route", choices=("source", "naive", "megatron", "streaming"),
                   help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.route == "source":
        save_trainer_source(Path(args.paths[0]), args.layers, args.dtype)
        return 0
    if args.route:
        {"naive": naive, "megatron": megatron,
         "streaming": streaming}[args.route](*map(Path, args.paths))
        print(_peak_rss_line(), flush=True)
        return 0
    work = Path(args.workdir)
    source = work / f"source_{args.layers}l_{args.dtype}"
    from megatron_t2i.checkpoint.layout import read_latest

    if not source.exists() or read_latest(source) is None:
        shutil.rmtree(source, ignore_errors=True)
        make_source(source, args.layers, args.dtype)
    from megatron_t2i.checkpoint.io import CheckpointReader
    from megatron_t2i.model.keys import model_keys

    fc1_key = model_keys(convert_model(args.layers)).key("fc1")
    size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) / 2**30
    fc1 = CheckpointReader(source).spec(fc1_key)
    print(f"source: {source} ({size:.2f} GiB, OpenLM-1B shapes, {args.layers} layers, "
          f"{args.dtype}, saved by the trainer at TP={TP}; {fc1_key} {fc1.shape} in "
          f"{len(fc1.chunks)} chunks)")
    results = {}
    for route in ("naive", "megatron", "streaming"):
        results[route] = _child(route, source, work / route)
        print(f"{route:>9}: wall {results[route][0]:6.1f} s   peak RSS {results[route][1]:5.2f} GiB",
              flush=True)
    (tn, rn), (ts, rs) = results["naive"], results["streaming"]
    tm, rm = results["megatron"]
    print(f"streaming / naive: time {ts / tn:.2f}x, peak RSS {rs / rn:.2f}x "
          f"(goal: RSS <= 0.33x, time <= 1.0x)")
    print(f"megatron-core dist_checkpointing / naive: time {tm / tn:.2f}x, peak RSS "
          f"{rm / rn:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
