"""The megatron-core engine's checkpoint state (dist_checkpointing, torch_dist format): model,
optimizer, scheduler, RNG and the train state, written into a folder that
checkpoint/layout.py begins and publishes (folders, `latest`, meta.json live there).

Loading works under other TP / PP / DP sizes: dist_checkpointing reshards the model tensors.
The optimizer state is reloaded when the parallel layout is unchanged; after a change of
TP/PP only the non-distributed optimizer's state (whose tensors follow the model's keys)
can be resharded, so the distributed optimizer starts afresh there, with a warning. RNG states
are per (PP, TP) rank and are reloaded only on the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from megatron_t2i.checkpoint.layout import (
    CheckpointError,
    TrainState,
    check_core_format,
    parallel_layout,
    publish_checkpoint,
    read_meta,
)
from megatron_t2i.checkpoint.trust import check_before_load
from megatron_t2i.platform import megatron_core_0_17_or_later
from megatron_t2i.training.writer_guard import writers_die_with_rank
from megatron_t2i.vocab import VocabLayout

OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def rng_state() -> dict[str, Any]:
    """This rank's RNG states (torch, CUDA, megatron's tracker); see restore_rng."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _rng_sharded_object(is_loading: bool) -> ShardedObject:
    pp, tp = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank())
    state = None if is_loading else rng_state()
    return ShardedObject(
        "rng_state", state,
        (parallel_state.get_pipeline_model_parallel_world_size(),
         parallel_state.get_tensor_model_parallel_world_size()),
        (pp, tp), replica_id=parallel_state.get_data_parallel_rank())


def save_checkpoint(root: Path, state: TrainState, chunks: list[torch.nn.Module], optimizer,
                    scheduler, meta: dict[str, Any], save_optimizer: bool = True,
                    extras: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final folder. `extras`: more sharded
    state dicts by top-level key (the EMA weights, training/ema.py)."""
    def write(tmp: Path) -> dict[str, Any]:
        return write_sharded(tmp, state, chunks, optimizer, scheduler, save_optimizer, extras)

    return publish_checkpoint(root, state, meta, write)


def write_sharded(folder: Path, state: TrainState, chunks: list[torch.nn.Module], optimizer,
                  scheduler, save_optimizer: bool = True,
                  extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collective: model, optimizer, scheduler, RNG and train state into `folder` with
    dist_checkpointing; returns what meta.json records about it."""
    sharded = _save_state_dict(state, chunks, optimizer, scheduler, save_optimizer, extras)
    with writers_die_with_rank():  # no orphaned writer processes
        dist_checkpointing.save(sharded, str(folder), content_metadata=OPTIM_METADATA)
    return {"has_optimizer": save_optimizer}


def start_sharded(folder: Path, state: TrainState, chunks: list[torch.nn.Module], optimizer,
                  scheduler, save_optimizer: bool = True,
                  extras: dict[str, Any] | None = None) -> tuple[AsyncRequest, dict[str, Any]]:
    """Collective: the asynchronous form of write_sharded. The tensors are written by the
    returned request, which the caller schedules (training/async_save.py); the common part and
    the sharded objects now on 0.16 (common.pt), by the request on 0.17+ (inside the torch_dist
    files). Returns it and what meta.json records."""
    sharded = _save_state_dict(state, chunks, optimizer, scheduler, save_optimizer, extras)
    # 0.17+ default to NVIDIA Resiliency Extension's writer (`async_strategy="nvrx"`), a package
    # this project does not depend on: without it every asynchronous save failed
    # (ModuleNotFoundError). megatron-core's own writer, the only one on 0.16, is the one
    # training/async_save.py schedules and tests.
    writer = {"async_strategy": "mcore"} if megatron_core_0_17_or_later() else {}
    with writers_die_with_rank():  # its results-queue Manager starts here: ours, guarded
        request = dist_checkpointing.save(sharded, str(folder),
                                          content_metadata=OPTIM_METADATA,
                                          async_sharded_save=True, **writer)
    return request, {"has_optimizer": save_optimizer}


def _save_state_dict(state: TrainState, chunks: list[torch.nn.Module], optimizer, scheduler,
                     save_optimizer: bool, extras: dict[str, Any] | None) -> dict[str, Any]:
    sharded = model_sharded_state_dict(chunks)
    if save_optimizer:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False,
                                                            metadata=OPTIM_METADATA)
    sharded.update(extras or {})  # after: the optimizer maps its state to the model's keys
    sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded["rng_state"] = _rng_sharded_object(is_loading=False)
    sharded["iteration"] = state.iteration
    sharded["consumed_samples"] = state.consumed_samples
    return sharded


def load_checkpoint(folder: Path, chunks: list[torch.nn.Module], optimizer, scheduler,
                    layout: VocabLayout, padded_vocab_size: int, load_optimizer: bool = True,
                    verify: bool = True, extras: dict[str, Any] | None = None,
                    ) -> tuple[TrainState, dict[str, Any]]:
    """Load model (resharded as needed), optimizer, scheduler, RNG and the train state.
    `extras` (sharded state dicts by top-level key, as saved) are replaced in place by the
    loaded values."""
    meta = check_checkpoint(folder, layout, padded_vocab_size, verify)
    return load_sharded(folder, meta, chunks, optimizer, scheduler, load_optimizer,
                        extras), meta


