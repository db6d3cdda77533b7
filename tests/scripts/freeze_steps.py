"""Two training steps per freeze setting, checking what changed (run by tests/test_freeze.py).

    python tests/scripts/freeze_steps.py --config configs/demo.yaml --freeze embeddings \
        --freeze attention,mlp [section.key=value ...]
    torchrun --nproc_per_node 2 tests/scripts/freeze_steps.py --config ... --freeze text_rows

For each --freeze value (comma-separated groups; "" for none) the real Trainer is set up,
every parameter of this rank is copied, train_step() runs twice, and then:
frozen parameters (and frozen text rows) are bit-identical, every other parameter changed,
frozen parameters have no DDP gradient buffer and no optimizer state, and the word-embedding
and output-layer weights have weight decay 0 when text rows are frozen.
Writes <run_dir>/<setting>/result.rank<R>.json per setting and rank, and prints OK lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_t2i.config import load_config
from megatron_t2i.model.freeze import is_frozen
from megatron_t2i.training.trainer import Trainer

VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")


def optimizer_params(optimizer) -> list[torch.nn.Parameter]:
    """The model parameters each (chained) megatron-core optimizer updates."""
    out = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for attr in ("float16_groups", "fp32_from_fp32_groups", "model_float16_groups",
                     "model_fp32_groups"):
            for group in getattr(inner, attr, None) or []:
                out += list(group)
        if not any(getattr(inner, a, None) for a in ("float16_groups", "model_float16_groups",
                                                      "model_fp32_groups")):
            out += [p for g in inner.optimizer.param_groups for p in g["params"]]
    return out


def optimizer_state_count(optimizer) -> int:
    return sum(len(inner.optimizer.state)
               for inner in getattr(optimizer, "chained_optimizers", [optimizer]))


def check(config: str, freeze: list[str], overrides: list[str]) -> dict:
    cfg = load_config(config, [*overrides, f"model.freeze={json.dumps(freeze)}"])
    cfg.train.run_dir = str(Path(cfg.train.run_dir) / (",".join(freeze) or "none"))
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        params = [(n.replace("module.", ""), p) for c in trainer.chunks
                  for n, p in c.named_parameters()]
        before = {n: p.detach().clone() for n, p in params}
        for _ in range(2):
            report = trainer.train_step()
            assert report["skipped"] == 0.0, report
        in_optimizer = {id(p) for p in optimizer_params(trainer.optimizer)}
        rows = {r.name.replace("module.", ""): (r.start, r.stop) for r in trainer.engine.freeze.rows}
        trainable = 0
        for name, p in params:
            if is_frozen(name, freeze):
                assert torch.equal(p, before[name]), f"{name} is frozen but changed"
                assert not p.requires_grad and not hasattr(p, "main_grad"), name
                assert id(p) not in in_optimizer, f"{name} is frozen but in the optimizer"
                continue
            trainable += 1
            # the distributed optimizer holds only the parameters with a shard on this rank
            assert id(p) in in_optimizer or cfg.parallel.use_distributed_optimizer, \
                f"{name} trains but is not in the optimizer"
            start, stop = rows.get(name, (0, 0))
            assert torch.equal(p[start:stop], before[name][start:stop]), \
                f"{name}: frozen text rows [{start}, {stop}) changed"
            changed = torch.ones(p.shape[0], dtype=torch.bool)
            changed[start:stop] = False
            # bf16 cannot show two small steps on a norm weight of 1.0
            small = cfg.train.precision == "bf16" and p.dim() == 1
            assert small or not torch.equal(p[changed], before[name][changed]), \
                f"{name} trains but did not change"
        if "text_rows" in freeze:
            assert rows or _tp_rank() > 0, "no frozen text rows on tensor-parallel rank 0"
            if cfg.train.precision == "fp32" and not cfg.parallel.use_distributed_optimizer:
                _check_no_weight_decay(trainer)
        states = optimizer_state_count(trainer.optimizer)
        if not cfg.parallel.use_distributed_optimizer:
            assert states == trainable, f"optimizer state for {states} params, {trainable} train"
        result = {"freeze": freeze, "rank": dist.get_rank(), "trainable_params": trainable,
                  "frozen_rows": rows, "optimizer_states": states, "loss": report["loss"]}
        # a file per rank: the ranks' stdout lines interleave under torchrun
        (trainer.run_dir / f"result.rank{dist.get_rank()}.json").write_text(json.dumps(result))
        return result
    finally:
        trainer.close()


def _tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def _check_no_weight_decay(trainer: Trainer) -> None:
    """fp32, regular optimizer: its param groups hold the model parameters themselves."""
    names = {id(p): n.replace("module.", "") for c in trainer.chunks
             for n, p in c.named_parameters()}
    seen = set()
    for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                if names.get(id(p)) in VOCAB_TABLES:
                    seen.add(names[id(p)])
                    assert group["weight_decay"] == 0.0, f"{names[id(p)]}: weight decay " \
                        f"{group['weight_decay']}"
    assert seen, "the vocabulary tables are not in the optimizer"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--freeze", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for value in args.freeze:
        result = check(args.config, [g for g in value.split(",") if g], args.overrides)
        print(f"OK {result['freeze']} rank {result['rank']}", flush=True)


if __name__ == "__main__":
    main()
