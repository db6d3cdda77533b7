"""Training throughput of a config through the real engine, optionally against a HF peer.

    python tools/bench_throughput.py --config configs/demo.yaml --iters 10 --warmup 3 --peer hf

The megatron side is the trainer itself: `Trainer.setup()` (model, DDP, optimizer, schedule),
then `warmup` untimed and `iters` timed `train_step()` calls, each ending in a device
synchronisation. Batches are random token ids of the config's shapes by default
(`[bos] caption [boi] image codes [eoi]`, full length, every target a loss token), so a
benchmark needs no corpus; `--data config` reads the config's own data instead.

With `--peer hf` the same architecture runs as a Hugging Face `LlamaForCausalLM`
(bench/hf_peer.py) on the same microbatches in the same process, and the ratio of tokens/s is
reported. The peer is a one-process model, so `--peer` is refused under a multi-process launch.

One JSON line goes to stdout (rank 0); every other message goes to stderr. Rates use the
median step time; TFLOP/s come from training/flops.py (matmuls only, no causal discount).
Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's peak resident set
(VmHWM, reset before each side where Linux allows) on the CPU; `peak_memory_kind` says which.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import platform as host
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_t2i.config import (
    Config,
    ConfigError,
    load_config,
    uses_transformer_engine,
    validate,
    world_size_from_env,
)
from megatron_t2i.data.documents import make_document, make_sample
from megatron_t2i.training.metrics import Throughput
from megatron_t2i.vocab import VocabLayout

PEERS = ("hf",)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    iters: int = 10
    warmup: int = 3
    peer: str | None = None  # "hf": also time the LlamaForCausalLM peer
    data: str = "synthetic"  # "synthetic" random tokens | "config": the config's own data
    run_dir: str = "runs/bench"


# ---- synthetic batches -----------------------------------------------------------------------

def synthetic_layout(cfg: Config) -> VocabLayout:
    """The config's id ranges with the text tokenizer's own pad (as GPT-NeoX BPE has), so the
    1B config gets the paper's 66,818 ids padded to 66,944."""
    text = cfg.data.text_vocab_size
    return VocabLayout(text_size=text, image_size=cfg.data.image_vocab_size,
                       bos_id=min(1, text - 1), eod_id=min(2, text - 1), text_pad_id=0)


class SyntheticT2IDataset(torch.utils.data.Dataset):
    """Random full-length samples `[bos] caption [boi] image codes [eoi]` of seq_length + 1
    ids: caption ids from the text range, codes from the image range. Item i is the same on
    every call (seeded by (seed, i)); items have the keys and dtypes of T2IDataset."""

    def __init__(self, layout: VocabLayout, seq_length: int, image_tokens: int,
                 num_samples: int, seed: int) -> None:
        self.layout, self.seq_length, self.image_tokens = layout, seq_length, image_tokens
        self.caption_tokens = seq_length + 1 - 3 - image_tokens
        if self.caption_tokens < 1:
            raise ValueError(f"seq_length={seq_length} leaves no room for a caption beside "
                             f"{image_tokens} image codes")
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i) % self.num_samples])
        lay = self.layout
        caption = rng.integers(0, lay.text_size, self.caption_tokens)
        codes = rng.integers(0, lay.image_size, self.image_tokens)
        doc = make_document(caption, codes, lay)  # exactly seq_length + 1 ids: no padding
        return make_sample(doc, 1 + self.caption_tokens, lay.pad_id, self.seq_length)


def build_synthetic_pipeline(cfg: Config, platform: Any) -> Any:
    """A DataPipeline (the trainer's own iterators, sampler and collate) over random tokens."""
    from megatron.core import parallel_state

    from megatron_t2i.data.loader import DataPipeline

    t = cfg.train
    dp = parallel_state.get_data_parallel_world_size()
    layout = synthetic_layout(cfg)

    def make(seed: int) -> SyntheticT2IDataset:
        return SyntheticT2IDataset(layout, cfg.model.seq_length, cfg.data.image_tokens_per_sample,
                                   num_samples=max(8 * t.global_batch_size, 64), seed=seed)

    return DataPipeline(
        layout=layout, train=make(t.seed), valid=make(t.seed + 1),
        num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
        micro_batch_size=t.micro_batch_size, seed=t.seed, device=platform.device(),
        n_iterators=cfg.parallel.virtual_pipeline_model_parallel_size or 1)