def check_checkpoint(folder: Path, layout: VocabLayout, padded_vocab_size: int,
                     verify: bool = True, engine: str = "megatron") -> dict[str, Any]:
    """Before anything is loaded: the files whole and every pickle safe (checkpoint/trust.py;
    DeepSpeed's folders hold no DCP metadata), written by this engine, for this vocabulary.
    Returns meta.json."""
    check_before_load(folder, verify, dcp=engine == "megatron")
    meta = read_meta(folder)
    check_engine(folder, meta, engine)
    if engine == "megatron":
        check_core_format(folder)
    check_vocab(folder, meta, layout, padded_vocab_size)
    return meta


def load_sharded(folder: Path, meta: dict[str, Any], chunks: list[torch.nn.Module], optimizer,
                 scheduler, load_optimizer: bool = True,
                 extras: dict[str, Any] | None = None) -> TrainState:
    """The loading half of load_checkpoint, for a folder check_checkpoint passed."""
    same_layout = _same_parallel_layout(meta.get("parallel", {}))
    sharded = model_sharded_state_dict(chunks)
    with_optimizer = load_optimizer and meta.get("has_optimizer", False)
    if with_optimizer and not same_layout and _uses_distributed_optimizer(optimizer):
        if dist.get_rank() == 0:
            print(f"[checkpoint] {folder}: the parallel layout changed "
                  f"({meta['parallel']} -> {parallel_layout()}); the distributed optimizer's "
                  f"state is not reshardable across TP/PP, so it starts afresh", flush=True)
        with_optimizer = False
    if with_optimizer:
        _init_optimizer_states(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                            metadata=OPTIM_METADATA)
    if same_layout:
        sharded["rng_state"] = _rng_sharded_object(is_loading=True)
    sharded.update(extras or {})
    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded, str(folder))
    _apply_model(chunks, loaded)
    for key in extras or {}:
        extras[key] = loaded[key]
    if with_optimizer:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    if "opt_param_scheduler" in loaded:  # absent from imported checkpoints (tools/): fresh
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        restore_rng(loaded["rng_state"])
    return TrainState(int(loaded["iteration"]), int(loaded["consumed_samples"]))


def load_model_weights(folder: Path, chunks: list[torch.nn.Module], layout: VocabLayout,
                       padded_vocab_size: int, verify: bool = True) -> None:
    """Only the model tensors (resharded to this run's TP/PP), e.g. a pretrained init."""
    check_checkpoint(folder, layout, padded_vocab_size, verify)
    with torch.no_grad():
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(folder))
    _apply_model(chunks, loaded)


def _apply_model(chunks: list[torch.nn.Module], loaded: dict[str, Any]) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"])


def check_engine(folder: Path, meta: dict[str, Any], engine: str) -> None:
    """Megatron (dist_checkpointing) and DeepSpeed (ZeRO) checkpoints are different formats."""
    saved = meta.get("engine", "megatron")
    if saved != engine:
        raise CheckpointError(f"checkpoint {folder} was written by the {saved} engine; only "
                              f"a {engine}-engine checkpoint can be read here (the formats "
                              f"differ: check train.engine)")


def check_vocab(folder: Path, meta: dict[str, Any], layout: VocabLayout, padded: int) -> None:
    saved = VocabLayout.from_dict(meta["vocab"])
    layout.check_matches(saved, mine="the training data and config",
                         theirs=f"checkpoint {folder}")
    if meta["padded_vocab_size"] != padded:
        raise CheckpointError(
            f"checkpoint {folder} has a padded vocabulary of {meta['padded_vocab_size']} rows, "
            f"this run expects {padded}")


# What must agree between a checkpoint and the run that loads its weights: shapes (layers,
# widths, heads, groups, vocabulary tables, tying) and the function (norm, activation,
# positions, biases). A differing key is named with the override that makes the run match.
ARCHITECTURE_KEYS = ("untie_embeddings_and_output_weights", "num_layers", "hidden_size",
                     "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "normalization", "activation", "position_embedding_type", "rotary_base",
                     "add_bias_linear", "qk_layernorm")


def _architecture(model: dict[str, Any]) -> dict[str, Any]:
    from megatron_t2i.config import ModelConfig

    known = {f for f in ModelConfig.__dataclass_fields__}
    mc = ModelConfig(**{k: v for k, v in model.items() if k in known})
    out = {k: getattr(mc, k) for k in ARCHITECTURE_KEYS}
    out["num_query_groups"] = mc.num_query_groups or mc.num_attention_heads
    out["ffn_hidden_size"] = mc.resolved_ffn_hidden_size
    return out


def check_architecture(folder: Path, meta: dict[str, Any], model_cfg: Any) -> None:
    """Refuse, in one line naming each differing key and its fix, a checkpoint whose model is
    not the one this run builds (e.g. a tied checkpoint given to an untied run)."""
    import dataclasses

    saved = _architecture(meta.get("config", {}).get("model", {}))
    mine = _architecture(dataclasses.asdict(model_cfg))
    diffs = [k for k in ARCHITECTURE_KEYS if saved[k] != mine[k]]
    if diffs:
        fix = " ".join(f"model.{k}={json.dumps(saved[k])}" for k in diffs)
        raise CheckpointError(
            f"checkpoint {folder} has another architecture than this run: "
            + "; ".join(f"model.{k} is {json.dumps(saved[k])} there, {json.dumps(mine[k])} "
                        f"here" for k in diffs) + f" (to load it, set {fix})")


def _same_parallel_layout(saved: dict[str, int]) -> bool:
    now = parallel_layout()
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size")
    return all(saved.get(k) == now[k] for k in keys)


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _init_optimizer_states(optimizer) -> None:
    """dist_checkpointing needs the optimizer's state tensors to exist before a load."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()
        elif hasattr(inner, "init_state_fn") and inner.init_state_fn is not None:
            inner.init_state_fn(inner.optimizer, inner.config)


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
