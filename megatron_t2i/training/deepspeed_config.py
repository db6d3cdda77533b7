"""DeepSpeed's JSON config, generated from the project's config (train.engine=deepspeed).

    ds = deepspeed_config(cfg, world_size=8, on_cuda=True)   # the dict deepspeed.initialize gets

Every setting the project's config owns is written from it: batch sizes and accumulation
(`train.*`), clipping (`optim.clip_grad`), precision (`train.precision`), ZeRO stage and
offload (`deepspeed.*`). A user JSON (`deepspeed.config_json`) adds what the project has no key
for (bucket sizes, overlap_comm, ...); where it sets a key the generated config also sets, the
values must agree, so the two can never silently disagree. The optimizer (torch AdamW with
megatron-core's parameter groups) and the LR schedule (megatron-core's) are the engine's own,
so the JSON may not bring "optimizer" or "scheduler" sections.

This module stays light (no torch, no deepspeed): `config.validate` calls it before any
process group starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_t2i.config import Config, ConfigError

# Which project key owns each generated DeepSpeed key (for the refusal messages).
_OWNERS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size x DP)",
    "gradient_clipping": "optim.clip_grad",
    "bf16.enabled": "train.precision",
    "communication_data_type": "train.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_force_ds_cpu_optimizer": "the engine's optimizer (torch AdamW)",
}
# The engine brings these itself.
_REFUSED_SECTIONS = {
    "optimizer": "the optimizer is torch AdamW with megatron-core's parameter groups; "
                 "set optim.* instead",
    "scheduler": "the LR schedule is megatron-core's OptimizerParamScheduler; "
                 "set optim.lr, optim.lr_warmup_iters, optim.lr_decay_style instead",
}
# Defaults the user JSON may change: the trainer logs every step itself.
_DEFAULTS = {"steps_per_print": 2**31 - 1}


def generated_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The keys the project's config owns. DP = world size (the engine runs TP = PP = 1)."""
    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * world_size)
    bf16 = t.precision == "bf16"
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            "offload_optimizer": {"device": "cpu" if cfg.deepspeed.offload_optimizer
                                  else "none"},
        },
        # a torch optimizer may run the offloaded step (DeepSpeedCPUAdam would JIT-compile)
        "zero_force_ds_cpu_optimizer": False,
    }
    if bf16:
        # as the megatron engine (grad_reduce_in_fp32): gradients are reduced in fp32
        ds["communication_data_type"] = "fp32"
    return ds


def deepspeed_config(cfg: Config, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """The generated config plus the user JSON's additions; refuses disagreements."""
    ds = _merge(dict(_DEFAULTS), generated_config(cfg, world_size), path="", source=None)
    user = read_user_json(cfg.deepspeed.config_json)
    if not user:
        return ds
    source = cfg.deepspeed.config_json
    for section, why in _REFUSED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"{source}: section {section!r} is not accepted: {why}")
    fp16 = user.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        if not on_cuda:
            raise ConfigError(f"{source}: fp16.enabled=true, but DeepSpeed cannot run fp16 on "
                              f"the CPU; use train.precision=bf16 or fp32")
        if cfg.train.precision != "fp32":
            raise ConfigError(f"{source}: fp16.enabled=true disagrees with "
                              f"train.precision={cfg.train.precision}")
    for key in [k for k, v in _DEFAULTS.items() if k in user]:
        ds[key] = user[key]
    return _merge(ds, {k: v for k, v in user.items() if k not in _DEFAULTS}, path="",
                  source=source)


def read_user_json(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_json: file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_json: {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.config_json: {path} must hold a JSON object")
    return raw


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str,
           source: str | None) -> dict[str, Any]:
    """base + extra; a leaf both set must be equal (source names the user JSON)."""
    out = dict(base)
    for key, value in extra.items():
        dotted = f"{path}{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, dotted + ".", source)
        elif out[key] != value and value != "auto":
            owner = _OWNERS.get(dotted, "the project's config")
            raise ConfigError(f"{source}: {dotted}={value!r} disagrees with the value "
                              f"{out[key]!r} generated from {owner}; remove it from the JSON")
    return out


def validate_deepspeed(cfg: Config, world_size: int) -> None:
    """Refuse what the DeepSpeed engine cannot run, naming the keys involved."""
    p, t = cfg.parallel, cfg.train
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(p, key) != 1:
            raise ConfigError(f"train.engine=deepspeed runs the model without tensor or "
                              f"pipeline parallelism (ZeRO shards over data parallel); got "
                              f"parallel.{key}={getattr(p, key)}: use train.engine=megatron "
                              f"for TP / PP")
    if p.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError("train.engine=deepspeed has no pipeline schedule: unset "
                          "parallel.virtual_pipeline_model_parallel_size")
    for key in ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
        if getattr(p, key):
            raise ConfigError(f"parallel.{key} belongs to the megatron engine; with "
                              f"train.engine=deepspeed, ZeRO shards the optimizer "
                              f"(deepspeed.zero_stage) and DeepSpeed overlaps communication "
                              f"(zero_optimization.overlap_comm in deepspeed.config_json)")
    if cfg.deepspeed.zero_stage not in (1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: expected 1, 2 "
                          f"or 3")
    if t.fp8 is not None:
        raise ConfigError("train.fp8 needs the megatron engine (Transformer Engine recipes); "
                          "unset it with train.engine=deepspeed")
    if t.nan_policy != "stop":
        raise ConfigError("train.nan_policy=skip needs the megatron engine: DeepSpeed applies "
                          "the update inside engine.step(); use train.nan_policy=stop")
    if not cfg.checkpoint.save_optimizer:
        raise ConfigError("checkpoint.save_optimizer=false cannot work with "
                          "train.engine=deepspeed: ZeRO checkpoints keep the model's fp32 "
                          "weights in the optimizer partitions")
    deepspeed_config(cfg, world_size, on_cuda=_on_cuda(cfg))


def _on_cuda(cfg: Config) -> bool:
    if cfg.train.device != "auto":
        return cfg.train.device == "cuda"
    import torch

    return torch.cuda.is_available()