# ---- timing and memory -----------------------------------------------------------------------

def time_steps(step: Callable[[], Any], warmup: int, iters: int,
               synchronize: Callable[[], None]) -> tuple[list[float], Any]:
    """Seconds of each of `iters` calls of `step` after `warmup` untimed ones (every timed
    call ends with `synchronize()` so queued device work is counted), and the last result."""
    for _ in range(warmup):
        step()
    synchronize()
    times, result = [], None
    for _ in range(iters):
        start = time.perf_counter()
        result = step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times, result


def step_statistics(step_times: list[float], throughput: Throughput) -> dict[str, Any]:
    """Rates at the median step time, and the spread of step times (p10, p90)."""
    median = float(np.median(step_times))
    rates = throughput.scalars(median)
    return {
        "tokens_per_sec": rates["tokens_per_sec"],
        "tflops_per_gpu": rates["tflops_per_gpu"],
        "mfu": rates["mfu"],
        "step_time_median_s": median,
        "step_time_p10_s": float(np.percentile(step_times, 10)),
        "step_time_p90_s": float(np.percentile(step_times, 90)),
        "step_times_s": [round(t, 6) for t in step_times],
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    with contextlib.suppress(OSError, AttributeError):
        kib = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)
        return int(kib) / 2**20, "cpu_peak_rss_since_reset"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss_process"


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ---- the two sides ---------------------------------------------------------------------------

def bench_config(cfg: Config, opts: BenchOptions) -> Config:
    """The config as benchmarked: a fresh model (no resume, no pretrained weights) and no
    sinks, so a benchmark never reads or writes a training run."""
    cfg = dataclasses.replace(cfg)
    cfg.train = dataclasses.replace(cfg.train, run_dir=opts.run_dir, eval_interval=None)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, resume=False, pretrained=None,
                                         save_interval=None, save_at_end=False)
    cfg.logging = dataclasses.replace(cfg.logging, tensorboard=False, wandb=False)
    return cfg


def _count_parameters(trainer: Any) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    n = sum(p.numel() for c in trainer.chunks for p in c.parameters())
    counts = torch.tensor([n], dtype=torch.int64, device=trainer.platform.device())
    dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return int(counts.item())


def bench_engine(trainer: Any, opts: BenchOptions) -> dict[str, Any]:
    """Time the trainer's own train_step (set up already)."""
    device = trainer.platform.device()
    times, report = time_steps(trainer.train_step, opts.warmup, opts.iters,
                               _synchronizer(device))
    memory, kind = peak_memory(device)
    return {**step_statistics(times, trainer.throughput), "last_loss": report["loss"],
            "peak_memory_gib": memory, "peak_memory_kind": kind,
            "parameters": _count_parameters(trainer)}


def release_engine(trainer: Any) -> None:
    """Drop the engine's model, gradients and optimizer so the peer starts from free memory."""
    if hasattr(trainer, "engine"):
        del trainer.engine
    trainer.data.set_consumed_samples(0)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_peer(cfg: Config, trainer: Any, opts: BenchOptions) -> dict[str, Any]:
    """Time the HF peer on the engine's data stream (same microbatches per step)."""
    from megatron_t2i.experiments.bench.hf_peer import HFPeer

    device = trainer.platform.device()
    reset_peak_memory(device)
    peer = HFPeer(cfg, trainer.padded_vocab_size, device)
    stream = trainer.data.train_iterators()[0]
    n = trainer.data.num_microbatches
    times, loss = time_steps(lambda: peer.train_step([next(stream) for _ in range(n)]),
                             opts.warmup, opts.iters, _synchronizer(device))
    memory, kind = peak_memory(device)
    return {**step_statistics(times, trainer.throughput), "last_loss": loss,
            "peak_memory_gib": memory, "peak_memory_kind": kind,
            "parameters": peer.num_parameters(),
            "model": "transformers.LlamaForCausalLM", "attn_implementation": "sdpa",
            "optimizer": peer.optimizer_name, "differences": peer.notes}


