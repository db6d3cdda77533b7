"""Helper for tests/test_checkpoint_tools.py, run under torchrun (gloo, CPU).

    ckpt_model.py make   LAYOUT_JSON ROOT:TP[,ROOT:TP...] [config overrides...]
        build the trainer's model at TP, take one optimizer step on random text ids, save it
        with the trainer's save_checkpoint under ROOT with the layout LAYOUT_JSON
    ckpt_model.py logits OUT IDS_PT CKPT:TP [CKPT:TP ...]
        load each checkpoint into the trainer's model at TP (its meta.json config), run the
        ids through it and write the logits gathered over TP: {"CKPT:TP": [b, s, vocab]}

Several TP sizes run in one launch: the model-parallel groups are rebuilt for each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _setup(cfg) -> None:
    from megatron.core import parallel_state, tensor_parallel

    from megatron_t2i.distributed import init_distributed
    from megatron_t2i.platform import select_platform

    select_platform("cpu", "gloo")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(cfg.parallel, "cpu")
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)


def make(root: str, layout_json: str, tp: int, overrides: list[str]) -> None:
    """One source checkpoint, saved by the trainer's own code at TP."""
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_t2i.checkpoint.layout import TrainState
    from megatron_t2i.config import load_config
    from megatron_t2i.model.gpt import build_model_chunks
    from megatron_t2i.training import checkpointing
    from megatron_t2i.training.engine import build_scheduler
    from megatron_t2i.training.megatron_engine import optimizer_config, wrap_ddp
    from megatron_t2i.vocab import VocabLayout

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs/demo.yaml", [*overrides, "train.device=cpu",
                                                   f"parallel.tensor_model_parallel_size={tp}"])
    layout = VocabLayout.load(layout_json)
    padded = layout.padded_size(cfg.model.make_vocab_size_divisible_by, tp)
    _setup(cfg)
    # the megatron engine's DDP / optimizer / scheduler recipes, without data
    chunks = build_model_chunks(cfg, padded, on_cuda=False)
    model = wrap_ddp(cfg, chunks)
    optimizer = get_megatron_optimizer(optimizer_config(cfg), model)
    scheduler = build_scheduler(cfg, optimizer)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, layout.text_size, (2, cfg.model.seq_length + 1), generator=gen)
    pos = torch.arange(cfg.model.seq_length).expand(2, -1)
    loss = model[0](input_ids=ids[:, :-1], position_ids=pos, attention_mask=None,
                    labels=ids[:, 1:])
    loss.float().mean().backward()
    model[0].finish_grad_sync()
    optimizer.step()
    scheduler.step(increment=1)
    meta = {"config": cfg.to_dict(), "vocab": layout.to_dict(), "padded_vocab_size": padded}
    checkpointing.save_checkpoint(Path(root), TrainState(1, 8), chunks, optimizer,
                                  scheduler, meta)


def logits(out: str, ids_path: str, jobs: list[str]) -> None:
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron_t2i.checkpoint.layout import resolve_folder
    from megatron_t2i.config import config_from_dict
    from megatron_t2i.model.gpt import build_model_chunks
    from megatron_t2i.training.checkpointing import model_sharded_state_dict, read_meta

    ids = torch.load(ids_path, weights_only=True)
    results = {}
    for job in jobs:
        path, tp = job.rsplit(":", 1)
        folder = resolve_folder(path)
        meta = read_meta(folder)
        raw = meta["config"]
        raw["parallel"].update(tensor_model_parallel_size=int(tp),
                               pipeline_model_parallel_size=1)
        raw["model"].update(transformer_impl="local")
        raw["train"].update(device="cpu", precision="fp32")
        cfg = config_from_dict(raw)
        _setup(cfg)
        chunks = build_model_chunks(cfg, meta["padded_vocab_size"], on_cuda=False)
        with torch.no_grad():
            loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(folder))
            chunks[0].load_state_dict(loaded["model"])
            chunks[0].eval()
            pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
            out_tp = chunks[0](input_ids=ids, position_ids=pos, attention_mask=None)
            results[job] = tensor_parallel.gather_from_tensor_model_parallel_region(out_tp)
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "make":
        for job in args[1].split(","):
            root, tp = job.rsplit(":", 1)
            make(root, args[0], int(tp), args[2:])
    elif mode == "logits":
        logits(args[0], args[1], args[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}: {json.dumps(sys.argv)}")
    dist.barrier()
    dist.destroy_process_group()