def describe_run(cfg: Config, trainer: Any, opts: BenchOptions) -> dict[str, Any]:
    import torch.distributed as dist

    device = trainer.platform.device()
    t = cfg.train
    te = uses_transformer_engine(cfg)
    return {
        "date": datetime.date.today().isoformat(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({host.processor() or host.machine()}, "
                        f"{torch.get_num_threads()} threads)"),
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size,
        "precision": t.precision,
        "transformer_impl": "transformer_engine" if te else "local",
        "core_attention": None if te else cfg.model.core_attention,
        "recompute_granularity": t.recompute_granularity,
        "data": opts.data,
        "seq_length": cfg.model.seq_length,
        "micro_batch_size": t.micro_batch_size,
        "global_batch_size": t.global_batch_size,
        "num_microbatches": trainer.data.num_microbatches,
        "padded_vocab_size": trainer.padded_vocab_size,
        "tokens_per_iteration": trainer.throughput.tokens_per_iteration,
        "flops_per_iteration": trainer.throughput.flops_per_iteration,
        "peak_tflops_per_gpu": trainer.throughput.peak_tflops_per_gpu,
        "iters": opts.iters,
        "warmup": opts.warmup,
        "versions": _versions(),
    }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for dist_name in ("megatron-core", "transformers", "transformer-engine"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = None
    return out


def run_benchmark(cfg: Config, opts: BenchOptions) -> dict[str, Any] | None:
    """Set the trainer up, time it (and the peer); the result on rank 0, None elsewhere."""
    from megatron_t2i.training.trainer import Trainer

    cfg = bench_config(cfg, opts)
    trainer = Trainer(cfg)
    # the host's peak RSS from here; a GPU's peak counter starts at zero in a fresh process
    # (resetting it here would create a context on GPU 0 from every rank)
    reset_peak_memory(torch.device("cpu"))
    trainer.setup(build_data=build_synthetic_pipeline if opts.data == "synthetic" else None)
    try:
        result = describe_run(cfg, trainer, opts)
        result.update(bench_engine(trainer, opts))
        if opts.peer == "hf":
            release_engine(trainer)
            result["peer"] = bench_peer(cfg, trainer, opts)
            result["tokens_per_sec_vs_peer"] = (result["tokens_per_sec"]
                                                / result["peer"]["tokens_per_sec"])
        return result if trainer.rank == 0 else None
    finally:
        trainer.close()


# ---- command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--peer", choices=PEERS, default=None,
                        help="also time the same architecture as a HF LlamaForCausalLM")
    parser.add_argument("--data", choices=("synthetic", "config"), default="synthetic",
                        help="random tokens of the config's shapes (default), or its own data")
    parser.add_argument("--run-dir", default="runs/bench",
                        help="where the trainer writes its resolved config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = world_size_from_env()
    try:
        if args.iters < 1 or args.warmup < 0:
            raise ConfigError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} "
                              f"and {args.warmup}")
        if args.peer and world_size > 1:
            raise ConfigError(f"--peer {args.peer} compares one process with one process; "
                              f"launch without torchrun (world size is {world_size})")
        # the benchmark times training steps only: no sample grids (they read the config's data)
        cfg = load_config(args.config, ["train.sample_at_end=false", "train.sample_interval=null",
                                        *args.overrides])
        validate(cfg, world_size)
        if args.peer:
            from megatron_t2i.experiments.bench.hf_peer import peer_differences

            peer_differences(cfg.model)  # refuse an architecture Llama cannot express early
    except ValueError as e:  # ConfigError and PeerUnsupported
        print(f"config error: {e}", file=sys.stderr)
        return 2
    opts = BenchOptions(iters=args.iters, warmup=args.warmup, peer=args.peer, data=args.data,
                        run_dir=args.run_dir)
    from megatron_t2i.checkpoint.layout import CheckpointError
    from megatron_t2i.vocab import VocabMismatchError

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's own prints are logs
            result = run_benchmark(cfg, opts)
    except (CheckpointError, VocabMismatchError, FileNotFoundError) as e:  # --data config
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0
